//! Which variant of a kernel family runs: measured on the adapter at hand once per shape
//! class, remembered on disk per adapter and driver, and consulted when a graph is
//! recorded.
//!
//! Every family with variants implements [`Tunable`]: the convolution forward
//! ([`ConvForward`]: register tiles of 4 or 16 pixels, which a CPU driver such as lavapipe
//! runs best, or an implicit GEMM through workgroup memory at two slice depths, which GPUs
//! reward), its input and weight gradients ([`ConvInputGrad`], [`ConvWeightGrad`]: narrow
//! or wide register tiles, or GEMMs through workgroup memory), the matrix product
//! ([`MatmulKernel`]: register tiles or workgroup-memory tiles) and the chunk sums of
//! batch norm, softmax and the losses ([`super::sums::Sums`]: an invocation or a workgroup
//! tree per chunk). Each says how to time a variant on a proxy of its class and what to
//! take untimed.
//!
//! A [`Tuner`] holds the choices; it lives beside the device, not in it. Measuring is a
//! step of its own ([`Tuner::tune`], driven by `GraphBuilder::tune` and `hrnet-ocr tune`);
//! recording a graph never measures ([`choose`]): it takes the tuner's choice for the class,
//! or the untimed default, so a single segmentation compiles no variant it does not run.

use super::conv2d::Precision;
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu, Shader, INCLUDES};
use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where a [`Tuner`]'s choices live.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TuningCache {
    /// `$XDG_CACHE_HOME/hrnet-ocr/tuning.tsv` (or `~/.cache/...`).
    #[default]
    Default,
    /// This file (`HRNET_OCR_TUNING=<path>`).
    File(PathBuf),
    /// Measured, kept for this process only (`HRNET_OCR_TUNING=memory`).
    Memory,
    /// Not measured: each kind of adapter's default variant (`HRNET_OCR_TUNING=off`).
    Off,
}

impl TuningCache {
    /// `off`, `memory`, or a file path (`HRNET_OCR_TUNING`); unset or empty is the default file.
    pub fn from_env() -> Self {
        match std::env::var_os("HRNET_OCR_TUNING") {
            None => TuningCache::Default,
            Some(v) if v.is_empty() => TuningCache::Default,
            Some(v) if v == "off" => TuningCache::Off,
            Some(v) if v == "memory" => TuningCache::Memory,
            Some(v) => TuningCache::File(v.into()),
        }
    }

    /// The cache file: the one given, `$XDG_CACHE_HOME/hrnet-ocr/tuning.tsv`, or
    /// `~/.cache/hrnet-ocr/tuning.tsv`; none when choices stay in memory.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
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
}

/// A kernel family whose variants are chosen per shape class by measurement.
pub trait Tunable: Copy + Eq + Debug + Send + 'static {
    /// The family's name in the cache file and in `hrnet-ocr info`.
    const FAMILY: &'static str;
    /// What the choice may depend on (sizes rounded to classes).
    type Class: Copy + Debug + Send + 'static;
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
    /// Rows of K a workgroup-memory variant stages at once (its `SLICE` override); none
    /// for the others.
    fn slice(self) -> Option<u32> {
        None
    }
    /// Whether the device can run it: the workgroup-memory variants need 64 invocations a
    /// workgroup.
    fn runs_on(self, gpu: &Gpu) -> bool {
        self.slice().is_none() || gpu.workgroup_size() >= 64
    }
    /// The class's key in the cache file, e.g. `48x48 3x3/1x1 p1x1 d1x1 F32 64x64`.
    fn key(class: &Self::Class) -> String;
    /// Multiply-adds of the class's proxy: below [`MIN_TUNED_MACS`] timing cannot tell the
    /// variants apart.
    fn macs(class: &Self::Class) -> usize;
    /// What recording takes where nothing was measured: cheap to compile, sound everywhere.
    fn untimed(gpu: &Gpu, class: &Self::Class) -> Self;
    /// What tuning keeps, unmeasured, for a class too small to time: the kind of adapter's
    /// best at run time, whatever it costs to compile.
    fn untimed_best(gpu: &Gpu, class: &Self::Class) -> Self {
        Self::untimed(gpu, class)
    }
    /// Milliseconds one run of this variant takes on a proxy of the class.
    fn time(self, gpu: &Gpu, class: &Self::Class) -> Result<f64>;
    /// Variants of one tier (the workgroup-memory tiles) are not timed again once one of
    /// them ran 3x behind the best so far: that saves a third of a CPU driver's tuning.
    fn tier(self) -> Option<&'static str> {
        self.slice().map(|_| "workgroup-memory tiles")
    }
}

