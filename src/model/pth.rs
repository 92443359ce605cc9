//! Reads PyTorch checkpoints (`torch.save` files) without PyTorch and without running any code.
//!
//! `torch.save` has two container formats:
//! * **legacy** (torch < 1.6, or `_use_new_zipfile_serialization=False`): five pickles in a row
//!   (magic number, protocol version 1001, `sys_info`, the saved object, the list of storage
//!   keys), then for each listed key an 8-byte little-endian element count and the raw data;
//! * **zip** (torch >= 1.6): `<prefix>/data.pkl` holds the object and `<prefix>/data/<key>`
//!   the raw bytes of each storage, stored uncompressed; `<prefix>/byteorder` says `little`.
//!
//! In both the object pickle names storages by persistent ids
//! `('storage', <storage class>, key, location, numel[, view])` and builds each tensor with
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
//!
//! The unpickler here is restricted: it knows the opcodes torch emits (protocols 2 to 5) and a
//! short allow-list of globals, which it interprets itself; any other global is refused by name.
//! Objects live in a flat arena, so deep nesting cannot overflow the stack. Every size read from
//! the file is checked against the bytes actually present before it is used, and the tensors
//! returned may take at most 8 bytes (f32 data and names) per byte of the file, which bounds
//! the memory even for overlapping views (a stride-0 view can describe terabytes).
//!
//! Not supported: compressed zip entries, big-endian files, the tar format of early torch
//! versions, tensor subclasses (`_rebuild_from_type_v2`), and any global outside the allow-list.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use crate::{Error, Result};

/// One tensor of a checkpoint, converted to f32, row-major (contiguous) in `shape` order.
pub use super::weights::NamedTensor as PthTensor;

/// Reads every tensor of a PyTorch checkpoint at `path`.
///
/// The saved object must be a dict (a state dict, or a training checkpoint whose `state_dict`
/// entry is one); its tensor values are returned in the dict's order under their keys, and
/// everything else (epoch, optimizer state, ...) is skipped.
pub fn read_pth(path: &Path) -> Result<Vec<PthTensor>> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: shown.clone(), source })?;
    parse_pth(&bytes, &shown)
}

/// The same from bytes already in memory (`path` only names the source in errors).
pub fn parse_pth(bytes: &[u8], path: &str) -> Result<Vec<PthTensor>> {
    let checkpoint =
        if bytes.starts_with(&ZIP_LOCAL) { zip_checkpoint(bytes) } else { legacy_checkpoint(bytes) };
    checkpoint
        .and_then(|checkpoint| checkpoint.tensors(bytes.len()))
        .map_err(|what| Error::Format { path: path.to_string(), what })
}

/// Internal results carry only the message; `parse_pth` adds the path.
type Parse<T> = std::result::Result<T, String>;

fn bad<T>(what: impl Into<String>) -> Parse<T> {
    Err(what.into())
}

/// The legacy format's first pickle, and its protocol version (torch/serialization.py).
const LEGACY_MAGIC: i128 = 0x1950_a86a_20f9_469c_fc6c;
const LEGACY_PROTOCOL: i128 = 1001;
/// Newest pickle protocol (Python 3.8+).
const HIGHEST_PROTOCOL: u8 = 5;
/// Tensors of higher rank are refused, which also caps what one REDUCE can allocate.
const MAX_RANK: usize = 64;
/// Storage keys are short ("0", "94293653646352"); the cap keeps hashing them cheap.
const MAX_KEY_BYTES: usize = 256;
/// Budget for the tensors returned (f32 data plus names), per byte of the file.
const OUTPUT_BYTES_PER_FILE_BYTE: usize = 8;

// ---------------------------------------------------------------------------------------------
// Element types

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

/// The storage classes torch pickles (`torch.<name>`) and their element types.
const STORAGE_CLASSES: [(&str, DType); 10] = [
    ("DoubleStorage", DType::F64),
    ("FloatStorage", DType::F32),
    ("HalfStorage", DType::F16),
    ("BFloat16Storage", DType::BF16),
    ("LongStorage", DType::I64),
    ("IntStorage", DType::I32),
    ("ShortStorage", DType::I16),
    ("CharStorage", DType::I8),
    ("ByteStorage", DType::U8),
    ("BoolStorage", DType::Bool),
];

impl DType {
    fn from_class(name: &str) -> Option<DType> {
        STORAGE_CLASSES.iter().find(|(class, _)| *class == name).map(|&(_, dtype)| dtype)
    }

    fn class(self) -> &'static str {
        STORAGE_CLASSES.iter().find(|(_, dtype)| *dtype == self).map_or("?", |(class, _)| class)
    }

    fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Converts one little-endian element; `b` holds exactly `self.size()` bytes.
    fn decode(self, b: &[u8]) -> f32 {
        match self {
            DType::F64 => f64::from_le_bytes(le(b)) as f32,
            DType::F32 => f32::from_le_bytes(le(b)),
            DType::F16 => f16_to_f32(u16::from_le_bytes(le(b))),
            // bfloat16 is the upper half of an f32.
            DType::BF16 => f32::from_bits(u32::from(u16::from_le_bytes(le(b))) << 16),
            DType::I64 => i64::from_le_bytes(le(b)) as f32,
            DType::I32 => i32::from_le_bytes(le(b)) as f32,
            DType::I16 => f32::from(i16::from_le_bytes(le(b))),
            DType::I8 => f32::from(i8::from_le_bytes(le(b))),
            DType::U8 => f32::from(b[0]),
            DType::Bool => f32::from(u8::from(b[0] != 0)),
        }
    }
}

