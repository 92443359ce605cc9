//! Reads PyTorch checkpoints (`torch.save` files) without PyTorch and without running any code,
//! and writes state dicts in the zip format ([`write_pth`]).
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

mod pickle;
mod torch;
mod write;
mod zip;

use torch::*;
pub use write::write_pth;
use zip::*;

/// One tensor of a checkpoint, converted to f32, row-major (contiguous) in `shape` order.
pub use crate::model::weights::NamedTensor as PthTensor;

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
    checkpoint(bytes)
        .and_then(|checkpoint| checkpoint.tensors(bytes.len()))
        .map_err(|what| Error::Format { path: path.to_string(), what })
}

/// Whether `path` names a PyTorch file by its extension (`.pth`, `.pt`, or `.tar` as the
/// official `checkpoint.pth.tar`).
pub fn is_pytorch_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("pth" | "pt" | "tar"))
}

/// The saved object of either container format.
fn checkpoint(bytes: &[u8]) -> Parse<Checkpoint<'_>> {
    if bytes.starts_with(&ZIP_LOCAL) {
        zip_checkpoint(bytes)
    } else {
        legacy_checkpoint(bytes)
    }
}

/// The training state of an official `checkpoint.pth.tar` (`tools/train.py` saves
/// `{'epoch', 'best_mIoU', 'state_dict', 'optimizer'}`): epochs completed and SGD's
/// momentum buffers, by the optimizer's parameter indices.
#[derive(Clone, Debug, PartialEq)]
pub struct OfficialTraining {
    pub epoch: usize,
    /// `best_mIoU`: the best validation mIoU so far (a numpy float64), where it is a number.
    pub best_mean_iou: Option<f64>,
    /// Each parameter group's indices (`param_groups[g]['params']`).
    pub groups: Vec<Vec<usize>>,
    /// `state[index]['momentum_buffer']`, named by the index.
    pub momentum: Vec<(usize, PthTensor)>,
}

/// Reads an official training checkpoint: the state dict's tensors (as [`read_pth`]) and the
/// training state, which it must have.
pub fn read_official_training(path: &Path) -> Result<(Vec<PthTensor>, OfficialTraining)> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: shown.clone(), source })?;
    checkpoint(&bytes)
        .and_then(|c| Ok((c.tensors(bytes.len())?, c.training(bytes.len())?)))
        .map_err(|what| Error::Format { path: shown, what })
}

/// Internal results carry only the message; `parse_pth` adds the path.
pub(super) type Parse<T> = std::result::Result<T, String>;

pub(super) fn bad<T>(what: impl Into<String>) -> Parse<T> {
    Err(what.into())
}

/// The legacy format's first pickle, and its protocol version (torch/serialization.py).
pub(super) const LEGACY_MAGIC: i128 = 0x1950_a86a_20f9_469c_fc6c;
pub(super) const LEGACY_PROTOCOL: i128 = 1001;
/// Newest pickle protocol (Python 3.8+).
pub(super) const HIGHEST_PROTOCOL: u8 = 5;
/// Tensors of higher rank are refused, which also caps what one REDUCE can allocate.
pub(super) const MAX_RANK: usize = 64;
/// Storage keys are short ("0", "94293653646352"); the cap keeps hashing them cheap.
pub(super) const MAX_KEY_BYTES: usize = 256;
/// Budget for the tensors returned (f32 data plus names), per byte of the file.
pub(super) const OUTPUT_BYTES_PER_FILE_BYTE: usize = 8;

// ---------------------------------------------------------------------------------------------
// Byte cursor

/// Bounds-checked reads from a byte slice; every read past the end is an error.
pub(super) struct Cursor<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn at(bytes: &'a [u8], pos: usize) -> Self {
        Cursor { bytes, pos }
    }

    pub(super) fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    pub(super) fn take(&mut self, n: usize) -> Parse<&'a [u8]> {
        let taken = self.rest().get(..n).ok_or_else(|| {
            format!("truncated: {n} bytes needed at offset {}, only {} left", self.pos, self.rest().len())
        })?;
        self.pos += n;
        Ok(taken)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Parse<[u8; N]> {
        self.take(N).map(le)
    }

    pub(super) fn u8(&mut self) -> Parse<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn u16(&mut self) -> Parse<u16> {
        self.array().map(u16::from_le_bytes)
    }

    pub(super) fn u32(&mut self) -> Parse<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Parse<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A `\n`-terminated UTF-8 line (the operands of GLOBAL), without the newline.
    pub(super) fn line(&mut self) -> Parse<&'a str> {
        let len = self.rest().iter().position(|&b| b == b'\n').ok_or("unterminated GLOBAL operand")?;
        let line = self.take(len)?;
        self.take(1)?;
        std::str::from_utf8(line).map_err(|_| "GLOBAL operand is not UTF-8".to_string())
    }
}

/// A length or count from the file as usize (negative or too large is an error).
pub(super) fn to_len<T: TryInto<usize> + Copy + std::fmt::Display>(n: T) -> Parse<usize> {
    n.try_into().map_err(|_| format!("invalid length {n}"))
}
