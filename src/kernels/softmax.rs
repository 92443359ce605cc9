//! Softmax of `scale * x` along the middle axis of `[outer, len, inner]`, numerically stable
//! for inputs of any magnitude, with its backward (`softmax.wgsl`). Tensors beyond a storage
//! binding run in ranges of `outer` ([`slabs::item_ranges`]), each summing in the chunks of
//! the whole axis: bit-identical to one launch. Long rows' chunk sums are a tuned family
//! ([`SoftmaxClass`]): an invocation or a workgroup tree per chunk ([`Summing`]).

use super::slabs::{self, Items};
use super::sums::{self, Summing, SumsClass};
use super::tuning::{self, Tuner};
use super::{f32_bytes, launch, reduce, scratch, to_u32};
use crate::error::{check_shape, Error, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

/// Rows at most this long are done by one invocation each, in one dispatch.
const SHORT_ROW: usize = 256;

crate::gpu::shader_params! {
    struct Params {
        outer: u32,
        len: u32,
        inner: u32,
        chunk_len: u32,
        scale: f32,
        flags: u32,
        _pad: [u32; 2],
    }
}

const ACCUMULATE: u32 = 1;

/// The axis a softmax runs along: the tensor is viewed as `[outer, len, inner]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Axis {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
}

impl Axis {
    /// Softmax along dimension `dim` of `shape`.
    pub fn of(shape: &[usize], dim: usize) -> Result<Self> {
        if dim >= shape.len() {
            return Err(Error::Invalid(format!("softmax axis {dim} of a {}-D tensor", shape.len())));
        }
        Ok(Axis {
            outer: shape[..dim].iter().product(),
            len: shape[dim],
            inner: shape[dim + 1..].iter().product(),
        })
    }

    fn rows(&self) -> usize {
        self.outer * self.inner
    }

    fn numel(&self) -> usize {
        self.rows() * self.len
    }

    /// How rows are summed by `summing`: short rows, and long ones the chunked split
    /// leaves whole, by an invocation each; the tree takes even one chunk a row, as 64
    /// invocations share it.
    fn split(&self, summing: Summing) -> Split {
        if self.len <= SHORT_ROW {
            return Split::Rows;
        }
        let len = self.len.div_ceil(summing.chunks(self.rows(), self.len));
        let count = self.len.div_ceil(len);
        if count == 1 && summing == Summing::Chunked {
            return Split::Rows;
        }
        Split::Chunks { count, len, summing }
    }

    /// The kernel's parameters for rows summed as `split` says.
    fn params(&self, split: Split, scale: f32, flags: u32) -> Result<Params> {
        to_u32("softmax elements", self.numel())?;
        let chunk_len = match split {
            Split::Rows => self.len,
            Split::Chunks { len, .. } => len,
        };
        Ok(Params {
            outer: self.outer as u32,
            len: self.len as u32,
            inner: self.inner as u32,
            chunk_len: chunk_len as u32,
            scale,
            flags,
            _pad: [0; 2],
        })
    }

    /// Runs `launch` over the whole axis, or where `tensors` (laid out along it) exceed a
    /// binding, once per range of `outer` with views of them; either way with the whole
    /// axis's chunks for `summing`.
    fn launches(
        &self,
        gpu: &Gpu,
        summing: Summing,
        tensors: &[&Tensor],
        launch: impl Fn(Axis, Split, &[Tensor]) -> Result<Vec<Dispatch>>,
    ) -> Result<Vec<Dispatch>> {
        let block = self.len * self.inner;
        let items: Vec<Items<'_>> =
            tensors.iter().map(|&t| Items { tensor: t, stride: block, extent: block }).collect();
        let Some(ranges) = slabs::item_ranges(gpu, self.outer, &items)? else {
            let whole: Vec<Tensor> = tensors.iter().map(|&t| t.clone()).collect();
            return launch(*self, self.split(summing), &whole);
        };
        let mut d = Vec::new();
        for range in ranges {
            let views = items.iter().map(|t| t.view(gpu, &range)).collect::<Result<Vec<_>>>()?;
            d.extend(launch(Axis { outer: range.len(), ..*self }, self.split(summing), &views)?);
        }
        Ok(d)
    }
}