/// Classes below this many multiply-adds are not timed: their time is the dispatch's
/// overhead whatever the variant.
pub const MIN_TUNED_MACS: usize = 1 << 20;

/// A timing proxy's largest output side: 64 x 64 pixels, enough workgroups of every variant
/// to fill a CPU driver's threads (at 32 x 32 the wide tiles were one workgroup per channel
/// group and timed slower than they run on real maps).
pub const PROXY_SIDE: usize = 64;

/// What measuring a noted class runs, once the recording that noted it is over.
type Pending = Box<dyn FnOnce(&Gpu, &Tuner) -> Result<()> + Send>;

/// The variant choices of one adapter: loaded from the cache file when made, extended by
/// [`Tuner::tune`], consulted by recording through [`choose`]. Share one (in an `Arc`)
/// between the graphs of a process; opening it reads the file, recording never does I/O.
pub struct Tuner {
    cache: TuningCache,
    /// The adapter, driver and kernel sources the choices hold for.
    identity: String,
    table: Mutex<HashMap<String, String>>,
    /// While a probe recording runs ([`Tuner::collect`]): the classes it asked for that
    /// have no choice yet.
    noted: Mutex<Option<Vec<(String, Pending)>>>,
}

impl Tuner {
    /// A tuner for `gpu` keeping its choices in `cache` (read now, once).
    pub fn new(gpu: &Gpu, cache: TuningCache) -> Self {
        let identity = identity(gpu);
        let table = if cache == TuningCache::Off { HashMap::new() } else { load(&cache, &identity) };
        Tuner { cache, identity, table: Mutex::new(table), noted: Mutex::new(None) }
    }

    /// A tuner for `gpu` keeping its choices where `HRNET_OCR_TUNING` says.
    pub fn from_env(gpu: &Gpu) -> Self {
        Tuner::new(gpu, TuningCache::from_env())
    }

    pub fn cache(&self) -> &TuningCache {
        &self.cache
    }

    /// Every choice known, as (family and class key, variant), sorted.
    pub fn choices(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = lock(&self.table).iter().map(|(k, c)| (k.clone(), c.clone())).collect();
        v.sort();
        v
    }

    /// The choice known for `class`, if the device can run it (a cache file is shared by
    /// every device opened on one adapter, and one opened with smaller workgroups cannot run
    /// the tiled GEMM).
    fn known<V: Tunable>(&self, gpu: &Gpu, key: &str) -> Option<V> {
        let table = lock(&self.table);
        let name = table.get(key)?;
        V::ALL.iter().copied().find(|v| v.name() == name).filter(|v| v.runs_on(gpu))
    }

    /// Measures `class` with [`Tunable::time`] unless a choice is known; see [`Tuner::measure`].
    pub fn tune<V: Tunable>(&self, gpu: &Gpu, class: &V::Class) -> Result<V> {
        self.measure(gpu, class, |v: V| v.time(gpu, class))
    }

