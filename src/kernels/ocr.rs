//! OCR's two region operators, composed from the softmax and strided matmul kernels:
//! the spatial gather (SpatialGather_Module) and the pixel-region attention of
//! ObjectAttentionBlock2D. Shapes follow the model's NCHW tensors, so no transpose is
//! ever materialised: the matmuls read them through strides. Each product runs the
//! kernel the tuner, if one is given, chose for its class.

use super::matmul::{product, product_with, MatmulClass, Strided};
use super::slabs::{self, Cut, Slab};
use super::softmax::{self, Axis};
use super::tuning;
use super::tuning::Tuner;
use crate::error::{check_shape, Error, Result};
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
    let summing = softmax::summing(tuner, gpu, &g.axis());
    let mut d = softmax::forward_with(gpu, aux, g.axis(), 1.0, probs, summing)?;
    let f = Strided::row_major(g.c, g.hw);
    let p_t = Strided::row_major(g.k, g.hw).t();
    let Some(split) = Slabbed::new(gpu, g.n, g.c, &[Cut::new(feats, 0), Cut::new(context, 0)])? else {
        d.extend(product(gpu, tuner, g.n, (feats, f), (probs, p_t), context, false)?);
        return Ok(d);
    };
    // Each image's channel slab of the context from that slab of the features.
    let kernel = tuning::choose(tuner, gpu, &MatmulClass::of(g.n, &f, &p_t));
    for (_, slab) in split.each() {
        let [fs, cs] = split.views(slab, [feats, context])?;
        let f = Strided::row_major(slab.channels.len(), g.hw);
        d.extend(product_with(gpu, kernel, 1, (&fs, f), (&image(gpu, probs, slab.item)?, p_t), &cs, false)?);
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
    let cuts = [grad_context, feats, grad_feats].map(|t| Cut::new(t, 0));
    let mut d = match Slabbed::new(gpu, g.n, g.c, &cuts)? {
        None => [
            product(gpu, tuner, g.n, (grad_context, gc), (probs, p), grad_feats, accumulate_feats)?,
            product(gpu, tuner, g.n, (grad_context, gc.t()), (feats, f), &grad_probs, false)?,
        ]
        .concat(),
        // Per image and channel slab: the slab's feature gradient (exact), and the region
        // gradient summed over the slabs in order.
        Some(split) => {
            let to_feats = tuning::choose(tuner, gpu, &MatmulClass::of(g.n, &gc, &p));
            let to_probs = tuning::choose(tuner, gpu, &MatmulClass::of(g.n, &gc.t(), &f));
            let mut d = Vec::new();
            for (j, slab) in split.each() {
                let [gcs, fs, gfs] = split.views(slab, [grad_context, feats, grad_feats])?;
                let (gc, f) = (
                    Strided::row_major(slab.channels.len(), g.k),
                    Strided::row_major(slab.channels.len(), g.hw),
                );
                let (probs, grad_probs) =
                    (image(gpu, probs, slab.item)?, image(gpu, &grad_probs, slab.item)?);
                d.extend(product_with(gpu, to_feats, 1, (&gcs, gc), (&probs, p), &gfs, accumulate_feats)?);
                d.extend(product_with(gpu, to_probs, 1, (&gcs, gc.t()), (&fs, f), &grad_probs, j > 0)?);
            }
            d
        }
    };
    let summing = softmax::summing(tuner, gpu, &g.axis());
    let grad_aux = (grad_aux, accumulate_aux);
    d.extend(softmax::backward_with(gpu, probs, &grad_probs, g.axis(), 1.0, grad_aux, summing)?);
    Ok(d)
}

/// An OCR operator over tensors larger than a storage binding, cut per image and slab of
/// its channel axis (the features', or the key channels); its whole-image operands (region
/// maps, attention maps) are bound one image at a time. Each product keeps the kernel of
/// the whole product, so a slab's sums are the whole product's to the bit; products that
/// sum over the channel axis add the slabs in order instead.
struct Slabbed<'g> {
    gpu: &'g Gpu,
    slabs: Vec<Slab>,
}

