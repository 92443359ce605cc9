//! The shader registry: every `shaders/*.wgsl` embedded in the binary, composed with the
//! shared pieces they include, and a cache that builds each (shader, entry point,
//! override constants) pipeline once.

use super::contract::Interface;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Every shader file, by the name kernels use for it.
pub const SHADERS: &[(&str, &str)] = &[
    ("batch_norm", include_str!("../../shaders/batch_norm.wgsl")),
    ("concat", include_str!("../../shaders/concat.wgsl")),
    ("conv2d", include_str!("../../shaders/conv2d.wgsl")),
    ("dropout", include_str!("../../shaders/dropout.wgsl")),
    ("elementwise", include_str!("../../shaders/elementwise.wgsl")),
    ("loss", include_str!("../../shaders/loss.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("metrics", include_str!("../../shaders/metrics.wgsl")),
    ("reduce", include_str!("../../shaders/reduce.wgsl")),
    ("resize", include_str!("../../shaders/resize.wgsl")),
    ("sgd", include_str!("../../shaders/sgd.wgsl")),
    ("softmax", include_str!("../../shaders/softmax.wgsl")),
];

/// The pieces kernel files share, by the name a line `#include "NAME"` gives
/// (`shaders/include/`): written once, composed into every file that includes them.
pub const INCLUDES: &[(&str, &str)] = &[("common.wgsl", include_str!("../../shaders/include/common.wgsl"))];

/// `source` with each `#include "NAME"` line replaced by that piece; `None` when a piece
/// is not in [`INCLUDES`].
fn compose(source: &str) -> Option<String> {
    let mut out = String::with_capacity(source.len() + 1024);
    for line in source.lines() {
        match line.trim().strip_prefix("#include ") {
            Some(name) => out.push_str(INCLUDES.iter().find(|(n, _)| name.trim_matches('"') == *n)?.1),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Some(out)
}

/// A shader built from another file's source with f16 enabled and one alias retyped:
/// (name, base shader, the alias line as written, the line in the f16 build). Pipelines
/// from these need the adapter's `SHADER_F16`.
pub const F16_VARIANTS: &[(&str, &str, &str, &str)] =
    &[("conv2d_f16", "conv2d", "alias PackedWeights = vec4<f32>;", "alias PackedWeights = vec4<f16>;")];

/// The composed WGSL source of a registered shader or f16 variant.
pub fn shader_source(name: &str) -> Option<String> {
    if let Some((_, src)) = SHADERS.iter().find(|(n, _)| *n == name) {
        return compose(src);
    }
    let &(_, base, line, f16_line) = F16_VARIANTS.iter().find(|v| v.0 == name)?;
    let src = compose(SHADERS.iter().find(|(n, _)| *n == base)?.1)?;
    // An alias line that went missing must fail loudly, not build an f32 "variant".
    src.contains(line).then(|| format!("enable f16;\n{}", src.replace(line, f16_line)))
}

/// Every shader the engine builds pipelines from: the files, then the f16 variants.
pub fn shader_names() -> impl Iterator<Item = &'static str> {
    SHADERS.iter().map(|s| s.0).chain(F16_VARIANTS.iter().map(|v| v.0))
}

/// Override constants are part of a pipeline's identity; f64 bits make them hashable.
type PipelineKey = (&'static str, &'static str, Vec<(&'static str, u64)>);

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    interfaces: Mutex<HashMap<&'static str, Arc<Interface>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl PipelineCache {
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        shader: &'static str,
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
            return Err(Error::Device(format!("building pipeline {shader}.wgsl:{entry}: {e}")));
        }
        let pipeline = Arc::new(pipeline);
        lock(&self.pipelines).insert(key, Arc::clone(&pipeline));
        Ok(pipeline)
    }

    /// What the shader declares (its `Params` and storage bindings), read once.
    pub(crate) fn interface(&self, shader: &'static str) -> Result<Arc<Interface>> {
        if let Some(i) = lock(&self.interfaces).get(shader) {
            return Ok(Arc::clone(i));
        }
        let source = shader_source(shader)
            .ok_or_else(|| Error::Invalid(format!("no shader named {shader:?} is registered")))?;
        let interface = Arc::new(Interface::reflect(shader, &source)?);
        lock(&self.interfaces).insert(shader, Arc::clone(&interface));
        Ok(interface)
    }

    fn module(&self, device: &wgpu::Device, shader: &'static str) -> Result<Arc<wgpu::ShaderModule>> {
        if let Some(m) = lock(&self.modules).get(shader) {
            return Ok(Arc::clone(m));
        }
        let source = shader_source(shader)
            .ok_or_else(|| Error::Invalid(format!("no shader named {shader:?} is registered")))?;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Device(format!("compiling shaders/{shader}.wgsl: {e}")));
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