    /// Times the variants for `class` with `time_variant` (milliseconds of one run) unless a
    /// choice is known, and keeps the fastest in memory and in the cache file; returns the
    /// choice. A class too small to time gets [`Tunable::untimed_best`], kept the same way;
    /// tuning off, the untimed default.
    pub fn measure<V: Tunable>(
        &self,
        gpu: &Gpu,
        class: &V::Class,
        time_variant: impl Fn(V) -> Result<f64>,
    ) -> Result<V> {
        if self.cache == TuningCache::Off {
            return Ok(V::untimed(gpu, class));
        }
        let key = format!("{} {}", V::FAMILY, V::key(class));
        if let Some(choice) = self.known(gpu, &key) {
            return Ok(choice);
        }
        let candidates: Vec<V> = V::ALL.iter().copied().filter(|v| v.runs_on(gpu)).collect();
        let mut best = (f64::INFINITY, V::untimed_best(gpu, class));
        if candidates.len() >= 2 && V::macs(class) >= MIN_TUNED_MACS {
            let mut lost_badly: Vec<&str> = Vec::new();
            for variant in candidates {
                if variant.tier().is_some_and(|t| lost_badly.contains(&t)) {
                    continue;
                }
                let ms = time_variant(variant)?;
                if ms > 3.0 * best.0 {
                    lost_badly.extend(variant.tier());
                }
                if ms < best.0 {
                    best = (ms, variant);
                }
            }
        }
        lock(&self.table).insert(key.clone(), best.1.name().to_string());
        if let Some(path) = self.cache.path() {
            // A cache that cannot be written costs a re-measure next time, nothing more.
            if let Err(e) = save(&path, &self.identity, &key, best.1.name()) {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| log::warn!("tuning cache not saved (choices kept for this run): {e}"));
            }
        }
        Ok(best.1)
    }

    /// Runs `record` (a probe recording of what is to be tuned) noting every class it asks
    /// [`choose`] for that has no choice yet, then measures each noted class once.
    pub fn collect(&self, gpu: &Gpu, record: impl FnOnce() -> Result<()>) -> Result<()> {
        *lock(&self.noted) = Some(Vec::new());
        let recorded = record();
        let noted = lock(&self.noted).take().unwrap_or_default();
        recorded?;
        for (_, measure) in noted {
            measure(gpu, self)?;
        }
        Ok(())
    }

    fn note<V: Tunable>(&self, key: String, class: V::Class) {
        if let Some(noted) = lock(&self.noted).as_mut() {
            if !noted.iter().any(|(k, _)| *k == key) {
                noted.push((key, Box::new(move |gpu, tuner| tuner.tune::<V>(gpu, &class).map(|_| ()))));
            }
        }
    }
}

/// The variant recording takes for `class`: the tuner's choice, or the untimed default
/// (without a tuner, tuning off, or a class not measured, which a collecting tuner notes).
/// Never measures.
pub fn choose<V: Tunable>(tuner: Option<&Tuner>, gpu: &Gpu, class: &V::Class) -> V {
    let Some(tuner) = tuner.filter(|t| t.cache != TuningCache::Off) else {
        return V::untimed(gpu, class);
    };
    let key = format!("{} {}", V::FAMILY, V::key(class));
    tuner.known(gpu, &key).unwrap_or_else(|| {
        tuner.note::<V>(key, *class);
        V::untimed(gpu, class)
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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

    /// The variant used where nothing was tuned: the implicit GEMM wherever the adapter
    /// allows its 64 invocations a workgroup. On a CPU driver too, though it runs slower
    /// there: LLVM compiles it in 0.35 s on lavapipe where the 16-pixel register tiles take
    /// 5.8 s and the 4-pixel ones 0.6 s per workgroup size, and a first run is mostly
    /// compiling (`hrnet-ocr tune` then measures what runs fastest).
    pub fn default_for(gpu: &Gpu) -> Self {
        if ConvForward::TiledK8.runs_on(gpu) {
            ConvForward::TiledK8
        } else {
            ConvForward::Registers
        }
    }
}

impl Tunable for ConvForward {
    const FAMILY: &'static str = "conv2d_forward";
    type Class = ConvClass;
    const ALL: &'static [Self] =
        &[ConvForward::Registers, ConvForward::RegistersWide, ConvForward::TiledK8, ConvForward::TiledK16];

    fn name(self) -> &'static str {
        match self {
            ConvForward::Registers => "registers",
            ConvForward::RegistersWide => "registers-wide",
            ConvForward::TiledK8 => "tiled-k8",
            ConvForward::TiledK16 => "tiled-k16",
        }
    }

    fn slice(self) -> Option<u32> {
        match self {
            ConvForward::Registers | ConvForward::RegistersWide => None,
            ConvForward::TiledK8 => Some(8),
            ConvForward::TiledK16 => Some(16),
        }
    }

    fn key(class: &ConvClass) -> String {
        class.key()
    }

    fn macs(class: &ConvClass) -> usize {
        class.macs()
    }

    fn untimed(gpu: &Gpu, _: &ConvClass) -> Self {
        ConvForward::default_for(gpu)
    }

    /// On a CPU driver the 16-pixel tiles, which beat the others down to 8 x 16 maps there.
    fn untimed_best(gpu: &Gpu, _: &ConvClass) -> Self {
        if gpu.info().device_type == wgpu::DeviceType::Cpu {
            ConvForward::RegistersWide
        } else {
            ConvForward::default_for(gpu)
        }
    }

    fn time(self, gpu: &Gpu, class: &ConvClass) -> Result<f64> {
        super::conv2d::time_forward(gpu, class, self)
    }
}

/// How the input gradient is computed: register tiles of 16 input channels by 4 (narrow)
/// or 16 (wide) columns of one row, or a GEMM through workgroup memory (32 input channels
/// x 32 input pixels per workgroup of 64, K = (tap, output channel) in slices of 8 or 16:
/// the shader's `SLICE` override).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvInputGrad {
    Narrow,
    Wide,
    TiledK8,
    TiledK16,
}

