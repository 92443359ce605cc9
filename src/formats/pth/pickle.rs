//! The restricted unpickler: the opcodes torch emits and an allow-list of globals, objects
//! in a flat arena.

use super::torch::*;
use super::*;

// ---------------------------------------------------------------------------------------------
// Unpickled values

/// A pickled value. Containers live in [`Heap`] and are shared by id, as Python shares them.
#[derive(Clone, PartialEq)]
pub(super) enum Value {
    None,
    Bool(bool),
    /// Python ints up to 128 bits (the legacy magic number needs 80).
    Int(i128),
    /// A float, or a numpy float scalar (a training checkpoint's `best_mIoU`).
    Float(f64),
    /// A bytes object (a numpy scalar's raw value).
    Bytes(Rc<[u8]>),
    /// A numpy dtype, by its code (`f8`, `i8`, ...).
    Dtype(Rc<str>),
    Str(Rc<str>),
    Global(Global),
    /// An index into [`Storages::views`].
    Storage(usize),
    /// An index into [`Heap`].
    Obj(usize),
}

impl Value {
    /// What the value is, for error messages (long strings cut short).
    pub(super) fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(n) => format!("int {n}"),
            Value::Float(_) => "a float".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Dtype(code) => format!("numpy dtype {code:?}"),
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

pub(super) enum Obj {
    /// A tuple or a list: nothing here depends on the difference.
    Seq(Vec<Value>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Vec<(Value, Value)>),
    Tensor(TensorView),
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage, in elements.
pub(super) struct TensorView {
    pub(super) storage: usize,
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

/// Every container the pickle builds, addressed by [`Value::Obj`] ids. Flat on purpose: the memo
/// lets objects share children or contain themselves, and dropping a flat arena needs no
/// recursion however deep the nesting.
#[derive(Default)]
pub(super) struct Heap(Vec<Obj>);

impl Heap {
    pub(super) fn alloc(&mut self, obj: Obj) -> Value {
        self.0.push(obj);
        Value::Obj(self.0.len() - 1)
    }

    pub(super) fn get(&self, value: &Value) -> Option<&Obj> {
        match value {
            Value::Obj(id) => self.0.get(*id),
            _ => None,
        }
    }

    pub(super) fn get_mut(&mut self, value: &Value) -> Option<&mut Obj> {
        match value {
            Value::Obj(id) => self.0.get_mut(*id),
            _ => None,
        }
    }

    pub(super) fn seq(&self, value: &Value) -> Option<&[Value]> {
        match self.get(value)? {
            Obj::Seq(items) => Some(items),
            _ => None,
        }
    }

    pub(super) fn dict(&self, value: &Value) -> Option<&[(Value, Value)]> {
        match self.get(value)? {
            Obj::Dict(entries) => Some(entries),
            _ => None,
        }
    }

    pub(super) fn tensor(&self, value: &Value) -> Option<&TensorView> {
        match self.get(value)? {
            Obj::Tensor(view) => Some(view),
            _ => None,
        }
    }

    /// `dict[key]` for a string key; the last entry wins, as when Python builds the dict.
    pub(super) fn dict_get(&self, dict: &Value, key: &str) -> Option<&Value> {
        let entries = self.dict(dict)?;
        entries.iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if &**s == key)).map(|(_, v)| v)
    }

    /// A list of non-negative ints of any length (an optimizer group's parameter indices).
    pub(super) fn usizes_list(&self, value: &Value, what: &str) -> Parse<Vec<usize>> {
        let items = self.seq(value).ok_or_else(|| format!("{what} is not a list"))?;
        items.iter().map(|item| to_usize(item, what)).collect()
    }

