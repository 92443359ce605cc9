//! Dropout2d: whole channels dropped with probability `p` in training (`dropout.wgsl`).
//! The mask is a hash of (seed, n * C + c), so a step replays exactly from its seed and
//! the backward needs nothing stored. [`keep`] computes the same mask on the host.

use super::slabs::{self, Cut};
use super::{f32_bytes, launch, to_u32};
use crate::error::{check_shape, Error, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

crate::gpu::shader_params! {
    struct Params {
        len: u32,
        channels: u32,
        hw: u32,
        seed: u32,
        drop: f32,
        flags: u32,
        first_unit: u32,
        _pad: u32,
    }
}

const ACCUMULATE: u32 = 1;

/// The 32-bit hash the shader uses.
fn hash(v: u32) -> u32 {
    let mut h = v;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// Whether channel `c` of sample `n` (of `channels` per sample) is kept under `seed`.
pub fn keep(seed: u32, drop: f32, n: usize, channels: usize, c: usize) -> bool {
    let unit = (n * channels + c) as u32;
    let u = (hash(hash(seed) ^ unit) >> 8) as f32 / 16_777_216.0;
    u >= drop
}

/// A dropout layer's sizes and drop probability; its dispatches can be reseeded per step.
#[derive(Clone, Copy, Debug)]
pub struct Dropout2d {
    pub drop: f32,
    /// The batch's first image within a larger batch (a data-parallel rank's slice): the
    /// mask of image n is that of image `first_image + n` of the whole batch.
    pub first_image: usize,
}

/// A recorded dropout launch whose seed is rewritten each step (a clone shares the
/// launch's parameters, so reseeding rewrites the very dispatch the passes encode).
#[derive(Clone)]
pub struct SeededDispatch {
    pub dispatch: Dispatch,
    params: Params,
}

impl SeededDispatch {
    /// Sets the seed for the next submission (the executor calls this once per step).
    pub fn reseed(&self, gpu: &Gpu, seed: u32) {
        self.dispatch.write_params(gpu, &Params { seed, ..self.params });
    }
}

impl Dropout2d {
    fn params(&self, x: &Tensor, seed: u32, accumulate: bool, first_unit: usize) -> Result<Params> {
        if !(0.0..1.0).contains(&self.drop) {
            return Err(Error::Invalid(format!("dropout probability {} is not in [0, 1)", self.drop)));
        }
        let [_, c, h, w] = x.dims4("dropout input")?;
        Ok(Params {
            len: to_u32("dropout elements", x.numel())?,
            channels: c as u32,
            hw: (h * w) as u32,
            seed,
            drop: self.drop,
            flags: if accumulate { ACCUMULATE } else { 0 },
            first_unit: to_u32("dropout units", first_unit)?,
            _pad: 0,
        })
    }

    /// `y = x * mask / (1 - p)`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, y: &Tensor, seed: u32) -> Result<Vec<SeededDispatch>> {
        check_shape("dropout output", x.shape(), y.shape())?;
        self.per_slab(gpu, x, y, |x, y, first_unit| {
            let params = self.params(x, seed, false, first_unit)?;
            let cost = Cost { flops: x.numel() as u64, bytes: f32_bytes(2 * x.numel()) };
            let bindings = [Binding::read(1, x), Binding::write(2, y)];
            let dispatch =
                launch(gpu, Shader::Dropout, "dropout_forward", &params, &bindings, x.numel(), cost)?;
            Ok(SeededDispatch { dispatch, params })
        })
    }

    /// `grad_x (+)= grad_y * mask / (1 - p)` with the forward's seed.
    pub fn backward(
        &self,
        gpu: &Gpu,
        grad_y: &Tensor,
        grad_x: &Tensor,
        seed: u32,
        accumulate: bool,
    ) -> Result<Vec<SeededDispatch>> {
        check_shape("dropout input gradient", grad_y.shape(), grad_x.shape())?;
        self.per_slab(gpu, grad_y, grad_x, |grad_y, grad_x, first_unit| {
            let params = self.params(grad_y, seed, accumulate, first_unit)?;
            let n = grad_y.numel();
            let cost = Cost { flops: n as u64, bytes: f32_bytes((2 + usize::from(accumulate)) * n) };
            let bindings = [Binding::read(3, grad_y), Binding::write(4, grad_x)];
            let dispatch = launch(gpu, Shader::Dropout, "dropout_backward", &params, &bindings, n, cost)?;
            Ok(SeededDispatch { dispatch, params })
        })
    }

    /// `launch(input, output, first mask unit)` once, or once per channel slab when the
    /// tensors exceed a binding, each slab starting the mask at its own unit (n * C + c).
    fn per_slab(
        &self,
        gpu: &Gpu,
        input: &Tensor,
        output: &Tensor,
        launch: impl Fn(&Tensor, &Tensor, usize) -> Result<SeededDispatch>,
    ) -> Result<Vec<SeededDispatch>> {
        let [n, c, _, _] = input.dims4("dropout input")?;
        let first = self.first_image * c;
        let cuts = [Cut::new(input, 0), Cut::new(output, 0)];
        let Some(slabs) = slabs::split(gpu, n, c, &cuts)? else {
            return Ok(vec![launch(input, output, first)?]);
        };
        slabs
            .iter()
            .map(|s| {
                launch(&s.view(gpu, cuts[0])?, &s.view(gpu, cuts[1])?, first + s.item * c + s.channels.start)
            })
            .collect()
    }
}
