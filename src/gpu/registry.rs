//! The shader registry: every `shaders/*.wgsl` embedded in the binary, composed with the
//! shared pieces they include, and a cache that builds each (shader, entry point,
//! override constants) pipeline once.

use super::contract::Interface;
use super::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Every module the engine builds pipelines from: a kernel file of `shaders/`, composed
/// (see [`super::compose`]) with the flag its variant sets. The `F16` modules are the files
/// of half-precision inference composed with `F16`: activations (and the convolution's
/// packed weights) stored at half, sums at f32. The `Subgroups` ones are the reductions'
/// files composed with `SUBGROUPS`: their trees finish in subgroup shuffles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shader {
    BatchNorm,
    BatchNormSubgroups,
    Concat,
    ConcatF16,
    Conv2d,
    Conv2dF16,
    Dropout,
    Elementwise,
    ElementwiseF16,
    Loss,
    LossSubgroups,
    Matmul,
    MatmulF16,
    Metrics,
    MetricsF16,
    Reduce,
    Resize,
    ResizeF16,
    Sgd,
    Softmax,
    SoftmaxF16,
    SoftmaxSubgroups,
}

/// Each twin module: (the plain module, the twin, the flag it is composed with, its name).
const TWINS: [(Shader, Shader, &str, &str); 10] = [
    (Shader::Concat, Shader::ConcatF16, "F16", "concat_f16"),
    (Shader::Conv2d, Shader::Conv2dF16, "F16", "conv2d_f16"),
    (Shader::Elementwise, Shader::ElementwiseF16, "F16", "elementwise_f16"),
    (Shader::Matmul, Shader::MatmulF16, "F16", "matmul_f16"),
    (Shader::Metrics, Shader::MetricsF16, "F16", "metrics_f16"),
    (Shader::Resize, Shader::ResizeF16, "F16", "resize_f16"),
    (Shader::Softmax, Shader::SoftmaxF16, "F16", "softmax_f16"),
    (Shader::BatchNorm, Shader::BatchNormSubgroups, "SUBGROUPS", "batch_norm_subgroups"),
    (Shader::Loss, Shader::LossSubgroups, "SUBGROUPS", "loss_subgroups"),
    (Shader::Softmax, Shader::SoftmaxSubgroups, "SUBGROUPS", "softmax_subgroups"),
];

impl Shader {
    pub const ALL: [Shader; 22] = [
        Shader::BatchNorm,
        Shader::BatchNormSubgroups,
        Shader::Concat,
        Shader::ConcatF16,
        Shader::Conv2d,
        Shader::Conv2dF16,
        Shader::Dropout,
        Shader::Elementwise,
        Shader::ElementwiseF16,
        Shader::Loss,
        Shader::LossSubgroups,
        Shader::Matmul,
        Shader::MatmulF16,
        Shader::Metrics,
        Shader::MetricsF16,
        Shader::Reduce,
        Shader::Resize,
        Shader::ResizeF16,
        Shader::Sgd,
        Shader::Softmax,
        Shader::SoftmaxF16,
        Shader::SoftmaxSubgroups,
    ];

    /// This module's twin composed with `flag`, if it has one.
    fn twin(self, flag: &str) -> Option<Shader> {
        TWINS.iter().find(|t| t.0 == self && t.2 == flag).map(|t| t.1)
    }

    /// The module whose activations are stored as `activations` (f32 or f16): this one or
    /// its half-precision twin, or an error naming the module that has no such twin.
    pub fn storing(self, activations: DType) -> Result<Shader> {
        match activations {
            DType::F16 => self.twin("F16").ok_or_else(|| {
                Error::Invalid(format!("{} has no f16 variant: f16 tensors are for inference", self.name()))
            }),
            _ => Ok(self),
        }
    }

    /// The twin whose trees finish in subgroup shuffles, if the module has one.
    pub fn with_subgroups(self) -> Option<Shader> {
        self.twin("SUBGROUPS")
    }

