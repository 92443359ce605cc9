//! A tensor: a device buffer and an NCHW shape, f32 elements.

use crate::error::{fmt_shape, Error, Result};
use crate::gpu::{Gpu, PooledBuffer};
use std::num::NonZeroU64;
use std::sync::Arc;

/// An f32 tensor on the device. Cloning shares the buffer.
#[derive(Clone)]
pub struct Tensor {
    buffer: Arc<PooledBuffer>,
    shape: Vec<usize>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{}", fmt_shape(&self.shape))
    }
}

impl Tensor {
    /// A tensor whose contents are unspecified (a reused buffer keeps old data).
    pub fn empty(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let bytes = numel.and_then(|n| n.checked_mul(4)).ok_or_else(|| {
            Error::Invalid(format!(
                "tensor of shape {} overflows the address space",
                fmt_shape(shape)
            ))
        })? as u64;
        if bytes == 0 {
            return Err(Error::Invalid(format!(
                "tensor of shape {} has no elements",
                fmt_shape(shape)
            )));
        }
        let limits = gpu.limits();
        let binding_limit = limits.max_storage_buffer_binding_size;
        if bytes > binding_limit.min(limits.max_buffer_size) {
            let (limit, limit_name) = if binding_limit <= limits.max_buffer_size {
                (binding_limit, "max_storage_buffer_binding_size")
            } else {
                (limits.max_buffer_size, "max_buffer_size")
            };
            return Err(Error::Limit {
                what: format!("tensor of shape {}", fmt_shape(shape)),
                bytes,
                limit,
                limit_name,
            });
        }
        Ok(Tensor {
            buffer: Arc::new(gpu.pool().acquire(&gpu.device, bytes)),
            shape: shape.to_vec(),
        })
    }

    /// A tensor holding `data` (row-major NCHW); `data.len()` must match the shape.
    pub fn from_slice(gpu: &Gpu, shape: &[usize], data: &[f32]) -> Result<Self> {
        let t = Self::empty(gpu, shape)?;
        t.write(gpu, data)?;
        Ok(t)
    }

    /// A tensor with every element `value`.
    pub fn full(gpu: &Gpu, shape: &[usize], value: f32) -> Result<Self> {
        let t = Self::empty(gpu, shape)?;
        t.fill(gpu, value);
        Ok(t)
    }

    pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        Self::full(gpu, shape, 0.0)
    }

    /// Overwrites the contents with `data`.
    pub fn write(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(Error::Invalid(format!(
                "{} values given for a tensor of shape {} ({} elements)",
                data.len(),
                fmt_shape(&self.shape),
                self.numel()
            )));
        }
        gpu.queue
            .write_buffer(self.buffer(), 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Sets every element to `value` (tests poison outputs with NaN this way).
    pub fn fill(&self, gpu: &Gpu, value: f32) {
        let data = vec![value; self.numel()];
        gpu.queue
            .write_buffer(self.buffer(), 0, bytemuck::cast_slice(&data));
    }

    /// Copies the contents back to the host (waits for all submitted work).
    pub fn to_vec(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let bytes = read_buffer(gpu, self.buffer(), self.bytes())?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the elements in bytes (the buffer may be larger).
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * 4
    }

    /// The shape as `[N, C, H, W]`, or an error naming `what` if it is not 4-D.
    pub fn dims4(&self, what: &str) -> Result<[usize; 4]> {
        <[usize; 4]>::try_from(self.shape.as_slice()).map_err(|_| Error::Shape {
            what: what.to_string(),
            expected: "[N, C, H, W]".to_string(),
            actual: fmt_shape(&self.shape),
        })
    }

    /// Whether both tensors are views of the same device buffer.
    pub fn same_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.buffer()
    }

    /// The binding covers exactly the elements, so `arrayLength` matches the shape.
    pub(crate) fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer(),
            offset: 0,
            size: NonZeroU64::new(self.bytes()),
        })
    }
}

/// Copies `size` bytes of `buffer` to the host through a staging buffer.
pub(crate) fn read_buffer(gpu: &Gpu, buffer: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
    let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
    gpu.queue.submit([encoder.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    gpu.wait()?;
    rx.recv()
        .map_err(|_| Error::Readback("the map callback never ran".into()))?
        .map_err(|e| Error::Readback(e.to_string()))?;
    let data = {
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Readback(e.to_string()))?;
        view.to_vec()
    };
    staging.unmap();
    Ok(data)
}
