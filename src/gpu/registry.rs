//! The shader registry: every `shaders/*.wgsl` embedded in the binary, composed with the
//! shared pieces they include, and a cache that builds each (shader, entry point,
//! override constants) pipeline once.

use super::contract::Interface;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Every module the engine builds pipelines from: a kernel file of `shaders/`, composed
/// (see [`super::compose`]) with the flags its variant sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shader {
    BatchNorm,
    Concat,
    Conv2d,
    /// `conv2d.wgsl` with `F16`: the forward's packed weights at half precision.
    Conv2dF16,
    Dropout,
    Elementwise,
    Loss,
    Matmul,
    Metrics,
    Reduce,
    Resize,
    Sgd,
    Softmax,
}

impl Shader {
    pub const ALL: [Shader; 13] = [
        Shader::BatchNorm,
        Shader::Concat,
        Shader::Conv2d,
        Shader::Conv2dF16,
        Shader::Dropout,
        Shader::Elementwise,
        Shader::Loss,
        Shader::Matmul,
        Shader::Metrics,
        Shader::Reduce,
        Shader::Resize,
        Shader::Sgd,
        Shader::Softmax,
    ];

    /// The module's name in errors, labels and the tuning cache, e.g. `conv2d_f16`.
    pub fn name(self) -> &'static str {
        match self {
            Shader::Conv2dF16 => "conv2d_f16",
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
            Shader::Concat => file!("concat"),
            Shader::Conv2d | Shader::Conv2dF16 => file!("conv2d"),
            Shader::Dropout => file!("dropout"),
            Shader::Elementwise => file!("elementwise"),
            Shader::Loss => file!("loss"),
            Shader::Matmul => file!("matmul"),
            Shader::Metrics => file!("metrics"),
            Shader::Reduce => file!("reduce"),
            Shader::Resize => file!("resize"),
            Shader::Sgd => file!("sgd"),
            Shader::Softmax => file!("softmax"),
        }
    }

    /// The flags its file is composed with (`#if F16`).
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Shader::Conv2dF16 => &["F16"],
            _ => &[],
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
