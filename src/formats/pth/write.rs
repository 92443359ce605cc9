//! Writes a state dict as torch >= 1.6 does (`torch.save` zip format): a stored zip archive
//! holding `archive/data.pkl` (a protocol-2 pickle of an `OrderedDict` whose values are
//! `torch._utils._rebuild_tensor_v2` of `FloatStorage` persistent ids), `archive/data/<i>`
//! (each tensor's little-endian f32 bytes, aligned to 64 bytes as torch aligns them),
//! `archive/byteorder` and `archive/version`. `torch.load(weights_only=True)` reads it:
//! only globals of its allow-list are named.

use super::PthTensor;
use crate::{Error, Result};
use std::path::Path;

const PREFIX: &str = "archive";
/// torch aligns each record's data to this many bytes (for memory-mapped loads).
const ALIGN: usize = 64;

/// Writes `tensors` (names as given) as a zip-format PyTorch file at `path`, atomically.
pub fn write_pth(path: &Path, tensors: &[PthTensor]) -> Result<()> {
    let shown = path.display().to_string();
    for t in tensors {
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(Error::Format {
                path: shown,
                what: format!("tensor {}: shape {:?} holds {} values", t.name, t.shape, t.data.len()),
            });
        }
    }
    let mut zip = ZipWriter::default();
    zip.add(&format!("{PREFIX}/data.pkl"), &state_dict_pickle(tensors));
    zip.add(&format!("{PREFIX}/byteorder"), b"little");
    for (i, t) in tensors.iter().enumerate() {
        zip.add(&format!("{PREFIX}/data/{i}"), bytemuck::cast_slice(&t.data));
    }
    zip.add(&format!("{PREFIX}/version"), b"3\n");
    let bytes = zip.finish().map_err(|what| Error::Format { path: shown, what })?;
    crate::fs::write_atomic(path, &bytes)
}

/// `OrderedDict([(name, _rebuild_tensor_v2(storage i, 0, shape, stride, False, OrderedDict())), ...])`.
fn state_dict_pickle(tensors: &[PthTensor]) -> Vec<u8> {
    let mut p = Pickle(vec![0x80, 2]);
    p.global("collections", "OrderedDict");
    p.0.extend([b')', b'R']);
    if !tensors.is_empty() {
        p.0.push(b'(');
        for (i, t) in tensors.iter().enumerate() {
            p.text(&t.name);
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.0.push(b'(');
            // The persistent id ('storage', FloatStorage, key, location, numel).
            p.0.push(b'(');
            p.text("storage");
            p.global("torch", "FloatStorage");
            p.text(&i.to_string());
            p.text("cpu");
            p.int(t.data.len());
            p.0.extend([b't', b'Q']);
            p.int(0);
            p.ints(&t.shape);
            let mut stride = vec![1; t.shape.len()];
            for d in (0..t.shape.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * t.shape[d + 1];
            }
            p.ints(&stride);
            p.0.push(0x89); // requires_grad False
            p.global("collections", "OrderedDict");
            p.0.extend([b')', b'R', b't', b'R']);
        }
        p.0.push(b'u');
    }
    p.0.push(b'.');
    p.0
}

struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn text(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A non-negative int: BININT where it fits, else LONG1.
    fn int(&mut self, n: usize) {
        match i32::try_from(n) {
            Ok(v) => {
                self.0.push(b'J');
                self.0.extend_from_slice(&v.to_le_bytes());
            }
            Err(_) => {
                self.0.extend([0x8a, 9]);
                self.0.extend_from_slice(&(n as u64).to_le_bytes());
                self.0.push(0);
            }
        }
    }

    fn ints(&mut self, values: &[usize]) {
        self.0.push(b'(');
        for &v in values {
            self.int(v);
        }
        self.0.push(b't');
    }
}

/// A stored (uncompressed) zip archive, each entry's data aligned to [`ALIGN`] by padding
/// its local header's extra field.
#[derive(Default)]
struct ZipWriter {
    bytes: Vec<u8>,
    central: Vec<u8>,
    entries: u16,
    failed: Option<String>,
}

