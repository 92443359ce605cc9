//! Pixel-wise cross entropy and OHEM cross entropy over NCHW logits (`loss.wgsl`).
//!
//! Logits beyond a storage binding (many classes, large crops, large batches) are read in
//! channel slabs of one image each ([`slabs`]): the per-pixel statistics sum over the slabs
//! in class order, so the loss and its gradient are bit-identical however they are cut.
//!
//! Semantics are PyTorch's and HRNet-OCR's: pixels whose label is the ignore label are left
//! out; with class weights `w` the loss is `sum(w[y] * nll) / sum(w[y])` ([`Reduction`]
//! says how else it is reduced). OHEM keeps the pixels whose target-class probability is
//! below `max(p_sorted[min(min_kept, n - 1)], thresh)` and averages `w[y] * nll` over them. **When no pixel is left (every label
//! ignored) the loss is 0 and the gradient is 0, never NaN** (PyTorch would give NaN).
//! Labels at or above the class count are treated as ignored by the kernels;
//! [`crate::data::image::check_labels`] rejects them on the host before they reach the device.
//!
//! The loss sums its pixels in chunks, an invocation or a workgroup tree per chunk
//! ([`Summing`]): a tuned family ([`LossClass`]).

use super::slabs::{self, Cut, Slab};
use super::sums::{self, Summing, SumsClass, TREE_WORKGROUP};
use super::tuning;
use super::{f32_bytes, launch, scratch, to_u32};
use crate::error::{check_shape, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, DType, Tensor};
use std::ops::Range;

/// Pixels per chunk of the loss's sums: 256 for one invocation, or 64 for each of a tree's
/// invocations.
fn chunk_pixels(summing: Summing) -> usize {
    match summing {
        Summing::Chunked => 256,
        Summing::Tree | Summing::Subgroup => 64 * TREE_WORKGROUP,
    }
}

/// What a loss's summing is chosen for: its classes and pixels (N x H x W), the pixels
/// rounded up to a power of two and capped at [`PROXY_PIXELS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossClass {
    pub classes: usize,
    pub pixels: usize,
}

/// A timing proxy's most pixels: 16 of a tree's chunks.
pub const PROXY_PIXELS: usize = 1 << 16;

impl LossClass {
    pub fn of(logits: &Tensor) -> Result<Self> {
        let [n, k, h, w] = logits.dims4("cross entropy logits")?;
        Ok(LossClass { classes: k, pixels: (n * h * w).next_power_of_two().min(PROXY_PIXELS) })
    }
}

impl SumsClass for LossClass {
    const FAMILY: &'static str = "loss_sums";

    fn key(&self) -> String {
        format!("{}x{}", self.classes, self.pixels)
    }

    /// The logits the forward reads.
    fn terms(&self) -> usize {
        self.classes * self.pixels
    }

    /// A cross entropy's forward (the backward sums nothing) over a proxy of one image of
    /// the class's pixels.
    fn time(&self, gpu: &Gpu, summing: Summing) -> Result<f64> {
        let logits = Tensor::zeros(gpu, &[1, self.classes, 1, self.pixels])?;
        let labels = Tensor::from_u32(gpu, &[1, 1, self.pixels], &vec![0; self.pixels])?;
        let ce = CrossEntropy { ignore_label: u32::MAX, class_weight: None, reduction: Reduction::Mean };
        tuning::time_dispatches(gpu, &ce.forward_with(gpu, &logits, &labels, summing)?.forward)
    }
}

crate::gpu::shader_params! {
    struct Params {
        n: u32,
        classes: u32,
        hw: u32,
        chunk_len: u32,
        ignore_label: u32,
        flags: u32,
        grad_scale: f32,
        thresh: f32,
        min_kept: u32,
        radix_pass: u32,
        first_class: u32,
        slab_classes: u32,
        first_image: u32,
        _pad: [u32; 3],
    }
}

const ACCUMULATE: u32 = 1;
const ALL_PIXELS: u32 = 2;

/// Online hard example mining: HRNet-OCR's `OHEMTHRES` and `OHEMKEEP`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ohem {
    pub thresh: f32,
    pub min_kept: usize,
}

/// How the per-pixel losses `w[y] * nll` (none where the label is ignored) become one
/// number: the official criteria's three ways.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reduction {
    /// PyTorch's weighted mean, `sum(w[y] * nll) / sum(w[y])` (`CrossEntropy`).
    Mean,
    /// Their sum over every pixel count, ignored ones included: the official train loop's
    /// `losses.mean()` of the unreduced loss `OhemCrossEntropy` gives its aux output.
    AllPixels,
    /// The plain mean over the pixels OHEM keeps (`OhemCrossEntropy`'s last output).
    Ohem(Ohem),
}

