//! 2-D convolution, NCHW input, OIHW weight, groups = 1 (`conv2d.wgsl`).

use super::batch_norm::BatchNormParams;
use super::slabs::{self, Cut, Slab};
use super::tuning::{self, ConvClass, ConvForward, ConvInputGrad, ConvWeightGrad, Tunable};
use super::{f32_bytes, launch, launch_sized, launch_tuned, reduce, reduction_chunks, scratch, to_u32};
use crate::error::{check_shape, Error, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, DType, Tensor};

/// Stride, padding and dilation, each as (vertical, horizontal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dSpec {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

impl Conv2dSpec {
    /// The same stride, padding and dilation in both directions.
    pub fn square(stride: usize, padding: usize, dilation: usize) -> Self {
        Conv2dSpec { stride: [stride; 2], padding: [padding; 2], dilation: [dilation; 2] }
    }

    /// Output height and width for an `h x w` input and a `kh x kw` kernel.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> Result<[usize; 2]> {
        if self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err(Error::Invalid(format!(
                "conv2d: stride and dilation must be positive, got {self:?}"
            )));
        }
        let out = |len: usize, k: usize, axis: usize| {
            let span = self.dilation[axis] * (k - 1) + 1;
            let padded = len + 2 * self.padding[axis];
            (padded >= span).then(|| (padded - span) / self.stride[axis] + 1)
        };
        match (out(h, kh, 0), out(w, kw, 1)) {
            (Some(ho), Some(wo)) => Ok([ho, wo]),
            _ => Err(Error::Invalid(format!(
                "conv2d: a {kh}x{kw} kernel with {self:?} does not fit a {h}x{w} input"
            ))),
        }
    }
}

/// All sizes of one convolution, resolved from the input and weight shapes.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
}

impl Dims {
    fn resolve(spec: &Conv2dSpec, x_shape: &[usize], weight_shape: &[usize]) -> Result<Self> {
        let [n, ci, h, w] = <[usize; 4]>::try_from(x_shape).map_err(|_| Error::Shape {
            what: "conv2d input".into(),
            expected: "[N, C, H, W]".into(),
            actual: format!("{x_shape:?}"),
        })?;
        let [co, wci, kh, kw] = <[usize; 4]>::try_from(weight_shape).map_err(|_| Error::Shape {
            what: "conv2d weight".into(),
            expected: "[N, C, H, W]".into(),
            actual: format!("{weight_shape:?}"),
        })?;
        if wci != ci {
            return Err(Error::Shape {
                what: "conv2d weight (input channels must match the input's C)".into(),
                expected: format!("[{co}, {ci}, {kh}, {kw}]"),
                actual: format!("{weight_shape:?}"),
            });
        }
        let [ho, wo] = spec.output_size(h, w, kh, kw)?;
        Ok(Dims { n, ci, h, w, co, kh, kw, ho, wo })
    }

    fn y_shape(&self) -> [usize; 4] {
        [self.n, self.co, self.ho, self.wo]
    }

    fn macs(&self) -> u64 {
        (self.n * self.co * self.ho * self.wo * self.ci * self.kh * self.kw) as u64
    }

    /// The shape class the variants are chosen for.
    fn class(&self, spec: &Conv2dSpec, precision: Precision) -> ConvClass {
        ConvClass::new(self.ci, self.co, [self.kh, self.kw], spec, precision, [self.n * self.ho, self.wo])
    }

    fn weight_len(&self) -> usize {
        self.co * self.ci * self.kh * self.kw
    }