impl ZipWriter {
    fn add(&mut self, name: &str, data: &[u8]) {
        let (Ok(size), Ok(offset), Some(entries)) =
            (u32::try_from(data.len()), u32::try_from(self.bytes.len()), self.entries.checked_add(1))
        else {
            self.failed = Some(format!("{name}: past the 4 GiB and 65535 entries of a zip without zip64"));
            return;
        };
        let crc = crc32(data);
        let header_end = self.bytes.len() + 30 + name.len() + 4;
        let pad = (ALIGN - header_end % ALIGN) % ALIGN;
        let mut extra = vec![0x46, 0x42]; // "FB", torch's padding field
        extra.extend_from_slice(&(pad as u16).to_le_bytes());
        extra.resize(4 + pad, b'Z');
        let fields = |signature: &[u8], central: bool| {
            let mut h = signature.to_vec();
            if central {
                h.extend_from_slice(&20u16.to_le_bytes()); // made by
            }
            for v in [20u16, 0, 0, 0, 0x21] {
                h.extend_from_slice(&v.to_le_bytes()); // version, flags, stored, time, date
            }
            for v in [crc, size, size] {
                h.extend_from_slice(&v.to_le_bytes());
            }
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h
        };
        self.bytes.extend(fields(b"PK\x03\x04", false));
        self.bytes.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.extend_from_slice(&extra);
        self.bytes.extend_from_slice(data);
        self.central.extend(fields(b"PK\x01\x02", true));
        // No extra field or comment; disk 0, no attributes; the local header's offset.
        for v in [0u16, 0, 0, 0] {
            self.central.extend_from_slice(&v.to_le_bytes());
        }
        self.central.extend_from_slice(&0u32.to_le_bytes());
        self.central.extend_from_slice(&offset.to_le_bytes());
        self.central.extend_from_slice(name.as_bytes());
        self.entries = entries;
    }

    fn finish(mut self) -> std::result::Result<Vec<u8>, String> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let start = u32::try_from(self.bytes.len()).map_err(|_| "the archive passes 4 GiB".to_string())?;
        let size = self.central.len() as u32;
        self.bytes.append(&mut self.central);
        self.bytes.extend_from_slice(b"PK\x05\x06");
        for v in [0u16, 0, self.entries, self.entries] {
            self.bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.bytes.extend_from_slice(&size.to_le_bytes());
        self.bytes.extend_from_slice(&start.to_le_bytes());
        self.bytes.extend_from_slice(&0u16.to_le_bytes());
        Ok(self.bytes)
    }
}

/// The zip (IEEE) CRC-32.
fn crc32(data: &[u8]) -> u32 {
    let table: Vec<u32> = (0..256u32)
        .map(|n| (0..8).fold(n, |c, _| if c & 1 == 1 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 }))
        .collect();
    !data.iter().fold(!0u32, |c, &b| table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_zip_checksum() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn written_files_read_back_bit_identical() {
        let tensors = vec![
            PthTensor {
                name: "model.a.weight".into(),
                shape: vec![2, 3],
                data: vec![1.0, -0.0, f32::MIN_POSITIVE, 4.5, 5.0, 6.0],
            },
            PthTensor { name: "model.scalar".into(), shape: vec![], data: vec![7.0] },
            PthTensor { name: "model.empty".into(), shape: vec![0, 4], data: vec![] },
        ];
        let dir = std::env::temp_dir().join(format!("hrnet-ocr-pth-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.pth");
        write_pth(&path, &tensors).unwrap();
        let back = super::super::read_pth(&path).unwrap();
        assert_eq!(back.len(), 3);
        for (b, t) in back.iter().zip(&tensors) {
            assert_eq!((&b.name, &b.shape), (&t.name, &t.shape));
            assert_eq!(
                b.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        let bad = [PthTensor { name: "x".into(), shape: vec![2], data: vec![1.0] }];
        assert!(write_pth(&path, &bad).unwrap_err().to_string().contains("tensor x"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