    /// A tuple of non-negative ints (a tensor's size or stride).
    pub(super) fn usizes(&self, value: &Value, what: &str) -> Parse<Vec<usize>> {
        let items = self.seq(value).ok_or_else(|| format!("{what} is not a tuple"))?;
        if items.len() > MAX_RANK {
            return bad(format!("{what} has {} dimensions, more than {MAX_RANK}", items.len()));
        }
        items.iter().map(|item| to_usize(item, what)).collect()
    }
}

pub(super) fn to_usize(value: &Value, what: &str) -> Parse<usize> {
    match value {
        Value::Int(n) => to_len(*n),
        other => bad(format!("{what}: expected an int, got {}", other.describe())),
    }
}

// ---------------------------------------------------------------------------------------------
// Restricted unpickler

/// The globals a state dict needs, and those of the numpy scalars an official training
/// checkpoint holds (`best_mIoU`). They are interpreted here; nothing is imported or called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    Storage(DType),
    /// `numpy.core.multiarray.scalar(dtype, raw bytes)` (`numpy._core` in numpy 2).
    NumpyScalar,
    /// `numpy.dtype(code, align, copy)`.
    NumpyDtype,
    /// `_codecs.encode(text, 'latin1')`: how protocol 2 pickles bytes.
    Latin1Encode,
}

impl Global {
    pub(super) fn resolve(module: &str, name: &str) -> Parse<Global> {
        let global = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => Global::NumpyScalar,
            ("numpy", "dtype") => Global::NumpyDtype,
            ("_codecs", "encode") => Global::Latin1Encode,
            ("torch", class) => match DType::from_class(class) {
                Some(dtype) => Global::Storage(dtype),
                None => return refuse(module, name),
            },
            _ => return refuse(module, name),
        };
        Ok(global)
    }

    pub(super) fn name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::Storage(dtype) => format!("torch.{}", dtype.class()),
            Global::NumpyScalar => "numpy.core.multiarray.scalar".into(),
            Global::NumpyDtype => "numpy.dtype".into(),
            Global::Latin1Encode => "_codecs.encode".into(),
        }
    }
}

/// A little-endian numpy scalar's value: floats and integers of 4 or 8 bytes; any other
/// dtype's value is not read (None).
fn numpy_scalar(code: &str, raw: &[u8]) -> Value {
    match (code, raw.len()) {
        ("f8", 8) => Value::Float(f64::from_le_bytes(raw.try_into().unwrap_or_default())),
        ("f4", 4) => Value::Float(f32::from_le_bytes(raw.try_into().unwrap_or_default()).into()),
        ("i8", 8) => Value::Int(i64::from_le_bytes(raw.try_into().unwrap_or_default()).into()),
        ("i4", 4) => Value::Int(i32::from_le_bytes(raw.try_into().unwrap_or_default()).into()),
        _ => Value::None,
    }
}

