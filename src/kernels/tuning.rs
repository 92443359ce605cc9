//! Which variant of a kernel runs, measured on the adapter at hand once per shape class and
//! remembered on disk per adapter and driver.
//!
//! The convolution forward has three kernels (`conv2d.wgsl`): register tiles of 4 or of 16
//! pixels without workgroup memory, which a CPU driver such as lavapipe runs best, and an
//! implicit GEMM through workgroup memory, which GPUs reward, at two slice depths (an
//! override constant). Measuring is a step of its own ([`measure_conv_forward`], driven by
//! `GraphBuilder::tune` and `hrnet-ocr tune`): it times each variant on a proxy of at most
//! 64 x 64 output pixels and keeps the fastest for the shape class (channels, kernel,
//! stride, weight precision, pixel count to a power of two), in this process and, through
//! the cache file, in later ones. Recording a graph never measures ([`conv_forward`]): it
//! takes the cached choice, or the adapter's untimed default, so a single segmentation
//! compiles no variant it does not run.

use super::conv2d::Precision;
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu, TuningCache};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How the convolution forward is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvForward {
    /// 16 output channels x 4 pixels in each invocation's registers, no workgroup memory.
    Registers,
    /// 16 output channels x 16 pixels in registers: four times the work per load.
    RegistersWide,
    /// An implicit GEMM staged through workgroup memory, 32 x 32 outputs per workgroup, K
    /// in slices of 8 rows (the shader's `SLICE` override).
    TiledK8,
    /// The same with slices of 16: half the barriers, twice the workgroup memory.
    TiledK16,
}

impl ConvForward {
    pub const ALL: [ConvForward; 4] =
        [ConvForward::Registers, ConvForward::RegistersWide, ConvForward::TiledK8, ConvForward::TiledK16];

    pub fn name(self) -> &'static str {
        match self {
            ConvForward::Registers => "registers",
            ConvForward::RegistersWide => "registers-wide",
            ConvForward::TiledK8 => "tiled-k8",
            ConvForward::TiledK16 => "tiled-k16",
        }
    }

    /// The shader entry point that computes it, with the residual epilogue or without.
    pub fn entry(self, residual: bool) -> &'static str {
        match (self, residual) {
            (ConvForward::Registers, false) => "conv2d_forward",
            (ConvForward::Registers, true) => "conv2d_forward_residual",
            (ConvForward::RegistersWide, false) => "conv2d_forward_wide",
            (ConvForward::RegistersWide, true) => "conv2d_forward_wide_residual",
            (ConvForward::TiledK8 | ConvForward::TiledK16, false) => "conv2d_forward_tiled",
            (ConvForward::TiledK8 | ConvForward::TiledK16, true) => "conv2d_forward_tiled_residual",
        }
    }

    /// Rows of K a tiled variant stages at once; none for the register tiles.
    pub fn slice(self) -> Option<u32> {
        match self {
            ConvForward::Registers | ConvForward::RegistersWide => None,
            ConvForward::TiledK8 => Some(8),
            ConvForward::TiledK16 => Some(16),
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Whether the adapter can run it: the tiled variants need 64 invocations a workgroup.
    pub fn runs_on(self, gpu: &Gpu) -> bool {
        self.slice().is_none() || gpu.workgroup_size() >= 64
    }

    /// The variant used where nothing was tuned (no cached choice, or tuning off): the
    /// implicit GEMM wherever the adapter allows its 64 invocations a workgroup. On a CPU
    /// driver too, though it runs slower there: LLVM compiles it in 0.35 s on lavapipe where
    /// the 16-pixel register tiles take 5.8 s and the 4-pixel ones 0.6 s per workgroup size,
    /// and a first run is mostly compiling (`hrnet-ocr tune` then measures what runs fastest).
    pub fn default_for(gpu: &Gpu) -> Self {
        if ConvForward::TiledK8.runs_on(gpu) {
            ConvForward::TiledK8
        } else {
            ConvForward::Registers
        }
    }

    /// What tuning takes, untimed, for a convolution too small for timing to tell the
    /// variants apart: the one that runs best on this kind of adapter whatever it costs to
    /// compile (on lavapipe the 16-pixel tiles beat the others down to 8 x 16 maps).
    pub fn untimed_best(gpu: &Gpu) -> Self {
        if gpu.info().device_type == wgpu::DeviceType::Cpu {
            ConvForward::RegistersWide
        } else {
            ConvForward::default_for(gpu)
        }
    }
}

/// A convolution's shape class: what the variant choice may depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvClass {
    pub ci: usize,
    pub co: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub precision: Precision,
    /// The output pixel count (all images) rounded up to a power of two, capped at 2^12: the
    /// proxy never times more.
    pub pixels: usize,
}

