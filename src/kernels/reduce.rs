//! Deterministic per-channel sums and ordered sums of partial results (`reduce.wgsl`).

use super::slabs::{self, Cut};
use super::{f32_bytes, launch, reduction_chunks, scratch, to_u32};
use crate::error::{check_shape, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

crate::gpu::shader_params! {
    struct Params {
        n: u32,
        c: u32,
        hw: u32,
        chunk_len: u32,
        len: u32,
        chunks: u32,
        flags: u32,
        first_channel: u32,
    }
}

const ACCUMULATE: u32 = 1;

/// `out[c] (+)= sum over n, h, w of x[n, c, h, w]`; overwrites unless `accumulate`.
/// Used for the bias gradient of a convolution. An `x` larger than a binding is summed per
/// image and channel slab, each adding to the sums so far: the images' sums are added in
/// order, where the whole-tensor sum may split its terms into other chunks.
pub fn channel_sum(gpu: &Gpu, x: &Tensor, out: &Tensor, accumulate: bool) -> Result<Vec<Dispatch>> {
    let [n, c, h, w] = x.dims4("channel_sum input")?;
    check_shape("channel_sum output", &[c], out.shape())?;
    let cut = Cut::new(x, 0);
    if let Some(slabs) = slabs::split(gpu, n, c, &[cut])? {
        let mut d = Vec::new();
        for slab in slabs {
            let params = Params {
                n: 1,
                c: to_u32("C", slab.channels.len())?,
                hw: to_u32("H x W", h * w)?,
                chunk_len: to_u32("H x W", h * w)?,
                len: to_u32("C", c)?,
                chunks: 1,
                flags: if accumulate || slab.item > 0 { ACCUMULATE } else { 0 },
                first_channel: slab.channels.start as u32,
            };
            let xs = slab.view(gpu, cut)?;
            let cost = Cost { flops: xs.numel() as u64, bytes: f32_bytes(xs.numel() + slab.channels.len()) };
            let bindings = [Binding::read(1, &xs), Binding::write(2, out)];
            d.push(launch(
                gpu,
                Shader::Reduce,
                "channel_sum",
                &params,
                &bindings,
                slab.channels.len(),
                cost,
            )?);
        }
        return Ok(d);
    }
    let samples = n * h * w;
    let chunks = reduction_chunks(c, samples);
    let chunk_len = samples.div_ceil(chunks);
    let chunks = samples.div_ceil(chunk_len);
    let mut params = Params {
        n: to_u32("N", n)?,
        c: to_u32("C", c)?,
        hw: to_u32("H x W", h * w)?,
        chunk_len: to_u32("chunk length", chunk_len)?,
        len: to_u32("C", c)?,
        chunks: to_u32("chunks", chunks)?,
        flags: if accumulate { ACCUMULATE } else { 0 },
        first_channel: 0,
    };
    let cost = Cost { flops: (n * c * h * w) as u64, bytes: f32_bytes(n * c * h * w + c) };
    if chunks == 1 {
        let bindings = [Binding::read(1, x), Binding::write(2, out)];
        return Ok(vec![launch(gpu, Shader::Reduce, "channel_sum", &params, &bindings, c, cost)?]);
    }
    let partials = scratch(gpu, "channel-sum partials", chunks * c)?;
    params.flags = 0;
    let bindings = [Binding::read(1, x), Binding::write(2, &partials)];
    let first = launch(gpu, Shader::Reduce, "channel_sum", &params, &bindings, chunks * c, cost)?;
    Ok(vec![first, sum_chunks(gpu, &partials, chunks, out, accumulate)?])
}

/// `out[i] (+)= sum over k of partials[k * len + i]` for `chunks` partial arrays of
/// `out.numel()` values, summed in chunk order.
pub fn sum_chunks(
    gpu: &Gpu,
    partials: &Tensor,
    chunks: usize,
    out: &Tensor,
    accumulate: bool,
) -> Result<Dispatch> {
    let len = out.numel();
    check_shape("sum_chunks partials", &[chunks * len], &[partials.numel()])?;
    let params = Params {
        n: 0,
        c: 0,
        hw: 0,
        chunk_len: 0,
        len: to_u32("length", len)?,
        chunks: to_u32("chunks", chunks)?,
        flags: if accumulate { ACCUMULATE } else { 0 },
        first_channel: 0,
    };
    let bindings = [Binding::read(1, partials), Binding::write(2, out)];
    let cost = Cost { flops: (chunks * len) as u64, bytes: f32_bytes(chunks * len + len) };
    launch(gpu, Shader::Reduce, "sum_chunks", &params, &bindings, len, cost)
}
