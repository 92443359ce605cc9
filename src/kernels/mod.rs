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
pub(crate) mod slabs;
pub mod softmax;
pub mod sums;
pub mod tuning;

use crate::error::{Error, Result};
use crate::gpu::{BufferBinding, Cost, Dispatch, DispatchSpec, Gpu, Shader, ShaderParams, Workgroups};
use crate::tensor::{Binding, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

/// The override constants a pipeline is built with on an adapter whose workgroup size
/// ([`Gpu::workgroup_size`]) is `workgroup_size` (the shader translation test applies the
/// same).
pub fn pipeline_constants(workgroup_size: u32) -> [(&'static str, f64); 1] {
    [("WG", f64::from(workgroup_size))]
}

/// Enough parallel invocations to fill a large GPU; reductions are split until they reach it.
const TARGET_INVOCATIONS: usize = 8192;
/// A chunk of a split reduction sums at least this many terms, so the extra pass stays cheap.
const MIN_CHUNK_TERMS: usize = 1024;

/// Records a dispatch of `invocations` invocations of `shader.wgsl:entry`.
pub(crate) fn launch<P: ShaderParams>(
    gpu: &Gpu,
    shader: Shader,
    entry: &'static str,
    params: &P,
    bindings: &[Binding<'_>],
    invocations: usize,
    cost: Cost,
) -> Result<Dispatch> {
    launch_sized(gpu, (shader, entry), gpu.workgroup_size(), params, bindings, invocations, cost)
}

/// [`launch`] with workgroups of `workgroup_size` invocations (at most the adapter's
/// [`Gpu::workgroup_size`]), for kernels that size their workgroups to the problem.
pub(crate) fn launch_sized<P: ShaderParams>(
    gpu: &Gpu,
    entry: (Shader, &'static str),
    workgroup_size: u32,
    params: &P,
    bindings: &[Binding<'_>],
    invocations: usize,
    cost: Cost,
) -> Result<Dispatch> {
    launch_tuned(gpu, entry, workgroup_size, &[], params, bindings, invocations, cost)
}

/// [`launch_sized`] with more override constants (a kernel variant's tile sizes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_tuned<P: ShaderParams>(
    gpu: &Gpu,
    (shader, entry): (Shader, &'static str),
    workgroup_size: u32,
    tile_constants: &[(&'static str, f64)],
    params: &P,
    bindings: &[Binding<'_>],
    invocations: usize,
    cost: Cost,
) -> Result<Dispatch> {
    check_bindings(gpu, entry, bindings)?;
    let workgroup_size = workgroup_size.min(gpu.workgroup_size());
    let mut constants = pipeline_constants(workgroup_size).to_vec();
    constants.extend_from_slice(tile_constants);
    let bindings: Vec<BufferBinding> = bindings.iter().map(|b| b.to_buffer()).collect();
    Dispatch::new(
        gpu,
        DispatchSpec {
            shader,
            entry,
            constants: &constants,
            params,
            bindings: &bindings,
            workgroups: Workgroups::cover(gpu, invocations, workgroup_size)?,
            cost,
        },
    )
}

/// Element types must match what the shader declares. One buffer may be bound twice only
/// as two writable, disjoint views (parameter gradients in one arena): a read-only and a
/// writable binding of one buffer is a wgpu usage conflict, and overlapping writable views
/// are a data race. Both are refused, naming the bindings. A tensor larger than a binding
/// is refused too: its launcher must bind slabs of it (see [`slabs`]).
fn check_bindings(gpu: &Gpu, entry: &str, bindings: &[Binding<'_>]) -> Result<()> {
    let limit = gpu.limits().max_storage_buffer_binding_size;
    for (i, a) in bindings.iter().enumerate() {
        a.tensor.check_dtype(&format!("{entry} binding {}", a.index), a.dtype)?;
        if a.tensor.bytes() > limit {
            return Err(Error::Limit {
                what: format!("{entry} binding {} ({:?})", a.index, a.tensor),
                bytes: a.tensor.bytes(),
                limit,
                limit_name: "max_storage_buffer_binding_size",
            });
        }
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

/// Invocations for a kernel that gives each of `planes` planes of `plane_len` values a run
/// of workgroups of 4 x WG values (batch norm's elementwise passes, the channel copy): the
/// plane, and so its channel, is then uniform across a workgroup.
pub(crate) fn plane_block_invocations(gpu: &Gpu, planes: usize, plane_len: usize) -> usize {
    let per_workgroup = gpu.workgroup_size() as usize;
    planes * plane_len.div_ceil(4 * per_workgroup) * per_workgroup
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

thread_local! {
    /// While a training graph records ([`sharing_scratch`]): each call site's scratch buffer.
    static SHARED_SCRATCH: RefCell<Option<HashMap<&'static str, Tensor>>> = const { RefCell::new(None) };
}

/// Runs `record` with the scratch buffers of its kernel calls shared between calls: every
/// request of one call site (`scratch`'s `site`) gets a view of one buffer, grown (at least
/// doubling) when a request outgrows it. Sound where the recorded calls run in order on
/// one queue and each uses its scratch only among its own dispatches: a training graph,
/// whose forward repacks every convolution's weights right before the convolution. (An eval
/// graph keeps its packed weights from pass to pass, so it does not share.)
pub(crate) fn sharing_scratch<T>(record: impl FnOnce() -> T) -> T {
    struct Sharing;
    impl Drop for Sharing {
        fn drop(&mut self) {
            SHARED_SCRATCH.with(|s| *s.borrow_mut() = None);
        }
    }
    SHARED_SCRATCH.with(|s| *s.borrow_mut() = Some(HashMap::new()));
    let _sharing = Sharing;
    record()
}

/// A scratch tensor for partial results, used only by the dispatches of one kernel call;
/// `site` names the call site (two scratches of one call need two sites). Owned by those
/// dispatches, or inside [`sharing_scratch`] a view of the site's shared buffer.
pub(crate) fn scratch(gpu: &Gpu, site: &'static str, elements: usize) -> Result<Tensor> {
    let shared = SHARED_SCRATCH.with(|s| -> Result<Option<Tensor>> {
        let mut sites = s.borrow_mut();
        let Some(sites) = sites.as_mut() else { return Ok(None) };
        let buffer = match sites.get(site) {
            Some(b) if b.numel() >= elements => b.clone(),
            held => {
                let binding = (gpu.limits().max_storage_buffer_binding_size / 4) as usize;
                let grown = held.map_or(0, |b| (2 * b.numel()).min(binding)).max(elements);
                let b = Tensor::empty(gpu, &[grown])?;
                sites.insert(site, b.clone());
                b
            }
        };
        buffer.view(gpu, 0, &[elements]).map(Some)
    })?;
    match shared {
        Some(t) => Ok(t),
        None => Tensor::empty(gpu, &[elements]),
    }
}

/// A tuned family's line: the variants the adapter can run (from the same table the
/// launchers dispatch on), the untimed rule, and what `tuner` chose so far.
fn tuned_family<V: tuning::Tunable>(
    gpu: &Gpu,
    tuner: Option<&tuning::Tuner>,
    what: &str,
    untimed: String,
) -> KernelVariant {
    let runnable: Vec<&str> = V::ALL.iter().filter(|v| v.runs_on(gpu)).map(|v| v.name()).collect();
    let why = match tuner.filter(|t| *t.cache() != tuning::TuningCache::Off) {
        None => format!("tuning off; untimed: {untimed}"),
        Some(t) => {
            let chosen = t.choices();
            let prefix = format!("{} ", V::FAMILY);
            let counts: Vec<String> = runnable
                .iter()
                .map(|name| {
                    let n = chosen.iter().filter(|(k, c)| k.starts_with(&prefix) && c == name).count();
                    format!("{n} {name}")
                })
                .collect();
            format!(
                "timed per shape class ({} so far); untimed: {untimed}; cache {}",
                counts.join(", "),
                t.cache().path().map_or("in memory only".into(), |p| p.display().to_string())
            )
        }
    };
    KernelVariant { kernel: V::FAMILY, variant: format!("{} ({what})", runnable.join(" / ")), why }
}

/// Which implementation of a kernel family runs on an adapter, and why.
#[derive(Clone, Debug)]
pub struct KernelVariant {
    pub kernel: &'static str,
    pub variant: String,
    pub why: String,
}

/// The variant of every kernel family on `gpu`: the tuned families' choices as `tuner`
/// holds them, the others decided from the device type, limits and features when it was
/// opened (`hrnet-ocr info` prints this).
pub fn variants(gpu: &Gpu, tuner: Option<&tuning::Tuner>) -> Vec<KernelVariant> {
    use tuning::{ConvForward, ConvInputGrad, ConvWeightGrad, Tunable};
    let limits = gpu.limits();
    let features = gpu.adapter_features();
    let wg = gpu.workgroup_size();
    let allowed = limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x);
    let v = |kernel, variant: &str, why: String| KernelVariant { kernel, variant: variant.into(), why };
    let has = |f: wgpu::Features| if features.contains(f) { "has" } else { "lacks" };
    let forward_untimed = if ConvForward::TiledK8.runs_on(gpu) {
        format!("{}, cheapest to compile", ConvForward::default_for(gpu).name())
    } else {
        format!("registers: the adapter allows {wg} invocations a workgroup, tiled needs 64")
    };
    vec![
        v(
            "every kernel",
            &format!("{wg} invocations per workgroup"),
            if wg == crate::gpu::DEFAULT_WORKGROUP_SIZE {
                format!("the design size; the adapter allows {allowed}")
            } else {
                format!("fallback: the adapter allows only {allowed}")
            },
        ),
        tuned_family::<ConvForward>(
            gpu,
            tuner,
            "16 output channels x 4 or 16 pixels in registers; or an implicit GEMM through workgroup memory, 32 x 32 outputs per workgroup of 64, K in slices of 8 or 16",
            forward_untimed,
        ),
        tuned_family::<ConvInputGrad>(
            gpu,
            tuner,
            "16 input channels x 4 or 16 columns in registers; or a GEMM through workgroup memory, 32 input channels x 32 pixels per workgroup of 64, gathering what each tap sent",
            format!("wide for rows of {} columns and more", tuning::WIDE_INPUT_GRAD_MIN_COLUMNS),
        ),
        tuned_family::<ConvWeightGrad>(
            gpu,
            tuner,
            "16 output x 4 or 16 input channels in registers; or a GEMM through workgroup memory, 32 output channels x 32 (input channel, tap) per workgroup of 64; rows split into chunks summed in order",
            format!("wide for {} input channels and more", tuning::WIDE_WEIGHT_GRAD_MIN_CI),
        ),
        tuned_family::<matmul::MatmulKernel>(
            gpu,
            tuner,
            "a 16 x 16 tile per invocation, a workgroup sharing its rows, one element per invocation, or 32 x 32 per workgroup of 64 through workgroup memory; operands read through strides",
            format!("per element below {} multiply-adds", matmul::SMALL_PRODUCT_MACS),
        ),
        tuned_family::<sums::Sums<batch_norm::BnClass>>(
            gpu,
            tuner,
            "training statistics and backward sums per chunk of samples: an invocation summing in order, or a workgroup of 64 meeting in a fixed tree; chunks added in order",
            "chunked".into(),
        ),
        tuned_family::<sums::Sums<softmax::SoftmaxClass>>(
            gpu,
            tuner,
            "long rows' (max, sum of exp) and backward dots per chunk of a row: an invocation summing in order, or a workgroup of 64 meeting in a fixed tree; chunks merged in order",
            "chunked".into(),
        ),
        tuned_family::<sums::Sums<loss::LossClass>>(
            gpu,
            tuner,
            "cross entropy's sums per chunk of pixels: an invocation of 256 pixels, or a workgroup of 64 over 4096 meeting in a fixed tree; chunks added in order",
            "chunked".into(),
        ),
        v(
            "other reductions",
            "chunked two-pass sums, blocked and compensated",
            "WGSL has no float atomics; a fixed order keeps results bit-reproducible".into(),
        ),
        v(
            "conv2d_pack_weight",
            "folds eval batch norm while packing (8 storage buffers)",
            format!(
                "the adapter allows {} storage buffers per stage",
                limits.max_storage_buffers_per_shader_stage
            ),
        ),
        v(
            "profiler",
            if gpu.has_timestamps() { "GPU timestamps around each dispatch" } else { "wall clock only" },
            format!("the adapter {} TIMESTAMP_QUERY", has(wgpu::Features::TIMESTAMP_QUERY)),
        ),
        if gpu.supports_f16() {
            v(
                "precision",
                "f32; inference may store activations and conv weights at f16, sums f32 (--precision f16, the *_f16 shaders)",
                "the adapter has SHADER_F16".into(),
            )
        } else {
            v(
                "precision",
                "f32 everywhere (--precision f16 falls back to f32)",
                "the adapter lacks SHADER_F16".into(),
            )
        },
        v(
            "subgroups",
            if gpu.supports_subgroups() {
                "the reductions' subgroup summing (the tree finished in shuffles) is a tuned variant"
            } else {
                "not used: the subgroup summing runs the workgroup tree (the same bits)"
            },
            format!("the adapter {} SUBGROUP", has(wgpu::Features::SUBGROUP)),
        ),
    ]
}