    fn params(&self, spec: &Conv2dSpec, flags: u32, chunk_rows: usize) -> Result<Params> {
        let u = to_u32;
        // Every flat index the shader forms must fit in u32.
        for (what, len) in [
            ("input elements", self.n * self.ci * self.h * self.w),
            ("output elements", self.n * self.co * self.ho * self.wo),
        ] {
            u(what, len)?;
        }
        Ok(Params {
            n: u("N", self.n)?,
            ci: u("input channels", self.ci)?,
            h: u("H", self.h)?,
            w: u("W", self.w)?,
            co: u("output channels", self.co)?,
            kh: u("kernel height", self.kh)?,
            kw: u("kernel width", self.kw)?,
            ho: u("output H", self.ho)?,
            wo: u("output W", self.wo)?,
            stride_h: u("stride", spec.stride[0])?,
            stride_w: u("stride", spec.stride[1])?,
            pad_h: u("padding", spec.padding[0])?,
            pad_w: u("padding", spec.padding[1])?,
            dil_h: u("dilation", spec.dilation[0])?,
            dil_w: u("dilation", spec.dilation[1])?,
            flags,
            chunk_rows: u("chunk rows", chunk_rows)?,
            eps: 0.0,
            weight_ci: u("input channels", self.ci)?,
            weight_ci0: 0,
            co0: 0,
            _pad: 0,
        })
    }

    /// One pair of slabs of a convolution split over bindings (`input` channels and `out`
    /// channels of one image): its sizes, and its parameters with the offsets that place it
    /// in the whole weight (and bias, batch norm, weight gradient).
    fn slab_pair(
        &self,
        spec: &Conv2dSpec,
        (input, out): (&Slab, &Slab),
        flags: u32,
        chunk_rows: usize,
    ) -> Result<(Dims, Params)> {
        let slab = Dims { n: 1, ci: input.channels.len(), co: out.channels.len(), ..*self };
        let mut params = slab.params(spec, flags, chunk_rows)?;
        params.weight_ci = to_u32("input channels", self.ci)?;
        params.weight_ci0 = input.channels.start as u32;
        params.co0 = out.channels.start as u32;
        Ok((slab, params))
    }
}

crate::gpu::shader_params! {
    struct Params {
        n: u32,
        ci: u32,
        h: u32,
        w: u32,
        co: u32,
        kh: u32,
        kw: u32,
        ho: u32,
        wo: u32,
        stride_h: u32,
        stride_w: u32,
        pad_h: u32,
        pad_w: u32,
        dil_h: u32,
        dil_w: u32,
        flags: u32,
        chunk_rows: u32,
        eps: f32,
        weight_ci: u32,
        weight_ci0: u32,
        co0: u32,
        _pad: u32,
    }
}

const ACCUMULATE: u32 = 1;
const RELU: u32 = 2;
const NO_SHIFT: u32 = 4;

/// What the forward does to each output value after the convolution, in order: add the
/// bias, apply the folded batch norm, add the residual, ReLU. Inference fuses a whole
/// conv-BN-(add)-(ReLU) chain into one kernel this way.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a Tensor>,
    /// An eval-mode batch norm (its running statistics; `momentum` is unused) folded into
    /// the convolution: the weight is scaled by `gamma / sqrt(var + eps)` per output
    /// channel as it is packed, and the shift is added in the stores.
    pub batch_norm: Option<BatchNormParams<'a>>,
    /// Same shape as the output.
    pub residual: Option<&'a Tensor>,
    pub relu: bool,
}

impl Epilogue<'_> {
    fn flags(&self) -> u32 {
        if self.relu {
            RELU
        } else {
            0
        }
    }

    /// The packing entry point that reads the optional terms this epilogue has.
    fn pack_entry(&self) -> &'static str {
        match (self.bias.is_some(), self.batch_norm.is_some()) {
            (false, false) => "conv2d_pack_weight",
            (true, false) => "conv2d_pack_weight_bias",
            (false, true) => "conv2d_pack_weight_batch_norm",
            (true, true) => "conv2d_pack_weight_bias_batch_norm",
        }
    }
}

/// The precision of inference. `F16` keeps the forward's packed weights (each weight,
/// batch-norm scale folded in, rounded to half once as it is packed) and its activations
/// (input, output, residual: f16 tensors) at half precision, half the traffic and memory;
/// products and sums stay f32. It needs the adapter's `SHADER_F16`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    F16,
}

impl Precision {
    /// The precision that runs on `gpu` when this one is asked for: `F16` falls back to
    /// `F32` without `SHADER_F16`.
    pub fn on(self, gpu: &Gpu) -> Precision {
        if gpu.supports_f16() {
            self
        } else {
            Precision::F32
        }
    }

