//! A tensor: a range of a device buffer and an NCHW shape, with f32 elements for data (f16
//! for the activations of half-precision inference) and u32 for labels and counts.

use crate::error::{fmt_shape, Error, Result};
pub use crate::gpu::DType;
use crate::gpu::{block_on, read_buffers, read_buffers_async, BufferBinding, Gpu, PooledBuffer};
use crate::half::{f16_to_f32, f32_to_f16};
use std::sync::Arc;

/// A tensor on the device. Cloning shares the buffer.
#[derive(Clone)]
pub struct Tensor {
    buffer: Arc<PooledBuffer>,
    /// Byte offset of the first element in the buffer (non-zero for views).
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{:?}>{}", self.dtype, fmt_shape(&self.shape))
    }
}

impl Tensor {
    /// An f32 tensor whose contents are unspecified (a reused buffer keeps old data).
    pub fn empty(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        Self::empty_of(gpu, shape, DType::F32)
    }

    /// A tensor of `dtype` whose contents are unspecified.
    pub fn empty_of(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Self> {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        // Rounded up to whole 4-byte words, which storage bindings are sized in.
        let bytes = numel.and_then(|n| n.checked_mul(dtype.size() as usize)).map(|b| b.next_multiple_of(4));
        let bytes = bytes.ok_or_else(|| {
            Error::Invalid(format!("tensor of shape {} overflows the address space", fmt_shape(shape)))
        })? as u64;
        if bytes == 0 {
            return Err(Error::Invalid(format!("tensor of shape {} has no elements", fmt_shape(shape))));
        }
        // A tensor may be as large as a buffer; launches bind views of at most a binding
        // (see `kernels::slabs`).
        let limit = gpu.limits().max_buffer_size;
        if bytes > limit {
            let what = format!("tensor of shape {}", fmt_shape(shape));
            return Err(Error::Limit { what, bytes, limit, limit_name: "max_buffer_size" });
        }
        gpu.check_lost()?;
        let buffer = gpu.pool().acquire(&gpu.device, bytes).map_err(|e| {
            Error::Device(format!("allocating a tensor of shape {} ({bytes} bytes): {e}", fmt_shape(shape)))
        })?;
        let buffer = Arc::new(buffer);
        Ok(Tensor { buffer, offset: 0, shape: shape.to_vec(), dtype })
    }

    /// An f32 tensor holding `data` (row-major NCHW); `data.len()` must match the shape.
    pub fn from_slice(gpu: &Gpu, shape: &[usize], data: &[f32]) -> Result<Self> {
        let t = Self::empty(gpu, shape)?;
        t.write(gpu, data)?;
        Ok(t)
    }

    /// A u32 tensor holding `data` (labels, counts).
    pub fn from_u32(gpu: &Gpu, shape: &[usize], data: &[u32]) -> Result<Self> {
        let t = Self::empty_of(gpu, shape, DType::U32)?;
        t.write_u32(gpu, data)?;
        Ok(t)
    }

    /// An f32 tensor with every element `value`.
    pub fn full(gpu: &Gpu, shape: &[usize], value: f32) -> Result<Self> {
        let t = Self::empty(gpu, shape)?;
        t.fill(gpu, value);
        Ok(t)
    }

    pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        Self::full(gpu, shape, 0.0)
    }

