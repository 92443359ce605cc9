//! Batch normalisation over N x H x W per channel, PyTorch semantics (`batch_norm.wgsl`).

use super::slabs::{self, Cut, Slab};
use super::sums::{self, Summing, SumsClass};
use super::tuning;
use super::{f32_bytes, launch, plane_block_invocations, scratch, to_u32};
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

impl<'a> BatchNormParams<'a> {
    /// A layer with PyTorch's default epsilon and momentum.
    pub fn with_defaults([gamma, beta, running_mean, running_var]: [&'a Tensor; 4]) -> Self {
        BatchNormParams { gamma, beta, running_mean, running_var, eps: EPS, momentum: MOMENTUM }
    }
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
        layer_channels: u32,
        layer_samples: u32,
        first_chunk: u32,
        _pad: u32,
    }
}

const ACCUMULATE: u32 = 1;
const RELU: u32 = 2;

/// The shape of the per-channel statistics a training forward saves for the backward:
/// (mean minus the shift, 1 / std, the shift, unused), the shift being the channel's first
/// value.
pub fn saved_shape(channels: usize) -> [usize; 2] {
    [channels, 4]
}

/// The partial-sums entry points of each pass: chunked, tree, subgroup.
const STATS_PARTIALS: (Shader, [&str; 3]) =
    (Shader::BatchNorm, ["bn_stats_partials", "bn_stats_partials_tree", "bn_stats_partials_subgroup"]);
const BACKWARD_PARTIALS: (Shader, [&str; 3]) = (
    Shader::BatchNorm,
    ["bn_backward_partials", "bn_backward_partials_tree", "bn_backward_partials_subgroup"],
);

/// Chunks per image for `c` channels of `n` images of `hw` samples summed by `summing`.
fn image_chunks(summing: Summing, n: usize, c: usize, hw: usize) -> usize {
    summing.chunks(c, n * hw).div_ceil(n).clamp(1, hw)
}

/// What a batch norm's summing is chosen for: its channels and samples per channel
/// (N x H x W), rounded up to a power of two and capped at [`tuning::PROXY_SIDE`] squared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnClass {
    pub channels: usize,
    pub samples: usize,
}

impl BnClass {
    pub fn of(x: &Tensor) -> Result<Self> {
        let [n, c, h, w] = x.dims4("batch_norm input")?;
        let cap = tuning::PROXY_SIDE * tuning::PROXY_SIDE;
        Ok(BnClass { channels: c, samples: (n * h * w).next_power_of_two().min(cap) })
    }
}

impl SumsClass for BnClass {
    const FAMILY: &'static str = "batch_norm_sums";

    fn key(&self) -> String {
        format!("{}x{}", self.channels, self.samples)
    }

    fn terms(&self) -> usize {
        self.channels * self.samples
    }

    /// A training forward and backward on a proxy of one image of the class's samples.
    fn time(&self, gpu: &Gpu, summing: Summing) -> Result<f64> {
        let c = self.channels;
        let shape = [1, c, 1, self.samples];
        let vector = || Tensor::zeros(gpu, &[c]);
        let (gamma, beta, mean, var) = (vector()?, vector()?, vector()?, vector()?);
        let bn = BatchNormParams::with_defaults([&gamma, &beta, &mean, &var]);
        let (x, y, gx) =
            (Tensor::zeros(gpu, &shape)?, Tensor::zeros(gpu, &shape)?, Tensor::zeros(gpu, &shape)?);
        let saved = Tensor::zeros(gpu, &saved_shape(c))?;
        let (grad_gamma, grad_beta) = (vector()?, vector()?);
        let grads = BatchNormGrads {
            grad_x: &gx,
            grad_gamma: &grad_gamma,
            grad_beta: &grad_beta,
            accumulate_x: false,
            accumulate_params: false,
        };
        let mut d = forward_train_with(gpu, &x, &bn, &saved, &y, summing)?;
        d.extend(backward_with(gpu, &x, &bn, &saved, &y, &grads, summing)?);
        tuning::time_dispatches(gpu, &d)
    }
}