/// A cross-entropy loss over `[N, K, H, W]` logits and `[N, H, W]` u32 labels.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy<'a> {
    pub ignore_label: u32,
    /// Per-class weights `[K]`, or none.
    pub class_weight: Option<&'a Tensor>,
    pub reduction: Reduction,
}

/// The recorded loss: its value and what the backward needs, kept between the passes.
pub struct LossPass {
    pub forward: Vec<Dispatch>,
    /// How the forward summed its chunks, for the backward's parameters to match.
    summing: Summing,
    /// A one-element tensor holding the loss after the forward has run.
    pub loss: Tensor,
    denom: Tensor,
    /// Per pixel: (max logit, sum of exp(logit - max), target logit, 0).
    stats: Tensor,
    target_prob: Tensor,
    select_state: Tensor,
}

/// The images one launch of a per-pixel pass covers: the whole batch, or one image.
#[derive(Clone, Copy)]
enum Images {
    All,
    One(usize),
}

impl Images {
    /// The part of a per-pixel tensor `[N, ...]` the launch binds.
    fn of(self, gpu: &Gpu, t: &Tensor) -> Result<Tensor> {
        match self {
            Images::All => Ok(t.clone()),
            Images::One(i) => {
                let mut shape = t.shape().to_vec();
                shape[0] = 1;
                t.view(gpu, i * (t.numel() / t.shape()[0]), &shape)
            }
        }
    }

    fn params(self, p: &Params) -> Params {
        match self {
            Images::All => *p,
            Images::One(i) => Params { n: 1, first_image: i as u32, ..*p },
        }
    }
}

/// A launch over logits: which images, and which classes.
struct Piece {
    images: Images,
    classes: Range<usize>,
}

impl Piece {
    /// The part of the logits (or their gradient) the launch binds.
    fn logits(&self, gpu: &Gpu, t: &Tensor) -> Result<Tensor> {
        match self.images {
            Images::All => Ok(t.clone()),
            Images::One(item) => Slab { item, channels: self.classes.clone() }.view(gpu, Cut::new(t, 0)),
        }
    }

    fn params(&self, p: &Params) -> Params {
        Params {
            first_class: self.classes.start as u32,
            slab_classes: self.classes.len() as u32,
            ..self.images.params(p)
        }
    }
}

