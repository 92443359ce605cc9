//! The GPU runtime: instance, adapter, device and queue; the shader registry and pipeline
//! cache; the buffer pool; recorded dispatches and the timestamp profiler.

mod compose;
mod contract;
mod dispatch;
mod pool;
mod profiler;
mod readback;
mod registry;
mod wait;

pub use compose::compose;
pub(crate) use contract::shader_params;
pub use contract::ShaderParams;
pub(crate) use dispatch::DispatchSpec;
pub use dispatch::{total_cost, BufferBinding, Cost, DType, Dispatch, Workgroups};
pub use pool::PooledBuffer;
pub use profiler::KernelTiming;
pub(crate) use readback::{read_buffer, read_buffers, read_buffers_async, Staged};
pub use registry::{Shader, INCLUDES};
pub(crate) use wait::{block_on, scoped};

use crate::error::{Error, Result};
use pool::BufferPool;
use registry::PipelineCache;
use std::sync::{Arc, Mutex};

/// Features the engine uses when the adapter has them; none is required.
const OPTIONAL_FEATURES: wgpu::Features =
    wgpu::Features::TIMESTAMP_QUERY.union(wgpu::Features::SHADER_F16).union(wgpu::Features::SUBGROUP);

/// Which adapter to open. [`GpuOptions::from_env`] reads wgpu's standard variables.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Backends to search (`WGPU_BACKEND`, e.g. `vulkan`, `metal`, `dx12`, `gl`); all when unset.
    pub backends: Option<wgpu::Backends>,
    /// Case-insensitive substring of the adapter's name (`WGPU_ADAPTER_NAME`).
    pub adapter_name: Option<String>,
    /// The adapter at this place in order of preference (see [`device_list`]): one device
    /// of several identical GPUs, for a data-parallel rank. Overrides `adapter_name`.
    pub adapter_index: Option<usize>,
    /// Caps the storage-buffer binding size below the adapter's (to leave memory to other
    /// work, or to exercise the limit handling on a device with a large limit).
    pub max_storage_binding: Option<u64>,
    /// Caps the buffer size below the adapter's (the largest tensor; to exercise the
    /// windowed fallback of images whose tensors exceed it).
    pub max_buffer: Option<u64>,
    /// Caps the invocations per workgroup below the adapter's (to exercise the fallback
    /// to smaller workgroups on a device that allows the default).
    pub max_workgroup_size: Option<u32>,
}

impl GpuOptions {
    /// Options from `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`.
    pub fn from_env() -> Self {
        GpuOptions {
            backends: wgpu::Backends::from_env(),
            adapter_name: std::env::var("WGPU_ADAPTER_NAME").ok().filter(|s| !s.is_empty()),
            adapter_index: None,
            max_storage_binding: None,
            max_buffer: None,
            max_workgroup_size: None,
        }
    }
}

/// An open device with everything kernels need to record work on it.
pub struct Gpu {
    adapter: wgpu::Adapter,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    pipelines: PipelineCache,
    pool: Arc<BufferPool>,
    /// The first error the device reported outside an error scope, kept instead of panicking.
    device_error: Arc<Mutex<Option<String>>>,
    /// Why the device was lost, once it is: every later call fails with it.
    lost: Arc<Mutex<Option<String>>>,
    /// Invocations per workgroup of every kernel (the shaders' `WG`).
    workgroup_size: u32,
    /// Command buffers submitted so far.
    submissions: std::sync::atomic::AtomicU64,
    /// Copies of device data to the host so far (each waits for the device).
    readbacks: std::sync::atomic::AtomicU64,
}

impl Gpu {
    /// Opens the adapter chosen by `WGPU_BACKEND` / `WGPU_ADAPTER_NAME`, or the best one found.
    pub fn new() -> Result<Self> {
        Self::with_options(&GpuOptions::from_env())
    }

    /// Opens an adapter: the first whose name contains `adapter_name` if given, else the
    /// most capable (discrete GPU, integrated, virtual, CPU; native backends before GL).
    /// Without `backends`, GL is probed only when no Vulkan, Metal or DX12 adapter exists:
    /// probing it through EGL is slow and makes some drivers print errors.
    pub fn with_options(options: &GpuOptions) -> Result<Self> {
        block_on(Self::open(options), "Gpu::open")
    }

