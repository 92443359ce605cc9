//! Pixel-wise cross entropy and OHEM cross entropy over NCHW logits (`loss.wgsl`).
//!
//! Semantics are PyTorch's and HRNet-OCR's: pixels whose label is the ignore label are left
//! out; with class weights `w` the loss is `sum(w[y] * nll) / sum(w[y])` ([`Reduction`]
//! says how else it is reduced). OHEM keeps the pixels whose target-class probability is
//! below `max(p_sorted[min(min_kept, n - 1)], thresh)` and averages `w[y] * nll` over them. **When no pixel is left (every label
//! ignored) the loss is 0 and the gradient is 0, never NaN** (PyTorch would give NaN).
//! Labels at or above the class count are treated as ignored by the kernels;
//! [`crate::data::image::check_labels`] rejects them on the host before they reach the device.

use super::{f32_bytes, launch, scratch, to_u32};
use crate::error::{check_shape, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, DType, Tensor};

/// Pixels per invocation when summing the loss.
const CHUNK_PIXELS: usize = 256;

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
        _pad: [u32; 2],
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
    /// A one-element tensor holding the loss after the forward has run.
    pub loss: Tensor,
    denom: Tensor,
    target_prob: Tensor,
    select_state: Tensor,
}

impl CrossEntropy<'_> {
    fn ohem(&self) -> Option<Ohem> {
        match self.reduction {
            Reduction::Ohem(ohem) => Some(ohem),
            _ => None,
        }
    }

    fn params(&self, logits: &Tensor, labels: &Tensor, flags: u32) -> Result<Params> {
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
            chunk_len: CHUNK_PIXELS as u32,
            ignore_label: self.ignore_label,
            flags,
            grad_scale: 1.0,
            thresh: ohem.thresh,
            min_kept: to_u32("min_kept", ohem.min_kept)?,
            radix_pass: 0,
            _pad: [0; 2],
        })
    }

    /// The loss's (partial sums, backward) entry points: one pair per kind, each reading
    /// only the class weights and selection outputs its kind has.
    fn entries(&self) -> (&'static str, &'static str) {
        match (self.class_weight.is_some(), self.ohem().is_some()) {
            (false, false) => ("ce_partials", "ce_backward"),
            (true, false) => ("ce_partials_weighted", "ce_backward_weighted"),
            (false, true) => ("ce_partials_ohem", "ce_backward_ohem"),
            (true, true) => ("ce_partials_weighted_ohem", "ce_backward_weighted_ohem"),
        }
    }

    /// The inputs every pixel term reads: logits, labels, the class weights if any, and
    /// OHEM's target probabilities and selection if it is on.
    fn pixel_inputs<'t>(
        &'t self,
        logits: &'t Tensor,
        labels: &'t Tensor,
        pass: &'t LossPass,
    ) -> Vec<Binding<'t>> {
        let mut bindings = vec![Binding::read(1, logits), Binding::read_u32(2, labels)];
        bindings.extend(self.class_weight.map(|w| Binding::read(3, w)));
        if self.ohem().is_some() {
            bindings
                .extend([Binding::read(13, &pass.target_prob), Binding::read_u32(14, &pass.select_state)]);
        }
        bindings
    }

    /// Records the loss of `logits` against `labels`.
    pub fn forward(&self, gpu: &Gpu, logits: &Tensor, labels: &Tensor) -> Result<LossPass> {
        let mut p = self.params(logits, labels, 0)?;
        to_u32("logits", logits.numel())?;
        let pixels = labels.numel();
        let chunks = pixels.div_ceil(CHUNK_PIXELS);
        let partials = scratch(gpu, "loss partials", 2 * chunks)?;
        let pass = LossPass {
            forward: Vec::new(),
            loss: Tensor::empty(gpu, &[1])?,
            denom: Tensor::empty(gpu, &[1])?,
            target_prob: Tensor::empty(gpu, &[pixels])?,
            select_state: Tensor::empty_of(gpu, &[4], DType::U32)?,
        };
        let histogram = Tensor::empty_of(gpu, &[256], DType::U32)?;
        let classes = p.classes as usize;
        let pixel_cost =
            Cost { flops: 4 * logits.numel() as u64, bytes: f32_bytes(logits.numel() + 2 * pixels) };
        let mut forward = Vec::new();
        if self.ohem().is_some() {
            let probs = [
                Binding::read(1, logits),
                Binding::read_u32(2, labels),
                Binding::write(8, &pass.target_prob),
                Binding::write_u32(9, &histogram),
            ];
            forward.push(launch(gpu, Shader::Loss, "ohem_probs", &p, &probs, pixels.max(256), pixel_cost)?);
            for radix_pass in 0..4 {
                p.radix_pass = radix_pass;
                let count = [
                    Binding::read(13, &pass.target_prob),
                    Binding::write_u32(9, &histogram),
                    Binding::read_u32(14, &pass.select_state),
                ];
                let hist_cost = Cost { flops: 0, bytes: f32_bytes(pixels) };
                forward.push(launch(gpu, Shader::Loss, "ohem_histogram", &p, &count, pixels, hist_cost)?);
                let select = [Binding::write_u32(9, &histogram), Binding::write_u32(10, &pass.select_state)];
                let select_cost = Cost { flops: 0, bytes: f32_bytes(512) };
                forward.push(launch(gpu, Shader::Loss, "ohem_select", &p, &select, 1, select_cost)?);
            }
        }
        let mut terms = self.pixel_inputs(logits, labels, &pass);
        terms.push(Binding::write(4, &partials));
        let sum_cost = Cost { flops: (2 * classes + 4) as u64 * pixels as u64, bytes: pixel_cost.bytes };
        forward.push(launch(gpu, Shader::Loss, self.entries().0, &p, &terms, chunks, sum_cost)?);
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
    ) -> Result<Dispatch> {
        let mut p = self.params(logits, labels, if accumulate { ACCUMULATE } else { 0 })?;
        p.grad_scale = grad_scale;
        check_shape("cross entropy logits gradient", logits.shape(), grad_logits.shape())?;
        let mut bindings = self.pixel_inputs(logits, labels, pass);
        bindings.extend([Binding::read(12, &pass.denom), Binding::write(7, grad_logits)]);
        let n = logits.numel();
        let cost = Cost { flops: 6 * n as u64, bytes: f32_bytes(2 * n + labels.numel()) };
        launch(gpu, Shader::Loss, self.entries().1, &p, &bindings, labels.numel(), cost)
    }
}
