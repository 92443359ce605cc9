//! Torch's side of a checkpoint: element types and storages, the object that names them,
//! and the legacy container (pickles and raw storages in a row).

use super::pickle::*;
use super::*;
use crate::half::f16_to_f32;

// ---------------------------------------------------------------------------------------------
// Element types

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DType {
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
pub(super) const STORAGE_CLASSES: [(&str, DType); 10] = [
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
    pub(super) fn from_class(name: &str) -> Option<DType> {
        STORAGE_CLASSES.iter().find(|(class, _)| *class == name).map(|&(_, dtype)| dtype)
    }

    pub(super) fn class(self) -> &'static str {
        STORAGE_CLASSES.iter().find(|(_, dtype)| *dtype == self).map_or("?", |(class, _)| class)
    }

    pub(super) fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Converts one little-endian element; `b` holds exactly `self.size()` bytes.
    pub(super) fn decode(self, b: &[u8]) -> f32 {
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

pub(super) fn le<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut bytes = [0; N];
    bytes.copy_from_slice(b);
    bytes
}

// ---------------------------------------------------------------------------------------------
// Storages

/// A storage as its persistent id declares it; its bytes are bound after unpickling.
pub(super) struct Root {
    pub(super) key: Rc<str>,
    pub(super) dtype: DType,
    pub(super) numel: usize,
}

impl Root {
    pub(super) fn byte_len(&self) -> Parse<usize> {
        self.numel
            .checked_mul(self.dtype.size())
            .ok_or_else(|| format!("storage `{}` of {} elements is too large", self.key, self.numel))
    }
}

/// A range of a root storage (legacy storage views; the whole root otherwise), in elements.
pub(super) struct StorageView {
    pub(super) root: usize,
    pub(super) offset: usize,
    pub(super) len: usize,
}

#[derive(Default)]
pub(super) struct Storages {
    pub(super) roots: Vec<Root>,
    pub(super) by_key: HashMap<Rc<str>, usize>,
    pub(super) views: Vec<StorageView>,
}

impl Storages {
    /// The root with `key`, declared on first sight; later ids must agree with the first.
    pub(super) fn root(&mut self, key: &Rc<str>, dtype: DType, numel: usize) -> Parse<usize> {
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

    pub(super) fn view(&mut self, root: usize, offset: usize, len: usize) -> Parse<usize> {
        let numel = self.roots[root].numel;
        if offset.checked_add(len).is_none_or(|end| end > numel) {
            return bad(format!("storage view {offset}+{len} lies outside its storage of {numel} elements"));
        }
        self.views.push(StorageView { root, offset, len });
        Ok(self.views.len() - 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint: the object and the bytes of its storages

pub(super) struct Checkpoint<'a> {
    pub(super) objects: Unpickler,
    pub(super) root: Value,
    /// The bytes of each root storage (`objects.storages.roots[i]`), exactly its length.
    pub(super) data: Vec<&'a [u8]>,
}

impl Checkpoint<'_> {
    /// The tensors of the state dict, in its order; `file_len` sets the output budget.
    pub(super) fn tensors(&self, file_len: usize) -> Parse<Vec<PthTensor>> {
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

    /// `epoch` and the optimizer's groups and momentum buffers of a training checkpoint.
    pub(super) fn training(&self, file_len: usize) -> Parse<OfficialTraining> {
        let heap = &self.objects.heap;
        let missing = |what: &str| format!("not an official training checkpoint: no {what}");
        let epoch = match heap.dict_get(&self.root, "epoch") {
            Some(Value::Int(n)) => to_len(*n)?,
            _ => return Err(missing("epoch")),
        };
        let optimizer = heap.dict_get(&self.root, "optimizer").ok_or_else(|| missing("optimizer"))?;
        let groups = heap
            .dict_get(optimizer, "param_groups")
            .and_then(|g| heap.seq(g))
            .ok_or_else(|| missing("optimizer param_groups"))?
            .iter()
            .map(|group| {
                let params = heap.dict_get(group, "params").ok_or_else(|| missing("params of a group"))?;
                heap.usizes_list(params, "a group's params")
            })
            .collect::<Parse<Vec<_>>>()?;
        let state = heap
            .dict_get(optimizer, "state")
            .and_then(|s| heap.dict(s))
            .ok_or_else(|| missing("optimizer state"))?;
        let mut budget = file_len.saturating_mul(OUTPUT_BYTES_PER_FILE_BYTE);
        let mut momentum = Vec::new();
        for (key, value) in state {
            let index = to_usize(key, "an optimizer state key")?;
            let buffer = heap.dict_get(value, "momentum_buffer").and_then(|b| heap.tensor(b));
            let Some(view) = buffer else { continue };
            let name = format!("momentum_buffer {index}");
            momentum
                .push((index, self.tensor(&name, view, &mut budget).map_err(|e| format!("{name}: {e}"))?));
        }
        let best_mean_iou = match heap.dict_get(&self.root, "best_mIoU") {
            Some(Value::Float(v)) => Some(*v),
            Some(Value::Int(v)) => Some(*v as f64),
            _ => None,
        };
        Ok(OfficialTraining { epoch, best_mean_iou, groups, momentum })
    }

    pub(super) fn tensor(&self, name: &str, view: &TensorView, budget: &mut usize) -> Parse<PthTensor> {
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
    pub(super) fn gather(&self, view: &TensorView, numel: usize) -> Parse<Vec<f32>> {
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

pub(super) fn legacy_checkpoint(bytes: &[u8]) -> Parse<Checkpoint<'_>> {
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
pub(super) fn legacy_storage_data<'a>(
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