    /// The element type of the activations at this precision.
    pub fn activations(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }

    /// The shader the forward and its weight packing are built from: conv2d, or its twin
    /// storing this precision's activations.
    fn shader(self) -> Result<Shader> {
        Shader::Conv2d.storing(self.activations())
    }
}

/// A convolution forward's launches, in pairs: a weight packing, which an eval graph runs
/// only when the weights change, and the convolution that reads it. One pair, or one per
/// slab of a convolution whose tensors exceed a binding.
#[derive(Debug)]
pub struct ForwardDispatches {
    pub pairs: Vec<(Dispatch, Dispatch)>,
}

impl ForwardDispatches {
    /// Each packing just before its convolution, for a submission of their own or a longer
    /// list (so packings may share scratch, see `kernels::sharing_scratch`).
    pub fn into_vec(self) -> Vec<Dispatch> {
        self.pairs.into_iter().flat_map(|(pack, conv)| [pack, conv]).collect()
    }
}

/// The output shape `[N, Co, Ho, Wo]` of a convolution of `x_shape` by `weight`.
pub fn output_shape(spec: &Conv2dSpec, x_shape: &[usize], weight: &Tensor) -> Result<[usize; 4]> {
    Ok(Dims::resolve(spec, x_shape, weight.shape())?.y_shape())
}

/// The shape class a convolution of `x_shape` by a `weight_shape` weight falls in, for
/// choosing its variants ([`tuning::choose`]).
pub fn class(
    spec: &Conv2dSpec,
    x_shape: &[usize],
    weight_shape: &[usize],
    precision: Precision,
) -> Result<ConvClass> {
    Ok(Dims::resolve(spec, x_shape, weight_shape)?.class(spec, precision))
}