/// How a launch sums its rows.
#[derive(Clone, Copy)]
enum Split {
    /// Whole, an invocation per row.
    Rows,
    /// In `count` chunks of `len` (the last one may be shorter), each summed by `summing`.
    Chunks { count: usize, len: usize, summing: Summing },
}

/// What a softmax's summing is chosen for: the rows of the long-row path (the only one that
/// sums in chunks) and their length, rounded up to powers of two, the rows capped at
/// [`PROXY_ROWS`] and the length at [`tuning::PROXY_SIDE`] squared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftmaxClass {
    pub rows: usize,
    pub len: usize,
}

/// A timing proxy's most rows: beyond them the chunks fill a device either way.
pub const PROXY_ROWS: usize = 1024;

impl SoftmaxClass {
    /// The class of a softmax along `axis`; none for short rows, one invocation each.
    pub fn of(axis: &Axis) -> Option<Self> {
        (axis.len > SHORT_ROW).then(|| SoftmaxClass {
            rows: axis.rows().next_power_of_two().min(PROXY_ROWS),
            len: axis.len.next_power_of_two().min(tuning::PROXY_SIDE * tuning::PROXY_SIDE),
        })
    }
}

impl SumsClass for SoftmaxClass {
    const FAMILY: &'static str = "softmax_sums";

    fn key(&self) -> String {
        format!("{}x{}", self.rows, self.len)
    }

    fn terms(&self) -> usize {
        self.rows * self.len
    }

    /// A forward and backward over a proxy of the class's rows.
    fn time(&self, gpu: &Gpu, summing: Summing) -> Result<f64> {
        let axis = Axis { outer: self.rows, len: self.len, inner: 1 };
        let shape = [self.rows, self.len];
        let (x, y, gx) =
            (Tensor::zeros(gpu, &shape)?, Tensor::zeros(gpu, &shape)?, Tensor::zeros(gpu, &shape)?);
        let mut d = forward_with(gpu, &x, axis, 1.0, &y, summing)?;
        d.extend(backward_with(gpu, &y, &x, axis, 1.0, (&gx, false), summing)?);
        tuning::time_dispatches(gpu, &d)
    }
}

/// How a softmax along `axis` sums its chunks: `tuner`'s choice for its class, or without
/// one the untimed default; short rows have no chunks to sum.
pub fn summing(tuner: Option<&Tuner>, gpu: &Gpu, axis: &Axis) -> Summing {
    SoftmaxClass::of(axis).map_or(Summing::Chunked, |class| sums::choose(tuner, gpu, &class))
}

/// `y = softmax(scale * x)` along `axis`.
pub fn forward(gpu: &Gpu, x: &Tensor, axis: Axis, scale: f32, y: &Tensor) -> Result<Vec<Dispatch>> {
    forward_with(gpu, x, axis, scale, y, summing(None, gpu, &axis))
}

/// [`forward`] with the given summing of long rows' chunks.
pub fn forward_with(
    gpu: &Gpu,
    x: &Tensor,
    axis: Axis,
    scale: f32,
    y: &Tensor,
    summing: Summing,
) -> Result<Vec<Dispatch>> {
    check_shape("softmax input (as [outer, len, inner])", &[axis.numel()], &[x.numel()])?;
    check_shape("softmax output", x.shape(), y.shape())?;
    axis.launches(gpu, summing, &[x, y], |axis, split, t| forward_rows(gpu, &t[0], axis, split, scale, &t[1]))
}