/// A timing proxy's largest output side: 64 x 64 pixels, enough workgroups of every variant
/// to fill a CPU driver's threads (at 32 x 32 the wide tiles were one workgroup per channel
/// group and timed slower than they run on real maps).
pub const PROXY_SIDE: usize = 64;
const PROXY_PIXELS: usize = PROXY_SIDE * PROXY_SIDE;
/// Convolutions below this many multiply-adds take the default variant untimed: their
/// time is the dispatch's overhead either way.
const MIN_TUNED_MACS: usize = 1 << 20;

impl ConvClass {
    pub fn new(
        ci: usize,
        co: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        precision: Precision,
        pixels: usize,
    ) -> Self {
        ConvClass { ci, co, kernel, stride, precision, pixels: pixels.next_power_of_two().min(PROXY_PIXELS) }
    }

    /// The key in the cache file, e.g. `conv2d_forward 48x48 3x3/1 f32 px1024`.
    fn key(&self) -> String {
        format!(
            "conv2d_forward {}x{} {}x{}/{}x{} {:?} px{}",
            self.ci,
            self.co,
            self.kernel[0],
            self.kernel[1],
            self.stride[0],
            self.stride[1],
            self.precision,
            self.pixels
        )
    }

    fn macs(&self) -> usize {
        self.ci * self.co * self.kernel[0] * self.kernel[1] * self.pixels
    }
}

/// Whether timing can choose for `class` on `gpu`: two variants to choose from, and enough
/// work for timing to tell them apart.
fn timeable(gpu: &Gpu, class: &ConvClass) -> bool {
    let choices = ConvForward::ALL.into_iter().filter(|v| v.runs_on(gpu)).count();
    class.macs() >= MIN_TUNED_MACS && choices >= 2
}

/// The variant for convolutions of `class`: the choice tuning made earlier (in this process
/// or a cached one), else the adapter's untimed default. Never measures.
pub fn conv_forward(gpu: &Gpu, class: &ConvClass) -> ConvForward {
    let default = ConvForward::default_for(gpu);
    if gpu.tuning_cache() == &TuningCache::Off {
        return default;
    }
    let mut table = gpu.tuned.lock().unwrap_or_else(|p| p.into_inner());
    let table = table.get_or_insert_with(|| load(gpu));
    cached(table, class, gpu).unwrap_or(default)
}

/// The choice kept for `class`, if it runs on `gpu`: a cache file is shared by every device
/// opened on one adapter, and one opened with smaller workgroups cannot run the tiled GEMM.
fn cached(table: &HashMap<String, String>, class: &ConvClass, gpu: &Gpu) -> Option<ConvForward> {
    table.get(&class.key()).and_then(|c| ConvForward::parse(c)).filter(|v| v.runs_on(gpu))
}

/// Measures the variants for `class` unless a choice is known, timing each with
/// `time_variant` (milliseconds of one run), and keeps the fastest in memory and in the
/// cache file; returns the choice. A class too small to time gets
/// [`ConvForward::untimed_best`], kept the same way; tuning off, the untimed default.
pub fn measure_conv_forward(
    gpu: &Gpu,
    class: &ConvClass,
    time_variant: impl Fn(ConvForward) -> Result<f64>,
) -> Result<ConvForward> {
    let default = ConvForward::default_for(gpu);
    if gpu.tuning_cache() == &TuningCache::Off {
        return Ok(default);
    }
    // None to time for a class too small to tell the variants apart: it keeps the untimed best.
    let candidates: Vec<ConvForward> = if timeable(gpu, class) {
        ConvForward::ALL.into_iter().filter(|v| v.runs_on(gpu)).collect()
    } else {
        Vec::new()
    };
    let key = class.key();
    let mut table = gpu.tuned.lock().unwrap_or_else(|p| p.into_inner());
    let table = table.get_or_insert_with(|| load(gpu));
    if let Some(choice) = cached(table, class, gpu) {
        return Ok(choice);
    }
    let mut best = (f64::INFINITY, ConvForward::untimed_best(gpu));
    let mut tiled_lost_badly = false;
    for variant in candidates {
        // Workgroup-memory tiling 3x behind (a CPU driver) is not worth timing at another
        // slice depth: that saves a third of the first run's tuning there.
        if tiled_lost_badly && variant.slice().is_some() {
            continue;
        }
        let ms = time_variant(variant)?;
        tiled_lost_badly |= variant.slice().is_some() && ms > 3.0 * best.0;
        if ms < best.0 {
            best = (ms, variant);
        }
    }
    table.insert(key.clone(), best.1.name().to_string());
    if let Some(path) = cache_path(gpu.tuning_cache()) {
        // A cache that cannot be written costs a re-measure next time, nothing more.
        if let Err(e) = save(&path, &identity(gpu), &key, best.1) {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| log::warn!("tuning cache not saved (choices kept for this run): {e}"));
        }
    }
    Ok(best.1)
}