fn le<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut bytes = [0; N];
    bytes.copy_from_slice(b);
    bytes
}

/// Exact IEEE half to single conversion (every f16 value is representable as f32).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    match exponent {
        0 => {
            // Zero or subnormal: mantissa * 2^-24, exact in f32.
            let magnitude = mantissa as f32 * f32::from_bits(0x3380_0000);
            if sign == 0 {
                magnitude
            } else {
                -magnitude
            }
        }
        // Infinity or NaN; the NaN payload moves to the top of the f32 mantissa.
        31 => f32::from_bits(sign | 0x7f80_0000 | mantissa << 13),
        // Normal: rebias the exponent from 15 to 127.
        _ => f32::from_bits(sign | (exponent + 112) << 23 | mantissa << 13),
    }
}

// ---------------------------------------------------------------------------------------------
// Byte cursor

/// Bounds-checked reads from a byte slice; every read past the end is an error.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn at(bytes: &'a [u8], pos: usize) -> Self {
        Cursor { bytes, pos }
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    fn take(&mut self, n: usize) -> Parse<&'a [u8]> {
        let taken = self.rest().get(..n).ok_or_else(|| {
            format!("truncated: {n} bytes needed at offset {}, only {} left", self.pos, self.rest().len())
        })?;
        self.pos += n;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Parse<[u8; N]> {
        self.take(N).map(le)
    }

    fn u8(&mut self) -> Parse<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Parse<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Parse<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Parse<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A `\n`-terminated UTF-8 line (the operands of GLOBAL), without the newline.
    fn line(&mut self) -> Parse<&'a str> {
        let len = self.rest().iter().position(|&b| b == b'\n').ok_or("unterminated GLOBAL operand")?;
        let line = self.take(len)?;
        self.take(1)?;
        std::str::from_utf8(line).map_err(|_| "GLOBAL operand is not UTF-8".to_string())
    }
}

/// A length or count from the file as usize (negative or too large is an error).
fn to_len<T: TryInto<usize> + Copy + std::fmt::Display>(n: T) -> Parse<usize> {
    n.try_into().map_err(|_| format!("invalid length {n}"))
}

// ---------------------------------------------------------------------------------------------
// Unpickled values

/// A pickled value. Containers live in [`Heap`] and are shared by id, as Python shares them.
#[derive(Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    /// Python ints up to 128 bits (the legacy magic number needs 80).
    Int(i128),
    /// A float; no field the reader looks at is one, so its value is dropped.
    Float,
    Str(Rc<str>),
    Global(Global),
    /// An index into [`Storages::views`].
    Storage(usize),
    /// An index into [`Heap`].
    Obj(usize),
}

impl Value {
    /// What the value is, for error messages (long strings cut short).
    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(n) => format!("int {n}"),
            Value::Float => "a float".into(),
            Value::Str(s) if s.chars().count() > 40 => {
                format!("string {:?}...", s.chars().take(40).collect::<String>())
            }
            Value::Str(s) => format!("string {s:?}"),
            Value::Global(global) => format!("`{}`", global.name()),
            Value::Storage(_) => "a storage".into(),
            Value::Obj(_) => "a container".into(),
        }
    }
}

enum Obj {
    /// A tuple or a list: nothing here depends on the difference.
    Seq(Vec<Value>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Vec<(Value, Value)>),
    Tensor(TensorView),
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage, in elements.
struct TensorView {
    storage: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Every container the pickle builds, addressed by [`Value::Obj`] ids. Flat on purpose: the memo
/// lets objects share children or contain themselves, and dropping a flat arena needs no
/// recursion however deep the nesting.
#[derive(Default)]
struct Heap(Vec<Obj>);

impl Heap {
    fn alloc(&mut self, obj: Obj) -> Value {
        self.0.push(obj);
        Value::Obj(self.0.len() - 1)
    }

    fn get(&self, value: &Value) -> Option<&Obj> {
        match value {
            Value::Obj(id) => self.0.get(*id),
            _ => None,
        }
    }

    fn get_mut(&mut self, value: &Value) -> Option<&mut Obj> {
        match value {
            Value::Obj(id) => self.0.get_mut(*id),
            _ => None,
        }
    }

    fn seq(&self, value: &Value) -> Option<&[Value]> {
        match self.get(value)? {
            Obj::Seq(items) => Some(items),
            _ => None,
        }
    }

    fn dict(&self, value: &Value) -> Option<&[(Value, Value)]> {
        match self.get(value)? {
            Obj::Dict(entries) => Some(entries),
            _ => None,
        }
    }

    fn tensor(&self, value: &Value) -> Option<&TensorView> {
        match self.get(value)? {
            Obj::Tensor(view) => Some(view),
            _ => None,
        }
    }

