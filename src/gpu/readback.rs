//! Copies of device buffers back to the host.

use super::Gpu;
use crate::error::{Error, Result};

/// Copies `size` bytes of `buffer` from `offset` to the host through a staging buffer.
pub(crate) fn read_buffer(gpu: &Gpu, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
    Ok(read_buffers(gpu, &[(buffer, offset, size)])?.remove(0))
}

/// Copies each (buffer, offset, bytes) range to the host: one staging buffer, one
/// command buffer, one wait.
pub(crate) fn read_buffers(gpu: &Gpu, ranges: &[(&wgpu::Buffer, u64, u64)]) -> Result<Vec<Vec<u8>>> {
    gpu.check_lost()?;
    let total: u64 = ranges.iter().map(|r| r.2).sum();
    let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: total.max(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    let mut at = 0;
    for &(buffer, offset, size) in ranges {
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, at, size);
        at += size;
    }
    gpu.queue.submit([encoder.finish()]);
    gpu.count_submission(true);
    let (tx, rx) = std::sync::mpsc::channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    gpu.wait()?;
    rx.recv()
        .map_err(|_| Error::Readback("the map callback never ran".into()))?
        .map_err(|e| Error::Readback(e.to_string()))?;
    let data = {
        let view = staging.slice(..).get_mapped_range().map_err(|e| Error::Readback(e.to_string()))?;
        let mut at = 0;
        ranges
            .iter()
            .map(|r| {
                let bytes = view[at as usize..(at + r.2) as usize].to_vec();
                at += r.2;
                bytes
            })
            .collect()
    };
    staging.unmap();
    Ok(data)
}
