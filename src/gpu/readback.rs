//! Copies of device buffers back to the host.

use super::wait::{block_on, delivery};
use super::Gpu;
use crate::error::{Error, Result};

/// Copies `size` bytes of `buffer` from `offset` to the host through a staging buffer.
pub(crate) fn read_buffer(gpu: &Gpu, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
    Ok(read_buffers(gpu, &[(buffer, offset, size)])?.remove(0))
}

/// Copies each (buffer, offset, bytes) range to the host: one staging buffer, one
/// command buffer, one wait.
pub(crate) fn read_buffers(gpu: &Gpu, ranges: &[(&wgpu::Buffer, u64, u64)]) -> Result<Vec<Vec<u8>>> {
    gpu.submit_staged(&[], [], ranges)?.read(gpu)
}

/// [`read_buffers`] without blocking: the browser's form.
pub(crate) async fn read_buffers_async(
    gpu: &Gpu,
    ranges: &[(&wgpu::Buffer, u64, u64)],
) -> Result<Vec<Vec<u8>>> {
    gpu.submit_staged(&[], [], ranges)?.read_async(gpu).await
}

/// Copies of device ranges on their way to the host: the staging buffer (with each
/// range's length) and the submission that fills it.
pub(crate) struct Staged {
    pub(super) staging: Option<(wgpu::Buffer, Vec<u64>)>,
    pub(super) index: wgpu::SubmissionIndex,
}

/// Records copies of `ranges` into a new staging buffer (none for no ranges).
pub(super) fn stage(
    gpu: &Gpu,
    encoder: &mut wgpu::CommandEncoder,
    ranges: &[(&wgpu::Buffer, u64, u64)],
) -> Option<(wgpu::Buffer, Vec<u64>)> {
    if ranges.is_empty() {
        return None;
    }
    let total: u64 = ranges.iter().map(|r| r.2).sum();
    let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: total.max(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut at = 0;
    for &(buffer, offset, size) in ranges {
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, at, size);
        at += size;
    }
    Some((staging, ranges.iter().map(|r| r.2).collect()))
}

impl Staged {
    /// The staged ranges' bytes, once their submission has finished (later submissions may
    /// still run).
    pub(crate) fn read(self, gpu: &Gpu) -> Result<Vec<Vec<u8>>> {
        block_on(self.read_async(gpu), "the async readbacks (Tensor::read)")
    }

    /// [`Staged::read`] as a future: natively it waits for the submission in place; in a
    /// browser it resolves when WebGPU has mapped the staging buffer.
    pub(crate) async fn read_async(self, gpu: &Gpu) -> Result<Vec<Vec<u8>>> {
        let Some((staging, sizes)) = self.staging else { return Ok(Vec::new()) };
        let (deliver, mapped) = delivery();
        staging.slice(..).map_async(wgpu::MapMode::Read, deliver);
        // Natively the map callback runs inside this poll; WebGPU polls by itself.
        gpu.device
            .poll(wgpu::PollType::Wait { submission_index: Some(self.index), timeout: None })
            .map_err(|e| Error::Device(format!("waiting for the device: {e}")))?;
        let mapped = mapped.await;
        gpu.check_device_error()?;
        mapped.map_err(|e| Error::Readback(e.to_string()))?;
        let data = {
            let view = staging.slice(..).get_mapped_range().map_err(|e| Error::Readback(e.to_string()))?;
            let mut at = 0;
            sizes
                .iter()
                .map(|&size| {
                    let bytes = view[at as usize..(at + size) as usize].to_vec();
                    at += size;
                    bytes
                })
                .collect()
        };
        staging.unmap();
        Ok(data)
    }
}