/// `y = conv2d(x, weight) + bias`: the weight is repacked (one small dispatch), then the
/// convolution runs in the adapter's untimed default variant.
pub fn forward(
    gpu: &Gpu,
    spec: &Conv2dSpec,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<ForwardDispatches> {
    let plain = Epilogue { bias, ..Epilogue::default() };
    forward_with(gpu, spec, x, weight, &plain, Precision::F32, ConvForward::default_for(gpu), y)
}

/// Zero tensors shaped like a proxy of `class`: one image of the class's capped output
/// size, the input that gives it (activations at the class's precision), and the weight.
struct Proxy {
    spec: Conv2dSpec,
    x: Tensor,
    weight: Tensor,
    y: Tensor,
}

impl Proxy {
    fn new(gpu: &Gpu, class: &ConvClass) -> Result<Self> {
        let spec = Conv2dSpec { stride: class.stride, padding: class.padding, dilation: class.dilation };
        let [h, w] = class.input_size();
        let activations = class.precision.activations();
        let x = Tensor::empty_of(gpu, &[1, class.ci, h, w], activations)?;
        x.fill(gpu, 0.0);
        let weight = Tensor::zeros(gpu, &[class.co, class.ci, class.kernel[0], class.kernel[1]])?;
        let y = Tensor::empty_of(gpu, &output_shape(&spec, x.shape(), &weight)?, activations)?;
        y.fill(gpu, 0.0);
        Ok(Proxy { spec, x, weight, y })
    }
}

/// Milliseconds of the forward `variant` on a proxy of `class` (the timing does not depend
/// on values, so the tensors are zeros).
pub(crate) fn time_forward(gpu: &Gpu, class: &ConvClass, variant: ConvForward) -> Result<f64> {
    let p = Proxy::new(gpu, class)?;
    let d =
        forward_with(gpu, &p.spec, &p.x, &p.weight, &Epilogue::default(), class.precision, variant, &p.y)?;
    tuning::time_dispatches(gpu, &d.into_vec())
}

/// Milliseconds of the input gradient `variant` on a proxy of `class`.
pub(crate) fn time_backward_input(gpu: &Gpu, class: &ConvClass, variant: ConvInputGrad) -> Result<f64> {
    let p = Proxy::new(gpu, class)?;
    tuning::time_dispatches(gpu, &backward_input_with(gpu, &p.spec, &p.y, &p.weight, &p.x, false, variant)?)
}

/// Milliseconds of the weight gradient `variant` on a proxy of `class`.
pub(crate) fn time_backward_weight(gpu: &Gpu, class: &ConvClass, variant: ConvWeightGrad) -> Result<f64> {
    let p = Proxy::new(gpu, class)?;
    let grad_weight = Tensor::zeros(gpu, p.weight.shape())?;
    tuning::time_dispatches(
        gpu,
        &backward_weight_with(gpu, &p.spec, &p.x, &p.y, &grad_weight, false, variant)?,
    )
}

/// `y = epilogue(conv2d(x, weight))` in the given forward variant: the weight is repacked
/// at `precision` (one small dispatch, which also folds the batch norm), then the
/// convolution runs with the epilogue in its stores.
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    gpu: &Gpu,
    spec: &Conv2dSpec,
    x: &Tensor,
    weight: &Tensor,
    epilogue: &Epilogue,
    precision: Precision,
    variant: ConvForward,
    y: &Tensor,
) -> Result<ForwardDispatches> {
    if precision == Precision::F16 && !gpu.supports_f16() {
        return Err(Error::Invalid(format!(
            "conv2d: f16 inference needs SHADER_F16, which adapter {} lacks",
            gpu.describe()
        )));
    }
    let residual = epilogue.residual.map(|r| ("residual", r));
    for (what, t) in [("input", x), ("output", y)].into_iter().chain(residual) {
        if t.dtype() != precision.activations() {
            return Err(Error::Invalid(format!(
                "conv2d at {precision:?} takes {:?} activations; the {what} is {t:?}",
                precision.activations()
            )));
        }
    }
    if !variant.runs_on(gpu) {
        return Err(Error::Invalid(format!(
            "conv2d: the {} forward needs 64 invocations a workgroup; adapter {} allows {}",
            variant.name(),
            gpu.describe(),
            gpu.workgroup_size()
        )));
    }
    let d = Dims::resolve(spec, x.shape(), weight.shape())?;
    check_shape("conv2d output", &d.y_shape(), y.shape())?;
    if let Some(b) = epilogue.bias {
        check_shape("conv2d bias", &[d.co], b.shape())?;
    }
    if let Some(bn) = &epilogue.batch_norm {
        let terms =
            [("gamma", bn.gamma), ("beta", bn.beta), ("mean", bn.running_mean), ("var", bn.running_var)];
        for (what, t) in terms {
            check_shape(&format!("conv2d folded batch norm {what}"), &[d.co], t.shape())?;
        }
    }
    if let Some(r) = epilogue.residual {
        check_shape("conv2d residual", &d.y_shape(), r.shape())?;
    }
    if !slabs::exceeds_binding(gpu, &[x, y]) {
        let params = d.params(spec, epilogue.flags(), 1)?;
        return Ok(ForwardDispatches {
            pairs: vec![forward_launch(gpu, &d, params, weight, x, y, epilogue, precision, variant)?],
        });
    }
    forward_slabs(gpu, spec, &d, [x, weight, y], epilogue, precision, variant)
}

