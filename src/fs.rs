//! Files the engine writes: checkpoints, weights, output images, the tuning cache, logs.

use crate::error::{Error, Result};
use std::path::Path;

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`, so a
/// failure never leaves a half-written file where the old one was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let shown = path.display().to_string();
    let io = |source| Error::Io { path: shown.clone(), source };
    let file_name = path.file_name().ok_or_else(|| Error::Invalid(format!("{shown} is not a file path")))?;
    // A name of this write alone: threads of one process (data-parallel ranks writing their
    // tuning cache) may write the same path at once.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{}.tmp{}.{n}", file_name.to_string_lossy(), std::process::id()));
    // Flushed to the disk before the rename, so a crash leaves the old file or the new one.
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}
