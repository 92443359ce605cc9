//! Argmax over classes and the confusion matrix for mIoU (`metrics.wgsl`).

use super::{f32_bytes, launch, to_u32};
use crate::error::{check_shape, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

crate::gpu::shader_params! {
    struct Params {
        n: u32,
        classes: u32,
        hw: u32,
        ignore_label: u32,
    }
}

fn params(scores: &Tensor, ignore_label: u32) -> Result<Params> {
    let [n, k, h, w] = scores.dims4("argmax scores")?;
    to_u32("scores", scores.numel())?;
    Ok(Params { n: n as u32, classes: k as u32, hw: (h * w) as u32, ignore_label })
}

/// `prediction[n, h, w] = argmax over k of scores[n, k, h, w]` (the first maximum), as u32.
pub fn argmax(gpu: &Gpu, scores: &Tensor, prediction: &Tensor) -> Result<Dispatch> {
    let p = params(scores, 0)?;
    let [n, _, h, w] = scores.dims4("argmax scores")?;
    check_shape("argmax prediction", &[n, h, w], prediction.shape())?;
    let cost = Cost { flops: scores.numel() as u64, bytes: f32_bytes(scores.numel() + prediction.numel()) };
    let bindings = [Binding::read(1, scores), Binding::write_u32(2, prediction)];
    launch(gpu, Shader::Metrics, "argmax_classes", &p, &bindings, prediction.numel(), cost)
}

/// `confusion[label, prediction] += 1` over the pixels whose label is not `ignore_label`;
/// `confusion` is u32 `[K, K]` (rows: ground truth) and keeps counting across calls.
pub fn confusion(
    gpu: &Gpu,
    prediction: &Tensor,
    labels: &Tensor,
    classes: usize,
    ignore_label: u32,
    confusion: &Tensor,
) -> Result<Dispatch> {
    check_shape("confusion labels", prediction.shape(), labels.shape())?;
    check_shape("confusion matrix", &[classes, classes], confusion.shape())?;
    let px = prediction.numel();
    let p = Params { n: 1, classes: to_u32("classes", classes)?, hw: to_u32("pixels", px)?, ignore_label };
    let bindings =
        [Binding::read_u32(5, prediction), Binding::read_u32(3, labels), Binding::write_u32(4, confusion)];
    let cost = Cost { flops: 0, bytes: f32_bytes(2 * px) };
    launch(gpu, Shader::Metrics, "confusion_accumulate", &p, &bindings, px, cost)
}
