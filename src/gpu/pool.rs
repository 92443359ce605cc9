//! A pool of storage buffers. Tensors come and go by the thousand in tests and benchmarks;
//! creating a device buffer is slow on every backend, so freed buffers are kept by size
//! class and handed out again.

use super::registry::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Idle buffers beyond this many bytes are released to the driver instead of kept.
const MAX_IDLE_BYTES: u64 = 1 << 30;

const USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC).union(wgpu::BufferUsages::COPY_DST);

#[derive(Default)]
pub(crate) struct BufferPool {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    by_class: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
    /// Bytes of the buffers on loan now, and the most on loan at once since the last reset.
    lent: u64,
    peak_lent: u64,
}

/// Rounds a request up to its size class: at most 1/8 above the request, at least 256 bytes,
/// a multiple of 16 (so any f32 tensor can also be read as vec4).
fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256);
    let highest_bit = 1u64 << (63 - bytes.leading_zeros());
    let step = (highest_bit / 8).max(16);
    bytes.div_ceil(step) * step
}

impl BufferPool {
    /// A buffer of at least `bytes`: an idle one of its size class, or a new one. A device
    /// out of memory is an error (caught by an error scope), not a later panic.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        device: &wgpu::Device,
        bytes: u64,
    ) -> Result<PooledBuffer, String> {
        let class = size_class(bytes);
        let reused = {
            let mut idle = lock(&self.idle);
            let buffer = idle.by_class.get_mut(&class).and_then(Vec::pop);
            if buffer.is_some() {
                idle.bytes -= class;
            }
            idle.lent += class;
            idle.peak_lent = idle.peak_lent.max(idle.lent);
            buffer
        };
        let buffer = match reused {
            Some(buffer) => buffer,
            None => {
                let (buffer, error) = super::scoped(device, wgpu::ErrorFilter::OutOfMemory, || {
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("hrnet-ocr tensor"),
                        size: class,
                        usage: USAGE,
                        mapped_at_creation: false,
                    })
                });
                if let Some(e) = error {
                    lock(&self.idle).lent -= class;
                    return Err(e.to_string());
                }
                buffer
            }
        };
        Ok(PooledBuffer { buffer: Some(buffer), class, pool: Arc::downgrade(self) })
    }

    fn release(&self, buffer: wgpu::Buffer, class: u64) {
        let mut idle = lock(&self.idle);
        idle.lent -= class;
        if idle.bytes + class <= MAX_IDLE_BYTES {
            idle.bytes += class;
            idle.by_class.entry(class).or_default().push(buffer);
        }
    }

    pub(crate) fn idle_bytes(&self) -> u64 {
        lock(&self.idle).bytes
    }

    /// (bytes on loan now, the most on loan at once since the last reset).
    pub(crate) fn lent(&self) -> (u64, u64) {
        let idle = lock(&self.idle);
        (idle.lent, idle.peak_lent)
    }

    /// Starts a new high-water mark from what is on loan now.
    pub(crate) fn reset_peak(&self) {
        let mut idle = lock(&self.idle);
        idle.peak_lent = idle.lent;
    }
}

/// A device buffer on loan from the pool; it goes back when dropped.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    class: u64,
    pool: Weak<BufferPool>,
}

impl PooledBuffer {
    /// The device buffer (its size is the size class, at least the bytes asked for).
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("a pooled buffer holds its buffer until dropped")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let (Some(buffer), Some(pool)) = (self.buffer.take(), self.pool.upgrade()) {
            pool.release(buffer, self.class);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_with_little_waste() {
        for bytes in [1u64, 255, 256, 257, 1000, 4096, 4097, 123_457, 1 << 20, (1 << 20) + 1] {
            let c = size_class(bytes);
            assert!(c >= bytes && c % 16 == 0, "{bytes} -> {c}");
            assert!(c <= (bytes.max(256) * 9).div_ceil(8) + 16, "{bytes} -> {c} wastes too much");
        }
    }
}
