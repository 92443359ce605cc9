//! SGD with momentum over a whole model in one dispatch (`sgd.wgsl`): parameters,
//! gradients and momentum buffers live in flat arenas, each parameter a view of them.

use super::{f32_bytes, launch, to_u32};
use crate::error::{Error, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, DType, Tensor};

crate::gpu::shader_params! {
    struct Params {
        len: u32,
        segments: u32,
        nesterov: u32,
        _pad0: u32,
        lr: f32,
        momentum: f32,
        weight_decay: f32,
        _pad1: u32,
    }
}

/// SGD's hyperparameters (PyTorch's, dampening 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
}

/// One flat arena each for parameters, gradients and momentum, with a view per parameter.
pub struct Arena {
    pub params: Tensor,
    pub grads: Tensor,
    pub momentum: Tensor,
    /// (parameter view, gradient view) per parameter, in the order given.
    pub views: Vec<(Tensor, Tensor)>,
    /// The momentum buffer's view per parameter (saved in checkpoints for an exact resume).
    pub momentum_views: Vec<Tensor>,
    segment_end: Tensor,
    segment_lr: Tensor,
}

impl Arena {
    /// Lays out parameters of the given shapes, each with a learning-rate multiplier.
    /// Views start at the adapter's storage offset alignment; gradients and momentum start
    /// at zero (the gaps between views stay zero, so the optimizer leaves them so).
    pub fn new(gpu: &Gpu, params: &[(&[usize], f32)]) -> Result<Self> {
        if params.is_empty() {
            return Err(Error::Invalid("an optimizer arena needs at least one parameter".into()));
        }
        let align = (gpu.limits().min_storage_buffer_offset_alignment as usize / 4).max(1);
        let mut starts = Vec::with_capacity(params.len());
        let mut len = 0usize;
        for (shape, _) in params {
            starts.push(len);
            len = (len + shape.iter().product::<usize>()).div_ceil(align) * align;
        }
        to_u32("arena elements", len)?;
        let whole = [len];
        let (p, g, m) =
            (Tensor::zeros(gpu, &whole)?, Tensor::zeros(gpu, &whole)?, Tensor::zeros(gpu, &whole)?);
        let views = params
            .iter()
            .zip(&starts)
            .map(|((shape, _), &start)| Ok((p.view(gpu, start, shape)?, g.view(gpu, start, shape)?)))
            .collect::<Result<Vec<_>>>()?;
        let momentum_views = params
            .iter()
            .zip(&starts)
            .map(|((shape, _), &start)| m.view(gpu, start, shape))
            .collect::<Result<_>>()?;
        // Segment i runs to the next view's start (or the end), so gaps share its multiplier.
        let ends: Vec<u32> = starts[1..].iter().map(|&s| s as u32).chain([len as u32]).collect();
        let lrs: Vec<f32> = params.iter().map(|&(_, m)| m).collect();
        Ok(Arena {
            segment_end: Tensor::from_u32(gpu, &[ends.len()], &ends)?,
            segment_lr: Tensor::from_slice(gpu, &[lrs.len()], &lrs)?,
            params: p,
            grads: g,
            momentum: m,
            views,
            momentum_views,
        })
    }

    fn params(&self, config: &SgdConfig, lr: f32) -> Params {
        Params {
            len: self.params.numel() as u32,
            segments: self.segment_lr.numel() as u32,
            nesterov: u32::from(config.nesterov),
            _pad0: 0,
            lr,
            momentum: config.momentum,
            weight_decay: config.weight_decay,
            _pad1: 0,
        }
    }

    /// Records one step over every parameter at learning rate `lr`.
    pub fn step(&self, gpu: &Gpu, config: &SgdConfig, lr: f32) -> Result<Dispatch> {
        self.segment_end.check_dtype("sgd segments", DType::U32)?;
        let n = self.params.numel();
        let bindings = [
            Binding::write(1, &self.params),
            Binding::read(2, &self.grads),
            Binding::write(3, &self.momentum),
            Binding::read_u32(4, &self.segment_end),
            Binding::read(5, &self.segment_lr),
        ];
        let cost = Cost { flops: 7 * n as u64, bytes: f32_bytes(5 * n) };
        launch(gpu, Shader::Sgd, "sgd_step", &self.params(config, lr), &bindings, n, cost)
    }

    /// Sets the learning rate of a recorded step for the next submission (the poly schedule
    /// is computed on the host).
    pub fn set_lr(&self, gpu: &Gpu, step: &Dispatch, config: &SgdConfig, lr: f32) {
        step.write_params(gpu, &self.params(config, lr));
    }
}
