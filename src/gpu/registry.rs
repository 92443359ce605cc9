//! The shader registry: every `shaders/*.wgsl` embedded in the binary, composed with the
//! shared pieces they include, and a cache that builds each (shader, entry point,
//! override constants) pipeline once.

use super::contract::Interface;
use super::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Every module the engine builds pipelines from: a kernel file of `shaders/`, composed
/// (see [`super::compose`]) with the flags its variant sets. The `F16` modules are the
/// files of half-precision inference composed with `F16`: activations (and the
/// convolution's packed weights) stored at half, sums at f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shader {
    BatchNorm,
    Concat,
    ConcatF16,
    Conv2d,
    Conv2dF16,
    Dropout,
    Elementwise,
    ElementwiseF16,
    Loss,
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
}

/// Each inference module and its half-precision twin.
const HALF_TWINS: [(Shader, Shader); 7] = [
    (Shader::Concat, Shader::ConcatF16),
    (Shader::Conv2d, Shader::Conv2dF16),
    (Shader::Elementwise, Shader::ElementwiseF16),
    (Shader::Matmul, Shader::MatmulF16),
    (Shader::Metrics, Shader::MetricsF16),
    (Shader::Resize, Shader::ResizeF16),
    (Shader::Softmax, Shader::SoftmaxF16),
];

impl Shader {
    pub const ALL: [Shader; 19] = [
        Shader::BatchNorm,
        Shader::Concat,
        Shader::ConcatF16,
        Shader::Conv2d,
        Shader::Conv2dF16,
        Shader::Dropout,
        Shader::Elementwise,
        Shader::ElementwiseF16,
        Shader::Loss,
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
    ];

    /// The module whose activations are stored as `activations` (f32 or f16): this one or
    /// its half-precision twin, or an error naming the module that has no such twin.
    pub fn storing(self, activations: DType) -> Result<Shader> {
        match activations {
            DType::F16 => {
                HALF_TWINS.iter().find(|(plain, _)| *plain == self).map(|&(_, half)| half).ok_or_else(|| {
                    Error::Invalid(format!(
                        "{} has no f16 variant: f16 tensors are for inference",
                        self.name()
                    ))
                })
            }
            _ => Ok(self),
        }
    }

    /// The module's name in errors, labels and the tuning cache, e.g. `conv2d_f16`.
    pub fn name(self) -> &'static str {
        match self {
            Shader::ConcatF16 => "concat_f16",
            Shader::Conv2dF16 => "conv2d_f16",
            Shader::ElementwiseF16 => "elementwise_f16",
            Shader::MatmulF16 => "matmul_f16",
            Shader::MetricsF16 => "metrics_f16",
            Shader::ResizeF16 => "resize_f16",
            Shader::SoftmaxF16 => "softmax_f16",
            _ => self.file().0,
        }
    }

    /// The kernel file it is composed from: (stem under `shaders/`, text).
    pub fn file(self) -> (&'static str, &'static str) {
        macro_rules! file {
            ($stem:literal) => {
                ($stem, include_str!(concat!("../../shaders/", $stem, ".wgsl")))
            };
        }
        match self {
            Shader::BatchNorm => file!("batch_norm"),
            Shader::Concat | Shader::ConcatF16 => file!("concat"),
            Shader::Conv2d | Shader::Conv2dF16 => file!("conv2d"),
            Shader::Dropout => file!("dropout"),
            Shader::Elementwise | Shader::ElementwiseF16 => file!("elementwise"),
            Shader::Loss => file!("loss"),
            Shader::Matmul | Shader::MatmulF16 => file!("matmul"),
            Shader::Metrics | Shader::MetricsF16 => file!("metrics"),
            Shader::Reduce => file!("reduce"),
            Shader::Resize | Shader::ResizeF16 => file!("resize"),
            Shader::Sgd => file!("sgd"),
            Shader::Softmax | Shader::SoftmaxF16 => file!("softmax"),
        }
    }

    /// The flags its file is composed with (`#if F16`).
    pub fn flags(self) -> &'static [&'static str] {
        if HALF_TWINS.iter().any(|&(_, half)| half == self) {
            &["F16"]
        } else {
            &[]
        }
    }

    /// Whether its pipelines need the adapter's `SHADER_F16`.
    pub fn needs_f16(self) -> bool {
        self.flags().contains(&"F16")
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
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
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
        if shader.needs_f16() && !device.features().contains(wgpu::Features::SHADER_F16) {
            return Err(Error::Invalid(format!(
                "{} stores f16 and needs SHADER_F16, which the device lacks",
                shader.name()
            )));
        }
        let source = shader.source()?;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader.name()),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
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