/// Shapes of one layer, with the split of its channel reductions into chunks of samples
/// within one image.
struct Layout {
    dims: [usize; 4],
    /// Chunks per image.
    image_chunks: usize,
    params: Params,
}

impl Layout {
    fn new(what: &str, x: &Tensor, bn: &BatchNormParams<'_>, flags: u32, summing: Summing) -> Result<Self> {
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
        // Chunks of equal length within each image, as many per image as the whole
        // reduction's split asks for: a channel slab of one image then sums whole chunks.
        let chunk_len = (h * w).div_ceil(image_chunks(summing, n, c, h * w));
        to_u32("batch_norm elements", n * c * h * w)?;
        Ok(Layout {
            dims: [n, c, h, w],
            image_chunks: (h * w).div_ceil(chunk_len),
            params: Params {
                n: to_u32("N", n)?,
                c: to_u32("C", c)?,
                hw: to_u32("H x W", h * w)?,
                chunk_len: to_u32("chunk length", chunk_len)?,
                flags,
                eps: bn.eps,
                momentum: bn.momentum,
                first_channel: 0,
                layer_channels: c as u32,
                layer_samples: to_u32("N x H x W", samples)?,
                first_chunk: 0,
                _pad: 0,
            },
        })
    }

    /// A training pass's layout, its saved statistics and output checked against the input.
    fn with_saved(
        x: &Tensor,
        bn: &BatchNormParams<'_>,
        (saved, y): (&Tensor, &Tensor),
        flags: u32,
        summing: Summing,
    ) -> Result<Self> {
        let l = Layout::new("batch_norm input", x, bn, flags, summing)?;
        check_shape("batch_norm output", x.shape(), y.shape())?;
        check_shape("batch_norm saved statistics", &saved_shape(l.channels()), saved.shape())?;
        Ok(l)
    }

    /// The layout of one rank of `ranks` whose statistics are over all their samples.
    fn across(mut self, ranks: usize) -> Result<Self> {
        let samples = self.params.layer_samples as usize * ranks;
        self.params.layer_samples = to_u32("N x H x W over the ranks", samples)?;
        Ok(self)
    }

    fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    fn channels(&self) -> usize {
        self.dims[1]
    }

    fn chunks(&self) -> usize {
        self.dims[0] * self.image_chunks
    }

    /// What the per-element passes run over: the whole layer, or, when one of `tensors`
    /// (shaped like the input) exceeds a binding, each image's channel slabs.
    fn pieces(&self, gpu: &Gpu, tensors: &[&Tensor]) -> Result<Vec<Piece>> {
        let cuts: Vec<Cut> = tensors.iter().map(|t| Cut::new(t, 0)).collect();
        let [n, c, _, _] = self.dims;
        let Some(slabs) = slabs::split(gpu, n, c, &cuts)? else {
            return Ok(vec![Piece { slab: None, params: self.params }]);
        };
        Ok(slabs
            .into_iter()
            .map(|slab| Piece {
                params: Params {
                    n: 1,
                    c: slab.channels.len() as u32,
                    first_channel: slab.channels.start as u32,
                    first_chunk: (slab.item * self.image_chunks) as u32,
                    ..self.params
                },
                slab: Some(slab),
            })
            .collect())
    }
}

/// The whole layer or one image's channel slab, with the parameters that place it.
struct Piece {
    slab: Option<Slab>,
    params: Params,
}

impl Piece {
    /// The piece's view of a tensor shaped like the layer's input.
    fn view(&self, gpu: &Gpu, t: &Tensor) -> Result<Tensor> {
        match &self.slab {
            None => Ok(t.clone()),
            Some(slab) => slab.view(gpu, Cut::new(t, 0)),
        }
    }

    fn first_image(&self) -> bool {
        self.slab.as_ref().is_none_or(|s| s.item == 0)
    }

    fn numel(&self) -> usize {
        let p = &self.params;
        (p.n * p.c * p.hw) as usize
    }

    fn plane_blocks(&self, gpu: &Gpu) -> usize {
        let p = &self.params;
        plane_block_invocations(gpu, (p.n * p.c) as usize, p.hw as usize)
    }
}

