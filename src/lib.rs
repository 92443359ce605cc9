//! HRNet-OCR semantic segmentation on hand-written WGSL compute shaders.
//!
//! Layers, each using only those before it (checked by `tests/layers.rs`): [`gpu`] (device,
//! pipelines, buffers, dispatches, profiler), [`tensor`], [`kernels`] (one launcher module
//! per shader file, and the variant tuning), [`graph`] (the executor that records whole
//! forward and backward passes) and [`model`]; [`infer`], [`train`] and [`eval`] use them.

#[cfg(feature = "bench")]
pub mod bench;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod formats;
pub mod fs;
pub mod gpu;
pub mod graph;
pub mod half;
pub mod images;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions};
pub use tensor::Tensor;