    /// `dict[key]` for a string key; the last entry wins, as when Python builds the dict.
    fn dict_get(&self, dict: &Value, key: &str) -> Option<&Value> {
        let entries = self.dict(dict)?;
        entries.iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if &**s == key)).map(|(_, v)| v)
    }

    /// A tuple of non-negative ints (a tensor's size or stride).
    fn usizes(&self, value: &Value, what: &str) -> Parse<Vec<usize>> {
        let items = self.seq(value).ok_or_else(|| format!("{what} is not a tuple"))?;
        if items.len() > MAX_RANK {
            return bad(format!("{what} has {} dimensions, more than {MAX_RANK}", items.len()));
        }
        items.iter().map(|item| to_usize(item, what)).collect()
    }
}

fn to_usize(value: &Value, what: &str) -> Parse<usize> {
    match value {
        Value::Int(n) => to_len(*n),
        other => bad(format!("{what}: expected an int, got {}", other.describe())),
    }
}

// ---------------------------------------------------------------------------------------------
// Storages

/// A storage as its persistent id declares it; its bytes are bound after unpickling.
struct Root {
    key: Rc<str>,
    dtype: DType,
    numel: usize,
}

impl Root {
    fn byte_len(&self) -> Parse<usize> {
        self.numel
            .checked_mul(self.dtype.size())
            .ok_or_else(|| format!("storage `{}` of {} elements is too large", self.key, self.numel))
    }
}

/// A range of a root storage (legacy storage views; the whole root otherwise), in elements.
struct StorageView {
    root: usize,
    offset: usize,
    len: usize,
}

#[derive(Default)]
struct Storages {
    roots: Vec<Root>,
    by_key: HashMap<Rc<str>, usize>,
    views: Vec<StorageView>,
}

impl Storages {
    /// The root with `key`, declared on first sight; later ids must agree with the first.
    fn root(&mut self, key: &Rc<str>, dtype: DType, numel: usize) -> Parse<usize> {
        if let Some(&id) = self.by_key.get(key) {
            let root = &self.roots[id];
            if root.dtype != dtype || root.numel != numel {
                return bad(format!(
                    "storage `{key}` is declared both as {} elements of {} and as {numel} of {}",
                    root.numel,
                    root.dtype.class(),
                    dtype.class()
                ));
            }
            return Ok(id);
        }
        self.roots.push(Root { key: key.clone(), dtype, numel });
        self.by_key.insert(key.clone(), self.roots.len() - 1);
        Ok(self.roots.len() - 1)
    }

    fn view(&mut self, root: usize, offset: usize, len: usize) -> Parse<usize> {
        let numel = self.roots[root].numel;
        if offset.checked_add(len).is_none_or(|end| end > numel) {
            return bad(format!("storage view {offset}+{len} lies outside its storage of {numel} elements"));
        }
        self.views.push(StorageView { root, offset, len });
        Ok(self.views.len() - 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Restricted unpickler

/// The globals a state dict needs. They are interpreted here; nothing is imported or called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    Storage(DType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Parse<Global> {
        let global = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", class) => match DType::from_class(class) {
                Some(dtype) => Global::Storage(dtype),
                None => return refuse(module, name),
            },
            _ => return refuse(module, name),
        };
        Ok(global)
    }

    fn name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::Storage(dtype) => format!("torch.{}", dtype.class()),
        }
    }
}

fn refuse<T>(module: &str, name: &str) -> Parse<T> {
    bad(format!(
        "refusing to load global `{}.{}`: only the globals of plain tensors and state dicts are allowed",
        module.escape_debug(),
        name.escape_debug()
    ))
}

/// Pickle opcodes, named as in CPython's `Lib/pickle.py`.
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const EMPTY_LIST: u8 = b']';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// Objects outlive one pickle (the legacy format's key list names storages of the object
/// before it); stack, marks and memo are per pickle.
#[derive(Default)]
struct Unpickler {
    heap: Heap,
    storages: Storages,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Items that REDUCE may still copy (Python 2's `OrderedDict(items)`), so a memoized list
    /// reduced over and over cannot multiply memory: at most one per byte of the pickle.
    copy_budget: usize,
}

impl Unpickler {
    /// Runs one pickle from `cur` up to its STOP and returns the object it built.
    fn load(&mut self, cur: &mut Cursor) -> Parse<Value> {
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        self.copy_budget = cur.rest().len();
        loop {
            let at = cur.pos;
            let op = cur.u8()?;
            if op == op::STOP {
                return self.pop();
            }
            self.step(op, cur).map_err(|e| format!("{e} (pickle opcode 0x{op:02x} at byte {at})"))?;
        }
    }