/// Training-mode forward: batch statistics into `saved` (see [`saved_shape`]), the running
/// statistics updated in place, `y` normalised. Four dispatches, or those of each slab.
pub fn forward_train(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    y: &Tensor,
) -> Result<Vec<Dispatch>> {
    forward_train_with(gpu, x, bn, saved, y, sums::choose(None, gpu, &BnClass::of(x)?))
}

/// [`forward_train`] with the given summing of the channel sums.
pub fn forward_train_with(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    y: &Tensor,
    summing: Summing,
) -> Result<Vec<Dispatch>> {
    Ok(forward_train_synced(gpu, x, bn, (saved, y), summing, 1)?.dispatches)
}

/// The training forward of one rank of `ranks` whose batch norm normalises with the
/// statistics of all their batches together (synchronized batch norm): the dispatches of
/// [`forward_train_with`], with an [`Exchange::Statistics`] between the partial sums and
/// their finalisation, which then reads the one chunk the exchange wrote. One rank:
/// exactly [`forward_train_with`]'s dispatches.
pub fn forward_train_synced(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    (saved, y): (&Tensor, &Tensor),
    summing: Summing,
    ranks: usize,
) -> Result<SyncedPass> {
    let l = Layout::with_saved(x, bn, (saved, y), 0, summing)?.across(ranks)?;
    if l.dims[0] * l.dims[2] * l.dims[3] * ranks < 2 {
        return Err(Error::Invalid(format!(
            "batch_norm in training mode needs more than one value per channel; input shape {:?}",
            x.shape()
        )));
    }
    let (numel, c, chunks) = (l.numel(), l.channels(), l.chunks());
    let pieces = l.pieces(gpu, &[x, y])?;
    let partials = scratch(gpu, "batch_norm stats", 2 * chunks * c)?;
    let mut d = Vec::new();
    for piece in pieces.iter().filter(|p| p.first_image()) {
        let xs = piece.view(gpu, x)?;
        let bindings = [Binding::read(1, &xs), Binding::write(6, saved)];
        let cost = Cost { flops: 0, bytes: f32_bytes(5 * piece.params.c as usize) };
        d.push(launch(
            gpu,
            Shader::BatchNorm,
            "bn_shift",
            &piece.params,
            &bindings,
            piece.params.c as usize,
            cost,
        )?);
    }
    for piece in &pieces {
        let xs = piece.view(gpu, x)?;
        let bindings = [Binding::read(1, &xs), Binding::read(14, saved), Binding::write(8, &partials)];
        let (terms, sums) =
            (piece.numel(), l.image_chunks * piece.params.n as usize * piece.params.c as usize);
        let cost = Cost { flops: 3 * terms as u64, bytes: f32_bytes(terms + 2 * sums) };
        d.push(summing.launch(gpu, STATS_PARTIALS, &piece.params, &bindings, (sums, cost))?);
    }
    let exchange_at = d.len();
    // Synchronized: the exchange leaves the global sums as one chunk of the whole layer.
    let finalize = match ranks {
        1 => l.params,
        _ => Params { n: 1, chunk_len: l.params.hw, ..l.params },
    };
    d.push(launch(
        gpu,
        Shader::BatchNorm,
        "bn_stats_finalize",
        &finalize,
        &[
            Binding::write(4, bn.running_mean),
            Binding::write(5, bn.running_var),
            Binding::write(6, saved),
            Binding::read(15, &partials),
        ],
        c,
        Cost { flops: (2 * chunks * c + 10 * c) as u64, bytes: f32_bytes(2 * chunks * c + 8 * c) },
    )?);
    for piece in &pieces {
        d.push(normalize_train(gpu, piece, [x, y], bn, saved)?);
    }
    debug_assert_eq!(numel, pieces.iter().map(Piece::numel).sum::<usize>());
    let samples = l.dims[0] * l.dims[2] * l.dims[3];
    let exchange = Exchange::Statistics { partials, saved: saved.clone(), chunks, channels: c, samples };
    Ok(SyncedPass { dispatches: d, exchange_at, exchange })
}

