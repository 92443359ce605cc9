//! Batch normalisation over N x H x W per channel, PyTorch semantics (`batch_norm.wgsl`).

use super::slabs::{self, Cut};
use super::{f32_bytes, launch, plane_block_invocations, reduction_chunks, scratch, to_u32};
use crate::error::{check_shape, Error, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

/// PyTorch's defaults, which HRNet-OCR uses everywhere.
pub const EPS: f32 = 1e-5;
pub const MOMENTUM: f32 = 0.1;

/// The parameters and running statistics of one batch-norm layer.
#[derive(Clone, Copy)]
pub struct BatchNormParams<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub eps: f32,
    pub momentum: f32,
}

crate::gpu::shader_params! {
    struct Params {
        n: u32,
        c: u32,
        hw: u32,
        chunk_len: u32,
        flags: u32,
        eps: f32,
        momentum: f32,
        first_channel: u32,
    }
}

const ACCUMULATE: u32 = 1;
const RELU: u32 = 2;

/// The shape of the per-channel (mean, 1/std) a training forward saves for the backward.
pub fn saved_shape(channels: usize) -> [usize; 2] {
    [channels, 2]
}

/// Shapes of one layer, with the split of its channel reductions.
struct Layout {
    dims: [usize; 4],
    chunks: usize,
    params: Params,
}

impl Layout {
    fn new(what: &str, x: &Tensor, bn: &BatchNormParams<'_>, flags: u32) -> Result<Self> {
        let [n, c, h, w] = x.dims4(what)?;
        for (name, t) in [
            ("weight", bn.gamma),
            ("bias", bn.beta),
            ("running_mean", bn.running_mean),
            ("running_var", bn.running_var),
        ] {
            check_shape(&format!("{what} {name}"), &[c], t.shape())?;
        }
        let samples = n * h * w;
        let chunk_len = samples.div_ceil(reduction_chunks(c, samples));
        let chunks = samples.div_ceil(chunk_len);
        to_u32("batch_norm elements", n * c * h * w)?;
        Ok(Layout {
            dims: [n, c, h, w],
            chunks,
            params: Params {
                n: to_u32("N", n)?,
                c: to_u32("C", c)?,
                hw: to_u32("H x W", h * w)?,
                chunk_len: to_u32("chunk length", chunk_len)?,
                flags,
                eps: bn.eps,
                momentum: bn.momentum,
                first_channel: 0,
            },
        })
    }

    /// A training pass's layout, its saved statistics and output checked against the input.
    fn with_saved(
        x: &Tensor,
        bn: &BatchNormParams<'_>,
        (saved, y): (&Tensor, &Tensor),
        flags: u32,
    ) -> Result<Self> {
        let l = Layout::new("batch_norm input", x, bn, flags)?;
        check_shape("batch_norm output", x.shape(), y.shape())?;
        check_shape("batch_norm saved statistics", &saved_shape(l.channels()), saved.shape())?;
        Ok(l)
    }

    fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    fn channels(&self) -> usize {
        self.dims[1]
    }

    fn samples_per_channel(&self) -> usize {
        self.dims[0] * self.dims[2] * self.dims[3]
    }

    /// Invocations of the elementwise passes (see `plane_block` in the shader).
    fn plane_blocks(&self, gpu: &Gpu) -> usize {
        let [n, c, h, w] = self.dims;
        plane_block_invocations(gpu, n * c, h * w)
    }
}