impl<'g> Slabbed<'g> {
    /// The slabs of `channels` channels shared by `cuts`, or `None` when every tensor fits
    /// a binding (the operator runs whole).
    fn new(gpu: &'g Gpu, n: usize, channels: usize, cuts: &[Cut<'_>]) -> Result<Option<Self>> {
        Ok(slabs::split(gpu, n, channels, cuts)?.map(|slabs| Slabbed { gpu, slabs }))
    }

    /// Each slab with its place among its image's slabs.
    fn each(&self) -> impl Iterator<Item = (usize, &Slab)> {
        self.slabs.iter().scan((usize::MAX, 0), |(item, j), slab| {
            *j = if *item == slab.item { *j + 1 } else { 0 };
            *item = slab.item;
            Some((*j, slab))
        })
    }

    /// The slab's views of tensors whose channel axis is the cut one.
    fn views<const K: usize>(&self, slab: &Slab, tensors: [&Tensor; K]) -> Result<[Tensor; K]> {
        let views: Vec<Tensor> =
            tensors.iter().map(|t| slab.view(self.gpu, Cut::new(t, 0))).collect::<Result<_>>()?;
        Ok(views.try_into().unwrap_or_else(|_| unreachable!("one view per tensor")))
    }
}

/// Image `item` of `t` (`[N, ...]`).
fn image(gpu: &Gpu, t: &Tensor, item: usize) -> Result<Tensor> {
    Cut::new(t, 0).view(gpu, item, &(0..t.shape()[1]))
}

/// Sizes of an attention: query `[n, ch, h, w]`, key `[n, ch, a, b]` and value `[n, cv, a, b]`
/// (OCR's: `k = a * b` regions `[n, ch, k, 1]`; self-attention's: every pixel), output
/// `[n, cv, h, w]`.
#[derive(Clone, Copy, Debug)]
struct Attention {
    n: usize,
    ch: usize,
    cv: usize,
    k: usize,
    hw: usize,
    scale: f32,
}

impl Attention {
    /// The sizes, the similarity scaled by `scale` (`None`: OCR's `KEY^-0.5`).
    fn resolve(query: &Tensor, key: &Tensor, value: &Tensor, scale: Option<f32>) -> Result<Self> {
        let [n, ch, h, w] = query.dims4("attention query")?;
        let [_, _, a, b] = key.dims4("attention key")?;
        let [_, cv, _, _] = value.dims4("attention value")?;
        check_shape("attention key", &[n, ch, a, b], key.shape())?;
        check_shape("attention value", &[n, cv, a, b], value.shape())?;
        let scale = scale.unwrap_or((ch as f32).powf(-0.5));
        Ok(Attention { n, ch, cv, k: a * b, hw: h * w, scale })
    }

    /// The output's shape, `[n, cv, h, w]` for a query `[n, ch, h, w]`.
    fn out_shape(&self, query: &Tensor) -> [usize; 4] {
        let q = query.shape();
        [self.n, self.cv, q[2], q[3]]
    }

    /// Softmax over the regions of each pixel: `sim` is `[n, hw, k]`.
    fn axis(&self) -> Axis {
        Axis { outer: self.n * self.hw, len: self.k, inner: 1 }
    }

    /// `sim` and its gradient, `[n, hw, k]`.
    fn sim_shape(&self) -> [usize; 3] {
        [self.n, self.hw, self.k]
    }

    /// Cut per key-channel slab where a tensor exceeds a binding; the slabs cut query, key,
    /// value and output alike, so only when value and key channels agree.
    fn slabbed<'g>(&self, gpu: &'g Gpu, tensors: &[&Tensor]) -> Result<Option<Slabbed<'g>>> {
        let cuts: Vec<Cut<'_>> = tensors.iter().map(|t| Cut::new(t, 0)).collect();
        let split = Slabbed::new(gpu, self.n, self.ch, &cuts)?;
        if split.is_some() && self.cv != self.ch {
            return Err(Error::Invalid(format!(
                "an attention with {} value channels and {} key channels must fit a storage binding \
                 ({} bytes); only attentions whose value and key channels agree are cut into slabs",
                self.cv,
                self.ch,
                gpu.limits().max_storage_buffer_binding_size
            )));
        }
        Ok(split)
    }
}