impl CrossEntropy<'_> {
    fn ohem(&self) -> Option<Ohem> {
        match self.reduction {
            Reduction::Ohem(ohem) => Some(ohem),
            _ => None,
        }
    }

    /// The kernels' parameters, with the chunk length of `summing`.
    fn params(&self, logits: &Tensor, labels: &Tensor, flags: u32, summing: Summing) -> Result<Params> {
        let [n, k, h, w] = logits.dims4("cross entropy logits")?;
        check_shape("cross entropy labels", &[n, h, w], labels.shape())?;
        labels.check_dtype("cross entropy labels", DType::U32)?;
        if let Some(cw) = self.class_weight {
            check_shape("cross entropy class weights", &[k], cw.shape())?;
        }
        let (ohem, flags) = match self.reduction {
            Reduction::Ohem(ohem) => (ohem, flags),
            Reduction::AllPixels => (Ohem { thresh: 0.0, min_kept: 0 }, flags | ALL_PIXELS),
            Reduction::Mean => (Ohem { thresh: 0.0, min_kept: 0 }, flags),
        };
        Ok(Params {
            n: to_u32("N", n)?,
            classes: to_u32("classes", k)?,
            hw: to_u32("H x W", h * w)?,
            chunk_len: to_u32("loss chunk length", chunk_pixels(summing))?,
            ignore_label: self.ignore_label,
            flags,
            grad_scale: 1.0,
            thresh: ohem.thresh,
            min_kept: to_u32("min_kept", ohem.min_kept)?,
            radix_pass: 0,
            first_class: 0,
            slab_classes: to_u32("classes", k)?,
            first_image: 0,
            _pad: [0; 3],
        })
    }

    /// The loss's (partial sums: chunked, tree and subgroup, backward) entry points: one
    /// set per kind, each reading only the class weights and selection outputs its kind has.
    fn entries(&self) -> ([&'static str; 3], &'static str) {
        match (self.class_weight.is_some(), self.ohem().is_some()) {
            (false, false) => (["ce_partials", "ce_partials_tree", "ce_partials_subgroup"], "ce_backward"),
            (true, false) => (
                ["ce_partials_weighted", "ce_partials_weighted_tree", "ce_partials_weighted_subgroup"],
                "ce_backward_weighted",
            ),
            (false, true) => (
                ["ce_partials_ohem", "ce_partials_ohem_tree", "ce_partials_ohem_subgroup"],
                "ce_backward_ohem",
            ),
            (true, true) => (
                [
                    "ce_partials_weighted_ohem",
                    "ce_partials_weighted_ohem_tree",
                    "ce_partials_weighted_ohem_subgroup",
                ],
                "ce_backward_weighted_ohem",
            ),
        }
    }

    /// The per-pixel tensors of `images`, and the pieces the passes over the logits
    /// (and `grad`, if given) launch: all at once when every tensor they bind fits a
    /// storage binding, else a channel slab of one image at a time.
    fn cover(&self, gpu: &Gpu, logits: &Tensor, grad: Option<&Tensor>, pass: &LossPass) -> Result<Cover> {
        let [n, k, _, _] = logits.dims4("cross entropy logits")?;
        let per_pixel = [&pass.stats, &pass.target_prob];
        let mut cuts = vec![Cut::new(logits, 0)];
        cuts.extend(grad.map(|g| Cut::new(g, 0)));
        let tensors: Vec<&Tensor> = cuts.iter().map(|c| c.tensor).chain(per_pixel).collect();
        if !slabs::exceeds_binding(gpu, &tensors) {
            return Ok(Cover {
                images: vec![Images::All],
                pieces: vec![Piece { images: Images::All, classes: 0..k }],
            });
        }
        let pieces = slabs::channel_slabs(gpu, n, k, &cuts)?
            .into_iter()
            .map(|s| Piece { images: Images::One(s.item), classes: s.channels })
            .collect();
        Ok(Cover { images: (0..n).map(Images::One).collect(), pieces })
    }

    /// Records the loss of `logits` against `labels`.
    pub fn forward(&self, gpu: &Gpu, logits: &Tensor, labels: &Tensor) -> Result<LossPass> {
        self.forward_with(gpu, logits, labels, sums::choose(None, gpu, &LossClass::of(logits)?))
    }

    /// [`CrossEntropy::forward`] with the given summing of the pixel chunks.
    pub fn forward_with(
        &self,
        gpu: &Gpu,
        logits: &Tensor,
        labels: &Tensor,
        summing: Summing,
    ) -> Result<LossPass> {
        let mut p = self.params(logits, labels, 0, summing)?;
        let [n, _, h, w] = logits.dims4("cross entropy logits")?;
        let hw = h * w;
        let image_chunks = hw.div_ceil(chunk_pixels(summing));
        let chunks = n * image_chunks;
        let partials = scratch(gpu, "loss partials", 2 * chunks)?;
        let pass = LossPass {
            forward: Vec::new(),
            summing,
            loss: Tensor::empty(gpu, &[1])?,
            denom: Tensor::empty(gpu, &[1])?,
            stats: Tensor::empty(gpu, &[n, hw, 4])?,
            target_prob: Tensor::empty(gpu, &[n, hw])?,
            select_state: Tensor::empty_of(gpu, &[4], DType::U32)?,
        };
        let histogram = Tensor::empty_of(gpu, &[256], DType::U32)?;
        let cover = self.cover(gpu, logits, None, &pass)?;
        let mut forward = Vec::new();
        for entry in ["ce_max", "ce_sum_exp"] {
            for piece in &cover.pieces {
                let (slab, pixels) =
                    (piece.logits(gpu, logits)?, PixelViews::of(gpu, piece.images, labels, &pass)?);
                let mut bindings = vec![Binding::read(1, &slab), Binding::write(15, &pixels.stats)];
                // The target logit is the labelled class's.
                bindings.extend((entry == "ce_sum_exp").then(|| Binding::read_u32(2, &pixels.labels)));
                let cost = Cost {
                    flops: 2 * slab.numel() as u64,
                    bytes: f32_bytes(slab.numel() + 5 * pixels.count()),
                };
                forward.push(launch(
                    gpu,
                    Shader::Loss,
                    entry,
                    &piece.params(&p),
                    &bindings,
                    pixels.count(),
                    cost,
                )?);
            }
        }
        if self.ohem().is_some() {
            for &images in &cover.images {
                let pixels = PixelViews::of(gpu, images, labels, &pass)?;
                let probs = [
                    Binding::read_u32(2, &pixels.labels),
                    Binding::read(16, &pixels.stats),
                    Binding::write(8, &pixels.target_prob),
                    Binding::write_u32(9, &histogram),
                ];
                let cost = Cost { flops: 2 * pixels.count() as u64, bytes: f32_bytes(6 * pixels.count()) };
                let invocations = pixels.count().max(256);
                forward.push(launch(
                    gpu,
                    Shader::Loss,
                    "ohem_probs",
                    &images.params(&p),
                    &probs,
                    invocations,
                    cost,
                )?);
            }
            for radix_pass in 0..4 {
                p.radix_pass = radix_pass;
                for &images in &cover.images {
                    let pixels = PixelViews::of(gpu, images, labels, &pass)?;
                    let count = [
                        Binding::read(13, &pixels.target_prob),
                        Binding::write_u32(9, &histogram),
                        Binding::read_u32(14, &pass.select_state),
                    ];
                    let cost = Cost { flops: 0, bytes: f32_bytes(pixels.count()) };
                    let params = images.params(&p);
                    forward.push(launch(
                        gpu,
                        Shader::Loss,
                        "ohem_histogram",
                        &params,
                        &count,
                        pixels.count(),
                        cost,
                    )?);
                }
                let select = [Binding::write_u32(9, &histogram), Binding::write_u32(10, &pass.select_state)];
                let select_cost = Cost { flops: 0, bytes: f32_bytes(512) };
                forward.push(launch(gpu, Shader::Loss, "ohem_select", &p, &select, 1, select_cost)?);
            }
        }
        for &images in &cover.images {
            let pixels = PixelViews::of(gpu, images, labels, &pass)?;
            let mut terms = pixels.term_inputs(self, &pass);
            terms.push(Binding::write(4, &partials));
            let params = images.params(&p);
            let launched = params.n as usize * image_chunks;
            let cost = Cost { flops: 8 * pixels.count() as u64, bytes: f32_bytes(7 * pixels.count()) };
            let entries = (Shader::Loss, self.entries().0);
            forward.push(summing.launch(gpu, entries, &params, &terms, (launched, cost))?);
        }
        let finalize =
            [Binding::read(11, &partials), Binding::write(5, &pass.loss), Binding::write(6, &pass.denom)];
        let finalize_cost = Cost { flops: 2 * chunks as u64, bytes: f32_bytes(2 * chunks + 2) };
        forward.push(launch(gpu, Shader::Loss, "ce_finalize", &p, &finalize, 1, finalize_cost)?);
        Ok(LossPass { forward, ..pass })
    }

    /// `grad_logits (+)= grad_scale * d loss / d logits`, from a recorded forward.
    pub fn backward(
        &self,
        gpu: &Gpu,
        pass: &LossPass,
        logits: &Tensor,
        labels: &Tensor,
        grad_scale: f32,
        (grad_logits, accumulate): (&Tensor, bool),
    ) -> Result<Vec<Dispatch>> {
        let mut p = self.params(logits, labels, if accumulate { ACCUMULATE } else { 0 }, pass.summing)?;
        p.grad_scale = grad_scale;
        check_shape("cross entropy logits gradient", logits.shape(), grad_logits.shape())?;
        let cover = self.cover(gpu, logits, Some(grad_logits), pass)?;
        let mut d = Vec::new();
        for piece in &cover.pieces {
            let (slab, grad) = (piece.logits(gpu, logits)?, piece.logits(gpu, grad_logits)?);
            let pixels = PixelViews::of(gpu, piece.images, labels, pass)?;
            let mut bindings = pixels.term_inputs(self, pass);
            bindings.extend([
                Binding::read(1, &slab),
                Binding::read(12, &pass.denom),
                Binding::write(7, &grad),
            ]);
            let cost = Cost {
                flops: 6 * slab.numel() as u64,
                bytes: f32_bytes(2 * slab.numel() + 6 * pixels.count()),
            };
            d.push(launch(
                gpu,
                Shader::Loss,
                self.entries().1,
                &piece.params(&p),
                &bindings,
                pixels.count(),
                cost,
            )?);
        }
        Ok(d)
    }
}