/// How the weight gradient is computed: register tiles of 16 output by 4 or 16 input
/// channels, or a GEMM through workgroup memory (32 output channels x 32 (input channel,
/// tap) columns per workgroup of 64, the output pixels in slices of 8 or 16: the shader's
/// `SLICE` override).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvWeightGrad {
    Narrow,
    Wide,
    TiledK8,
    TiledK16,
}

/// Input-gradient rows at least this wide take the wide tiles untimed, narrower ones the
/// narrow: the wide would idle most of their columns.
pub const WIDE_INPUT_GRAD_MIN_COLUMNS: usize = 16;
/// Weight gradients of at least this many input channels take the wide tiles untimed.
pub const WIDE_WEIGHT_GRAD_MIN_CI: usize = 16;

impl Tunable for ConvInputGrad {
    const FAMILY: &'static str = "conv2d_backward_input";
    type Class = ConvClass;
    const ALL: &'static [Self] =
        &[ConvInputGrad::Narrow, ConvInputGrad::Wide, ConvInputGrad::TiledK8, ConvInputGrad::TiledK16];

    fn name(self) -> &'static str {
        match self {
            ConvInputGrad::Narrow => "narrow",
            ConvInputGrad::Wide => "wide",
            ConvInputGrad::TiledK8 => "tiled-k8",
            ConvInputGrad::TiledK16 => "tiled-k16",
        }
    }

    /// (Tap, output channel) rows a workgroup-memory variant stages at once.
    fn slice(self) -> Option<u32> {
        match self {
            ConvInputGrad::Narrow | ConvInputGrad::Wide => None,
            ConvInputGrad::TiledK8 => Some(8),
            ConvInputGrad::TiledK16 => Some(16),
        }
    }

    fn key(class: &ConvClass) -> String {
        class.key()
    }

    fn macs(class: &ConvClass) -> usize {
        class.macs()
    }

    fn untimed(_: &Gpu, class: &ConvClass) -> Self {
        if class.input_size()[1] >= WIDE_INPUT_GRAD_MIN_COLUMNS {
            ConvInputGrad::Wide
        } else {
            ConvInputGrad::Narrow
        }
    }

    fn time(self, gpu: &Gpu, class: &ConvClass) -> Result<f64> {
        super::conv2d::time_backward_input(gpu, class, self)
    }
}

impl Tunable for ConvWeightGrad {
    const FAMILY: &'static str = "conv2d_backward_weight";
    type Class = ConvClass;
    const ALL: &'static [Self] =
        &[ConvWeightGrad::Narrow, ConvWeightGrad::Wide, ConvWeightGrad::TiledK8, ConvWeightGrad::TiledK16];

    fn name(self) -> &'static str {
        match self {
            ConvWeightGrad::Narrow => "narrow",
            ConvWeightGrad::Wide => "wide",
            ConvWeightGrad::TiledK8 => "tiled-k8",
            ConvWeightGrad::TiledK16 => "tiled-k16",
        }
    }

    /// Output pixels a workgroup-memory variant stages at once.
    fn slice(self) -> Option<u32> {
        match self {
            ConvWeightGrad::Narrow | ConvWeightGrad::Wide => None,
            ConvWeightGrad::TiledK8 => Some(8),
            ConvWeightGrad::TiledK16 => Some(16),
        }
    }

    fn key(class: &ConvClass) -> String {
        class.key()
    }

    fn macs(class: &ConvClass) -> usize {
        class.macs()
    }

    fn untimed(_: &Gpu, class: &ConvClass) -> Self {
        if class.ci >= WIDE_WEIGHT_GRAD_MIN_CI {
            ConvWeightGrad::Wide
        } else {
            ConvWeightGrad::Narrow
        }
    }

    fn time(self, gpu: &Gpu, class: &ConvClass) -> Result<f64> {
        super::conv2d::time_backward_weight(gpu, class, self)
    }
}

/// A convolution's shape class: what the variant choice may depend on. The output size
/// is rounded up to powers of two and capped at [`PROXY_SIDE`]: the proxy never times more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvClass {
    pub ci: usize,
    pub co: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub precision: Precision,
    /// Output height and width (one image), rounded and capped.
    pub out: [usize; 2],
}

