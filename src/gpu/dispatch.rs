//! A recorded dispatch: pipeline, bind group and grid, built once and encoded as often as
//! needed. Kernel launchers return these; the executor strings them into command buffers.

use super::{Gpu, PooledBuffer, Shader, ShaderParams};
use crate::error::{Error, Result};
use std::num::NonZeroU64;
use std::sync::Arc;
use wgpu::util::DeviceExt;

/// The element type of a bound buffer; the contract checks the one the shader declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    U32,
    /// Half precision: the activations of f16 inference and the packed weights it reads.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }
}

/// A range of a pooled buffer bound at a binding index of a kernel's bind group (group 0;
/// binding 0 is always the kernel's uniform `Params`); tensors make these
/// (`tensor::Binding`).
#[derive(Clone, Copy)]
pub struct BufferBinding<'a> {
    pub index: u32,
    pub buffer: &'a Arc<PooledBuffer>,
    /// Byte offset and size of the range.
    pub offset: u64,
    pub size: u64,
    /// Whether the kernel writes it (a `read_write` storage binding).
    pub writes: bool,
    /// The element type the shader declares there.
    pub dtype: DType,
}

/// A dispatch grid. WebGPU caps each dimension (65535 by default), so a long 1-D range of
/// workgroups is folded into x and y; shaders rebuild the linear index from
/// `num_workgroups` (`linear_index` in `shaders/include/common.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workgroups(pub [u32; 3]);

impl Workgroups {
    /// Enough workgroups of `workgroup_size` invocations to cover `invocations`.
    pub fn cover(gpu: &Gpu, invocations: usize, workgroup_size: u32) -> Result<Self> {
        let groups = invocations.div_ceil(workgroup_size as usize).max(1) as u64;
        let max = u64::from(gpu.limits().max_compute_workgroups_per_dimension);
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        if y > max {
            return Err(Error::Invalid(format!(
                "{invocations} invocations need {groups} workgroups, more than {max} x {max}"
            )));
        }
        Ok(Workgroups([x as u32, y as u32, 1]))
    }
}

/// Work counted for throughput figures: FLOPs as 2 x multiply-adds, bytes as the minimum
/// traffic (each input read once, each output written once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub flops: u64,
    pub bytes: u64,
}

/// A kernel launch ready to encode. A clone shares the pipeline, bindings and `Params`
/// buffer (handles are reference counted), so it runs the same launch.
#[derive(Clone)]
pub struct Dispatch {
    label: &'static str,
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    /// The uniform `Params`, rewritable between submissions (a step's learning rate or seed).
    params: wgpu::Buffer,
    workgroups: Workgroups,
    cost: Cost,
    /// The bound tensors, kept alive so the pool cannot hand their buffers out again while
    /// this dispatch may still run.
    _bound: Vec<Arc<PooledBuffer>>,
}

/// What a kernel launcher asks for.
pub(crate) struct DispatchSpec<'a, P: ShaderParams> {
    pub shader: Shader,
    pub entry: &'static str,
    pub constants: &'a [(&'static str, f64)],
    pub params: &'a P,
    pub bindings: &'a [BufferBinding<'a>],
    pub workgroups: Workgroups,
    pub cost: Cost,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dispatch({}, {:?})", self.label, self.workgroups.0)
    }
}

impl Dispatch {
    /// Builds the launch after checking it against the shader's declarations (see
    /// [`super::contract`]).
    pub(crate) fn new<P: ShaderParams>(gpu: &Gpu, spec: DispatchSpec<'_, P>) -> Result<Self> {
        gpu.shader_interface(spec.shader)?.check::<P>(spec.shader.name(), spec.entry, spec.bindings)?;
        let allowed = gpu.limits().max_storage_buffers_per_shader_stage as usize;
        if spec.bindings.len() > allowed {
            return Err(Error::Invalid(format!(
                "{}.wgsl:{} binds {} storage buffers; adapter {} allows {allowed} per shader stage",
                spec.shader.name(),
                spec.entry,
                spec.bindings.len(),
                gpu.describe()
            )));
        }
        let pipeline = gpu.pipeline(spec.shader, spec.entry, spec.constants)?;
        let params = gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(spec.entry),
            contents: bytemuck::bytes_of(spec.params),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() }];
        entries.extend(spec.bindings.iter().map(|b| wgpu::BindGroupEntry {
            binding: b.index,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: b.buffer.buffer(),
                offset: b.offset,
                size: NonZeroU64::new(b.size),
            }),
        }));
        let (bind_group, error) = super::scoped(&gpu.device, wgpu::ErrorFilter::Validation, || {
            gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(spec.entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
        });
        if let Some(e) = error {
            return Err(Error::Device(format!("binding {}.wgsl:{}: {e}", spec.shader.name(), spec.entry)));
        }
        Ok(Dispatch {
            label: spec.entry,
            pipeline,
            bind_group,
            params,
            workgroups: spec.workgroups,
            cost: spec.cost,
            _bound: spec.bindings.iter().map(|b| Arc::clone(b.buffer)).collect(),
        })
    }

    /// Replaces the uniform parameters for the next submission. Only launchers that document
    /// it offer this (the layout must be the kernel's own `Params`).
    pub(crate) fn write_params<P: bytemuck::Pod>(&self, gpu: &Gpu, params: &P) {
        gpu.queue.write_buffer(&self.params, 0, bytemuck::bytes_of(params));
    }

    /// The entry point's name, e.g. `conv2d_forward`.
    pub fn label(&self) -> &'static str {
        self.label
    }

    /// FLOPs and bytes this dispatch does, for throughput figures.
    pub fn cost(&self) -> Cost {
        self.cost
    }

    pub fn workgroups(&self) -> Workgroups {
        self.workgroups
    }

    /// Records this dispatch into a compute pass.
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups.0;
        pass.dispatch_workgroups(x, y, z);
    }
}

/// The summed cost of several dispatches.
pub fn total_cost<'a>(dispatches: impl IntoIterator<Item = &'a Dispatch>) -> Cost {
    dispatches.into_iter().fold(Cost::default(), |acc, d| Cost {
        flops: acc.flops + d.cost.flops,
        bytes: acc.bytes + d.cost.bytes,
    })
}