/// The shape of the attention map `sim` an object attention keeps for its backward.
pub fn attention_map_shape(query: &Tensor, key: &Tensor, value: &Tensor) -> Result<[usize; 3]> {
    Ok(Attention::resolve(query, key, value, None)?.sim_shape())
}

/// [`attention_forward`] with OCR's similarity scale `KEY^-0.5`.
pub fn object_attention_forward(
    gpu: &Gpu,
    tuner: Option<&Tuner>,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    sim: &Tensor,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    attention_forward(gpu, tuner, None, (query, key, value), sim, out)
}

/// `sim = softmax over regions of (query^T @ key) * scale` (kept for the backward, `[n, hw,
/// k]`; `scale` `None`: `KEY^-0.5`), then `out = value @ sim^T`, `[n, cv, h, w]`.
pub fn attention_forward(
    gpu: &Gpu,
    tuner: Option<&Tuner>,
    scale: Option<f32>,
    (query, key, value): (&Tensor, &Tensor, &Tensor),
    sim: &Tensor,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    let a = Attention::resolve(query, key, value, scale)?;
    check_shape("attention map", &a.sim_shape(), sim.shape())?;
    check_shape("attention output", &a.out_shape(query), out.shape())?;
    let logits = Tensor::empty_of(gpu, &a.sim_shape(), sim.dtype())?;
    let summing = softmax::summing(tuner, gpu, &a.axis());
    let q_t = Strided::row_major(a.ch, a.hw).t();
    let kv = Strided::row_major(a.ch, a.k);
    let sim_t = Strided::row_major(a.hw, a.k).t();
    let Some(split) = a.slabbed(gpu, &[query, key, value, out])? else {
        let mut d = product(gpu, tuner, a.n, (query, q_t), (key, kv), &logits, false)?;
        d.extend(softmax::forward_with(gpu, &logits, a.axis(), a.scale, sim, summing)?);
        let v = Strided::row_major(a.cv, a.k);
        d.extend(product(gpu, tuner, a.n, (value, v), (sim, sim_t), out, false)?);
        return Ok(d);
    };
    // Per image and key-channel slab: the logits summed over the slabs in order, then the
    // slab's output (exact).
    let to_logits = tuning::choose(tuner, gpu, &MatmulClass::of(a.n, &q_t, &kv));
    let to_out = tuning::choose(tuner, gpu, &MatmulClass::of(a.n, &kv, &sim_t));
    let mut d = Vec::new();
    for (j, slab) in split.each() {
        let [qs, ks] = split.views(slab, [query, key])?;
        let (q_t, kv) =
            (Strided::row_major(slab.channels.len(), a.hw).t(), Strided::row_major(slab.channels.len(), a.k));
        d.extend(product_with(
            gpu,
            to_logits,
            1,
            (&qs, q_t),
            (&ks, kv),
            &image(gpu, &logits, slab.item)?,
            j > 0,
        )?);
    }
    d.extend(softmax::forward_with(gpu, &logits, a.axis(), a.scale, sim, summing)?);
    for (_, slab) in split.each() {
        let [vs, os] = split.views(slab, [value, out])?;
        let kv = Strided::row_major(slab.channels.len(), a.k);
        d.extend(product_with(gpu, to_out, 1, (&vs, kv), (&image(gpu, sim, slab.item)?, sim_t), &os, false)?);
    }
    Ok(d)
}