/// `y = relu(BN(x))` with the batch statistics a training forward saved: a BN-ReLU output
/// recomputed in the backward, bit-identical to the forward's (the same arithmetic, then
/// ReLU's max). One dispatch, or one per slab.
pub fn normalize_relu_train(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    y: &Tensor,
) -> Result<Vec<Dispatch>> {
    // The chunking matters only to the statistics, which this pass reads.
    let l = Layout::with_saved(x, bn, (saved, y), RELU, Summing::Chunked)?;
    l.pieces(gpu, &[x, y])?.iter().map(|piece| normalize_train(gpu, piece, [x, y], bn, saved)).collect()
}

/// The normalisation pass of one piece with saved batch statistics (its flags: ReLU after,
/// or not).
fn normalize_train(
    gpu: &Gpu,
    piece: &Piece,
    [x, y]: [&Tensor; 2],
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
) -> Result<Dispatch> {
    normalize(gpu, ("bn_normalize_train", piece), [x, y], bn, &[Binding::read(14, saved)])
}

/// Eval-mode forward with the running statistics: one launch, or one per channel slab
/// when the tensors exceed a binding (each channel is normalised on its own).
pub fn forward_eval(gpu: &Gpu, x: &Tensor, bn: &BatchNormParams<'_>, y: &Tensor) -> Result<Vec<Dispatch>> {
    let l = Layout::new("batch_norm input", x, bn, 0, Summing::Chunked)?;
    check_shape("batch_norm output", x.shape(), y.shape())?;
    let statistics = [Binding::read(17, bn.running_mean), Binding::read(18, bn.running_var)];
    let pieces = l.pieces(gpu, &[x, y])?;
    pieces.iter().map(|piece| normalize(gpu, ("bn_normalize_eval", piece), [x, y], bn, &statistics)).collect()
}