    /// [`Gpu::with_options`] as a future, the form a browser needs: there the adapter is
    /// the page's WebGPU one (`navigator.gpu`).
    pub async fn open(options: &GpuOptions) -> Result<Self> {
        let (backends, adapters) = match options.backends {
            Some(backends) => (backends, adapters_on(backends).await),
            None => match adapters_on(wgpu::Backends::PRIMARY).await {
                native if native.is_empty() => {
                    (wgpu::Backends::all(), adapters_on(wgpu::Backends::SECONDARY).await)
                }
                native => (wgpu::Backends::PRIMARY, native),
            },
        };
        let adapter = match options.adapter_index {
            Some(i) => {
                let mut ranked = ranked(adapters);
                let names: Vec<String> = ranked.iter().map(|a| a.get_info().name).collect();
                if i >= ranked.len() {
                    return Err(Error::AdapterNotFound { wanted: format!("device {i}"), available: names });
                }
                ranked.swap_remove(i)
            }
            None => choose_adapter(adapters, backends, options.adapter_name.as_deref())?,
        };
        let info = adapter.get_info();
        let features = adapter.features() & OPTIONAL_FEATURES;
        let mut limits = adapter.limits();
        if let Some(cap) = options.max_storage_binding {
            limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
        }
        if let Some(cap) = options.max_buffer {
            limits.max_buffer_size = limits.max_buffer_size.min(cap);
        }
        if let Some(cap) = options.max_workgroup_size {
            limits.max_compute_invocations_per_workgroup =
                limits.max_compute_invocations_per_workgroup.min(cap);
            limits.max_compute_workgroup_size_x = limits.max_compute_workgroup_size_x.min(cap);
        }
        let workgroup_size = workgroup_size_for(&limits);
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("hrnet-ocr"),
                required_features: features,
                // The adapter's own limits: HRNet's tensors outgrow the WebGPU defaults.
                required_limits: limits,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::RequestDevice(format!("{} ({:?}): {e}", info.name, info.backend)))?;