    /// The module's name in errors, labels and the tuning cache, e.g. `conv2d_f16`.
    pub fn name(self) -> &'static str {
        TWINS.iter().find(|t| t.1 == self).map_or_else(|| self.file().0, |t| t.3)
    }

    /// The kernel file it is composed from: (stem under `shaders/`, text).
    pub fn file(self) -> (&'static str, &'static str) {
        macro_rules! file {
            ($stem:literal) => {
                ($stem, include_str!(concat!("../../shaders/", $stem, ".wgsl")))
            };
        }
        match self {
            Shader::BatchNorm | Shader::BatchNormSubgroups => file!("batch_norm"),
            Shader::Concat | Shader::ConcatF16 => file!("concat"),
            Shader::Conv2d | Shader::Conv2dF16 => file!("conv2d"),
            Shader::Dropout => file!("dropout"),
            Shader::Elementwise | Shader::ElementwiseF16 => file!("elementwise"),
            Shader::Loss | Shader::LossSubgroups => file!("loss"),
            Shader::Matmul | Shader::MatmulF16 => file!("matmul"),
            Shader::Metrics | Shader::MetricsF16 => file!("metrics"),
            Shader::Reduce => file!("reduce"),
            Shader::Resize | Shader::ResizeF16 => file!("resize"),
            Shader::Sgd => file!("sgd"),
            Shader::Softmax | Shader::SoftmaxF16 | Shader::SoftmaxSubgroups => file!("softmax"),
        }
    }

    /// The flags its file is composed with (`#if F16`, `#if SUBGROUPS`).
    pub fn flags(self) -> &'static [&'static str] {
        match TWINS.iter().find(|t| t.1 == self) {
            Some((_, _, "F16", _)) => &["F16"],
            Some((_, _, "SUBGROUPS", _)) => &["SUBGROUPS"],
            _ => &[],
        }
    }

    /// Whether its pipelines need the adapter's `SHADER_F16`.
    pub fn needs_f16(self) -> bool {
        self.flags().contains(&"F16")
    }

    /// Whether its pipelines need the adapter's `SUBGROUP`.
    pub fn needs_subgroups(self) -> bool {
        self.flags().contains(&"SUBGROUPS")
    }

    /// The composed WGSL source, or an error naming the file and line that do not compose.
    pub fn source(self) -> Result<String> {
        let (stem, text) = self.file();
        super::compose::compose(&format!("shaders/{stem}.wgsl"), text, self.flags(), INCLUDES)
            .map_err(|e| Error::Invalid(format!("composing {}: {e}", self.name())))
    }
}

/// The pieces kernel files share, by the name a line `#include "NAME"` gives
/// (`shaders/include/`): written once, composed into every file that includes them.
pub const INCLUDES: &[(&str, &str)] = &[
    ("common.wgsl", include_str!("../../shaders/include/common.wgsl")),
    ("tiles.wgsl", include_str!("../../shaders/include/tiles.wgsl")),
    ("trees.wgsl", include_str!("../../shaders/include/trees.wgsl")),
];

/// Override constants are part of a pipeline's identity; f64 bits make them hashable.
type PipelineKey = (Shader, &'static str, Vec<(&'static str, u64)>);

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<Shader, Arc<wgpu::ShaderModule>>>,
    interfaces: Mutex<HashMap<Shader, Arc<Interface>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl PipelineCache {
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        shader: Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = (shader, entry, constants.iter().map(|&(k, v)| (k, v.to_bits())).collect());
        if let Some(p) = lock(&self.pipelines).get(&key) {
            return Ok(Arc::clone(p));
        }
        let module = self.module(device, shader)?;
        let (pipeline, error) = super::scoped(device, wgpu::ErrorFilter::Validation, || {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        });
        if let Some(e) = error {
            return Err(Error::Device(format!("building pipeline {}.wgsl:{entry}: {e}", shader.name())));
        }
        let pipeline = Arc::new(pipeline);
        lock(&self.pipelines).insert(key, Arc::clone(&pipeline));
        Ok(pipeline)
    }

    /// What the shader declares (its `Params` and storage bindings), read once.
    pub(crate) fn interface(&self, shader: Shader) -> Result<Arc<Interface>> {
        if let Some(i) = lock(&self.interfaces).get(&shader) {
            return Ok(Arc::clone(i));
        }
        let interface = Arc::new(Interface::reflect(shader.name(), &shader.source()?)?);
        lock(&self.interfaces).insert(shader, Arc::clone(&interface));
        Ok(interface)
    }

    fn module(&self, device: &wgpu::Device, shader: Shader) -> Result<Arc<wgpu::ShaderModule>> {
        if let Some(m) = lock(&self.modules).get(&shader) {
            return Ok(Arc::clone(m));
        }
        for (needed, feature, name) in [
            (shader.needs_f16(), wgpu::Features::SHADER_F16, "SHADER_F16"),
            (shader.needs_subgroups(), wgpu::Features::SUBGROUP, "SUBGROUP"),
        ] {
            if needed && !device.features().contains(feature) {
                return Err(Error::Invalid(format!(
                    "{} needs {name}, which the device lacks",
                    shader.name()
                )));
            }
        }
        let source = shader.source()?;
        let (module, error) = super::scoped(device, wgpu::ErrorFilter::Validation, || {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(shader.name()),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            })
        });
        if let Some(e) = error {
            return Err(Error::Device(format!("compiling {}: {e}", shader.name())));
        }
        let module = Arc::new(module);
        lock(&self.modules).insert(shader, Arc::clone(&module));
        Ok(module)
    }
}

/// Locks a mutex, recovering the data if another thread panicked while holding it (the
/// caches stay valid: entries are inserted whole).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