/// The forward over tensors larger than a binding: per item and slab of output channels,
/// the convolutions of the input's channel slabs in order, each adding to the sum of the
/// ones before; the epilogue (shift, residual, ReLU) comes with the last. Splitting the
/// output is exact; splitting the input changes the order of the sum (partial sums per
/// slab, then added), so results match the unsplit forward to rounding, not to the bit.
fn forward_slabs(
    gpu: &Gpu,
    spec: &Conv2dSpec,
    d: &Dims,
    [x, weight, y]: [&Tensor; 3],
    epilogue: &Epilogue,
    precision: Precision,
    variant: ConvForward,
) -> Result<ForwardDispatches> {
    let mut outputs = vec![Cut::new(y, 0)];
    outputs.extend(epilogue.residual.map(|r| Cut::new(r, 0)));
    let input_slabs = slabs::channel_slabs(gpu, d.n, d.ci, &[Cut::new(x, 0)])?;
    let mut pairs = Vec::new();
    for out in slabs::channel_slabs(gpu, d.n, d.co, &outputs)? {
        let y = out.view(gpu, outputs[0])?;
        let residual = outputs.get(1).map(|&r| out.view(gpu, r)).transpose()?;
        let inputs: Vec<_> = input_slabs.iter().filter(|s| s.item == out.item).collect();
        for (j, input) in inputs.iter().enumerate() {
            let last = j + 1 == inputs.len();
            let slab_epilogue = Epilogue {
                residual: residual.as_ref().filter(|_| last),
                relu: epilogue.relu && last,
                ..*epilogue
            };
            let flags =
                slab_epilogue.flags() | if j > 0 { ACCUMULATE } else { 0 } | if last { 0 } else { NO_SHIFT };
            let (slab, params) = d.slab_pair(spec, (input, &out), flags, 1)?;
            let x = input.view(gpu, Cut::new(x, 0))?;
            pairs.push(forward_launch(
                gpu,
                &slab,
                params,
                weight,
                &x,
                &y,
                &slab_epilogue,
                precision,
                variant,
            )?);
        }
    }
    Ok(ForwardDispatches { pairs })
}

/// One packing and convolution of `x` into `y` (the whole tensors, or a slab's views).
#[allow(clippy::too_many_arguments)]
fn forward_launch(
    gpu: &Gpu,
    d: &Dims,
    mut params: Params,
    weight: &Tensor,
    x: &Tensor,
    y: &Tensor,
    epilogue: &Epilogue,
    precision: Precision,
    variant: ConvForward,
) -> Result<(Dispatch, Dispatch)> {
    params.eps = epilogue.batch_norm.map_or(0.0, |bn| bn.eps);
    let shift = scratch(gpu, "conv2d shift", d.co)?;
    let pack = pack_forward(gpu, d, &params, weight, epilogue, precision, &shift)?;
    let mut bindings = vec![
        Binding::read(1, x),
        Binding::write(4, y),
        Binding::read(8, &pack.packed),
        Binding::read(10, &shift),
    ];
    bindings.extend(epilogue.residual.map(|r| Binding::read(15, r)));
    let residual = epilogue.residual.is_some();
    let extra = epilogue.residual.map_or(0, |_| y.numel()) + epilogue.bias.map_or(0, |_| d.co);
    let cost = Cost { flops: 2 * d.macs(), bytes: f32_bytes(x.numel() + d.weight_len() + y.numel() + extra) };
    let pixels = d.ho * d.wo;
    let conv = match variant.slice() {
        None => {
            // A workgroup per (image, group of 16 channels, block of `per` x WG pixels). The
            // 4-pixel tiles take pixels WG apart, so small maps (HRNet's deepest branches)
            // get smaller workgroups, down to 8 (a CPU driver's SIMD width), rather than
            // idle invocations. The wide tiles keep one workgroup size for every map: each
            // size is another pipeline, and LLVM takes ~5 s to compile the wide kernel on
            // lavapipe; its invocations past a small map return at once.
            let full = gpu.workgroup_size() as usize;
            let (per, wg) = match variant {
                ConvForward::RegistersWide => (16, full),
                _ => (4, pixels.div_ceil(4).next_power_of_two().clamp(8, full)),
            };
            let invocations = d.n * d.co.div_ceil(16) * pixels.div_ceil(per * wg) * wg;
            let entry = (precision.shader()?, variant.entry(residual));
            launch_sized(gpu, entry, wg as u32, &params, &bindings, invocations, cost)?
        }
        Some(slice) => {
            // A workgroup of 64 per (image, 32 channels, 32 pixels).
            let invocations = d.n * d.co.div_ceil(32) * pixels.div_ceil(32) * 64;
            let entry = (precision.shader()?, variant.entry(residual));
            let tile = [("SLICE", f64::from(slice))];
            launch_tuned(gpu, entry, 64, &tile, &params, &bindings, invocations, cost)?
        }
    };
    Ok((pack.dispatch, conv))
}

