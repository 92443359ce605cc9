//! Resampling to an explicit size (`resize.wgsl`): bilinear resize, align_corners true or
//! false, and adaptive average pooling (PyTorch's `AdaptiveAvgPool2d`: PPM's pyramid and
//! ASPP's image pooling).

use super::slabs::{self, Cut};
use super::{f32_bytes, launch, to_u32};
use crate::error::{Error, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

crate::gpu::shader_params! {
    struct Params {
        n: u32,
        c: u32,
        h: u32,
        w: u32,
        ho: u32,
        wo: u32,
        align_corners: u32,
        flags: u32,
        out_offset: u32,
        out_channels: u32,
        _pad: [u32; 2],
    }
}

const ACCUMULATE: u32 = 1;

/// Where a resize or pooling writes: `channel_offset..channel_offset + C` of a tensor whose
/// shape is `[N, out_channels, Ho, Wo]` (the whole tensor when the channel counts agree);
/// errors name `what` (e.g. `resize output`).
fn params(
    what: &str,
    x_shape: [usize; 4],
    out: &Tensor,
    channel_offset: usize,
    align_corners: bool,
) -> Result<Params> {
    let [n, c, h, w] = x_shape;
    let [on, oc, ho, wo] = out.dims4(what)?;
    if on != n || channel_offset + c > oc {
        return Err(Error::Shape {
            what: format!("{what} (channels {channel_offset}..{} of it)", channel_offset + c),
            expected: format!("[{n}, >= {}, Ho, Wo]", channel_offset + c),
            actual: format!("{:?}", out.shape()),
        });
    }
    to_u32("resize elements", (n * oc * ho * wo).max(n * c * h * w))?;
    Ok(Params {
        n: n as u32,
        c: c as u32,
        h: h as u32,
        w: w as u32,
        ho: ho as u32,
        wo: wo as u32,
        align_corners: u32::from(align_corners),
        flags: 0,
        out_offset: channel_offset as u32,
        out_channels: oc as u32,
        _pad: [0; 2],
    })
}

/// `y[:, offset..offset + C] = resize(x)` to y's height and width.
pub fn forward(
    gpu: &Gpu,
    x: &Tensor,
    y: &Tensor,
    channel_offset: usize,
    align_corners: bool,
) -> Result<Vec<Dispatch>> {
    per_slab(gpu, "resize", x, (y, channel_offset), |x, y, offset| {
        let p = params("resize output", x.dims4("resize input")?, y, offset, align_corners)?;
        let out = (p.n * p.c * p.ho * p.wo) as usize;
        let cost = Cost { flops: 6 * out as u64, bytes: (x.numel() + out) as u64 * y.dtype().size() };
        let bindings = [Binding::read(1, x), Binding::write(2, y)];
        launch(gpu, Shader::Resize.storing(y.dtype())?, "resize_forward", &p, &bindings, out, cost)
    })
}

/// `grad_x (+)= resize_backward(grad_y[:, offset..offset + C])`, a gather per input pixel.
pub fn backward(
    gpu: &Gpu,
    grad_y: &Tensor,
    channel_offset: usize,
    grad_x: &Tensor,
    align_corners: bool,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let gather = Gather { what: "resize", entry: "resize_backward", align_corners, accumulate };
    gather.launch(gpu, grad_y, channel_offset, grad_x, |grad_x, _, out| Cost {
        flops: 6 * out as u64,
        bytes: f32_bytes(grad_x.numel() + out),
    })
}

/// `y[:, offset..offset + C] = AdaptiveAvgPool2d(y's height and width)(x)`: each output cell
/// the mean of the inputs it covers.
pub fn adaptive_avg_pool(gpu: &Gpu, x: &Tensor, y: &Tensor, channel_offset: usize) -> Result<Vec<Dispatch>> {
    per_slab(gpu, "adaptive pooling", x, (y, channel_offset), |x, y, offset| {
        let p = params("adaptive pooling output", x.dims4("adaptive pooling input")?, y, offset, false)?;
        let cost = Cost { flops: x.numel() as u64, bytes: (x.numel() + y.numel()) as u64 * y.dtype().size() };
        let bindings = [Binding::read(1, x), Binding::write(2, y)];
        let cells = (p.n * p.c * p.ho * p.wo) as usize;
        launch(
            gpu,
            Shader::Resize.storing(y.dtype())?,
            "adaptive_avg_pool_forward",
            &p,
            &bindings,
            cells,
            cost,
        )
    })
}

/// `grad_x (+)= the backward of [adaptive_avg_pool] from grad_y[:, offset..offset + C]`, a
/// gather per input pixel over the cells that cover it.
pub fn adaptive_avg_pool_backward(
    gpu: &Gpu,
    grad_y: &Tensor,
    channel_offset: usize,
    grad_x: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let gather = Gather {
        what: "adaptive pooling",
        entry: "adaptive_avg_pool_backward",
        align_corners: false,
        accumulate,
    };
    gather.launch(gpu, grad_y, channel_offset, grad_x, |grad_x, grad_y, _| Cost {
        flops: grad_x.numel() as u64,
        bytes: f32_bytes(2 * grad_x.numel() + grad_y.numel()),
    })
}

/// A backward of `resize.wgsl`'s gather template: its entry, what errors name, and the
/// launch's flags.
struct Gather {
    what: &'static str,
    entry: &'static str,
    align_corners: bool,
    accumulate: bool,
}

impl Gather {
    /// `grad_x (+)=` the gather from `grad_y[:, offset..offset + C]`, per channel slab where
    /// a tensor exceeds a binding; `cost` of each launch's (grad_x, grad_y, output-gradient
    /// elements read).
    fn launch(
        &self,
        gpu: &Gpu,
        grad_y: &Tensor,
        channel_offset: usize,
        grad_x: &Tensor,
        cost: impl Fn(&Tensor, &Tensor, usize) -> Cost,
    ) -> Result<Vec<Dispatch>> {
        let what = self.what;
        per_slab(gpu, what, grad_x, (grad_y, channel_offset), |grad_x, grad_y, offset| {
            let input = grad_x.dims4(&format!("{what} input gradient"))?;
            let mut p =
                params(&format!("{what} output gradient"), input, grad_y, offset, self.align_corners)?;
            p.flags = if self.accumulate { ACCUMULATE } else { 0 };
            let out = (p.n * p.c * p.ho * p.wo) as usize;
            let bindings = [Binding::read(3, grad_y), Binding::write(4, grad_x)];
            launch(gpu, Shader::Resize, self.entry, &p, &bindings, grad_x.numel(), cost(grad_x, grad_y, out))
        })
    }
}

/// `launch(small, large, offset)` once, or, when a tensor exceeds a binding, once per
/// channel slab of the small map and its slice of the large one (channels resample
/// independently, so the slabs give the same result); errors name `what` (`resize`).
fn per_slab(
    gpu: &Gpu,
    what: &str,
    small: &Tensor,
    (large, offset): (&Tensor, usize),
    launch: impl Fn(&Tensor, &Tensor, usize) -> Result<Dispatch>,
) -> Result<Vec<Dispatch>> {
    let [n, c, _, _] = small.dims4(&format!("{what} input"))?;
    let cuts = [Cut::new(small, 0), Cut::new(large, offset)];
    let Some(slabs) = slabs::split(gpu, n, c, &cuts)? else {
        return Ok(vec![launch(small, large, offset)?]);
    };
    // The whole shapes checked once; each slab's views then agree by construction.
    params(&format!("{what} output"), [n, c, 0, 0], large, offset, false)?;
    let mut d = Vec::new();
    for slab in slabs {
        d.push(launch(&slab.view(gpu, cuts[0])?, &slab.view(gpu, cuts[1])?, 0)?);
    }
    Ok(d)
}