/// One piece of an elementwise normalisation `entry`: `y` from `x`, gamma, beta and the
/// `statistics` it normalises with.
fn normalize(
    gpu: &Gpu,
    (entry, piece): (&'static str, &Piece),
    [x, y]: [&Tensor; 2],
    bn: &BatchNormParams<'_>,
    statistics: &[Binding<'_>],
) -> Result<Dispatch> {
    let (xs, ys) = (piece.view(gpu, x)?, piece.view(gpu, y)?);
    let mut bindings = vec![Binding::read(1, &xs), Binding::read(2, bn.gamma), Binding::read(3, bn.beta)];
    bindings.extend_from_slice(statistics);
    bindings.push(Binding::write(7, &ys));
    let numel = piece.numel();
    let cost = Cost { flops: 4 * numel as u64, bytes: f32_bytes(2 * numel + 6 * piece.params.c as usize) };
    launch(gpu, Shader::BatchNorm, entry, &piece.params, &bindings, piece.plane_blocks(gpu), cost)
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

/// Training-mode backward from the statistics `forward_train` saved. Three dispatches, or
/// the per-element ones for each slab.
pub fn backward(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    grad_y: &Tensor,
    grads: &BatchNormGrads<'_>,
) -> Result<Vec<Dispatch>> {
    backward_with(gpu, x, bn, saved, grad_y, grads, sums::choose(None, gpu, &BnClass::of(x)?))
}

/// [`backward`] with the given summing of the channel sums.
pub fn backward_with(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    grad_y: &Tensor,
    grads: &BatchNormGrads<'_>,
    summing: Summing,
) -> Result<Vec<Dispatch>> {
    Ok(backward_synced(gpu, x, bn, saved, grad_y, grads, summing, 1)?.dispatches)
}

/// The training backward of one rank of `ranks` under synchronized batch norm: the
/// dispatches of [`backward_with`], with an [`Exchange::GradientSums`] between the channel
/// sums and the input gradient, which then uses those of the global batch. The weight and
/// bias gradients stay this rank's own, as PyTorch's `SyncBatchNorm` leaves them for the
/// gradient all-reduce.
/// The training backward of one rank of `ranks` under synchronized batch norm: the
/// dispatches of [`backward_with`], with an [`Exchange::GradientSums`] between the channel
/// sums and the input gradient, which then uses those of the global batch. The weight and
/// bias gradients stay this rank's own, as PyTorch's `SyncBatchNorm` leaves them for the
/// gradient all-reduce. One rank: exactly [`backward_with`]'s dispatches.
#[allow(clippy::too_many_arguments)]
pub fn backward_synced(
    gpu: &Gpu,
    x: &Tensor,
    bn: &BatchNormParams<'_>,
    saved: &Tensor,
    grad_y: &Tensor,
    grads: &BatchNormGrads<'_>,
    summing: Summing,
    ranks: usize,
) -> Result<SyncedPass> {
    let l = Layout::new("batch_norm input", x, bn, 0, summing)?.across(ranks)?;
    let (c, chunks) = (l.channels(), l.chunks());
    check_shape("batch_norm saved statistics", &saved_shape(c), saved.shape())?;
    check_shape("batch_norm output gradient", x.shape(), grad_y.shape())?;
    check_shape("batch_norm input gradient", x.shape(), grads.grad_x.shape())?;
    check_shape("batch_norm weight gradient", &[c], grads.grad_gamma.shape())?;
    check_shape("batch_norm bias gradient", &[c], grads.grad_beta.shape())?;
    let pieces = l.pieces(gpu, &[x, grad_y, grads.grad_x])?;
    let partials = scratch(gpu, "batch_norm backward partials", 2 * chunks * c)?;
    let grad_sums = scratch(gpu, "batch_norm backward sums", 2 * c)?;
    let mut d = Vec::new();
    for piece in &pieces {
        let (xs, gys) = (piece.view(gpu, x)?, piece.view(gpu, grad_y)?);
        let bindings = [
            Binding::read(1, &xs),
            Binding::read(14, saved),
            Binding::write(8, &partials),
            Binding::read(9, &gys),
        ];
        let (terms, sums) =
            (piece.numel(), l.image_chunks * piece.params.n as usize * piece.params.c as usize);
        let cost = Cost { flops: 4 * terms as u64, bytes: f32_bytes(2 * terms + 2 * sums) };
        d.push(summing.launch(gpu, BACKWARD_PARTIALS, &piece.params, &bindings, (sums, cost))?);
    }
    let mut params = l.params;
    params.flags = if grads.accumulate_params { ACCUMULATE } else { 0 };
    d.push(launch(
        gpu,
        Shader::BatchNorm,
        "bn_backward_finalize",
        &params,
        &[
            Binding::read(15, &partials),
            Binding::write(11, grads.grad_gamma),
            Binding::write(12, grads.grad_beta),
            Binding::write(13, &grad_sums),
        ],
        c,
        Cost { flops: (2 * chunks * c) as u64, bytes: f32_bytes(2 * chunks * c + 4 * c) },
    )?);
    let exchange_at = d.len();
    for piece in &pieces {
        let mut params = piece.params;
        params.flags = if grads.accumulate_x { ACCUMULATE } else { 0 };
        let numel = piece.numel();
        d.push(launch(
            gpu,
            Shader::BatchNorm,
            "bn_backward_input",
            &params,
            &[
                Binding::read(1, &piece.view(gpu, x)?),
                Binding::read(2, bn.gamma),
                Binding::read(14, saved),
                Binding::read(9, &piece.view(gpu, grad_y)?),
                Binding::write(10, &piece.view(gpu, grads.grad_x)?),
                Binding::read(16, &grad_sums),
            ],
            piece.plane_blocks(gpu),
            Cost { flops: 8 * numel as u64, bytes: f32_bytes(3 * numel + 7 * piece.params.c as usize) },
        )?);
    }
    Ok(SyncedPass {
        dispatches: d,
        exchange_at,
        exchange: Exchange::GradientSums { sums: grad_sums, channels: c },
    })
}

/// A synchronized batch norm pass: its dispatches, and the host exchange that runs after
/// the first `exchange_at` of them.
pub struct SyncedPass {
    pub dispatches: Vec<Dispatch>,
    pub exchange_at: usize,
    pub exchange: Exchange,
}

/// What ranks of a synchronized batch norm exchange between two of its passes: each reads
/// back [`Exchange::reads`], contributes [`Exchange::local`], and writes back what
/// [`Exchange::apply`] makes of every rank's contribution (rank order, f64: every rank
/// writes the same bits).
#[derive(Clone)]
pub enum Exchange {
    /// After the forward's partial sums: this rank's (sum of x - shift, sum of its square)
    /// per (chunk, channel) and its shift per channel (its first value, `saved`'s third
    /// lane). Replaced by the global batch's sums relative to rank 0's shift, as one chunk,
    /// and rank 0's shift.
    Statistics { partials: Tensor, saved: Tensor, chunks: usize, channels: usize, samples: usize },
    /// After the backward's channel sums: (sum of grad_y, sum of grad_y * x_hat) per
    /// channel, replaced by their sums over the ranks.
    GradientSums { sums: Tensor, channels: usize },
}

impl Exchange {
    /// The tensors to read back once the passes before the exchange have run.
    pub fn reads(&self) -> Vec<&Tensor> {
        match self {
            Exchange::Statistics { partials, saved, .. } => vec![partials, saved],
            Exchange::GradientSums { sums, .. } => vec![sums],
        }
    }

    /// This rank's contribution, from what [`Exchange::reads`] read: per channel (shift,
    /// sum, sum of squares) then the sample count; or per channel the two gradient sums.
    pub fn local(&self, read: &[Vec<f32>]) -> Vec<f64> {
        match self {
            Exchange::Statistics { chunks, channels, samples, .. } => {
                let (partials, saved) = (&read[0], &read[1]);
                let mut out = Vec::with_capacity(3 * channels + 1);
                for ch in 0..*channels {
                    let sum = |lane: usize| -> f64 {
                        (0..*chunks).map(|k| f64::from(partials[2 * (k * channels + ch) + lane])).sum()
                    };
                    out.extend([f64::from(saved[4 * ch + 2]), sum(0), sum(1)]);
                }
                out.push(*samples as f64);
                out
            }
            Exchange::GradientSums { channels, .. } => {
                read[0][..2 * channels].iter().map(|&v| f64::from(v)).collect()
            }
        }
    }

    /// Writes back the combination of every rank's [`Exchange::local`] (rank order).
    pub fn apply(&self, gpu: &Gpu, all: &[Vec<f64>]) -> Result<()> {
        match self {
            Exchange::Statistics { partials, saved, channels, samples, .. } => {
                let count: f64 = all.iter().map(|r| r[3 * channels]).sum();
                if count != (*samples * all.len()) as f64 {
                    return Err(Error::Invalid(format!(
                        "synchronized batch norm: the ranks hold {count} samples per channel together, \
                         not {} ranks x {samples}: every rank must train on the same batch and crop",
                        all.len()
                    )));
                }
                let mut sums = Vec::with_capacity(2 * channels);
                let mut stats = Vec::with_capacity(4 * channels);
                for ch in 0..*channels {
                    let shift = all[0][3 * ch];
                    let (mut s1, mut s2) = (0.0, 0.0);
                    for rank in all {
                        // Rank r's sums about its own shift, moved to rank 0's.
                        let (d, n) = (rank[3 * ch] - shift, rank[3 * channels]);
                        let (r1, r2) = (rank[3 * ch + 1], rank[3 * ch + 2]);
                        s1 += r1 + n * d;
                        s2 += r2 + 2.0 * d * r1 + n * d * d;
                    }
                    sums.extend([s1 as f32, s2 as f32]);
                    stats.extend([0.0, 0.0, shift as f32, 0.0]);
                }
                partials.view(gpu, 0, &[2 * channels])?.write(gpu, &sums)?;
                saved.write(gpu, &stats)
            }
            Exchange::GradientSums { sums, channels } => {
                let total: Vec<f32> =
                    (0..2 * channels).map(|i| all.iter().map(|r| r[i]).sum::<f64>() as f32).collect();
                sums.write(gpu, &total)
            }
        }
    }
}