/// `grad_x (+)= conv2d_transpose(grad_y, weight)`: the gradient with respect to the input
/// (the weight is repacked over input channels first, one small dispatch).
pub fn backward_input(
    gpu: &Gpu,
    spec: &Conv2dSpec,
    grad_y: &Tensor,
    weight: &Tensor,
    grad_x: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let variant = ConvInputGrad::untimed(gpu, &class(spec, grad_x.shape(), weight.shape(), Precision::F32)?);
    backward_input_with(gpu, spec, grad_y, weight, grad_x, accumulate, variant)
}

/// [`backward_input`] in the given variant.
pub fn backward_input_with(
    gpu: &Gpu,
    spec: &Conv2dSpec,
    grad_y: &Tensor,
    weight: &Tensor,
    grad_x: &Tensor,
    accumulate: bool,
    variant: ConvInputGrad,
) -> Result<Vec<Dispatch>> {
    let d = Dims::resolve(spec, grad_x.shape(), weight.shape())?;
    check_shape("conv2d output gradient", &d.y_shape(), grad_y.shape())?;
    let flags = |accumulate: bool| if accumulate { ACCUMULATE } else { 0 };
    if !slabs::exceeds_binding(gpu, &[grad_y, grad_x]) {
        let params = d.params(spec, flags(accumulate), 1)?;
        return backward_input_launch(gpu, &d, params, [grad_y, weight, grad_x], variant);
    }
    // Beyond a binding: each image's input-channel slab of grad_x sums over the output
    // channels' slabs in order, each adding to the ones before (exact when grad_y fits
    // whole; over several slabs of grad_y, partial sums added in order).
    let (inputs, outputs) = (Cut::new(grad_x, 0), Cut::new(grad_y, 0));
    let output_slabs = slabs::channel_slabs(gpu, d.n, d.co, &[outputs])?;
    let mut dispatches = Vec::new();
    for input in slabs::channel_slabs(gpu, d.n, d.ci, &[inputs])? {
        let gx = input.view(gpu, inputs)?;
        for (j, out) in output_slabs.iter().filter(|o| o.item == input.item).enumerate() {
            let (slab, params) = d.slab_pair(spec, (&input, out), flags(accumulate || j > 0), 1)?;
            let gy = out.view(gpu, outputs)?;
            dispatches.extend(backward_input_launch(gpu, &slab, params, [&gy, weight, &gx], variant)?);
        }
    }
    Ok(dispatches)
}

/// The input gradient's packing and launch over `grad_y` into `grad_x` (the whole tensors,
/// or a slab's views).
fn backward_input_launch(
    gpu: &Gpu,
    d: &Dims,
    params: Params,
    [grad_y, weight, grad_x]: [&Tensor; 3],
    variant: ConvInputGrad,
) -> Result<Vec<Dispatch>> {
    let pack = pack_over_ci(gpu, d, &params, weight)?;
    let bindings = [Binding::read(5, grad_y), Binding::write(6, grad_x), Binding::read(8, &pack.packed)];
    let cost =
        Cost { flops: 2 * d.macs(), bytes: f32_bytes(grad_y.numel() + d.weight_len() + grad_x.numel()) };
    let conv = match variant.slice() {
        None => {
            let (columns, entry) = match variant {
                ConvInputGrad::Wide => (16, "conv2d_backward_input_wide"),
                _ => (4, "conv2d_backward_input"),
            };
            let tiles = d.n * d.ci.div_ceil(16) * d.h * d.w.div_ceil(columns);
            launch(gpu, Shader::Conv2d, entry, &params, &bindings, tiles, cost)?
        }
        Some(slice) => {
            // A workgroup of 64 per (image, 32 input channels, 32 input pixels).
            let invocations = d.n * d.ci.div_ceil(32) * (d.h * d.w).div_ceil(32) * 64;
            let entry = (Shader::Conv2d, "conv2d_backward_input_tiled");
            launch_tuned(
                gpu,
                entry,
                64,
                &[("SLICE", f64::from(slice))],
                &params,
                &bindings,
                invocations,
                cost,
            )?
        }
    };
    Ok(vec![pack.dispatch, conv])
}