/// How the loss's launches cover the batch: the images of the per-pixel passes, and the
/// pieces of the passes over the logits.
struct Cover {
    images: Vec<Images>,
    pieces: Vec<Piece>,
}

/// The per-pixel tensors one launch binds: the batch's, or views of one image's.
struct PixelViews {
    labels: Tensor,
    stats: Tensor,
    target_prob: Tensor,
}

impl PixelViews {
    fn of(gpu: &Gpu, images: Images, labels: &Tensor, pass: &LossPass) -> Result<Self> {
        Ok(PixelViews {
            labels: images.of(gpu, labels)?,
            stats: images.of(gpu, &pass.stats)?,
            target_prob: images.of(gpu, &pass.target_prob)?,
        })
    }

    fn count(&self) -> usize {
        self.labels.numel()
    }

    /// What every pixel term reads: labels, statistics, the class weights if any, and
    /// OHEM's target probabilities and selection if it is on.
    fn term_inputs<'a>(&'a self, ce: &CrossEntropy<'a>, pass: &'a LossPass) -> Vec<Binding<'a>> {
        let mut bindings = vec![Binding::read_u32(2, &self.labels), Binding::read(16, &self.stats)];
        bindings.extend(ce.class_weight.map(|w| Binding::read(3, w)));
        if ce.ohem().is_some() {
            bindings
                .extend([Binding::read(13, &self.target_prob), Binding::read_u32(14, &pass.select_state)]);
        }
        bindings
    }
}