    /// A view of `shape` starting `start` elements into this tensor, sharing its buffer.
    /// The start must meet the adapter's storage offset alignment.
    pub fn view(&self, gpu: &Gpu, start: usize, shape: &[usize]) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel == 0 || start + numel > self.numel() {
            return Err(Error::Invalid(format!(
                "a view of shape {} at element {start} does not fit in a tensor of shape {}",
                fmt_shape(shape),
                fmt_shape(&self.shape)
            )));
        }
        let offset = self.offset + start as u64 * self.dtype.size();
        let align = u64::from(gpu.limits().min_storage_buffer_offset_alignment);
        if offset % align != 0 {
            return Err(Error::Invalid(format!(
                "a view at byte offset {offset} breaks the adapter's storage offset alignment of {align} bytes"
            )));
        }
        Ok(Tensor { buffer: Arc::clone(&self.buffer), offset, shape: shape.to_vec(), dtype: self.dtype })
    }

    /// Overwrites the contents of a float tensor with `data` (rounded to the nearest half,
    /// ties to even, for an f16 one).
    pub fn write(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        self.check_float("write")?;
        self.check_len(data.len())?;
        self.write_floats(gpu, data);
        Ok(())
    }

    fn write_floats(&self, gpu: &Gpu, data: &[f32]) {
        if self.dtype == DType::F16 {
            let mut halves: Vec<u16> = data.iter().map(|&v| f32_to_f16(v)).collect();
            // Whole words: the tensor's buffer range is rounded up to them.
            halves.resize(halves.len().next_multiple_of(2), 0);
            gpu.queue.write_buffer(self.buffer(), self.offset, bytemuck::cast_slice(&halves));
        } else {
            gpu.queue.write_buffer(self.buffer(), self.offset, bytemuck::cast_slice(data));
        }
    }

    /// Sets every element of a float tensor to `value` (tests poison outputs with NaN this
    /// way).
    pub fn fill(&self, gpu: &Gpu, value: f32) {
        self.write_floats(gpu, &vec![value; self.numel()]);
    }

    /// Copies a float tensor back to the host as f32 (waits for all submitted work).
    /// In a browser, which cannot block, use [`Tensor::read`].
    pub fn to_vec(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        block_on(self.read(gpu), "Tensor::read")
    }

    /// [`Tensor::to_vec`] as a future.
    pub async fn read(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.check_float("read")?;
        Ok(self.floats(&self.read_bytes(gpu).await?))
    }

    /// This tensor's elements as f32, from its bytes.
    fn floats(&self, bytes: &[u8]) -> Vec<f32> {
        match self.dtype {
            DType::F16 => bytes
                .chunks_exact(2)
                .take(self.numel())
                .map(|h| f16_to_f32(u16::from_le_bytes([h[0], h[1]])))
                .collect(),
            _ => bytemuck::cast_slice(bytes).to_vec(),
        }
    }

    /// Copies a u32 tensor back to the host. In a browser use [`Tensor::read_u32`].
    pub fn to_vec_u32(&self, gpu: &Gpu) -> Result<Vec<u32>> {
        block_on(self.read_u32(gpu), "Tensor::read_u32")
    }

    /// [`Tensor::to_vec_u32`] as a future.
    pub async fn read_u32(&self, gpu: &Gpu) -> Result<Vec<u32>> {
        self.check_dtype("read_u32", DType::U32)?;
        Ok(bytemuck::cast_slice(&self.read_bytes(gpu).await?).to_vec())
    }

    async fn read_bytes(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        Ok(read_buffers_async(gpu, &[(self.buffer(), self.offset, self.words_bytes())]).await?.remove(0))
    }

    /// Overwrites the contents of a u32 tensor with `data`.
    pub fn write_u32(&self, gpu: &Gpu, data: &[u32]) -> Result<()> {
        self.check_dtype("write_u32", DType::U32)?;
        self.check_len(data.len())?;
        gpu.queue.write_buffer(self.buffer(), self.offset, bytemuck::cast_slice(data));
        Ok(())
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len == self.numel() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "{len} values given for a tensor of shape {} ({} elements)",
            fmt_shape(&self.shape),
            self.numel()
        )))
    }

    /// An error naming `what` unless the elements are floats (f32 or f16).
    pub fn check_float(&self, what: &str) -> Result<()> {
        if self.dtype == DType::U32 {
            return Err(Error::Invalid(format!("{what}: expected a float tensor, got {self:?}")));
        }
        Ok(())
    }

    /// An error naming `what` unless the elements are of `dtype`.
    pub fn check_dtype(&self, what: &str, dtype: DType) -> Result<()> {
        if self.dtype == dtype {
            return Ok(());
        }
        Err(Error::Invalid(format!("{what}: expected a {dtype:?} tensor, got {self:?}")))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the elements in bytes (the buffer may be larger).
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * self.dtype.size()
    }

    /// Size of the elements in whole 4-byte words, what copies and bindings take.
    pub(crate) fn words_bytes(&self) -> u64 {
        self.bytes().next_multiple_of(4)
    }

    /// The device buffer behind the tensor, shared by its views: (an identity, its size).
    pub(crate) fn storage(&self) -> (usize, u64) {
        (Arc::as_ptr(&self.buffer) as usize, self.buffer.buffer().size())
    }

    /// The shape as `[N, C, H, W]`, or an error naming `what` if it is not 4-D.
    pub fn dims4(&self, what: &str) -> Result<[usize; 4]> {
        <[usize; 4]>::try_from(self.shape.as_slice()).map_err(|_| Error::Shape {
            what: what.to_string(),
            expected: "[N, C, H, W]".to_string(),
            actual: fmt_shape(&self.shape),
        })
    }

    /// The (buffer, offset, bytes) the tensor's elements occupy, for copies.
    pub(crate) fn range(&self) -> (&wgpu::Buffer, u64, u64) {
        (self.buffer(), self.offset, self.words_bytes())
    }

    /// Whether both tensors live in the same device buffer (views included).
    pub fn same_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
    }

    /// Whether both tensors share bytes of one buffer.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        self.same_buffer(other)
            && self.offset < other.offset + other.bytes()
            && other.offset < self.offset + self.bytes()
    }

    /// Where the tensor starts in its buffer, in bytes.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.buffer()
    }
}

