//! Kernel launchers: one module per shader file. Each checks shapes, sizes the grid and
//! returns recorded [`Dispatch`]es; `*_forward` and `*_backward_*` sit side by side.

pub mod batch_norm;
pub mod concat;
pub mod conv2d;
pub mod dropout;
pub mod elementwise;
pub mod loss;
pub mod matmul;
pub mod metrics;
pub mod ocr;
pub mod reduce;
pub mod resize;
pub mod sgd;
pub mod softmax;

use crate::error::{Error, Result};
use crate::gpu::{Binding, Cost, Dispatch, DispatchSpec, Gpu, Workgroups};
use crate::tensor::Tensor;

/// Invocations per workgroup for every kernel (the `WG` override constant).
pub const WORKGROUP_SIZE: u32 = 64;

/// The override constants every pipeline is built with (the shader translation test
/// applies the same).
pub const PIPELINE_CONSTANTS: [(&str, f64); 1] = [("WG", WORKGROUP_SIZE as f64)];

/// Enough parallel invocations to fill a large GPU; reductions are split until they reach it.
const TARGET_INVOCATIONS: usize = 8192;
/// A chunk of a split reduction sums at least this many terms, so the extra pass stays cheap.
const MIN_CHUNK_TERMS: usize = 1024;

/// Records a dispatch of `invocations` invocations of `shader.wgsl:entry`.
pub(crate) fn launch<P: bytemuck::Pod>(
    gpu: &Gpu,
    shader: &'static str,
    entry: &'static str,
    params: &P,
    bindings: &[Binding<'_>],
    invocations: usize,
    cost: Cost,
) -> Result<Dispatch> {
    check_bindings(entry, bindings)?;
    Dispatch::new(
        gpu,
        DispatchSpec {
            shader,
            entry,
            constants: &PIPELINE_CONSTANTS,
            params,
            bindings,
            workgroups: Workgroups::cover(gpu, invocations, WORKGROUP_SIZE)?,
            cost,
        },
    )
}

/// Element types must match what the shader declares. One buffer may be bound twice only
/// as two writable, disjoint views (parameter gradients in one arena): a read-only and a
/// writable binding of one buffer is a wgpu usage conflict, and overlapping writable views
/// are a data race. Both are refused, naming the bindings.
fn check_bindings(entry: &str, bindings: &[Binding<'_>]) -> Result<()> {
    for (i, a) in bindings.iter().enumerate() {
        a.tensor.check_dtype(&format!("{entry} binding {}", a.index), a.dtype)?;
        for b in &bindings[i + 1..] {
            if !(a.writes || b.writes) || !a.tensor.same_buffer(b.tensor) {
                continue;
            }
            if !(a.writes && b.writes) || a.tensor.overlaps(b.tensor) {
                return Err(Error::Invalid(format!(
                    "{entry}: bindings {} and {} are the same tensor; a kernel cannot read and \
                     write one buffer in place",
                    a.index, b.index
                )));
            }
        }
    }
    Ok(())
}

/// How many chunks to split a reduction of `terms` terms into, for each of `outputs`
/// independent results, so that `outputs * chunks` keeps the device busy.
pub(crate) fn reduction_chunks(outputs: usize, terms: usize) -> usize {
    let wanted = TARGET_INVOCATIONS.div_ceil(outputs.max(1));
    wanted.min(terms.div_ceil(MIN_CHUNK_TERMS)).max(1)
}

/// Converts a size to the u32 the shaders index with, or names it in an error.
pub(crate) fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Invalid(format!("{what} = {v} exceeds the 32-bit index range")))
}

/// Bytes of f32 data in `elements` elements.
pub(crate) fn f32_bytes(elements: usize) -> u64 {
    elements as u64 * 4
}

/// A scratch tensor for partial results, owned by the dispatches that use it.
pub(crate) fn scratch(gpu: &Gpu, elements: usize) -> Result<Tensor> {
    Tensor::empty(gpu, &[elements])
}
