//! OCR's two region operators, composed from the softmax and strided matmul kernels:
//! the spatial gather (SpatialGather_Module) and the pixel-region attention of
//! ObjectAttentionBlock2D. Shapes follow the model's NCHW tensors, so no transpose is
//! ever materialised: the matmuls read them through strides. Each product runs the
//! kernel the tuner, if one is given, chose for its class.

use super::matmul::{product, product_with, MatmulClass, Strided};
use super::slabs::{self, Cut};
use super::softmax::{self, Axis};
use super::tuning;
use super::tuning::Tuner;
use crate::error::{check_shape, Result};
use crate::gpu::{Dispatch, Gpu};
use crate::tensor::Tensor;

/// Sizes of a spatial gather: aux logits `[n, k, h, w]`, features `[n, c, h, w]`.
#[derive(Clone, Copy, Debug)]
struct Gather {
    n: usize,
    k: usize,
    c: usize,
    hw: usize,
}

impl Gather {
    fn resolve(aux: &Tensor, feats: &Tensor) -> Result<Self> {
        let [n, k, h, w] = aux.dims4("spatial gather region logits")?;
        let [_, c, _, _] = feats.dims4("spatial gather features")?;
        check_shape("spatial gather features", &[n, c, h, w], feats.shape())?;
        Ok(Gather { n, k, c, hw: h * w })
    }

    /// Softmax over each region's pixels.
    fn axis(&self) -> Axis {
        Axis { outer: self.n * self.k, len: self.hw, inner: 1 }
    }
}

/// The spatial gather's forward: `probs = softmax over pixels of aux` (kept for the
/// backward, shaped like `aux`) and `context[n, c, k, 0] = sum_p probs[n, k, p] * feats[n, c, p]`.
pub fn spatial_gather_forward(
    gpu: &Gpu,
    tuner: Option<&Tuner>,
    aux: &Tensor,
    feats: &Tensor,
    probs: &Tensor,
    context: &Tensor,
) -> Result<Vec<Dispatch>> {
    let g = Gather::resolve(aux, feats)?;
    check_shape("spatial gather context", &[g.n, g.c, g.k, 1], context.shape())?;
    let mut d = softmax::forward(gpu, aux, g.axis(), 1.0, probs)?;
    let f = Strided::row_major(g.c, g.hw);
    let p_t = Strided::row_major(g.k, g.hw).t();
    if !slabs::exceeds_binding(gpu, &[feats]) {
        d.push(product(gpu, tuner, g.n, (feats, f), (probs, p_t), context, false)?);
        return Ok(d);
    }
    // Features beyond a binding: the context of each item's channel slab from that slab,
    // by the kernel the whole product would use, so the sums are the same to the bit.
    let kernel = tuning::choose(tuner, gpu, &MatmulClass::of(g.n, &f, &p_t));
    let cuts = [Cut::item(feats, 0), Cut::item(context, 0)];
    for slab in slabs::channel_slabs(gpu, g.n, g.c, &cuts)? {
        let item_probs = Cut::item(probs, 0).view(gpu, slab.item, &(0..g.k))?;
        let slab_feats = (slab.view(gpu, cuts[0])?, Strided::row_major(slab.channels.len(), g.hw));
        let slab_context = slab.view(gpu, cuts[1])?;
        let feats = (&slab_feats.0, slab_feats.1);
        d.push(product_with(gpu, kernel, 1, feats, (&item_probs, p_t), &slab_context, false)?);
    }
    Ok(d)
}

/// The spatial gather's backward to both inputs: `grad_feats = grad_context @ probs` and
/// `grad_aux = softmax_backward(probs, grad_context^T @ feats)`.
pub fn spatial_gather_backward(
    gpu: &Gpu,
    tuner: Option<&Tuner>,
    feats: &Tensor,
    probs: &Tensor,
    grad_context: &Tensor,
    (grad_aux, accumulate_aux): (&Tensor, bool),
    (grad_feats, accumulate_feats): (&Tensor, bool),
) -> Result<Vec<Dispatch>> {
    let g = Gather::resolve(probs, feats)?;
    check_shape("spatial gather context gradient", &[g.n, g.c, g.k, 1], grad_context.shape())?;
    check_shape("spatial gather region-logit gradient", probs.shape(), grad_aux.shape())?;
    check_shape("spatial gather feature gradient", feats.shape(), grad_feats.shape())?;
    let gc = Strided::row_major(g.c, g.k);
    let p = Strided::row_major(g.k, g.hw);
    let f = Strided::row_major(g.c, g.hw);
    let grad_probs = Tensor::empty(gpu, probs.shape())?;
    let mut d = vec![
        product(gpu, tuner, g.n, (grad_context, gc), (probs, p), grad_feats, accumulate_feats)?,
        product(gpu, tuner, g.n, (grad_context, gc.t()), (feats, f), &grad_probs, false)?,
    ];
    d.extend(softmax::backward(gpu, probs, &grad_probs, g.axis(), 1.0, grad_aux, accumulate_aux)?);
    Ok(d)
}