/// A tensor bound at a binding index of a kernel's bind group (group 0; binding 0 is always
/// the kernel's uniform `Params`).
#[derive(Clone, Copy)]
pub struct Binding<'a> {
    pub index: u32,
    pub tensor: &'a Tensor,
    /// Whether the kernel writes it (a `read_write` storage binding).
    pub writes: bool,
    /// The element type the shader declares there.
    pub dtype: DType,
}

impl<'a> Binding<'a> {
    /// A float tensor the kernel reads: f32, or f16 where the shader is a half-precision
    /// module (the contract checks which the shader declares).
    pub fn read(index: u32, tensor: &'a Tensor) -> Self {
        Binding { index, tensor, writes: false, dtype: float_dtype(tensor) }
    }

    /// A float tensor the kernel writes (and may read).
    pub fn write(index: u32, tensor: &'a Tensor) -> Self {
        Binding { index, tensor, writes: true, dtype: float_dtype(tensor) }
    }

    /// A u32 tensor the kernel reads.
    pub fn read_u32(index: u32, tensor: &'a Tensor) -> Self {
        Binding { index, tensor, writes: false, dtype: DType::U32 }
    }

    /// A u32 tensor the kernel writes.
    pub fn write_u32(index: u32, tensor: &'a Tensor) -> Self {
        Binding { index, tensor, writes: true, dtype: DType::U32 }
    }

    /// The buffer range it binds: exactly the tensor's elements, so `arrayLength` matches
    /// the shape.
    pub(crate) fn to_buffer(self) -> BufferBinding<'a> {
        BufferBinding {
            index: self.index,
            buffer: &self.tensor.buffer,
            offset: self.tensor.offset,
            size: self.tensor.words_bytes(),
            writes: self.writes,
            dtype: self.dtype,
        }
    }
}

/// The element type a float binding of `tensor` declares.
fn float_dtype(tensor: &Tensor) -> DType {
    if tensor.dtype == DType::F16 {
        DType::F16
    } else {
        DType::F32
    }
}

/// The f32 elements of each tensor, copied back together: one submission and one wait.
pub fn read_many(gpu: &Gpu, tensors: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
    for t in tensors {
        t.check_float("read_many")?;
    }
    let ranges: Vec<_> = tensors.iter().map(|t| t.range()).collect();
    Ok(read_buffers(gpu, &ranges)?.iter().zip(tensors).map(|(b, t)| t.floats(b)).collect())
}