impl ConvClass {
    /// The class of a convolution of `ci` to `co` channels by a `kernel` with `spec`'s
    /// stride, padding and dilation, with outputs of `out` pixels.
    pub fn new(
        ci: usize,
        co: usize,
        kernel: [usize; 2],
        spec: &super::conv2d::Conv2dSpec,
        precision: Precision,
        out: [usize; 2],
    ) -> Self {
        ConvClass {
            ci,
            co,
            kernel,
            stride: spec.stride,
            padding: spec.padding,
            dilation: spec.dilation,
            precision,
            out: out.map(|s| s.next_power_of_two().min(PROXY_SIDE)),
        }
    }

    /// E.g. `48x48 3x3/1x1 p1x1 d1x1 F32 64x64`.
    fn key(&self) -> String {
        let pair = |a: [usize; 2]| format!("{}x{}", a[0], a[1]);
        format!(
            "{}x{} {}/{} p{} d{} {:?} {}",
            self.ci,
            self.co,
            pair(self.kernel),
            pair(self.stride),
            pair(self.padding),
            pair(self.dilation),
            self.precision,
            pair(self.out)
        )
    }

    fn macs(&self) -> usize {
        self.ci * self.co * self.kernel[0] * self.kernel[1] * self.out[0] * self.out[1]
    }

    /// The proxy's input height and width: the smallest giving the class's output.
    pub fn input_size(&self) -> [usize; 2] {
        [0, 1].map(|a| {
            let span = self.dilation[a] * (self.kernel[a] - 1) + 1;
            ((self.out[a] - 1) * self.stride[a] + span).saturating_sub(2 * self.padding[a]).max(1)
        })
    }
}

/// Milliseconds one run of `dispatches` takes, cheaply, for choosing between variants:
/// after a warm-up run (a driver may compile on first use), their summed device time where
/// the adapter has timestamps, else the wall-clock time of a second run.
pub fn time_dispatches(gpu: &Gpu, dispatches: &[Dispatch]) -> Result<f64> {
    gpu.run(dispatches)?;
    if gpu.has_timestamps() {
        let refs: Vec<&Dispatch> = dispatches.iter().collect();
        let total: f64 = gpu.profile(&refs)?.iter().map(|t| t.nanoseconds).sum();
        return Ok(total / 1e6);
    }
    let start = std::time::Instant::now();
    gpu.run(dispatches)?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// Choices are only valid for the adapter, backend, driver and kernels that made them: a
/// driver update or any change to the tuned kernels' shaders re-measures.
fn identity(gpu: &Gpu) -> String {
    let i = gpu.info();
    // FNV-1a over the tuned families' files as written (every flag's code, the f16 and
    // subgroup twins' too) and the pieces they include: a fingerprint of the kernels.
    let files = [Shader::Conv2d, Shader::Matmul, Shader::BatchNorm, Shader::Softmax, Shader::Loss];
    let kernels = files
        .iter()
        .map(|s| s.file().1)
        .chain(INCLUDES.iter().map(|&(_, text)| text))
        .flat_map(str::bytes)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{}|{:?}|{}|{}|{kernels:016x}", i.name, i.backend, i.driver, i.driver_info)
        .replace(['\t', '\n'], " ")
}

/// This adapter's lines of the cache file (`identity TAB family class TAB variant`). A
/// missing or unreadable file is an empty cache; a line of another adapter is skipped (a
/// variant this version does not know is never taken: see [`Tuner::known`]).
fn load(cache: &TuningCache, id: &str) -> HashMap<String, String> {
    let Some(text) = cache.path().and_then(|p| std::fs::read_to_string(p).ok()) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (who, key, choice) = (fields.next()?, fields.next()?, fields.next()?);
            (who == id).then(|| (key.to_string(), choice.to_string()))
        })
        .collect()
}

/// Adds (or replaces) one choice in the cache file, written atomically
/// ([`crate::fs::write_atomic`]), so a reader never sees half a file.
fn save(path: &Path, id: &str, key: &str, choice: &str) -> Result<()> {
    let io = |source| Error::Io { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let prefix = format!("{id}\t{key}\t");
    let mut text: String = old.lines().filter(|l| !l.starts_with(&prefix)).flat_map(|l| [l, "\n"]).collect();
    text.push_str(&format!("{prefix}{choice}\n"));
    crate::fs::write_atomic(path, text.as_bytes())
}