    fn step(&mut self, op: u8, cur: &mut Cursor) -> Parse<()> {
        match op {
            op::PROTO => match cur.u8()? {
                version if version <= HIGHEST_PROTOCOL => Ok(()),
                version => bad(format!("unsupported pickle protocol {version}")),
            },
            // Frames only group bytes for buffered reading; the opcodes inside are plain.
            op::FRAME => cur.take(8).map(drop),
            op::MARK => {
                self.marks.push(self.stack.len());
                Ok(())
            }
            op::POP => self.pop_any(),
            op::POP_MARK => self.pop_mark().map(drop),
            op::NONE => self.push(Value::None),
            op::NEWTRUE => self.push(Value::Bool(true)),
            op::NEWFALSE => self.push(Value::Bool(false)),
            op::BININT => self.push(Value::Int(i32::from_le_bytes(cur.array()?).into())),
            op::BININT1 => self.push(Value::Int(cur.u8()?.into())),
            op::BININT2 => self.push(Value::Int(cur.u16()?.into())),
            op::LONG1 => {
                let len = cur.u8()?;
                self.push(Value::Int(long(cur.take(len.into())?)?))
            }
            op::BINFLOAT => cur.take(8).and_then(|_| self.push(Value::Float)),
            op::SHORT_BINUNICODE | op::SHORT_BINSTRING => {
                let len = cur.u8()?;
                self.push_str(cur.take(len.into())?)
            }
            op::BINUNICODE => {
                let len = to_len(cur.u32()?)?;
                self.push_str(cur.take(len)?)
            }
            op::BINSTRING => {
                let len = to_len(i32::from_le_bytes(cur.array()?))?;
                self.push_str(cur.take(len)?)
            }
            op::BINUNICODE8 => {
                let len = to_len(cur.u64()?)?;
                self.push_str(cur.take(len)?)
            }
            op::EMPTY_TUPLE | op::EMPTY_LIST => self.push_new(Obj::Seq(Vec::new())),
            op::EMPTY_DICT => self.push_new(Obj::Dict(Vec::new())),
            op::TUPLE => {
                let items = self.pop_mark()?;
                self.push_new(Obj::Seq(items))
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let items = self.pop_n(usize::from(op - op::TUPLE1 + 1))?;
                self.push_new(Obj::Seq(items))
            }
            op::APPEND => {
                let item = self.pop()?;
                self.extend_list(vec![item])
            }
            op::APPENDS => {
                let items = self.pop_mark()?;
                self.extend_list(items)
            }
            op::SETITEM => {
                let items = self.pop_n(2)?;
                self.extend_dict(items)
            }
            op::SETITEMS => {
                let items = self.pop_mark()?;
                self.extend_dict(items)
            }
            op::BINPUT => {
                let index = cur.u8()?;
                self.memo_put(index.into())
            }
            op::LONG_BINPUT => {
                let index = cur.u32()?;
                self.memo_put(index)
            }
            op::MEMOIZE => {
                let index = u32::try_from(self.memo.len()).map_err(|_| "memo is full".to_string())?;
                self.memo_put(index)
            }
            op::BINGET => {
                let index = cur.u8()?;
                self.memo_get(index.into())
            }
            op::LONG_BINGET => {
                let index = cur.u32()?;
                self.memo_get(index)
            }
            op::GLOBAL => {
                let module = cur.line()?;
                let name = cur.line()?;
                self.push(Value::Global(Global::resolve(module, name)?))
            }
            op::STACK_GLOBAL => {
                let name = self.pop_str()?;
                let module = self.pop_str()?;
                self.push(Value::Global(Global::resolve(&module, &name)?))
            }
            op::REDUCE => {
                let args = self.pop()?;
                let func = self.pop()?;
                let result = self.reduce(&func, &args)?;
                self.push(result)
            }
            op::NEWOBJ => {
                self.pop()?;
                match self.pop()? {
                    // `OrderedDict.__new__` ignores its arguments.
                    Value::Global(Global::OrderedDict) => self.push_new(Obj::Dict(Vec::new())),
                    other => bad(format!("NEWOBJ of {} is not supported", other.describe())),
                }
            }
            op::BUILD => {
                // The state (an OrderedDict's `_metadata`, say) only sets attributes: dropped.
                self.pop()?;
                self.top().map(drop)
            }
            op::BINPERSID => {
                let pid = self.pop()?;
                let storage = self.persistent_load(&pid)?;
                self.push(storage)
            }
            _ => bad(format!("unsupported pickle opcode 0x{op:02x}")),
        }
    }

    fn push(&mut self, value: Value) -> Parse<()> {
        self.stack.push(value);
        Ok(())
    }

    fn push_new(&mut self, obj: Obj) -> Parse<()> {
        let value = self.heap.alloc(obj);
        self.push(value)
    }

    fn push_str(&mut self, bytes: &[u8]) -> Parse<()> {
        // torch.load decodes Python 2 byte strings as UTF-8 too.
        let text = std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8".to_string())?;
        self.push(Value::Str(text.into()))
    }

    /// Stack length at the innermost MARK: values below it belong to an enclosing frame.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Parse<Value> {
        if self.stack.len() <= self.floor() {
            return bad("pickle stack underflow");
        }
        self.stack.pop().ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_n(&mut self, n: usize) -> Parse<Vec<Value>> {
        match self.stack.len().checked_sub(n) {
            Some(start) if start >= self.floor() => Ok(self.stack.split_off(start)),
            _ => bad("pickle stack underflow"),
        }
    }

