//! Argmax over classes and the confusion matrix for mIoU (`metrics.wgsl`).

use super::slabs::{self, Cut};
use super::{f32_bytes, launch, scratch, to_u32};
use crate::error::{check_shape, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

crate::gpu::shader_params! {
    struct Params {
        n: u32,
        classes: u32,
        hw: u32,
        ignore_label: u32,
        first_class: u32,
        _pad: [u32; 3],
    }
}

fn params(scores: &Tensor, ignore_label: u32) -> Result<Params> {
    let [n, k, h, w] = scores.dims4("argmax scores")?;
    to_u32("scores", scores.numel())?;
    Ok(Params {
        n: n as u32,
        classes: k as u32,
        hw: (h * w) as u32,
        ignore_label,
        first_class: 0,
        _pad: [0; 3],
    })
}

/// `prediction[n, h, w] = argmax over k of scores[n, k, h, w]` (the first maximum), as u32.
/// Scores larger than a binding are read in slabs of classes, carrying the running best
/// from slab to slab (the same classes, to the bit).
pub fn argmax(gpu: &Gpu, scores: &Tensor, prediction: &Tensor) -> Result<Vec<Dispatch>> {
    let [n, k, h, w] = scores.dims4("argmax scores")?;
    check_shape("argmax prediction", &[n, h, w], prediction.shape())?;
    let cut = Cut::new(scores, 0);
    let Some(slabs) = slabs::split(gpu, n, k, &[cut])? else {
        let p = params(scores, 0)?;
        let cost =
            Cost { flops: scores.numel() as u64, bytes: f32_bytes(scores.numel() + prediction.numel()) };
        let bindings = [Binding::read(1, scores), Binding::write_u32(2, prediction)];
        return Ok(vec![launch(
            gpu,
            Shader::Metrics.storing(scores.dtype())?,
            "argmax_classes",
            &p,
            &bindings,
            prediction.numel(),
            cost,
        )?]);
    };
    let best_scores = scratch(gpu, "argmax running best", h * w)?;
    let mut d = Vec::new();
    for slab in slabs {
        let slab_scores = slab.view(gpu, cut)?;
        let item_prediction = prediction.view(gpu, slab.item * h * w, &[1, h, w])?;
        let p = Params { first_class: slab.channels.start as u32, ..params(&slab_scores, 0)? };
        let cost =
            Cost { flops: slab_scores.numel() as u64, bytes: f32_bytes(slab_scores.numel() + 3 * h * w) };
        let bindings = [
            Binding::read(1, &slab_scores),
            Binding::write_u32(2, &item_prediction),
            Binding::write(6, &best_scores),
        ];
        let shader = Shader::Metrics.storing(scores.dtype())?;
        d.push(launch(gpu, shader, "argmax_classes_slab", &p, &bindings, h * w, cost)?);
    }
    Ok(d)
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
    let p = Params {
        n: 1,
        classes: to_u32("classes", classes)?,
        hw: to_u32("pixels", px)?,
        ignore_label,
        first_class: 0,
        _pad: [0; 3],
    };
    let bindings =
        [Binding::read_u32(5, prediction), Binding::read_u32(3, labels), Binding::write_u32(4, confusion)];
    let cost = Cost { flops: 0, bytes: f32_bytes(2 * px) };
    launch(gpu, Shader::Metrics, "confusion_accumulate", &p, &bindings, px, cost)
}