/// Milliseconds one run of `dispatches` takes, cheaply, for choosing between variants:
/// after a warm-up run (a driver may compile on first use), the device time of the last
/// dispatch (the kernel, after any weight packing the variants share) where the adapter
/// has timestamps, else the wall-clock time of a second run.
pub fn time_dispatches(gpu: &Gpu, dispatches: &[Dispatch]) -> Result<f64> {
    gpu.run(dispatches)?;
    if gpu.has_timestamps() {
        let refs: Vec<&Dispatch> = dispatches.iter().collect();
        let kernel = gpu.profile(&refs)?.pop().map_or(0.0, |t| t.nanoseconds);
        return Ok(kernel / 1e6);
    }
    let start = std::time::Instant::now();
    gpu.run(dispatches)?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// This adapter's choices, cached or measured so far, as (class key, variant).
pub fn choices(gpu: &Gpu) -> Vec<(String, String)> {
    let mut table = gpu.tuned.lock().unwrap_or_else(|p| p.into_inner());
    let table = table.get_or_insert_with(|| load(gpu));
    let mut v: Vec<_> = table.iter().map(|(k, c)| (k.clone(), c.clone())).collect();
    v.sort();
    v
}

/// The cache file: the one given, `$XDG_CACHE_HOME/hrnet-ocr/tuning.tsv`, or
/// `~/.cache/hrnet-ocr/tuning.tsv`; none when tuning stays in memory.
pub fn cache_path(cache: &TuningCache) -> Option<PathBuf> {
    match cache {
        TuningCache::File(p) => Some(p.clone()),
        TuningCache::Default => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(base.join("hrnet-ocr").join("tuning.tsv"))
        }
        TuningCache::Memory | TuningCache::Off => None,
    }
}

/// Choices are only valid for the adapter, backend, driver and kernels that made them: a
/// driver update or any change to the convolution shader or its variants re-measures.
fn identity(gpu: &Gpu) -> String {
    let i = gpu.info();
    // FNV-1a over the shader source and the variant names: a fingerprint of the kernels.
    let source = crate::gpu::Shader::Conv2d.source().unwrap_or_default();
    let names = ConvForward::ALL.map(ConvForward::name).join(",");
    let kernels = source
        .bytes()
        .chain(names.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{}|{:?}|{}|{}|{kernels:016x}", i.name, i.backend, i.driver, i.driver_info)
        .replace(['\t', '\n'], " ")
}

/// This adapter's lines of the cache file (`identity TAB class TAB variant`). A missing or
/// unreadable file is an empty cache; a line of another adapter or a variant this version
/// does not know is skipped.
fn load(gpu: &Gpu) -> HashMap<String, String> {
    let Some(text) = cache_path(gpu.tuning_cache()).and_then(|p| std::fs::read_to_string(p).ok()) else {
        return HashMap::new();
    };
    let id = identity(gpu);
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (who, key, choice) = (fields.next()?, fields.next()?, fields.next()?);
            (who == id && ConvForward::parse(choice).is_some()).then(|| (key.to_string(), choice.to_string()))
        })
        .collect()
}

/// Adds (or replaces) one choice in the cache file, written atomically
/// ([`crate::fs::write_atomic`]), so a reader never sees half a file.
fn save(path: &Path, id: &str, key: &str, choice: ConvForward) -> Result<()> {
    let io = |source| Error::Io { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let prefix = format!("{id}\t{key}\t");
    let mut text: String = old.lines().filter(|l| !l.starts_with(&prefix)).flat_map(|l| [l, "\n"]).collect();
    text.push_str(&format!("{prefix}{}\n", choice.name()));
    crate::fs::write_atomic(path, text.as_bytes())
}