    /// POP: drops the top value, or the innermost mark when its frame is empty (as CPython).
    fn pop_any(&mut self) -> Parse<()> {
        if self.stack.len() > self.floor() {
            self.pop().map(drop)
        } else {
            self.pop_mark().map(drop)
        }
    }

    fn pop_mark(&mut self) -> Parse<Vec<Value>> {
        let mark = self.marks.pop().ok_or("MARK missing")?;
        Ok(self.stack.split_off(mark))
    }

    fn pop_str(&mut self) -> Parse<Rc<str>> {
        match self.pop()? {
            Value::Str(s) => Ok(s),
            other => bad(format!("expected a string, got {}", other.describe())),
        }
    }

    fn top(&self) -> Parse<&Value> {
        match self.stack.last() {
            Some(value) if self.stack.len() > self.floor() => Ok(value),
            _ => bad("pickle stack underflow"),
        }
    }

    fn memo_put(&mut self, index: u32) -> Parse<()> {
        let value = self.top()?.clone();
        self.memo.insert(index, value);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Parse<()> {
        let value = self.memo.get(&index).ok_or_else(|| format!("memo entry {index} missing"))?.clone();
        self.push(value)
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Parse<()> {
        let target = self.top()?.clone();
        match self.heap.get_mut(&target) {
            Some(Obj::Seq(list)) => {
                list.extend(items);
                Ok(())
            }
            _ => bad("APPEND to something that is not a list"),
        }
    }

    /// SETITEM(S): `items` alternates keys and values.
    fn extend_dict(&mut self, items: Vec<Value>) -> Parse<()> {
        if items.len() % 2 != 0 {
            return bad("SETITEMS with a key but no value");
        }
        let target = self.top()?.clone();
        let Some(Obj::Dict(dict)) = self.heap.get_mut(&target) else {
            return bad("SETITEM on something that is not a dict");
        };
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            dict.push((key, value));
        }
        Ok(())
    }

    /// REDUCE: calls an allowed global, interpreted here.
    fn reduce(&mut self, func: &Value, args: &Value) -> Parse<Value> {
        let &Value::Global(global) = func else {
            return bad(format!("REDUCE of {}, which is not an allowed global", func.describe()));
        };
        let args = self.heap.seq(args).ok_or("REDUCE arguments are not a tuple")?;
        let obj = match (global, args) {
            (Global::OrderedDict, []) => Obj::Dict(Vec::new()),
            // Python 2 pickles an OrderedDict as `OrderedDict([[key, value], ...])`.
            (Global::OrderedDict, [items]) => Obj::Dict(pairs(&self.heap, items, &mut self.copy_budget)?),
            (
                Global::RebuildTensorV2,
                [storage, offset, size, stride, _, _] | [storage, offset, size, stride, _, _, _],
            )
            | (Global::RebuildTensor, [storage, offset, size, stride]) => {
                Obj::Tensor(self.tensor_view(storage, offset, size, stride)?)
            }
            // A Parameter is its data tensor here (requires_grad and hooks do not matter).
            (Global::RebuildParameter, [data, _, _]) if self.heap.tensor(data).is_some() => {
                return Ok(data.clone())
            }
            _ => {
                return bad(format!("unsupported call of `{}` with {} arguments", global.name(), args.len()))
            }
        };
        Ok(self.heap.alloc(obj))
    }

    fn tensor_view(
        &self,
        storage: &Value,
        offset: &Value,
        size: &Value,
        stride: &Value,
    ) -> Parse<TensorView> {
        let &Value::Storage(storage) = storage else {
            return bad(format!("tensor storage is {}, not a persistent storage", storage.describe()));
        };
        let offset = to_usize(offset, "tensor storage offset")?;
        let shape = self.heap.usizes(size, "tensor size")?;
        let stride = self.heap.usizes(stride, "tensor stride")?;
        if shape.len() != stride.len() {
            return bad(format!("tensor size {shape:?} and stride {stride:?} differ in rank"));
        }
        Ok(TensorView { storage, offset, shape, stride })
    }

    /// BINPERSID: `('storage', class, key, location, numel[, view])`, where a legacy `view` is
    /// `None` or `(view_key, offset, numel)` within the root storage.
    fn persistent_load(&mut self, pid: &Value) -> Parse<Value> {
        let items = self.heap.seq(pid).ok_or("persistent id is not a tuple")?;
        let [Value::Str(tag), class, Value::Str(key), _location, numel, view @ ..] = items else {
            return bad("persistent id is not ('storage', class, key, location, numel[, view])");
        };
        if &**tag != "storage" {
            return bad(format!("unsupported persistent id of type `{}`", tag.escape_debug()));
        }
        let &Value::Global(Global::Storage(dtype)) = class else {
            return bad(format!("persistent id names {}, not a storage class", class.describe()));
        };
        if key.len() > MAX_KEY_BYTES {
            return bad(format!("storage key of {} bytes is longer than {MAX_KEY_BYTES}", key.len()));
        }
        let numel = to_usize(numel, "storage size")?;
        let (offset, len) = match view {
            [] | [Value::None] => (0, numel),
            [view] => match self.heap.seq(view) {
                Some([_, offset, len]) => (to_usize(offset, "view offset")?, to_usize(len, "view size")?),
                _ => return bad("storage view is not (key, offset, size)"),
            },
            _ => return bad("persistent id has too many fields"),
        };
        let root = self.storages.root(key, dtype, numel)?;
        Ok(Value::Storage(self.storages.view(root, offset, len)?))
    }
}

/// Two's-complement little-endian integer of LONG1.
fn long(bytes: &[u8]) -> Parse<i128> {
    if bytes.len() > 16 {
        return bad(format!("integer of {} bytes is wider than 128 bits", bytes.len()));
    }
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut wide = [if negative { 0xff } else { 0 }; 16];
    wide[..bytes.len()].copy_from_slice(bytes);
    Ok(i128::from_le_bytes(wide))
}

/// The `[[key, value], ...]` argument of a Python 2 OrderedDict, charged to `budget`.
fn pairs(heap: &Heap, items: &Value, budget: &mut usize) -> Parse<Vec<(Value, Value)>> {
    let items = heap.seq(items).ok_or("OrderedDict argument is not a list")?;
    *budget = budget.checked_sub(items.len()).ok_or("the pickle copies more items than its size allows")?;
    items
        .iter()
        .map(|pair| match heap.seq(pair) {
            Some([key, value]) => Ok((key.clone(), value.clone())),
            _ => bad("OrderedDict item is not a (key, value) pair"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Checkpoint: the object and the bytes of its storages

struct Checkpoint<'a> {
    objects: Unpickler,
    root: Value,
    /// The bytes of each root storage (`objects.storages.roots[i]`), exactly its length.
    data: Vec<&'a [u8]>,
}

impl Checkpoint<'_> {
    /// The tensors of the state dict, in its order; `file_len` sets the output budget.
    fn tensors(&self, file_len: usize) -> Parse<Vec<PthTensor>> {
        let heap = &self.objects.heap;
        if heap.dict(&self.root).is_none() {
            return bad("the saved object is not a dict, so it holds no state dict");
        }
        let state = match heap.dict_get(&self.root, "state_dict") {
            Some(inner) if heap.dict(inner).is_some() => inner,
            _ => &self.root,
        };
        let mut budget = file_len.saturating_mul(OUTPUT_BYTES_PER_FILE_BYTE);
        let mut out: Vec<PthTensor> = Vec::new();
        let mut index: HashMap<Rc<str>, usize> = HashMap::new();
        for (key, value) in heap.dict(state).unwrap_or_default() {
            let (Value::Str(name), Some(view)) = (key, heap.tensor(value)) else { continue };
            let tensor = self.tensor(name, view, &mut budget).map_err(|e| format!("tensor `{name}`: {e}"))?;
            // A repeated key (only a crafted pickle has one) keeps its first place and last tensor.
            match index.get(name) {
                Some(&i) => out[i] = tensor,
                None => {
                    index.insert(name.clone(), out.len());
                    out.push(tensor);
                }
            }
        }
        if out.is_empty() {
            return bad("the checkpoint holds no tensors");
        }
        Ok(out)
    }

    fn tensor(&self, name: &str, view: &TensorView, budget: &mut usize) -> Parse<PthTensor> {
        let numel = view.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or("size overflows")?;
        let cost = numel.checked_mul(4).and_then(|bytes| bytes.checked_add(name.len()));
        *budget = cost.and_then(|cost| budget.checked_sub(cost)).ok_or_else(|| {
            format!(
                "{numel} elements exceed the output limit of {OUTPUT_BYTES_PER_FILE_BYTE} bytes per file byte \
                 (an expanded or overlapping view?)"
            )
        })?;
        Ok(PthTensor { name: name.to_string(), shape: view.shape.clone(), data: self.gather(view, numel)? })
    }

    /// Reads the view's elements in row-major order and converts them to f32.
    fn gather(&self, view: &TensorView, numel: usize) -> Parse<Vec<f32>> {
        let storages = &self.objects.storages;
        let range = &storages.views[view.storage];
        let dtype = storages.roots[range.root].dtype;
        let size = dtype.size();
        // In bounds: views were checked against the root's numel, data has the root's length.
        let elems = &self.data[range.root][range.offset * size..(range.offset + range.len) * size];
        if numel == 0 {
            return Ok(Vec::new());
        }
        // Size-1 dimensions never move; dropping them keeps huge unused strides out of the sums.
        let dims: Vec<(usize, usize)> =
            view.shape.iter().copied().zip(view.stride.iter().copied()).filter(|&(n, _)| n > 1).collect();
        let last = dims.iter().try_fold(view.offset, |end, &(n, s)| (n - 1).checked_mul(s)?.checked_add(end));
        if last.is_none_or(|last| last >= range.len) {
            return bad(format!(
                "the view (offset {}, size {:?}, stride {:?}) reaches past its storage of {} elements",
                view.offset, view.shape, view.stride, range.len
            ));
        }
        // Odometer over the multi-index; `pos` never exceeds the last index plus one stride.
        let mut out = Vec::with_capacity(numel);
        let mut index = vec![0; dims.len()];
        let mut pos = view.offset;
        for _ in 0..numel {
            out.push(dtype.decode(&elems[pos * size..(pos + 1) * size]));
            for (i, &(n, stride)) in dims.iter().enumerate().rev() {
                index[i] += 1;
                pos += stride;
                if index[i] < n {
                    break;
                }
                index[i] = 0;
                pos -= n * stride;
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Legacy format

fn legacy_checkpoint(bytes: &[u8]) -> Parse<Checkpoint<'_>> {
    let mut cur = Cursor::at(bytes, 0);
    let mut objects = Unpickler::default();
    if objects.load(&mut cur) != Ok(Value::Int(LEGACY_MAGIC)) {
        return bad(
            "not a PyTorch checkpoint: neither a zip archive nor a legacy pickle stream starting with \
             torch's magic number (the tar format of early torch versions is not supported)",
        );
    }
    match objects.load(&mut cur)? {
        Value::Int(LEGACY_PROTOCOL) => {}
        other => return bad(format!("unsupported legacy protocol version: {}", other.describe())),
    }
    let sys_info = objects.load(&mut cur)?;
    if objects.heap.dict_get(&sys_info, "little_endian") == Some(&Value::Bool(false)) {
        return bad("big-endian checkpoints are not supported");
    }
    let root = objects.load(&mut cur)?;
    let key_list = objects.load(&mut cur)?;
    let keys = objects.heap.seq(&key_list).ok_or("the storage key list is not a list")?;
    let keys = keys
        .iter()
        .map(|key| match key {
            Value::Str(key) => Ok(key.clone()),
            other => bad(format!("storage key {} is not a string", other.describe())),
        })
        .collect::<Parse<Vec<_>>>()?;
    let data = legacy_storage_data(&mut cur, &objects.storages, &keys)?;
    Ok(Checkpoint { objects, root, data })
}

/// After the pickles: for each key, an 8-byte element count and the storage's raw bytes.
fn legacy_storage_data<'a>(
    cur: &mut Cursor<'a>,
    storages: &Storages,
    keys: &[Rc<str>],
) -> Parse<Vec<&'a [u8]>> {
    let mut data = vec![None; storages.roots.len()];
    for key in keys {
        let &id =
            storages.by_key.get(key).ok_or_else(|| format!("storage `{key}` is listed but never used"))?;
        let root = &storages.roots[id];
        let count = cur.u64()?;
        if count != root.numel as u64 {
            return bad(format!("storage `{key}` holds {count} elements, its id declares {}", root.numel));
        }
        data[id] = Some(cur.take(root.byte_len()?)?);
    }
    storages
        .roots
        .iter()
        .zip(data)
        .map(|(root, data)| data.ok_or_else(|| format!("storage `{}` has no data", root.key)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Zip format

const ZIP_LOCAL: [u8; 4] = *b"PK\x03\x04";
const ZIP_CENTRAL: [u8; 4] = *b"PK\x01\x02";
const ZIP_END: [u8; 4] = *b"PK\x05\x06";
const ZIP64_END: [u8; 4] = *b"PK\x06\x06";
const ZIP64_LOCATOR: [u8; 4] = *b"PK\x06\x07";
/// The end-of-central-directory record without its comment.
const ZIP_END_LEN: usize = 22;
/// A 32-bit field with this value lives in the zip64 extra field.
const ZIP64_SAVED: u32 = u32::MAX;

fn zip_checkpoint(bytes: &[u8]) -> Parse<Checkpoint<'_>> {
    let entries = zip_entries(bytes)?;
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let read = |name: &str| by_name.get(name).map(|entry| entry.data(bytes)).transpose();
    let prefix = entries
        .iter()
        .find_map(|e| e.name.strip_suffix("/data.pkl").filter(|prefix| !prefix.contains('/')))
        .ok_or("zip archive without `<prefix>/data.pkl`: not a torch checkpoint")?;
    match read(&format!("{prefix}/byteorder"))? {
        None | Some(b"little") => {}
        Some(b"big") => return bad("big-endian checkpoints are not supported"),
        Some(other) => return bad(format!("unknown byte order {:?}", String::from_utf8_lossy(other))),
    }
    let pickle = read(&format!("{prefix}/data.pkl"))?.unwrap_or_default();
    let mut objects = Unpickler::default();
    let root = objects.load(&mut Cursor::at(pickle, 0)).map_err(|e| format!("{prefix}/data.pkl: {e}"))?;
    let mut data = Vec::with_capacity(objects.storages.roots.len());
    for root in &objects.storages.roots {
        let name = format!("{prefix}/data/{}", root.key);
        let stored = read(&name)?.ok_or_else(|| format!("zip entry `{name}` is missing"))?;
        let len = root.byte_len()?;
        let bytes = stored.get(..len).ok_or_else(|| {
            format!("zip entry `{name}` holds {} bytes, its storage needs {len}", stored.len())
        })?;
        data.push(bytes);
    }
    Ok(Checkpoint { objects, root, data })
}

/// One record of the central directory.
struct ZipEntry {
    name: String,
    method: u16,
    compressed: u64,
    uncompressed: u64,
    header_offset: u64,
}

impl ZipEntry {
    /// The entry's bytes, which must be stored uncompressed (as torch writes them).
    fn data<'a>(&self, bytes: &'a [u8]) -> Parse<&'a [u8]> {
        if self.method != 0 {
            return bad(format!(
                "zip entry `{}` is compressed (method {}); only stored (uncompressed) entries are supported",
                self.name, self.method
            ));
        }
        if self.compressed != self.uncompressed {
            return bad(format!("stored zip entry `{}` has two different sizes", self.name));
        }
        let mut cur = Cursor::at(bytes, to_len(self.header_offset)?);
        if cur.array()? != ZIP_LOCAL {
            return bad(format!("zip entry `{}` has no local header", self.name));
        }
        // Version, flags, method, time, date, crc and sizes; the central directory has them.
        cur.take(22)?;
        let name_len = cur.u16()?;
        let extra_len = cur.u16()?;
        cur.take(usize::from(name_len) + usize::from(extra_len))?;
        cur.take(to_len(self.compressed)?)
    }
}

fn zip_entries(bytes: &[u8]) -> Parse<Vec<ZipEntry>> {
    let (count, offset) = central_directory(bytes)?;
    let mut cur = Cursor::at(bytes, offset);
    let mut entries = Vec::new();
    // Each record takes at least 46 bytes, so a bogus count runs out of file quickly.
    for _ in 0..count {
        entries.push(central_record(&mut cur)?);
    }
    Ok(entries)
}

/// The number of entries and the offset of the central directory (zip64-aware).
fn central_directory(bytes: &[u8]) -> Parse<(u64, usize)> {
    let last = bytes.len().checked_sub(ZIP_END_LEN).ok_or("zip archive too short")?;
    // The end record sits at the end, before a comment of at most 64 KiB.
    let end = (last.saturating_sub(usize::from(u16::MAX))..=last)
        .rev()
        .find(|&at| bytes[at..].starts_with(&ZIP_END))
        .ok_or("zip end-of-central-directory record not found")?;
    let mut cur = Cursor::at(bytes, end + 10);
    let count = cur.u16()?;
    let size = cur.u32()?;
    let offset = cur.u32()?;
    if count != u16::MAX && size != ZIP64_SAVED && offset != ZIP64_SAVED {
        return Ok((count.into(), to_len(offset)?));
    }
    let mut cur = Cursor::at(bytes, end.checked_sub(20).ok_or("zip64 end locator missing")?);
    if cur.array()? != ZIP64_LOCATOR {
        return bad("zip64 end locator missing");
    }
    cur.take(4)?; // disk number
    let mut cur = Cursor::at(bytes, to_len(cur.u64()?)?);
    if cur.array()? != ZIP64_END {
        return bad("zip64 end-of-central-directory record missing");
    }
    cur.take(28)?; // record size, versions, disk numbers, entries on this disk
    let count = cur.u64()?;
    cur.take(8)?; // directory size
    Ok((count, to_len(cur.u64()?)?))
}

fn central_record(cur: &mut Cursor) -> Parse<ZipEntry> {
    if cur.array()? != ZIP_CENTRAL {
        return bad("corrupt zip central directory");
    }
    cur.take(6)?; // versions, flags
    let method = cur.u16()?;
    cur.take(8)?; // time, date, crc
    let mut compressed = u64::from(cur.u32()?);
    let mut uncompressed = u64::from(cur.u32()?);
    let name_len = cur.u16()?;
    let extra_len = cur.u16()?;
    let comment_len = cur.u16()?;
    cur.take(8)?; // disk, attributes
    let mut header_offset = u64::from(cur.u32()?);
    let name = String::from_utf8(cur.take(name_len.into())?.to_vec())
        .map_err(|_| "zip entry name is not UTF-8".to_string())?;
    let extra = cur.take(extra_len.into())?;
    cur.take(comment_len.into())?;
    // The zip64 field holds, in this order, those of the three that are saturated.
    if let Some(mut zip64) = zip64_extra(extra)? {
        for field in [&mut uncompressed, &mut compressed, &mut header_offset] {
            if *field == u64::from(ZIP64_SAVED) {
                *field = zip64.u64()?;
            }
        }
    }
    Ok(ZipEntry { name, method, compressed, uncompressed, header_offset })
}

/// The body of the zip64 extended-information extra field (id 1), if present.
fn zip64_extra(extra: &[u8]) -> Parse<Option<Cursor<'_>>> {
    let mut cur = Cursor::at(extra, 0);
    while !cur.rest().is_empty() {
        let id = cur.u16()?;
        let len = cur.u16()?;
        let body = cur.take(len.into())?;
        if id == 1 {
            return Ok(Some(Cursor::at(body, 0)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn long_is_twos_complement() {
        assert_eq!(long(&[]), Ok(0));
        assert_eq!(long(&[0xff]), Ok(-1));
        assert_eq!(long(&[0x00, 0x80]), Ok(-32768));
        assert_eq!(long(&[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]), Ok(LEGACY_MAGIC));
        assert!(long(&[0; 17]).is_err());
    }
}