/// Gradients of one object attention.
pub struct AttentionGrads<'a> {
    pub query: (&'a Tensor, bool),
    pub key: (&'a Tensor, bool),
    pub value: (&'a Tensor, bool),
}

/// [`attention_backward`] with OCR's similarity scale `KEY^-0.5`.
pub fn object_attention_backward(
    gpu: &Gpu,
    tuner: Option<&Tuner>,
    inputs: (&Tensor, &Tensor, &Tensor),
    sim: &Tensor,
    grad_out: &Tensor,
    grads: &AttentionGrads<'_>,
) -> Result<Vec<Dispatch>> {
    attention_backward(gpu, tuner, None, inputs, sim, grad_out, grads)
}

/// The attention's backward to query, key and value, each overwritten or accumulated as its
/// flag says; `scale` as the forward's.
pub fn attention_backward(
    gpu: &Gpu,
    tuner: Option<&Tuner>,
    scale: Option<f32>,
    (query, key, value): (&Tensor, &Tensor, &Tensor),
    sim: &Tensor,
    grad_out: &Tensor,
    grads: &AttentionGrads<'_>,
) -> Result<Vec<Dispatch>> {
    let a = Attention::resolve(query, key, value, scale)?;
    check_shape("attention map", &a.sim_shape(), sim.shape())?;
    check_shape("attention output gradient", &a.out_shape(query), grad_out.shape())?;
    check_shape("attention query gradient", query.shape(), grads.query.0.shape())?;
    check_shape("attention key gradient", key.shape(), grads.key.0.shape())?;
    check_shape("attention value gradient", value.shape(), grads.value.0.shape())?;
    let go = Strided::row_major(a.cv, a.hw);
    let s = Strided::row_major(a.hw, a.k);
    let (kv, v) = (Strided::row_major(a.ch, a.k), Strided::row_major(a.cv, a.k));
    let q = Strided::row_major(a.ch, a.hw);
    let grad_sim = Tensor::empty(gpu, &a.sim_shape())?;
    let grad_logits = Tensor::empty(gpu, &a.sim_shape())?;
    // The similarity softmax's backward writes the logits' gradient.
    let (summing, to_logits) = (softmax::summing(tuner, gpu, &a.axis()), (&grad_logits, false));
    let (gv, acc_v) = grads.value;
    let (gq, acc_q) = grads.query;
    let (gk, acc_k) = grads.key;
    let Some(split) = a.slabbed(gpu, &[query, key, value, grad_out, gq, gk, gv])? else {
        let mut d = [
            product(gpu, tuner, a.n, (grad_out, go), (sim, s), gv, acc_v)?,
            product(gpu, tuner, a.n, (grad_out, go.t()), (value, v), &grad_sim, false)?,
        ]
        .concat();
        d.extend(softmax::backward_with(gpu, sim, &grad_sim, a.axis(), a.scale, to_logits, summing)?);
        d.extend(product(gpu, tuner, a.n, (key, kv), (&grad_logits, s.t()), gq, acc_q)?);
        d.extend(product(gpu, tuner, a.n, (query, q), (&grad_logits, s), gk, acc_k)?);
        return Ok(d);
    };
    // Per image and key-channel slab: the value, query and key gradients of the slab
    // (exact), and the attention map's gradient summed over the slabs in order.
    let class = |a_view: &Strided, b_view: &Strided| {
        tuning::choose(tuner, gpu, &MatmulClass::of(a.n, a_view, b_view))
    };
    let (to_value, to_sim) = (class(&go, &s), class(&go.t(), &kv));
    let (to_query, to_key) = (class(&kv, &s.t()), class(&go, &s));
    let mut d = Vec::new();
    for (j, slab) in split.each() {
        let [gos, vs, gvs] = split.views(slab, [grad_out, value, gv])?;
        let (go, kv) =
            (Strided::row_major(slab.channels.len(), a.hw), Strided::row_major(slab.channels.len(), a.k));
        let (sim, grad_sim) = (image(gpu, sim, slab.item)?, image(gpu, &grad_sim, slab.item)?);
        d.extend(product_with(gpu, to_value, 1, (&gos, go), (&sim, s), &gvs, acc_v)?);
        d.extend(product_with(gpu, to_sim, 1, (&gos, go.t()), (&vs, kv), &grad_sim, j > 0)?);
    }
    d.extend(softmax::backward_with(gpu, sim, &grad_sim, a.axis(), a.scale, to_logits, summing)?);
    for (_, slab) in split.each() {
        let [qs, ks, gqs, gks] = split.views(slab, [query, key, gq, gk])?;
        let (go, kv) =
            (Strided::row_major(slab.channels.len(), a.hw), Strided::row_major(slab.channels.len(), a.k));
        let grad_logits = image(gpu, &grad_logits, slab.item)?;
        d.extend(product_with(gpu, to_query, 1, (&ks, kv), (&grad_logits, s.t()), &gqs, acc_q)?);
        d.extend(product_with(gpu, to_key, 1, (&qs, go), (&grad_logits, s), &gks, acc_k)?);
    }
    Ok(d)
}