/// Sizes of an object attention: query `[n, key, h, w]`, key and value `[n, key, k, 1]`.
#[derive(Clone, Copy, Debug)]
struct Attention {
    n: usize,
    ch: usize,
    k: usize,
    hw: usize,
}

impl Attention {
    fn resolve(query: &Tensor, key: &Tensor, value: &Tensor) -> Result<Self> {
        let [n, ch, h, w] = query.dims4("object attention query")?;
        let [_, _, k, _] = key.dims4("object attention key")?;
        check_shape("object attention key", &[n, ch, k, 1], key.shape())?;
        check_shape("object attention value", &[n, ch, k, 1], value.shape())?;
        Ok(Attention { n, ch, k, hw: h * w })
    }

    /// `KEY^-0.5`, the similarity scale.
    fn scale(&self) -> f32 {
        (self.ch as f32).powf(-0.5)
    }

    /// Softmax over the regions of each pixel: `sim` is `[n, hw, k]`.
    fn axis(&self) -> Axis {
        Axis { outer: self.n * self.hw, len: self.k, inner: 1 }
    }

    /// `sim` and its gradient, `[n, hw, k]`.
    fn sim_shape(&self) -> [usize; 3] {
        [self.n, self.hw, self.k]
    }
}

/// The shape of the attention map `sim` an object attention keeps for its backward.
pub fn attention_map_shape(query: &Tensor, key: &Tensor, value: &Tensor) -> Result<[usize; 3]> {
    Ok(Attention::resolve(query, key, value)?.sim_shape())
}

/// `sim = softmax over regions of (query^T @ key) * KEY^-0.5` (kept for the backward,
/// `[n, hw, k]`), then `out = value @ sim^T`, `[n, key, h, w]`.
pub fn object_attention_forward(
    gpu: &Gpu,
    tuner: Option<&Tuner>,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    sim: &Tensor,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    let a = Attention::resolve(query, key, value)?;
    check_shape("object attention map", &a.sim_shape(), sim.shape())?;
    check_shape("object attention output", query.shape(), out.shape())?;
    let logits = Tensor::empty(gpu, &a.sim_shape())?;
    let q_t = Strided::row_major(a.ch, a.hw).t();
    let kv = Strided::row_major(a.ch, a.k);
    let mut d = vec![product(gpu, tuner, a.n, (query, q_t), (key, kv), &logits, false)?];
    d.extend(softmax::forward(gpu, &logits, a.axis(), a.scale(), sim)?);
    let sim_t = Strided::row_major(a.hw, a.k).t();
    d.push(product(gpu, tuner, a.n, (value, kv), (sim, sim_t), out, false)?);
    Ok(d)
}

/// Gradients of one object attention.
pub struct AttentionGrads<'a> {
    pub query: (&'a Tensor, bool),
    pub key: (&'a Tensor, bool),
    pub value: (&'a Tensor, bool),
}

/// The object attention's backward to query, key and value, each overwritten or
/// accumulated as its flag says.
pub fn object_attention_backward(
    gpu: &Gpu,
    tuner: Option<&Tuner>,
    (query, key, value): (&Tensor, &Tensor, &Tensor),
    sim: &Tensor,
    grad_out: &Tensor,
    grads: &AttentionGrads<'_>,
) -> Result<Vec<Dispatch>> {
    let a = Attention::resolve(query, key, value)?;
    check_shape("object attention map", &a.sim_shape(), sim.shape())?;
    check_shape("object attention output gradient", query.shape(), grad_out.shape())?;
    check_shape("object attention query gradient", query.shape(), grads.query.0.shape())?;
    check_shape("object attention key gradient", key.shape(), grads.key.0.shape())?;
    check_shape("object attention value gradient", value.shape(), grads.value.0.shape())?;
    let go = Strided::row_major(a.ch, a.hw);
    let s = Strided::row_major(a.hw, a.k);
    let kv = Strided::row_major(a.ch, a.k);
    let grad_sim = Tensor::empty(gpu, &a.sim_shape())?;
    let grad_logits = Tensor::empty(gpu, &a.sim_shape())?;
    let (gv, acc_v) = grads.value;
    let (gq, acc_q) = grads.query;
    let (gk, acc_k) = grads.key;
    let mut d = vec![
        product(gpu, tuner, a.n, (grad_out, go), (sim, s), gv, acc_v)?,
        product(gpu, tuner, a.n, (grad_out, go.t()), (value, kv), &grad_sim, false)?,
    ];
    d.extend(softmax::backward(gpu, sim, &grad_sim, a.axis(), a.scale(), &grad_logits, false)?);
    d.push(product(gpu, tuner, a.n, (key, kv), (&grad_logits, s.t()), gq, acc_q)?);
    d.push(product(gpu, tuner, a.n, (query, go), (&grad_logits, s), gk, acc_k)?);
    Ok(d)
}