/// Training-mode forward: batch statistics into `saved` (see [`saved_shape`]), the running
/// statistics updated in place, `y` normalised. Three dispatches.
pub fn forward_train(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    y: &Tensor,
) -> Result<Vec<Dispatch>> {
    let l = Layout::with_saved(x, bn, (saved, y), 0)?;
    if l.samples_per_channel() < 2 {
        return Err(Error::Invalid(format!(
            "batch_norm in training mode needs more than one value per channel; input shape {:?}",
            x.shape()
        )));
    }
    let (numel, c) = (l.numel(), l.channels());
    let partials = scratch(gpu, "batch_norm stats", 2 * l.chunks * c)?;
    let stats = launch(
        gpu,
        Shader::BatchNorm,
        "bn_stats_partials",
        &l.params,
        &[Binding::read(1, x), Binding::write(8, &partials)],
        l.chunks * c,
        Cost { flops: 3 * numel as u64, bytes: f32_bytes(numel + 2 * l.chunks * c) },
    )?;
    let finalize = launch(
        gpu,
        Shader::BatchNorm,
        "bn_stats_finalize",
        &l.params,
        &[
            Binding::read(1, x),
            Binding::write(4, bn.running_mean),
            Binding::write(5, bn.running_var),
            Binding::write(6, saved),
            Binding::read(15, &partials),
        ],
        c,
        Cost { flops: (2 * l.chunks * c + 10 * c) as u64, bytes: f32_bytes(2 * l.chunks * c + 6 * c) },
    )?;
    Ok(vec![stats, finalize, normalize_train(gpu, &l, x, bn, saved, y)?])
}

/// `y = relu(BN(x))` with the batch statistics a training forward saved: a BN-ReLU output
/// recomputed in the backward, bit-identical to the forward's (the same arithmetic, then
/// ReLU's max). One dispatch.
pub fn normalize_relu_train(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    y: &Tensor,
) -> Result<Dispatch> {
    let l = Layout::with_saved(x, bn, (saved, y), RELU)?;
    normalize_train(gpu, &l, x, bn, saved, y)
}

/// The normalisation pass with saved batch statistics (`l`'s flags: ReLU after, or not).
fn normalize_train(
    gpu: &Gpu,
    l: &Layout,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    y: &Tensor,
) -> Result<Dispatch> {
    let (numel, c) = (l.numel(), l.channels());
    launch(
        gpu,
        Shader::BatchNorm,
        "bn_normalize_train",
        &l.params,
        &[
            Binding::read(1, x),
            Binding::read(2, bn.gamma),
            Binding::read(3, bn.beta),
            Binding::read(14, saved),
            Binding::write(7, y),
        ],
        l.plane_blocks(gpu),
        Cost { flops: 4 * numel as u64, bytes: f32_bytes(2 * numel + 4 * c) },
    )
}

/// Eval-mode forward with the running statistics: one launch, or one per channel slab
/// when the tensors exceed a binding (each channel is normalised on its own).
pub fn forward_eval(gpu: &Gpu, x: &Tensor, bn: &BatchNormParams<'_>, y: &Tensor) -> Result<Vec<Dispatch>> {
    let l = Layout::new("batch_norm input", x, bn, 0)?;
    check_shape("batch_norm output", x.shape(), y.shape())?;
    if !slabs::exceeds_binding(gpu, &[x]) {
        return Ok(vec![normalize_eval(gpu, (x, 0), bn, y)?]);
    }
    let [n, c, _, _] = l.dims;
    let cuts = [Cut::item(x, 0), Cut::item(y, 0)];
    let mut d = Vec::new();
    for slab in slabs::channel_slabs(gpu, n, c, &cuts)? {
        let (xs, ys) = (slab.view(gpu, cuts[0])?, slab.view(gpu, cuts[1])?);
        d.push(normalize_eval(gpu, (&xs, slab.channels.start), bn, &ys)?);
    }
    Ok(d)
}