        let lost = Arc::new(Mutex::new(None));
        let lost_sink = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            let mut slot = lost_sink.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(format!("{reason:?}: {message}"));
        });
        let device_error = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&device_error);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| e.to_string());
        }));

        Ok(Gpu {
            pipelines: PipelineCache::default(),
            pool: Arc::new(BufferPool::default()),
            adapter,
            device,
            queue,
            info,
            device_error,
            lost,
            workgroup_size,
            submissions: Default::default(),
            readbacks: Default::default(),
        })
    }

    /// How many command buffers this device has been given so far (a training step or a
    /// forward pass is one, a readback another).
    pub fn submissions(&self) -> u64 {
        self.submissions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many times data came back to the host, each a wait for the device (a training
    /// step's loss terms come back in one).
    pub fn readbacks(&self) -> u64 {
        self.readbacks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a submitted command buffer, a readback when `readback`.
    pub(crate) fn count_submission(&self, readback: bool) {
        self.submissions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if readback {
            self.readbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Invocations per workgroup of every kernel: [`DEFAULT_WORKGROUP_SIZE`], or the largest
    /// power of two the adapter allows when that is less.
    pub fn workgroup_size(&self) -> u32 {
        self.workgroup_size
    }

    /// The chosen adapter's name, backend, device type and driver.
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// A one-line description such as `llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)`.
    pub fn describe(&self) -> String {
        // A browser's WebGPU often leaves the description empty (only vendor and
        // architecture, which wgpu does not pass on, are always there).
        let name = if self.info.name.is_empty() { "unnamed adapter" } else { &self.info.name };
        format!("{name} ({:?}, {:?})", self.info.backend, self.info.device_type)
    }

    /// The limits the device was opened with (the adapter's own).
    pub fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    /// The optional features the device was opened with.
    pub fn features(&self) -> wgpu::Features {
        self.device.features()
    }

    /// Whether the device can run the subgroup shader variants (`SUBGROUP`).
    pub fn supports_subgroups(&self) -> bool {
        self.device.features().contains(wgpu::Features::SUBGROUP)
    }

    /// Whether the device can run the f16 shader variants (`SHADER_F16`).
    pub fn supports_f16(&self) -> bool {
        self.device.features().contains(wgpu::Features::SHADER_F16)
    }

    /// Everything the adapter supports, whether or not the engine asked for it.
    pub fn adapter_features(&self) -> wgpu::Features {
        self.adapter.features()
    }

    /// The raw device, for callers that record their own work beside the engine's.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The raw queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Records `dispatches` into one command buffer (one compute pass) and submits it.
    /// Does not wait; see [`Gpu::wait`].
    pub fn submit<'a>(&self, dispatches: impl IntoIterator<Item = &'a Dispatch>) -> Result<()> {
        self.submit_after_clearing(&[], dispatches)
    }

    /// [`Gpu::submit`], with the `clears` (buffer, offset, bytes) zeroed at the start of the
    /// same command buffer.
    pub(crate) fn submit_after_clearing<'a>(
        &self,
        clears: &[(&wgpu::Buffer, u64, u64)],
        dispatches: impl IntoIterator<Item = &'a Dispatch>,
    ) -> Result<()> {
        self.submit_staged(clears, dispatches, &[]).map(drop)
    }

    /// Submits `dispatches` (after zeroing the `clears`) and then copies the `reads`
    /// (buffer, offset, bytes) to a staging buffer, in one command buffer; does not wait.
    /// The copies are read with [`Staged::read`], which waits for this submission alone,
    /// so later work may be submitted first and run meanwhile.
    pub(crate) fn submit_staged<'a>(
        &self,
        clears: &[(&wgpu::Buffer, u64, u64)],
        dispatches: impl IntoIterator<Item = &'a Dispatch>,
        reads: &[(&wgpu::Buffer, u64, u64)],
    ) -> Result<Staged> {
        self.check_lost()?;
        let mut encoder = self.device.create_command_encoder(&Default::default());
        for &(buffer, offset, bytes) in clears {
            encoder.clear_buffer(buffer, offset, Some(bytes));
        }
        let mut labels: (Option<&str>, Option<&str>, usize) = (None, None, 0);
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for d in dispatches {
                d.encode(&mut pass);
                labels = (labels.0.or(Some(d.label())), Some(d.label()), labels.2 + 1);
            }
        }
        let staging = readback::stage(self, &mut encoder, reads);
        let index = self.queue.submit([encoder.finish()]);
        self.count_submission(!reads.is_empty());
        // An error raised by this submission names the kernels it held.
        self.check_device_error().map_err(|e| match (e, labels) {
            (Error::Device(msg), (Some(first), Some(last), n)) => {
                Error::Device(format!("{msg} (in a submission of {n} dispatches, {first} .. {last})"))
            }
            (e, _) => e,
        })?;
        Ok(Staged { staging, index })
    }

    /// Submits `dispatches` and waits until the device has finished them.
    pub fn run<'a>(&self, dispatches: impl IntoIterator<Item = &'a Dispatch>) -> Result<()> {
        self.submit(dispatches)?;
        self.wait()
    }

    /// Blocks until all submitted work has finished. A browser cannot block: there this
    /// returns at once, and the next readback (which WebGPU orders after the work) awaits it.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for the device: {e}")))?;
        self.check_device_error()
    }

    /// Fails, saying why, once the device is lost (a driver reset, a removed GPU, or
    /// `device().destroy()`): a lost device does no more work, so open a new `Gpu`.
    pub fn check_lost(&self) -> Result<()> {
        match self.lost.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(why) => Err(Error::Device(format!(
                "the device {} was lost ({why}); open a new Gpu to go on",
                self.describe()
            ))),
            None => Ok(()),
        }
    }

    /// Returns (and clears) an error the device reported asynchronously; a lost device
    /// is reported as lost whatever error its last work raised.
    pub fn check_device_error(&self) -> Result<()> {
        self.check_lost()?;
        let mut slot = self.device_error.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(msg) => Err(Error::Device(msg)),
            None => Ok(()),
        }
    }

    pub(crate) fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// A shader's declared interface, for checking launches against it.
    pub(crate) fn shader_interface(&self, shader: Shader) -> Result<Arc<contract::Interface>> {
        self.pipelines.interface(shader)
    }

    pub(crate) fn pipeline(
        &self,
        shader: Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipelines.get(&self.device, shader, entry, constants)
    }

    /// Bytes held by the buffer pool for reuse (not counting buffers in use).
    pub fn pooled_bytes(&self) -> u64 {
        self.pool.idle_bytes()
    }

    /// Bytes of the storage buffers tensors hold now (each rounded up to its pool size
    /// class), and the most they held at once since [`Gpu::reset_peak_memory`]: the device
    /// memory a graph really allocates, against what it planned.
    pub fn tensor_memory(&self) -> (u64, u64) {
        self.pool.lent()
    }

    /// Starts a new high-water mark of [`Gpu::tensor_memory`].
    pub fn reset_peak_memory(&self) {
        self.pool.reset_peak()
    }
}

