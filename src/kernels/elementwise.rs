//! ReLU, add, fused add + ReLU and the scaled add of a learnt scalar, with their backward
//! passes (`elementwise.wgsl`).

use super::matmul::{product, Strided};
use super::{launch, slabs, to_u32};
use crate::error::{check_shape, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

crate::gpu::shader_params! {
    struct Params {
        len: u32,
        flags: u32,
        _pad: [u32; 2],
    }
}

const ACCUMULATE_A: u32 = 1;
const ACCUMULATE_B: u32 = 2;

/// An elementwise entry point as launched: its name, flags and FLOPs per element.
#[derive(Clone, Copy)]
struct Entry {
    name: &'static str,
    flags: u32,
    flops: u64,
}

/// One launch of `entry`, or one per flat chunk when the tensors exceed a binding (each
/// element is independent, so the chunks give the same result).
fn elementwise(
    gpu: &Gpu,
    entry: Entry,
    reads: &[(u32, &Tensor)],
    writes: &[(u32, &Tensor)],
) -> Result<Vec<Dispatch>> {
    with_scalar(gpu, entry, reads, writes, None)
}

/// [`elementwise`] with a one-element tensor every launch binds whole (a learnt scalar).
fn with_scalar(
    gpu: &Gpu,
    entry: Entry,
    reads: &[(u32, &Tensor)],
    writes: &[(u32, &Tensor)],
    scalar: Option<(u32, &Tensor)>,
) -> Result<Vec<Dispatch>> {
    if let Some((_, t)) = scalar {
        check_shape(&format!("{} scalar", entry.name), &[1], t.shape())?;
    }
    let first = reads.first().map(|r| r.1).unwrap_or(writes[0].1);
    for (_, t) in reads.iter().chain(writes) {
        check_shape(entry.name, first.shape(), t.shape())?;
    }
    if !slabs::exceeds_binding(gpu, &[first]) {
        return Ok(vec![launch_over(gpu, entry, reads, writes, scalar)?]);
    }
    let mut d = Vec::new();
    for r in slabs::flat_chunks(gpu, first.numel(), first.dtype().size()) {
        let chunks = |ts: &[(u32, &Tensor)]| -> Result<Vec<(u32, Tensor)>> {
            ts.iter().map(|&(i, t)| Ok((i, t.view(gpu, r.start, &[r.len()])?))).collect()
        };
        let (reads, writes) = (chunks(reads)?, chunks(writes)?);
        d.push(launch_over(gpu, entry, &refs(&reads), &refs(&writes), scalar)?);
    }
    Ok(d)
}

fn refs(tensors: &[(u32, Tensor)]) -> Vec<(u32, &Tensor)> {
    tensors.iter().map(|(i, t)| (*i, t)).collect()
}

/// One launch of `entry` over tensors of one shape.
fn launch_over(
    gpu: &Gpu,
    entry: Entry,
    reads: &[(u32, &Tensor)],
    writes: &[(u32, &Tensor)],
    scalar: Option<(u32, &Tensor)>,
) -> Result<Dispatch> {
    let len = writes[0].1.numel();
    let params = Params { len: to_u32("elements", len)?, flags: entry.flags, _pad: [0; 2] };
    let bindings: Vec<Binding<'_>> = reads
        .iter()
        .map(|&(i, t)| Binding::read(i, t))
        .chain(writes.iter().map(|&(i, t)| Binding::write(i, t)))
        .chain(scalar.map(|(i, t)| Binding::read(i, t)))
        .collect();
    let accumulated = writes.len() * usize::from(entry.flags != 0);
    let stored = writes[0].1.dtype();
    let cost = Cost {
        flops: entry.flops * len as u64,
        bytes: (len * (reads.len() + writes.len() + accumulated)) as u64 * stored.size(),
    };
    launch(gpu, Shader::Elementwise.storing(stored)?, entry.name, &params, &bindings, len, cost)
}

fn flags(accumulate_a: bool, accumulate_b: bool) -> u32 {
    (if accumulate_a { ACCUMULATE_A } else { 0 }) | (if accumulate_b { ACCUMULATE_B } else { 0 })
}

/// `y = max(x, 0)`.
pub fn relu_forward(gpu: &Gpu, x: &Tensor, y: &Tensor) -> Result<Vec<Dispatch>> {
    elementwise(gpu, Entry { name: "relu_forward", flags: 0, flops: 1 }, &[(1, x)], &[(3, y)])
}

/// `grad_x (+)= grad_y where y > 0`. `y` may be the ReLU's output or its input.
pub fn relu_backward(
    gpu: &Gpu,
    y: &Tensor,
    grad_y: &Tensor,
    grad_x: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let entry = Entry { name: "relu_backward", flags: flags(accumulate, false), flops: 1 };
    elementwise(gpu, entry, &[(1, y), (4, grad_y)], &[(5, grad_x)])
}

/// `y = a + b`.
pub fn add_forward(gpu: &Gpu, a: &Tensor, b: &Tensor, y: &Tensor) -> Result<Vec<Dispatch>> {
    elementwise(gpu, Entry { name: "add_forward", flags: 0, flops: 1 }, &[(1, a), (2, b)], &[(3, y)])
}

/// `grad_a (+)= grad_y`, `grad_b (+)= grad_y`.
pub fn add_backward(
    gpu: &Gpu,
    grad_y: &Tensor,
    (grad_a, accumulate_a): (&Tensor, bool),
    (grad_b, accumulate_b): (&Tensor, bool),
) -> Result<Vec<Dispatch>> {
    let f = flags(accumulate_a, accumulate_b);
    elementwise(
        gpu,
        Entry { name: "add_backward", flags: f, flops: 0 },
        &[(4, grad_y)],
        &[(5, grad_a), (6, grad_b)],
    )
}

/// `y = max(a + b, 0)`.
pub fn add_relu_forward(gpu: &Gpu, a: &Tensor, b: &Tensor, y: &Tensor) -> Result<Vec<Dispatch>> {
    elementwise(gpu, Entry { name: "add_relu_forward", flags: 0, flops: 2 }, &[(1, a), (2, b)], &[(3, y)])
}

/// `grad_a (+)= grad_y where y > 0`, and the same into `grad_b`; `y` is the forward output.
pub fn add_relu_backward(
    gpu: &Gpu,
    y: &Tensor,
    grad_y: &Tensor,
    (grad_a, accumulate_a): (&Tensor, bool),
    (grad_b, accumulate_b): (&Tensor, bool),
) -> Result<Vec<Dispatch>> {
    let f = flags(accumulate_a, accumulate_b);
    elementwise(
        gpu,
        Entry { name: "add_relu_backward", flags: f, flops: 1 },
        &[(1, y), (4, grad_y)],
        &[(5, grad_a), (6, grad_b)],
    )
}

/// `y = gamma * a + b` with `gamma` a learnt scalar `[1]`.
pub fn scaled_add_forward(
    gpu: &Gpu,
    a: &Tensor,
    gamma: &Tensor,
    b: &Tensor,
    y: &Tensor,
) -> Result<Vec<Dispatch>> {
    let entry = Entry { name: "scaled_add_forward", flags: 0, flops: 2 };
    with_scalar(gpu, entry, &[(1, a), (2, b)], &[(3, y)], Some((7, gamma)))
}

/// The scaled add's backward: `grad_a (+)= gamma * grad_y`, `grad_b (+)= grad_y`, and
/// `grad_gamma (+)= sum(grad_y * a)`: a dot product per image and channel, then their sum,
/// both as products (a fixed order, so the same bits every run).
pub fn scaled_add_backward(
    gpu: &Gpu,
    (a, gamma): (&Tensor, &Tensor),
    grad_y: &Tensor,
    (grad_a, accumulate_a): (&Tensor, bool),
    (grad_b, accumulate_b): (&Tensor, bool),
    (grad_gamma, accumulate_gamma): (&Tensor, bool),
) -> Result<Vec<Dispatch>> {
    check_shape("scaled add input", grad_y.shape(), a.shape())?;
    check_shape("scaled add scalar gradient", &[1], grad_gamma.shape())?;
    let entry = Entry { name: "scaled_add_backward", flags: flags(accumulate_a, accumulate_b), flops: 1 };
    let mut d = with_scalar(gpu, entry, &[(4, grad_y)], &[(5, grad_a), (6, grad_b)], Some((7, gamma)))?;
    let [n, c, h, w] = a.dims4("scaled add input")?;
    let (rows, len) = (n * c, h * w);
    let partial = Tensor::empty(gpu, &[rows])?;
    let ones = Tensor::empty(gpu, &[rows])?;
    ones.write(gpu, &vec![1.0; rows])?;
    let row = Strided { rows: 1, cols: len, batch: len, row: len, col: 1 };
    d.extend(product(gpu, None, rows, (grad_y, row), (a, row.t()), &partial, false)?);
    let all = Strided::row_major(1, rows);
    d.extend(product(gpu, None, 1, (&partial, all), (&ones, all.t()), grad_gamma, accumulate_gamma)?);
    Ok(d)
}
