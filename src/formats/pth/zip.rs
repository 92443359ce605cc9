//! The zip container of torch >= 1.6: stored (uncompressed) entries found through the
//! central directory.

use super::pickle::*;
use super::torch::*;
use super::*;

// ---------------------------------------------------------------------------------------------
// Zip format

pub(super) const ZIP_LOCAL: [u8; 4] = *b"PK\x03\x04";
pub(super) const ZIP_CENTRAL: [u8; 4] = *b"PK\x01\x02";
pub(super) const ZIP_END: [u8; 4] = *b"PK\x05\x06";
pub(super) const ZIP64_END: [u8; 4] = *b"PK\x06\x06";
pub(super) const ZIP64_LOCATOR: [u8; 4] = *b"PK\x06\x07";
/// The end-of-central-directory record without its comment.
pub(super) const ZIP_END_LEN: usize = 22;
/// A 32-bit field with this value lives in the zip64 extra field.
pub(super) const ZIP64_SAVED: u32 = u32::MAX;

pub(super) fn zip_checkpoint(bytes: &[u8]) -> Parse<Checkpoint<'_>> {
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
pub(super) struct ZipEntry {
    pub(super) name: String,
    pub(super) method: u16,
    pub(super) compressed: u64,
    pub(super) uncompressed: u64,
    pub(super) header_offset: u64,
}

impl ZipEntry {
    /// The entry's bytes, which must be stored uncompressed (as torch writes them).
    pub(super) fn data<'a>(&self, bytes: &'a [u8]) -> Parse<&'a [u8]> {
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

pub(super) fn zip_entries(bytes: &[u8]) -> Parse<Vec<ZipEntry>> {
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
pub(super) fn central_directory(bytes: &[u8]) -> Parse<(u64, usize)> {
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

pub(super) fn central_record(cur: &mut Cursor) -> Parse<ZipEntry> {
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
pub(super) fn zip64_extra(extra: &[u8]) -> Parse<Option<Cursor<'_>>> {
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