/// A weight packing's dispatch and the packed weight it writes.
struct Packed {
    dispatch: Dispatch,
    packed: Tensor,
}

/// The packed weight's tensor: `vec4s` vec4s at `precision`. Only f32 packs share
/// scratch: f16 ones are for eval graphs, which keep their packs.
fn packed_tensor(gpu: &Gpu, vec4s: usize, precision: Precision) -> Result<Tensor> {
    match precision {
        Precision::F32 => scratch(gpu, "conv2d packed weight", 4 * vec4s),
        Precision::F16 => Tensor::empty_of(gpu, &[4 * vec4s], DType::F16),
    }
}

/// Repacks the weight as vec4s over output channels for the forward, scaled by the folded
/// batch norm, with each channel's additive term written to `shift`: one small dispatch
/// of the entry point that reads exactly the epilogue's optional terms.
fn pack_forward(
    gpu: &Gpu,
    d: &Dims,
    params: &Params,
    weight: &Tensor,
    epilogue: &Epilogue,
    precision: Precision,
    shift: &Tensor,
) -> Result<Packed> {
    let len = d.ci * d.kh * d.kw * d.co.div_ceil(4);
    let packed = packed_tensor(gpu, len, precision)?;
    let mut bindings = vec![Binding::read(2, weight), Binding::write(16, &packed), Binding::write(9, shift)];
    bindings.extend(epilogue.bias.map(|b| Binding::read(3, b)));
    if let Some(bn) = epilogue.batch_norm {
        bindings.extend([
            Binding::read(11, bn.gamma),
            Binding::read(12, bn.beta),
            Binding::read(13, bn.running_mean),
            Binding::read(14, bn.running_var),
        ]);
    }
    let cost = Cost { flops: 0, bytes: f32_bytes(2 * d.weight_len()) };
    let dispatch = launch(gpu, precision.shader()?, epilogue.pack_entry(), params, &bindings, len, cost)?;
    Ok(Packed { dispatch, packed })
}

/// Repacks the weight as vec4s over input channels, for the input gradient.
fn pack_over_ci(gpu: &Gpu, d: &Dims, params: &Params, weight: &Tensor) -> Result<Packed> {
    let len = d.co * d.kh * d.kw * d.ci.div_ceil(4);
    let packed = packed_tensor(gpu, len, Precision::F32)?;
    let bindings = [Binding::read(2, weight), Binding::write(16, &packed)];
    let cost = Cost { flops: 0, bytes: f32_bytes(2 * d.weight_len()) };
    let dispatch = launch(gpu, Shader::Conv2d, "conv2d_pack_weight_over_ci", params, &bindings, len, cost)?;
    Ok(Packed { dispatch, packed })
}

/// `grad_weight (+)= sum over pixels of grad_y * x`: the gradient with respect to the weight.
/// The pixel reduction is split into chunks of whole output rows when the weight alone
/// gives too little parallel work; the chunks are then summed in order.
pub fn backward_weight(
    gpu: &Gpu,
    spec: &Conv2dSpec,
    x: &Tensor,
    grad_y: &Tensor,
    grad_weight: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let variant = ConvWeightGrad::untimed(gpu, &class(spec, x.shape(), grad_weight.shape(), Precision::F32)?);
    backward_weight_with(gpu, spec, x, grad_y, grad_weight, accumulate, variant)
}

