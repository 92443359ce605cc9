//! SGD with momentum over a whole model in one dispatch per arena chunk (`sgd.wgsl`):
//! parameters, gradients and momentum buffers live in flat arenas, each parameter a view of
//! them.

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

/// Parameters, gradients and momentum in flat arenas, with a view per parameter. The
/// arenas are split into chunks that each fit one storage binding
/// (`max_storage_buffer_binding_size`), so a model of any size trains on any adapter: one
/// dispatch per chunk updates its parameters.
pub struct Arena {
    chunks: Vec<Chunk>,
    /// (parameter view, gradient view) per parameter, in the order given.
    pub views: Vec<(Tensor, Tensor)>,
    /// The momentum buffer's view per parameter (saved in checkpoints for an exact resume).
    pub momentum_views: Vec<Tensor>,
}

/// One chunk of the arenas: consecutive parameters, and where each one's learning-rate
/// segment ends.
struct Chunk {
    params: Tensor,
    grads: Tensor,
    momentum: Tensor,
    segment_end: Tensor,
    segment_lr: Tensor,
}

impl Arena {
    /// Lays out parameters of the given shapes, each with a learning-rate multiplier.
    /// Views start at the adapter's storage offset alignment; gradients and momentum start
    /// at zero (the gaps between views stay zero, so the optimizer leaves them so). A
    /// parameter larger than a binding is an error naming it.
    pub fn new(gpu: &Gpu, params: &[(&[usize], f32)]) -> Result<Self> {
        if params.is_empty() {
            return Err(Error::Invalid("an optimizer arena needs at least one parameter".into()));
        }
        let limits = gpu.limits();
        let align = (limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
        let binding = (limits.max_storage_buffer_binding_size as usize / 4) / align * align;
        // Each chunk's parameter indices and their starts within it.
        let mut layout: Vec<Vec<(usize, usize)>> = vec![Vec::new()];
        let mut len = 0usize;
        for (i, (shape, _)) in params.iter().enumerate() {
            let numel: usize = shape.iter().product();
            if numel > binding {
                return Err(Error::Invalid(format!(
                    "parameter {i} {shape:?}: {} bytes exceed the storage binding limit of {} bytes",
                    numel * 4,
                    binding * 4
                )));
            }
            if len + numel > binding {
                layout.push(Vec::new());
                len = 0;
            }
            layout.last_mut().expect("a chunk").push((i, len));
            len = (len + numel).div_ceil(align) * align;
        }
        let mut views = Vec::with_capacity(params.len());
        let mut momentum_views = Vec::with_capacity(params.len());
        let mut chunks = Vec::with_capacity(layout.len());
        for members in &layout {
            let (last, last_start) = *members.last().expect("a chunk has a parameter");
            let last_len: usize = params[last].0.iter().product();
            let len = (last_start + last_len).div_ceil(align) * align;
            to_u32("arena elements", len)?;
            let whole = [len];
            let (p, g, m) =
                (Tensor::zeros(gpu, &whole)?, Tensor::zeros(gpu, &whole)?, Tensor::zeros(gpu, &whole)?);
            for &(i, start) in members {
                let shape = params[i].0;
                views.push((p.view(gpu, start, shape)?, g.view(gpu, start, shape)?));
                momentum_views.push(m.view(gpu, start, shape)?);
            }
            // Segment k runs to the next view's start (or the end), so gaps share its multiplier.
            let ends: Vec<u32> = members[1..].iter().map(|&(_, s)| s as u32).chain([len as u32]).collect();
            let lrs: Vec<f32> = members.iter().map(|&(i, _)| params[i].1).collect();
            chunks.push(Chunk {
                segment_end: Tensor::from_u32(gpu, &[ends.len()], &ends)?,
                segment_lr: Tensor::from_slice(gpu, &[lrs.len()], &lrs)?,
                params: p,
                grads: g,
                momentum: m,
            });
        }
        Ok(Arena { chunks, views, momentum_views })
    }

    /// The elements of the arenas (each), padding included.
    pub fn numel(&self) -> usize {
        self.chunks.iter().map(|c| c.params.numel()).sum()
    }

    /// How many chunks (and SGD dispatches) the arenas take.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// The gradient arena's chunks (one clear each zeroes every gradient).
    pub fn grads(&self) -> impl Iterator<Item = &Tensor> {
        self.chunks.iter().map(|c| &c.grads)
    }

    /// Every chunk of the three arenas.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.chunks.iter().flat_map(|c| [&c.params, &c.grads, &c.momentum])
    }

    /// Records one step over every parameter at learning rate `lr`: a dispatch per chunk.
    pub fn step(&self, gpu: &Gpu, config: &SgdConfig, lr: f32) -> Result<Vec<Dispatch>> {
        self.chunks.iter().map(|c| c.step(gpu, config, lr)).collect()
    }

    /// Sets the learning rate of a recorded step for the next submission (the poly schedule
    /// is computed on the host).
    pub fn set_lr(&self, gpu: &Gpu, step: &[Dispatch], config: &SgdConfig, lr: f32) {
        for (c, d) in self.chunks.iter().zip(step) {
            d.write_params(gpu, &c.params(config, lr));
        }
    }
}

impl Chunk {
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

    fn step(&self, gpu: &Gpu, config: &SgdConfig, lr: f32) -> Result<Dispatch> {
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
}
