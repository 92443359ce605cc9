//! Channel concat and split (`concat.wgsl`). Producers that can write into a channel slice
//! (the resizes of HRNet's final concat) do so directly; the rest are copied.

use super::slabs::{self, Cut};
use super::{launch, plane_block_invocations, to_u32};
use crate::error::{Error, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

crate::gpu::shader_params! {
    struct Params {
        n: u32,
        channels: u32,
        hw: u32,
        flags: u32,
        src_channels: u32,
        src_offset: u32,
        dst_channels: u32,
        dst_offset: u32,
    }
}

const ACCUMULATE: u32 = 1;

/// `dst[:, dst_offset + c] (+)= src[:, src_offset + c]` for `c < channels`: one launch, or
/// one per channel slab when a tensor exceeds a binding (a copy per channel either way).
pub fn copy_channels(
    gpu: &Gpu,
    (src, src_offset): (&Tensor, usize),
    (dst, dst_offset): (&Tensor, usize),
    channels: usize,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let [n, sc, h, w] = src.dims4("channel copy source")?;
    let [dn, dc, dh, dw] = dst.dims4("channel copy destination")?;
    if (dn, dh, dw) != (n, h, w) || src_offset + channels > sc || dst_offset + channels > dc {
        return Err(Error::Invalid(format!(
            "cannot copy channels {src_offset}..{} of {:?} to channels {dst_offset}..{} of {:?}",
            src_offset + channels,
            src.shape(),
            dst_offset + channels,
            dst.shape()
        )));
    }
    let cuts = [Cut::new(src, src_offset), Cut::new(dst, dst_offset)];
    let Some(slabs) = slabs::split(gpu, n, channels, &cuts)? else {
        return Ok(vec![copy_launch(gpu, (src, src_offset), (dst, dst_offset), channels, accumulate)?]);
    };
    let mut d = Vec::new();
    for slab in slabs {
        let (s, t) = (slab.view(gpu, cuts[0])?, slab.view(gpu, cuts[1])?);
        d.push(copy_launch(gpu, (&s, 0), (&t, 0), slab.channels.len(), accumulate)?);
    }
    Ok(d)
}

fn copy_launch(
    gpu: &Gpu,
    (src, src_offset): (&Tensor, usize),
    (dst, dst_offset): (&Tensor, usize),
    channels: usize,
    accumulate: bool,
) -> Result<Dispatch> {
    let [n, sc, h, w] = src.dims4("channel copy source")?;
    let dc = dst.shape()[1];
    let len = n * channels * h * w;
    let p = Params {
        n: to_u32("N", n)?,
        channels: to_u32("channels", channels)?,
        hw: to_u32("H x W", h * w)?,
        flags: if accumulate { ACCUMULATE } else { 0 },
        src_channels: to_u32("source channels", sc)?,
        src_offset: src_offset as u32,
        dst_channels: to_u32("destination channels", dc)?,
        dst_offset: dst_offset as u32,
    };
    to_u32("elements", src.numel().max(dst.numel()))?;
    let bindings = [Binding::read(1, src), Binding::write(2, dst)];
    let cost = Cost { flops: 0, bytes: 2 * len as u64 * dst.dtype().size() };
    let invocations = plane_block_invocations(gpu, n * channels, h * w);
    launch(gpu, Shader::Concat.storing(dst.dtype())?, "copy_channels", &p, &bindings, invocations, cost)
}

/// `y = concat(inputs, channel axis)`: one copy per input into its slice.
pub fn concat_forward(gpu: &Gpu, inputs: &[&Tensor], y: &Tensor) -> Result<Vec<Dispatch>> {
    let mut offset = 0;
    let mut dispatches = Vec::with_capacity(inputs.len());
    for x in inputs {
        let c = x.dims4("concat input")?[1];
        dispatches.extend(copy_channels(gpu, (x, 0), (y, offset), c, false)?);
        offset += c;
    }
    let total = y.dims4("concat output")?[1];
    if offset != total {
        return Err(Error::Invalid(format!(
            "concat inputs have {offset} channels in all, the output {total}"
        )));
    }
    Ok(dispatches)
}

/// The backward of concat (a split): each input's gradient (+)= its slice of `grad_y`.
pub fn concat_backward(gpu: &Gpu, grad_y: &Tensor, grads: &[(&Tensor, bool)]) -> Result<Vec<Dispatch>> {
    let mut offset = 0;
    let mut dispatches = Vec::with_capacity(grads.len());
    for &(g, accumulate) in grads {
        let c = g.dims4("concat input gradient")?[1];
        dispatches.extend(copy_channels(gpu, (grad_y, offset), (g, 0), c, accumulate)?);
        offset += c;
    }
    Ok(dispatches)
}