/// [`backward_weight`] in the given variant.
pub fn backward_weight_with(
    gpu: &Gpu,
    spec: &Conv2dSpec,
    x: &Tensor,
    grad_y: &Tensor,
    grad_weight: &Tensor,
    accumulate: bool,
    variant: ConvWeightGrad,
) -> Result<Vec<Dispatch>> {
    let d = Dims::resolve(spec, x.shape(), grad_weight.shape())?;
    check_shape("conv2d output gradient", &d.y_shape(), grad_y.shape())?;
    // Invocations per chunk of output rows, and the launch of `invocations` of them.
    let (tiles, entry): (fn(&Dims) -> usize, &'static str) = match variant {
        ConvWeightGrad::Wide => {
            (|d| d.co.div_ceil(16) * d.ci.div_ceil(16) * d.kh * d.kw, "conv2d_backward_weight_wide")
        }
        ConvWeightGrad::Narrow => {
            (|d| d.co.div_ceil(16) * d.ci.div_ceil(4) * d.kh * d.kw, "conv2d_backward_weight")
        }
        ConvWeightGrad::TiledK8 | ConvWeightGrad::TiledK16 => {
            (|d| d.co.div_ceil(32) * (d.ci * d.kh * d.kw).div_ceil(32) * 64, "conv2d_backward_weight_tiled")
        }
    };
    let cost = |d: &Dims| Cost {
        flops: 2 * d.macs(),
        bytes: f32_bytes(d.n * (d.ci * d.h * d.w + d.co * d.ho * d.wo) + d.weight_len()),
    };
    let launch =
        |params: &Params, bindings: &[Binding<'_>], invocations: usize, cost: Cost| match variant.slice() {
            None => launch(gpu, Shader::Conv2d, entry, params, bindings, invocations, cost),
            Some(slice) => {
                let tile = [("SLICE", f64::from(slice))];
                launch_tuned(gpu, (Shader::Conv2d, entry), 64, &tile, params, bindings, invocations, cost)
            }
        };
    if slabs::exceeds_binding(gpu, &[x, grad_y]) {
        // Beyond a binding: each (image, output slab, input slab) sums its image's rows in
        // one chunk straight into its block of grad_weight, the images added in order
        // (where the whole-tensor reduction may chunk the rows otherwise).
        let (inputs, outputs) = (Cut::new(x, 0), Cut::new(grad_y, 0));
        let input_slabs = slabs::channel_slabs(gpu, d.n, d.ci, &[inputs])?;
        let mut dispatches = Vec::new();
        for out in slabs::channel_slabs(gpu, d.n, d.co, &[outputs])? {
            let gy = out.view(gpu, outputs)?;
            for input in input_slabs.iter().filter(|i| i.item == out.item) {
                let flags = if accumulate || out.item > 0 { ACCUMULATE } else { 0 };
                let (slab, params) = d.slab_pair(spec, (input, &out), flags, d.ho)?;
                let xs = input.view(gpu, inputs)?;
                let bindings = [Binding::read(1, &xs), Binding::read(5, &gy), Binding::write(7, grad_weight)];
                dispatches.push(launch(&params, &bindings, tiles(&slab), cost(&slab))?);
            }
        }
        return Ok(dispatches);
    }
    let rows = d.n * d.ho;
    let chunks = reduction_chunks(tiles(&d), rows * d.wo);
    let chunk_rows = rows.div_ceil(chunks);
    let chunks = rows.div_ceil(chunk_rows);
    let direct = chunks == 1;
    let flags = if direct && accumulate { ACCUMULATE } else { 0 };
    let params = d.params(spec, flags, chunk_rows)?;
    let partials = if direct {
        grad_weight.clone()
    } else {
        scratch(gpu, "conv2d weight-gradient partials", chunks * d.weight_len())?
    };
    let bindings = [Binding::read(1, x), Binding::read(5, grad_y), Binding::write(7, &partials)];
    let reduce_rows = launch(&params, &bindings, chunks * tiles(&d), cost(&d))?;
    if direct {
        return Ok(vec![reduce_rows]);
    }
    Ok(vec![reduce_rows, reduce::sum_chunks(gpu, &partials, chunks, grad_weight, accumulate)?])
}

/// `grad_bias (+)= sum over n, h, w of grad_y`.
pub fn backward_bias(
    gpu: &Gpu,
    grad_y: &Tensor,
    grad_bias: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    reduce::channel_sum(gpu, grad_y, grad_bias, accumulate)
}