pub(super) fn refuse<T>(module: &str, name: &str) -> Parse<T> {
    bad(format!(
        "refusing to load global `{}.{}`: only the globals of plain tensors, state dicts and numpy scalars are allowed",
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
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
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
pub(super) struct Unpickler {
    pub(super) heap: Heap,
    pub(super) storages: Storages,
    pub(super) stack: Vec<Value>,
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u32, Value>,
    /// Items that REDUCE may still copy (Python 2's `OrderedDict(items)`), so a memoized list
    /// reduced over and over cannot multiply memory: at most one per byte of the pickle.
    pub(super) copy_budget: usize,
}

impl Unpickler {
    /// Runs one pickle from `cur` up to its STOP and returns the object it built.
    pub(super) fn load(&mut self, cur: &mut Cursor) -> Parse<Value> {
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

    pub(super) fn step(&mut self, op: u8, cur: &mut Cursor) -> Parse<()> {
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
            op::BINFLOAT => self.push(Value::Float(f64::from_be_bytes(cur.array()?))),
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
            op::SHORT_BINBYTES => {
                let len = cur.u8()?;
                let bytes = cur.take(len.into())?;
                self.push(Value::Bytes(bytes.into()))
            }
            op::BINBYTES => {
                let len = to_len(cur.u32()?)?;
                let bytes = cur.take(len)?;
                self.push(Value::Bytes(bytes.into()))
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

    pub(super) fn push(&mut self, value: Value) -> Parse<()> {
        self.stack.push(value);
        Ok(())
    }

    pub(super) fn push_new(&mut self, obj: Obj) -> Parse<()> {
        let value = self.heap.alloc(obj);
        self.push(value)
    }

    pub(super) fn push_str(&mut self, bytes: &[u8]) -> Parse<()> {
        // torch.load decodes Python 2 byte strings as UTF-8 too.
        let text = std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8".to_string())?;
        self.push(Value::Str(text.into()))
    }

    /// Stack length at the innermost MARK: values below it belong to an enclosing frame.
    pub(super) fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    pub(super) fn pop(&mut self) -> Parse<Value> {
        if self.stack.len() <= self.floor() {
            return bad("pickle stack underflow");
        }
        self.stack.pop().ok_or_else(|| "pickle stack underflow".to_string())
    }

    pub(super) fn pop_n(&mut self, n: usize) -> Parse<Vec<Value>> {
        match self.stack.len().checked_sub(n) {
            Some(start) if start >= self.floor() => Ok(self.stack.split_off(start)),
            _ => bad("pickle stack underflow"),
        }
    }

    /// POP: drops the top value, or the innermost mark when its frame is empty (as CPython).
    pub(super) fn pop_any(&mut self) -> Parse<()> {
        if self.stack.len() > self.floor() {
            self.pop().map(drop)
        } else {
            self.pop_mark().map(drop)
        }
    }

    pub(super) fn pop_mark(&mut self) -> Parse<Vec<Value>> {
        let mark = self.marks.pop().ok_or("MARK missing")?;
        Ok(self.stack.split_off(mark))
    }

    pub(super) fn pop_str(&mut self) -> Parse<Rc<str>> {
        match self.pop()? {
            Value::Str(s) => Ok(s),
            other => bad(format!("expected a string, got {}", other.describe())),
        }
    }

    pub(super) fn top(&self) -> Parse<&Value> {
        match self.stack.last() {
            Some(value) if self.stack.len() > self.floor() => Ok(value),
            _ => bad("pickle stack underflow"),
        }
    }

    pub(super) fn memo_put(&mut self, index: u32) -> Parse<()> {
        let value = self.top()?.clone();
        self.memo.insert(index, value);
        Ok(())
    }

    pub(super) fn memo_get(&mut self, index: u32) -> Parse<()> {
        let value = self.memo.get(&index).ok_or_else(|| format!("memo entry {index} missing"))?.clone();
        self.push(value)
    }

    pub(super) fn extend_list(&mut self, items: Vec<Value>) -> Parse<()> {
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
    pub(super) fn extend_dict(&mut self, items: Vec<Value>) -> Parse<()> {
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
    pub(super) fn reduce(&mut self, func: &Value, args: &Value) -> Parse<Value> {
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
            // Numpy scalars: built from their dtype and raw bytes, and nothing else runs.
            (Global::NumpyDtype, [Value::Str(code), _, _]) => return Ok(Value::Dtype(code.clone())),
            (Global::Latin1Encode, [Value::Str(text), Value::Str(codec)]) if &**codec == "latin1" => {
                let bytes =
                    text.chars().map(|c| u8::try_from(c).map_err(|_| "a non-latin1 character".to_string()));
                return Ok(Value::Bytes(bytes.collect::<Parse<Vec<u8>>>()?.into()));
            }
            (Global::NumpyScalar, [Value::Dtype(code), Value::Bytes(raw)]) => {
                return Ok(numpy_scalar(code, raw))
            }
            _ => {
                return bad(format!("unsupported call of `{}` with {} arguments", global.name(), args.len()))
            }
        };
        Ok(self.heap.alloc(obj))
    }

    pub(super) fn tensor_view(
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
    pub(super) fn persistent_load(&mut self, pid: &Value) -> Parse<Value> {
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
pub(super) fn long(bytes: &[u8]) -> Parse<i128> {
    if bytes.len() > 16 {
        return bad(format!("integer of {} bytes is wider than 128 bits", bytes.len()));
    }
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut wide = [if negative { 0xff } else { 0 }; 16];
    wide[..bytes.len()].copy_from_slice(bytes);
    Ok(i128::from_le_bytes(wide))
}

/// The `[[key, value], ...]` argument of a Python 2 OrderedDict, charged to `budget`.
pub(super) fn pairs(heap: &Heap, items: &Value, budget: &mut usize) -> Parse<Vec<(Value, Value)>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_is_twos_complement() {
        assert_eq!(long(&[]), Ok(0));
        assert_eq!(long(&[0xff]), Ok(-1));
        assert_eq!(long(&[0x00, 0x80]), Ok(-32768));
        assert_eq!(long(&[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]), Ok(LEGACY_MAGIC));
        assert!(long(&[0; 17]).is_err());
    }
}