/// One launch over `x`, channels `first..` of the layer (the whole tensor, or a slab).
fn normalize_eval(
    gpu: &Gpu,
    (x, first): (&Tensor, usize),
    bn: &BatchNormParams<'_>,
    y: &Tensor,
) -> Result<Dispatch> {
    let [n, c, h, w] = x.dims4("batch_norm input")?;
    let numel = n * c * h * w;
    to_u32("batch_norm elements", numel)?;
    let params = Params {
        n: n as u32,
        c: c as u32,
        hw: (h * w) as u32,
        // An elementwise pass: no reduction to chunk.
        chunk_len: 0,
        flags: 0,
        eps: bn.eps,
        momentum: bn.momentum,
        first_channel: first as u32,
    };
    launch(
        gpu,
        Shader::BatchNorm,
        "bn_normalize_eval",
        &params,
        &[
            Binding::read(1, x),
            Binding::read(2, bn.gamma),
            Binding::read(3, bn.beta),
            Binding::read(17, bn.running_mean),
            Binding::read(18, bn.running_var),
            Binding::write(7, y),
        ],
        plane_block_invocations(gpu, n * c, h * w),
        Cost { flops: 4 * numel as u64, bytes: f32_bytes(2 * numel + 4 * c) },
    )
}

/// Where a training-mode backward writes, and whether each gradient is overwritten or
/// accumulated into.
pub struct BatchNormGrads<'a> {
    pub grad_x: &'a Tensor,
    pub grad_gamma: &'a Tensor,
    pub grad_beta: &'a Tensor,
    pub accumulate_x: bool,
    pub accumulate_params: bool,
}

/// Training-mode backward from the statistics `forward_train` saved. Three dispatches.
pub fn backward(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    grad_y: &Tensor,
    grads: &BatchNormGrads<'_>,
) -> Result<Vec<Dispatch>> {
    let mut l = Layout::new("batch_norm input", x, bn, 0)?;
    let c = l.channels();
    check_shape("batch_norm saved statistics", &saved_shape(c), saved.shape())?;
    check_shape("batch_norm output gradient", x.shape(), grad_y.shape())?;
    check_shape("batch_norm input gradient", x.shape(), grads.grad_x.shape())?;
    check_shape("batch_norm weight gradient", &[c], grads.grad_gamma.shape())?;
    check_shape("batch_norm bias gradient", &[c], grads.grad_beta.shape())?;
    let numel = l.numel();
    let partials = scratch(gpu, "batch_norm backward partials", 2 * l.chunks * c)?;
    let grad_sums = scratch(gpu, "batch_norm backward sums", 2 * c)?;
    let sums = launch(
        gpu,
        Shader::BatchNorm,
        "bn_backward_partials",
        &l.params,
        &[
            Binding::read(1, x),
            Binding::read(14, saved),
            Binding::write(8, &partials),
            Binding::read(9, grad_y),
        ],
        l.chunks * c,
        Cost { flops: 4 * numel as u64, bytes: f32_bytes(2 * numel + 2 * l.chunks * c) },
    )?;
    l.params.flags = if grads.accumulate_params { ACCUMULATE } else { 0 };
    let finalize = launch(
        gpu,
        Shader::BatchNorm,
        "bn_backward_finalize",
        &l.params,
        &[
            Binding::read(15, &partials),
            Binding::write(11, grads.grad_gamma),
            Binding::write(12, grads.grad_beta),
            Binding::write(13, &grad_sums),
        ],
        c,
        Cost { flops: (2 * l.chunks * c) as u64, bytes: f32_bytes(2 * l.chunks * c + 4 * c) },
    )?;
    l.params.flags = if grads.accumulate_x { ACCUMULATE } else { 0 };
    let input = launch(
        gpu,
        Shader::BatchNorm,
        "bn_backward_input",
        &l.params,
        &[
            Binding::read(1, x),
            Binding::read(2, bn.gamma),
            Binding::read(14, saved),
            Binding::read(9, grad_y),
            Binding::write(10, grads.grad_x),
            Binding::read(16, &grad_sums),
        ],
        l.plane_blocks(gpu),
        Cost { flops: 8 * numel as u64, bytes: f32_bytes(3 * numel + 5 * c) },
    )?;
    Ok(vec![sums, finalize, input])
}