/// [`forward`] in one launch over `axis`, summing as `split` says.
fn forward_rows(
    gpu: &Gpu,
    x: &Tensor,
    axis: Axis,
    split: Split,
    scale: f32,
    y: &Tensor,
) -> Result<Vec<Dispatch>> {
    let p = axis.params(split, scale, 0)?;
    let shader = Shader::Softmax.storing(y.dtype())?;
    let n = axis.numel();
    let cost = Cost { flops: 5 * n as u64, bytes: f32_bytes(2 * n) };
    let Split::Chunks { count: chunks, summing, .. } = split else {
        let bindings = [Binding::read(1, x), Binding::write(2, y)];
        return Ok(vec![launch(gpu, shader, "softmax_rows", &p, &bindings, axis.rows(), cost)?]);
    };
    let stats = scratch(gpu, "softmax statistics", 2 * chunks * axis.rows())?;
    let partial_cost = Cost { flops: 4 * n as u64, bytes: f32_bytes(n) };
    let partials = summing.launch(
        gpu,
        (shader, ["softmax_partials", "softmax_partials_tree", "softmax_partials_subgroup"]),
        &p,
        &[Binding::read(1, x), Binding::write(3, &stats)],
        (chunks * axis.rows(), partial_cost),
    )?;
    let combine_cost =
        Cost { flops: (4 * chunks * axis.rows()) as u64, bytes: f32_bytes(2 * chunks * axis.rows()) };
    let combine =
        launch(gpu, shader, "softmax_combine", &p, &[Binding::write(3, &stats)], axis.rows(), combine_cost)?;
    let normalize = launch(
        gpu,
        shader,
        "softmax_normalize",
        &p,
        &[Binding::read(1, x), Binding::write(2, y), Binding::read(8, &stats)],
        n,
        cost,
    )?;
    Ok(vec![partials, combine, normalize])
}

/// `grad_x (+)= scale * y * (grad_y - sum(grad_y * y))` along `axis`, from the forward's `y`.
pub fn backward(
    gpu: &Gpu,
    y: &Tensor,
    grad_y: &Tensor,
    axis: Axis,
    scale: f32,
    grad_x: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    backward_with(gpu, y, grad_y, axis, scale, (grad_x, accumulate), summing(None, gpu, &axis))
}

/// [`backward`] with the given summing of long rows' chunks.
pub fn backward_with(
    gpu: &Gpu,
    y: &Tensor,
    grad_y: &Tensor,
    axis: Axis,
    scale: f32,
    (grad_x, accumulate): (&Tensor, bool),
    summing: Summing,
) -> Result<Vec<Dispatch>> {
    check_shape("softmax output (as [outer, len, inner])", &[axis.numel()], &[y.numel()])?;
    check_shape("softmax output gradient", y.shape(), grad_y.shape())?;
    check_shape("softmax input gradient", y.shape(), grad_x.shape())?;
    let flags = if accumulate { ACCUMULATE } else { 0 };
    axis.launches(gpu, summing, &[y, grad_y, grad_x], |axis, split, t| {
        backward_rows(gpu, [&t[0], &t[1], &t[2]], axis, split, (scale, flags))
    })
}

/// [`backward`] in one launch over `axis` (`[y, grad_y, grad_x]`), summing as `split` says.
fn backward_rows(
    gpu: &Gpu,
    [y, grad_y, grad_x]: [&Tensor; 3],
    axis: Axis,
    split: Split,
    (scale, flags): (f32, u32),
) -> Result<Vec<Dispatch>> {
    let p = axis.params(split, scale, flags)?;
    let n = axis.numel();
    let cost = Cost { flops: 5 * n as u64, bytes: f32_bytes(3 * n) };
    let io = [Binding::read(7, y), Binding::read(4, grad_y)];
    let Split::Chunks { count: chunks, summing, .. } = split else {
        let bindings = [&io[..], &[Binding::write(5, grad_x)]].concat();
        return Ok(vec![launch(
            gpu,
            Shader::Softmax,
            "softmax_backward_rows",
            &p,
            &bindings,
            axis.rows(),
            cost,
        )?]);
    };
    let partial_dots = scratch(gpu, "softmax backward partials", chunks * axis.rows())?;
    let dots = scratch(gpu, "softmax backward dots", axis.rows())?;
    let bindings = [&io[..], &[Binding::write(6, &partial_dots)]].concat();
    let dot_cost = Cost { flops: 2 * n as u64, bytes: f32_bytes(2 * n) };
    let partials = summing.launch(
        gpu,
        (
            Shader::Softmax,
            [
                "softmax_backward_partials",
                "softmax_backward_partials_tree",
                "softmax_backward_partials_subgroup",
            ],
        ),
        &p,
        &bindings,
        (chunks * axis.rows(), dot_cost),
    )?;
    let sum = reduce::sum_chunks(gpu, &partial_dots, chunks, &dots, false)?;
    let bindings = [&io[..], &[Binding::write(5, grad_x), Binding::read(9, &dots)]].concat();
    let apply = launch(gpu, Shader::Softmax, "softmax_backward_apply", &p, &bindings, n, cost)?;
    Ok(vec![partials, sum, apply])
}