/// Every adapter on the given backends (in a browser, the page's WebGPU adapter, if any).
async fn adapters_on(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    instance.enumerate_adapters(backends).await
}

/// Every adapter on the given backends.
#[cfg(not(target_arch = "wasm32"))]
pub fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    pollster::block_on(adapters_on(backends))
}

/// Adapter information for `hrnet-ocr info`: every adapter on the given backends.
#[cfg(not(target_arch = "wasm32"))]
pub fn list_adapters(backends: wgpu::Backends) -> Vec<wgpu::AdapterInfo> {
    enumerate(backends).iter().map(|a| a.get_info()).collect()
}

fn no_adapter_hint() -> &'static str {
    if cfg!(target_arch = "wasm32") {
        "This browser offers no WebGPU adapter: use a browser with WebGPU enabled (Chrome or \
         Edge 113+, Safari 26+, Firefox 141+ on Windows), over https or localhost."
    } else if cfg!(target_os = "linux") {
        "Install a Vulkan driver: on Debian/Ubuntu `apt-get install mesa-vulkan-drivers` gives \
         Mesa's software driver lavapipe, which needs no GPU; with a GPU install its vendor driver."
    } else if cfg!(target_os = "macos") {
        "Metal should always be present on macOS; check WGPU_BACKEND."
    } else {
        "Install your GPU's driver (Vulkan or DX12), or check WGPU_BACKEND."
    }
}

/// The adapters of `adapters` most capable first (discrete GPU, integrated, virtual, CPU;
/// native backends before GL), ties in the order found.
fn ranked(mut adapters: Vec<wgpu::Adapter>) -> Vec<wgpu::Adapter> {
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        (device_type_rank(i.device_type), backend_rank(i.backend))
    });
    adapters
}

/// The devices `GpuOptions::adapter_index` counts, in its order: the adapters the default
/// choice picks among (Vulkan, Metal or DX12; GL only where none of those exists), most
/// capable first, so device 0 is the default adapter.
#[cfg(not(target_arch = "wasm32"))]
pub fn device_list() -> Vec<wgpu::AdapterInfo> {
    let native = enumerate(wgpu::Backends::PRIMARY);
    let adapters = if native.is_empty() { enumerate(wgpu::Backends::SECONDARY) } else { native };
    ranked(adapters).iter().map(wgpu::Adapter::get_info).collect()
}

fn choose_adapter(
    adapters: Vec<wgpu::Adapter>,
    backends: wgpu::Backends,
    wanted: Option<&str>,
) -> Result<wgpu::Adapter> {
    let none_found = || Error::NoAdapter { backends: format!("{backends:?}"), hint: no_adapter_hint() };
    if adapters.is_empty() {
        return Err(none_found());
    }
    if let Some(wanted) = wanted {
        let needle = wanted.to_lowercase();
        let names: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?})", i.name, i.backend)
            })
            .collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&needle))
            .ok_or(Error::AdapterNotFound { wanted: wanted.to_string(), available: names });
    }
    adapters
        .into_iter()
        .min_by_key(|a| {
            let i = a.get_info();
            (device_type_rank(i.device_type), backend_rank(i.backend))
        })
        .ok_or_else(none_found)
}

fn device_type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    }
}

/// The workgroup size the kernels are designed for: 64 invocations, a multiple of every
/// GPU's SIMD width and of lavapipe's 8 lanes.
pub const DEFAULT_WORKGROUP_SIZE: u32 = 64;

/// [`DEFAULT_WORKGROUP_SIZE`], halved until the adapter's limits allow it.
fn workgroup_size_for(limits: &wgpu::Limits) -> u32 {
    let allowed =
        limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x).max(1);
    let mut size = DEFAULT_WORKGROUP_SIZE;
    while size > allowed {
        size /= 2;
    }
    size
}
