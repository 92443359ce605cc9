//! The executor: a graph of kernel nodes recorded once. A whole forward pass is one command
//! buffer, a whole backward pass another; nothing is read back in between (but the loss,
//! when asked). The backward pass walks the nodes in reverse: a tensor read by several
//! nodes gets the sum of their gradients (the first writes, the rest accumulate), and
//! parameter gradients accumulate across backward passes until [`Graph::zero_grads`].
//!
//! Training starts the backward pass from the graph's loss nodes; a graph without one
//! starts from the output gradients the caller writes (see [`Graph::backward`]).

mod fuse;
mod ops;
mod plan;

use crate::dist::{Comm, DataParallel};
use crate::error::{check_shape, Error, Result};
use crate::gpu::{Dispatch, Gpu};
use crate::kernels::conv2d::{Conv2dSpec, Precision};
use crate::kernels::dropout::Dropout2d;
use crate::kernels::loss::Reduction;
use crate::kernels::sgd::{Arena, SgdConfig};
use crate::kernels::tuning::Tuner;
use crate::tensor::{DType, Tensor};
pub use ops::SoftmaxAxis;
use ops::{Backward, Op, Recorded, SyncPoint};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A tensor of the graph, by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ValueId(usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Fed by the caller each step.
    Input { requires_grad: bool },
    /// Trainable: has a gradient that accumulates.
    Param,
    /// Updated by the graph itself, never differentiated (batch-norm running statistics).
    State,
    /// Produced by a node.
    Activation,
    /// Computed inside a fused inference kernel and never stored.
    Fused,
}

impl Role {
    /// Inputs, parameters and running statistics: values the caller or the graph sets,
    /// rather than nodes computing them.
    fn is_set(self) -> bool {
        matches!(self, Role::Input { .. } | Role::Param | Role::State)
    }
}

#[derive(Clone)]
struct Value {
    name: String,
    shape: Vec<usize>,
    role: Role,
    dtype: DType,
}

impl Value {
    fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size()
    }
}

/// An eval graph at half precision stores its inputs and activations as f16: the caller's
/// f32 data is rounded to half as it is written and read back as f32.
fn store_activations_at(values: &mut [Value], precision: Precision) {
    let stored = |v: &Value| matches!(v.role, Role::Input { .. } | Role::Activation | Role::Fused);
    for v in values.iter_mut().filter(|v| stored(v) && v.dtype == DType::F32) {
        v.dtype = precision.activations();
    }
}

/// What a training graph's backward rebuilds instead of keeping it from the forward pass.
/// Every mode gives the same bits (a rebuild runs the forward's kernels on the same inputs);
/// they trade time for memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recompute {
    /// Keep every value the backward reads.
    Nothing,
    /// Rebuild each BN-ReLU output from the batch norm's input, which its own backward
    /// keeps, and its saved statistics: one elementwise pass over those values, and one
    /// kept tensor per convolution-BN-ReLU instead of two.
    #[default]
    BnRelu,
    /// Also rebuild each convolution output a batch norm reads, by running the convolution
    /// again from its input: the backbone keeps little more than its blocks' outputs, for
    /// about one more forward pass's convolutions.
    Convolutions,
}

/// Whether batch norm uses batch statistics (and a backward pass is recorded) or the
/// running statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// Describes a graph: its inputs, parameters and nodes, with shapes checked as they are added.
#[derive(Clone, Default)]
pub struct GraphBuilder {
    values: Vec<Value>,
    ops: Vec<Op>,
    /// (name substring, learning-rate multiplier) for the optimizer's parameter groups.
    lr_multipliers: Vec<(String, f32)>,
    /// Inputs whose data is known at build time, uploaded by `build`.
    constants: Vec<(ValueId, Vec<f32>)>,
    /// Eval graphs fuse conv-BN-(add)-(ReLU) chains unless this is set.
    unfused: bool,
    /// Training graphs: what the backward rebuilds instead of keeping it from the forward.
    recompute: Recompute,
    /// The precision of eval graphs: f16 stores activations and convolution weights at half.
    precision: Precision,
    /// Whose kernel-variant choices recording takes; none: the untimed defaults.
    tuner: Option<Arc<Tuner>>,
    /// Training graphs: this rank's place in data-parallel training.
    parallel: DataParallel,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    fn add_value(&mut self, name: String, shape: &[usize], role: Role) -> ValueId {
        self.values.push(Value { name, shape: shape.to_vec(), role, dtype: DType::F32 });
        ValueId(self.values.len() - 1)
    }

    fn activation(&mut self, name: &str, shape: &[usize]) -> ValueId {
        let name = format!("{name}#{}", self.ops.len());
        self.add_value(name, shape, Role::Activation)
    }

    /// The shape of a value.
    pub fn shape(&self, v: ValueId) -> &[usize] {
        &self.values[v.0].shape
    }

    fn dims4(&self, v: ValueId) -> Result<[usize; 4]> {
        let value = &self.values[v.0];
        <[usize; 4]>::try_from(value.shape.as_slice()).map_err(|_| Error::Shape {
            what: value.name.clone(),
            expected: "[N, C, H, W]".into(),
            actual: format!("{:?}", value.shape),
        })
    }

    /// A tensor the caller fills before each forward pass.
    pub fn input(&mut self, name: &str, shape: &[usize], requires_grad: bool) -> ValueId {
        self.add_value(name.to_string(), shape, Role::Input { requires_grad })
    }

    /// An f32 input `[data.len()]` that holds `data` from the start (class weights).
    pub fn constant(&mut self, name: &str, data: &[f32]) -> ValueId {
        let v = self.input(name, &[data.len()], false);
        self.constants.push((v, data.to_vec()));
        v
    }

    /// A u32 label map `[N, H, W]` the caller fills before each forward pass.
    pub fn labels(&mut self, name: &str, shape: &[usize]) -> ValueId {
        let v = self.add_value(name.to_string(), shape, Role::Input { requires_grad: false });
        self.values[v.0].dtype = DType::U32;
        v
    }

    /// Parameters whose name contains `keyword` train at `multiplier` times the learning
    /// rate (HRNet-OCR's `NONBACKBONE_KEYWORDS` / `NONBACKBONE_MULT`).
    pub fn lr_multiplier(&mut self, keyword: &str, multiplier: f32) {
        self.lr_multipliers.push((keyword.to_string(), multiplier));
    }

    /// A trainable tensor.
    pub fn param(&mut self, name: &str, shape: &[usize]) -> ValueId {
        self.add_value(name.to_string(), shape, Role::Param)
    }

    /// `y = conv2d(x, weight) + bias`; the weight (and bias) are parameters named
    /// `{name}.weight` (and `{name}.bias`), shaped `[co, ci, kh, kw]`.
    pub fn conv2d(
        &mut self,
        name: &str,
        x: ValueId,
        kernel: [usize; 2],
        out_channels: usize,
        bias: bool,
        spec: Conv2dSpec,
    ) -> Result<ValueId> {
        let [n, ci, h, w] = self.dims4(x)?;
        let [ho, wo] = spec.output_size(h, w, kernel[0], kernel[1])?;
        let weight = self.param(&format!("{name}.weight"), &[out_channels, ci, kernel[0], kernel[1]]);
        let bias = bias.then(|| self.param(&format!("{name}.bias"), &[out_channels]));
        let y = self.activation(name, &[n, out_channels, ho, wo]);
        self.ops.push(Op::Conv2d { spec, x, weight, bias, y });
        Ok(y)
    }

    /// Batch norm with parameters `{name}.weight`, `{name}.bias` and running statistics
    /// `{name}.running_mean`, `{name}.running_var` (PyTorch's eps and momentum).
    pub fn batch_norm(&mut self, name: &str, x: ValueId) -> Result<ValueId> {
        let [_, c, _, _] = self.dims4(x)?;
        let gamma = self.param(&format!("{name}.weight"), &[c]);
        let beta = self.param(&format!("{name}.bias"), &[c]);
        let mean = self.add_value(format!("{name}.running_mean"), &[c], Role::State);
        let var = self.add_value(format!("{name}.running_var"), &[c], Role::State);
        let shape = self.shape(x).to_vec();
        let y = self.activation(name, &shape);
        self.ops.push(Op::BatchNorm { x, gamma, beta, mean, var, y });
        Ok(y)
    }

    pub fn relu(&mut self, x: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        let y = self.activation("relu", &shape);
        self.ops.push(Op::Relu { x, y });
        y
    }

    pub fn add(&mut self, a: ValueId, b: ValueId) -> Result<ValueId> {
        let y = self.binary("add", a, b)?;
        self.ops.push(Op::Add { a, b, y });
        Ok(y)
    }

    /// `max(a + b, 0)` in one kernel (the residual sum of HRNet's blocks).
    pub fn add_relu(&mut self, a: ValueId, b: ValueId) -> Result<ValueId> {
        let y = self.binary("add_relu", a, b)?;
        self.ops.push(Op::AddRelu { a, b, y });
        Ok(y)
    }

    fn binary(&mut self, kind: &str, a: ValueId, b: ValueId) -> Result<ValueId> {
        check_shape(&format!("{kind}: second operand"), self.shape(a), self.shape(b))?;
        if a == b {
            return Err(Error::Invalid(format!("{kind}: both operands are {}", self.values[a.0].name)));
        }
        let shape = self.shape(a).to_vec();
        Ok(self.activation(kind, &shape))
    }

    /// The first channel of highest value at each pixel of `x` `[N, C, H, W]`, as a u32
    /// map `[N, H, W]` (the predicted classes of logits). Eval graphs only: it has no
    /// gradient.
    pub fn argmax(&mut self, x: ValueId) -> Result<ValueId> {
        let [n, _, h, w] = self.dims4(x)?;
        let y = self.activation("argmax", &[n, h, w]);
        self.values[y.0].dtype = DType::U32;
        self.ops.push(Op::Argmax { x, y });
        Ok(y)
    }

    /// Bilinear resize to `size` (height, width).
    pub fn resize(&mut self, x: ValueId, size: [usize; 2], align_corners: bool) -> Result<ValueId> {
        let [n, c, _, _] = self.dims4(x)?;
        let y = self.activation("resize", &[n, c, size[0], size[1]]);
        self.ops.push(Op::Resize { x, y, align_corners });
        Ok(y)
    }

    /// Channel concat; inputs of another height and width than the first are resized to it
    /// straight into their slice (HRNet's final representation).
    pub fn concat(&mut self, inputs: &[ValueId], align_corners: bool) -> Result<ValueId> {
        let first = *inputs.first().ok_or_else(|| Error::Invalid("concat of no tensors".into()))?;
        let [n, _, h, w] = self.dims4(first)?;
        let mut channels = 0;
        for &x in inputs {
            let [xn, c, _, _] = self.dims4(x)?;
            if xn != n {
                return Err(Error::Invalid(format!(
                    "concat: {} has batch {xn}, not {n}",
                    self.values[x.0].name
                )));
            }
            channels += c;
        }
        let y = self.activation("concat", &[n, channels, h, w]);
        self.ops.push(Op::Concat { inputs: inputs.to_vec(), y, align_corners });
        Ok(y)
    }

    /// OCR's spatial gather: the region representations `[N, C, K, 1]` of features `feats`
    /// `[N, C, h, w]` weighted by the softmax over pixels of `regions` `[N, K, h, w]`.
    pub fn spatial_gather(&mut self, regions: ValueId, feats: ValueId) -> Result<ValueId> {
        let [n, k, h, w] = self.dims4(regions)?;
        let [_, c, _, _] = self.dims4(feats)?;
        check_shape("spatial gather features", &[n, c, h, w], self.shape(feats))?;
        let probs = self.activation("region_probs", &[n, k, h, w]);
        let y = self.activation("context", &[n, c, k, 1]);
        self.ops.push(Op::SpatialGather { regions, feats, probs, y });
        Ok(y)
    }

    /// OCR's pixel-region attention: `value @ softmax_K(query^T @ key / sqrt(KEY))^T`.
    pub fn object_attention(&mut self, query: ValueId, key: ValueId, value: ValueId) -> Result<ValueId> {
        let [n, ch, _, _] = self.dims4(query)?;
        let [_, _, k, _] = self.dims4(key)?;
        check_shape("object attention key", &[n, ch, k, 1], self.shape(key))?;
        check_shape("object attention value", &[n, ch, k, 1], self.shape(value))?;
        self.attention(query, key, value, None)
    }

    /// `value @ softmax_over_keys(query^T @ key * scale)^T` for a query `[N, CK, H, W]`, keys
    /// `[N, CK, a, b]` and values `[N, CV, a, b]` (every pixel of `a x b` a key): `[N, CV, H,
    /// W]`. `scale` `None` is `CK^-0.5`. It keeps the attention map `[N, HW, ab]`.
    pub fn attention(
        &mut self,
        query: ValueId,
        key: ValueId,
        value: ValueId,
        scale: Option<f32>,
    ) -> Result<ValueId> {
        let [n, ch, h, w] = self.dims4(query)?;
        let [_, _, a, b] = self.dims4(key)?;
        let [_, cv, _, _] = self.dims4(value)?;
        check_shape("attention key", &[n, ch, a, b], self.shape(key))?;
        check_shape("attention value", &[n, cv, a, b], self.shape(value))?;
        let sim = self.activation("attention_map", &[n, h * w, a * b]);
        let y = self.activation("attention_context", &[n, cv, h, w]);
        self.ops.push(Op::ObjectAttention { query, key, value, scale, sim, y });
        Ok(y)
    }

    /// Adaptive average pooling of `x` `[N, C, H, W]` to `size` cells (PyTorch's
    /// AdaptiveAvgPool2d: overlapping cells where the size does not divide in).
    pub fn adaptive_avg_pool(&mut self, x: ValueId, size: [usize; 2]) -> Result<ValueId> {
        let [n, c, h, w] = self.dims4(x)?;
        if size[0] == 0 || size[1] == 0 || size[0] > h || size[1] > w {
            return Err(Error::Invalid(format!(
                "adaptive pooling of {} ({h}x{w}) to {}x{} cells: each side needs 1 to the input's",
                self.values[x.0].name, size[0], size[1]
            )));
        }
        let y = self.activation("pool", &[n, c, size[0], size[1]]);
        self.ops.push(Op::AdaptiveAvgPool { x, y });
        Ok(y)
    }

    /// Per image, `op(a) @ op(b)` where each operand `[N, C, H, W]` is its `C x HW` matrix,
    /// transposed where its flag says; the product `M x P` lands as `[N, M, size]`,
    /// `size[0] * size[1] == P`.
    pub fn matmul(&mut self, a: (ValueId, bool), b: (ValueId, bool), size: [usize; 2]) -> Result<ValueId> {
        let matrix = |g: &Self, (v, t): (ValueId, bool)| -> Result<[usize; 2]> {
            let [_, c, h, w] = g.dims4(v)?;
            Ok(if t { [h * w, c] } else { [c, h * w] })
        };
        let ([m, k], [kb, p]) = (matrix(self, a)?, matrix(self, b)?);
        let (n, nb) = (self.shape(a.0)[0], self.shape(b.0)[0]);
        if k != kb || n != nb || size[0] * size[1] != p {
            return Err(Error::Invalid(format!(
                "matmul: {} gives {n} matrices {m}x{k} and {} {nb} of {kb}x{p}; the product {m}x{p} \
                 cannot land as {}x{}",
                self.values[a.0 .0].name, self.values[b.0 .0].name, size[0], size[1]
            )));
        }
        let y = self.activation("matmul", &[n, m, size[0], size[1]]);
        self.ops.push(Op::Product { a, b, y });
        Ok(y)
    }

    /// Softmax of `scale * x` over `axis` of `x` `[N, C, H, W]`.
    pub fn softmax(&mut self, x: ValueId, axis: SoftmaxAxis, scale: f32) -> Result<ValueId> {
        let shape = self.dims4(x)?.to_vec();
        let y = self.activation("softmax", &shape);
        self.ops.push(Op::Softmax { x, y, axis, scale });
        Ok(y)
    }

    /// `gamma * a + b` with `gamma` a learnt scalar parameter named `name` (`[1]`).
    pub fn scaled_add(&mut self, name: &str, a: ValueId, b: ValueId) -> Result<ValueId> {
        let y = self.binary("scaled_add", a, b)?;
        let gamma = self.param(name, &[1]);
        self.ops.push(Op::ScaledAdd { a, gamma, b, y });
        Ok(y)
    }

    /// Dropout2d, active in training only (and left out entirely when `drop` is 0).
    pub fn dropout2d(&mut self, x: ValueId, drop: f32) -> ValueId {
        if drop == 0.0 {
            return x;
        }
        let shape = self.shape(x).to_vec();
        let y = self.activation("dropout", &shape);
        self.ops.push(Op::Dropout { x, y, layer: Dropout2d { drop, first_image: 0 } });
        y
    }

    /// A cross-entropy loss term `weight * CE(logits, labels)`, resized to the labels' size
    /// first when it differs; training starts the backward pass from these.
    pub fn cross_entropy(&mut self, spec: LossSpec, logits: ValueId, labels: ValueId) -> Result<()> {
        let [n, _, h, w] = self.dims4(logits)?;
        let label_shape = self.shape(labels).to_vec();
        let [ln, lh, lw] = <[usize; 3]>::try_from(label_shape.as_slice())
            .map_err(|_| Error::Invalid(format!("labels must be [N, H, W], got {label_shape:?}")))?;
        if ln != n {
            return Err(Error::Invalid(format!("labels have batch {ln}, logits {n}")));
        }
        let logits =
            if [h, w] == [lh, lw] { logits } else { self.resize(logits, [lh, lw], spec.align_corners)? };
        self.ops.push(Op::Loss { logits, labels, spec });
        Ok(())
    }

    /// The device memory an eval graph of these nodes takes, from the shapes alone (nothing
    /// is allocated): activations planned by liveness against each tensor on its own.
    /// Kernels' small scratch buffers are not counted.
    pub fn plan_memory(&self, outputs: &[ValueId]) -> MemoryReport {
        let mut values = self.values.clone();
        store_activations_at(&mut values, self.precision);
        let plan = plan::inference(&values, &self.ops, outputs);
        let fixed: u64 = values.iter().filter(|v| v.role.is_set()).map(Value::bytes).sum();
        let largest = values.iter().max_by_key(|v| v.bytes()).map(|v| (v.name.clone(), v.bytes()));
        MemoryReport {
            planned: fixed + plan.bytes(),
            unshared: values.iter().map(Value::bytes).sum(),
            largest: largest.unwrap_or_default(),
        }
    }

    /// The device memory a training step of these nodes takes, from the shapes alone
    /// (nothing is allocated): activations and their gradients planned by liveness across
    /// the forward and backward passes, and the optimizer's arenas. Kernels' scratch
    /// buffers (batch statistics, packed weights, the loss's) are not counted.
    pub fn plan_training_memory(&self, outputs: &[ValueId]) -> TrainingMemory {
        let bytes = Value::bytes;
        let backward = Backward::of(&self.values, &self.ops, outputs, self.recompute);
        let plan = training_plan(&self.values, &self.ops, (outputs, &backward));
        let needs = &backward.needs;
        let sum = |keep: &dyn Fn(usize, &Value) -> bool| -> u64 {
            self.values.iter().enumerate().filter(|(i, v)| keep(*i, v)).map(|(_, v)| bytes(v)).sum()
        };
        let parameters = sum(&|_, v| v.role == Role::Param);
        let activation = |v: &Value| v.role == Role::Activation;
        let unplanned_grads = sum(&|i, v| {
            needs[i] && !matches!(v.role, Role::Param) && plan.slot_of[self.values.len() + i].is_none()
        });
        let peak = plan.peak.as_ref().map(|(node, alive)| self.peak_memory(*node, alive));
        TrainingMemory {
            peak,
            activations: plan.bytes() + unplanned_grads,
            activations_unshared: sum(&|_, v| activation(v)) + sum(&|i, v| needs[i] && v.role != Role::Param),
            parameters,
            gradients: parameters,
            momentum: parameters,
            fixed: sum(&|_, v| matches!(v.role, Role::Input { .. } | Role::State)),
        }
    }

    /// What the planned buffers `alive` at `node`'s pass hold (buffer `i < n` is value `i`,
    /// `n + i` its gradient, `2n + i` it recomputed; see [`plan::training`]).
    fn peak_memory(&self, node: plan::Node, alive: &[usize]) -> PeakMemory {
        let n = self.values.len();
        let output = |at: usize| {
            self.ops[at].io().1.map_or_else(|| "the loss".to_string(), |y| self.values[y.0].name.clone())
        };
        let at = match node {
            plan::Node::Forward(at) => format!("the forward of {}", output(at)),
            plan::Node::Backward(at) => format!("the backward of {}", output(at)),
            plan::Node::Rebuild(v) => format!("rebuilding {}", self.values[v].name),
        };
        let mut peak = PeakMemory { at, ..PeakMemory::default() };
        let mut tensors: Vec<(String, u64)> = Vec::new();
        for &b in alive {
            let v = &self.values[b % n];
            let bytes = v.bytes();
            let (kind, name) = match b / n {
                0 => (&mut peak.activations, v.name.clone()),
                1 => (&mut peak.gradients, format!("grad {}", v.name)),
                _ => (&mut peak.recomputed, format!("{} (recomputed)", v.name)),
            };
            *kind += bytes;
            tensors.push((name, bytes));
        }
        tensors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        peak.largest = tensors.into_iter().take(6).collect();
        peak
    }

    /// The FLOPs (two per multiply-add) of the graph's convolutions and matrix products, as
    /// PyTorch's FlopCounterMode counts them: of the forward pass, and of the backward a
    /// training graph of `outputs` runs (only what needs a gradient).
    pub fn flops(&self, outputs: &[ValueId]) -> Flops {
        let backward = Backward::of(&self.values, &self.ops, outputs, self.recompute);
        let forward: u64 = self.ops.iter().map(|op| op.forward_macs(&self.values)).sum();
        let backward_macs: u64 = backward
            .schedule
            .iter()
            .filter_map(|step| match step {
                ops::BackwardStep::Node(at, _) => {
                    Some(self.ops[*at].backward_macs(&self.values, &backward.needs))
                }
                ops::BackwardStep::Rebuild(_) => None,
            })
            .sum();
        Flops { forward: 2 * forward, backward: 2 * backward_macs }
    }

    /// How many numbers the graph's parameters hold.
    pub fn parameter_count(&self) -> u64 {
        let params = self.values.iter().filter(|v| v.role == Role::Param);
        params.map(|v| v.shape.iter().product::<usize>() as u64).sum()
    }

    /// What a training graph rebuilds in the backward instead of keeping it from the forward
    /// ([`Recompute::BnRelu`] unless set).
    pub fn recompute_in_backward(&mut self, mode: Recompute) {
        self.recompute = mode;
    }

    /// Keeps every node of an eval graph separate (for checking the fused kernels against
    /// the unfused ones, or reading intermediate values).
    pub fn disable_fusion(&mut self) {
        self.unfused = true;
    }

    /// Asks an eval graph to run at `precision`: `F16` stores its inputs, activations and
    /// convolution weights at half, sums at f32, and falls back to `F32` on an adapter
    /// without `SHADER_F16` ([`Graph::precision`] tells which runs); a training graph
    /// refuses it.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// Records with `tuner`'s kernel-variant choices ([`crate::kernels::tuning`]); without
    /// a tuner, [`GraphBuilder::build`] takes each family's untimed default.
    pub fn use_tuner(&mut self, tuner: Arc<Tuner>) {
        self.tuner = Some(tuner);
    }

    /// Measures the variants of every kernel family the graph would run (convolution
    /// forward and, in training, its gradients; the OCR head's products) in each shape
    /// class `tuner` has no choice for yet, and records with its choices from then on. The
    /// classes come from a probe recording of the graph (its tensors allocated, nothing
    /// run). It runs timed GPU submissions and writes the tuning cache file: a step of its
    /// own, for work that reuses a graph (training, evaluation, benchmarks); `build` never
    /// measures.
    pub fn tune(&mut self, gpu: &Gpu, tuner: &Arc<Tuner>, mode: Mode, outputs: &[ValueId]) -> Result<()> {
        let mut probe = self.clone();
        probe.tuner = Some(Arc::clone(tuner));
        tuner.collect(gpu, || probe.build(gpu, mode, outputs).map(drop))?;
        self.tuner = Some(Arc::clone(tuner));
        Ok(())
    }

    /// Records the graph as rank `rank` of `ranks` training data-parallel on slices of one
    /// global batch ([`Graph::train_step_across`]): synchronized batch norm, if asked, meets
    /// the other ranks in each batch norm's forward and backward; dropout masks are those of
    /// the rank's images within the global batch; the backward hands parameter gradients to
    /// the all-reduce in buckets as they complete.
    pub fn data_parallel(&mut self, parallel: DataParallel) -> Result<()> {
        if parallel.ranks == 0 || parallel.rank >= parallel.ranks {
            return Err(Error::Invalid(format!("rank {} of {} ranks", parallel.rank, parallel.ranks)));
        }
        self.parallel = parallel;
        Ok(())
    }

    /// Allocates every tensor and records the forward (and, in training, backward) pass.
    /// Eval graphs fuse each conv-BN-(add)-(ReLU) chain into one kernel (see `fuse.rs`).
    pub fn build(mut self, gpu: &Gpu, mode: Mode, outputs: &[ValueId]) -> Result<Graph> {
        if mode == Mode::Train && self.precision != Precision::F32 {
            return Err(Error::Invalid(format!(
                "{:?} weights are for inference; a training graph keeps f32",
                self.precision
            )));
        }
        let precision = self.precision.on(gpu);
        if mode == Mode::Eval && !self.unfused {
            self.ops = fuse::fuse_for_inference(std::mem::take(&mut self.ops), &mut self.values, outputs);
        }
        store_activations_at(&mut self.values, precision);
        let mut by_name = HashMap::new();
        for (i, v) in self.values.iter().enumerate() {
            if by_name.insert(v.name.clone(), ValueId(i)).is_some() {
                return Err(Error::Invalid(format!("two tensors of the graph are named {:?}", v.name)));
            }
        }
        let backward =
            (mode == Mode::Train).then(|| Backward::of(&self.values, &self.ops, outputs, self.recompute));
        let (tensors, grads, optimizer, recomputed) = match &backward {
            Some(b) => {
                let passes = (&self.ops[..], outputs, b);
                let t = allocate_for_training(gpu, &self.values, passes, &self.lr_multipliers)?;
                (t.tensors, t.grads, t.arena.map(|arena| Optimizer { arena, step: None }), t.recomputed)
            }
            None => (
                allocate_for_inference(gpu, &self.values, &self.ops, outputs)?,
                Vec::new(),
                None,
                HashMap::new(),
            ),
        };
        let mut graph = Graph {
            values: self.values,
            tensors,
            grads,
            recorded: Recorded::default(),
            outputs: outputs.to_vec(),
            by_name,
            seed: 0,
            optimizer,
            precision,
            tuner: self.tuner,
            weights_touched: AtomicBool::new(true),
            forwarded: AtomicBool::new(false),
            recomputed,
            parallel: self.parallel,
        };
        for (v, data) in &self.constants {
            graph.t(*v).write(gpu, data)?;
        }
        match &backward {
            None => graph.record_forward(gpu, &self.ops, mode)?,
            // A training step's kernel calls run in order and repack their weights each pass,
            // so they share their scratch buffers.
            Some(b) => {
                crate::kernels::sharing_scratch(|| {
                    graph.record_forward(gpu, &self.ops, mode)?;
                    graph.record_backward(gpu, &self.ops, b)
                })?;
                graph.zero_grads(gpu)?;
            }
        }
        Ok(graph)
    }
}

/// A training graph's tensors: values, gradients, and the optimizer arena that holds the
/// parameters and their gradients (none for a graph without parameters, a loss of given
/// logits).
struct TrainingTensors {
    tensors: Vec<Tensor>,
    grads: Vec<Option<Tensor>>,
    arena: Option<Arena>,
    /// The values the backward rebuilds: the node that rebuilds each, and its buffer.
    recomputed: HashMap<ValueId, (usize, Tensor)>,
}

/// Whether each value's gradient is planned: an activation's that the backward computes.
/// Parameters' live in the optimizer arena; inputs' and outputs' gradients, which callers
/// read or write, keep buffers of their own.
fn planned_gradients(values: &[Value], needs: &[bool], outputs: &[ValueId]) -> Vec<bool> {
    (0..values.len())
        .map(|i| needs[i] && values[i].role == Role::Activation && !outputs.contains(&ValueId(i)))
        .collect()
}

/// The training step's plan over activations and their gradients ([`plan::training`]).
fn training_plan(values: &[Value], ops: &[Op], (outputs, backward): (&[ValueId], &Backward)) -> plan::Plan {
    let grads = planned_gradients(values, &backward.needs, outputs);
    plan::training(values, ops, (outputs, &grads), backward)
}

/// The graph's tensors for training: activations and their gradients share buffers by
/// liveness across the forward and backward passes ([`plan::training`]); parameters and
/// their gradients are views of one optimizer arena (so one dispatch updates them all).
fn allocate_for_training(
    gpu: &Gpu,
    values: &[Value],
    (ops, outputs, backward): (&[Op], &[ValueId], &Backward),
    multipliers: &[(String, f32)],
) -> Result<TrainingTensors> {
    let params: Vec<(&[usize], f32)> = values
        .iter()
        .filter(|v| v.role == Role::Param)
        .map(|v| {
            let m = multipliers.iter().find(|(k, _)| v.name.contains(k.as_str())).map_or(1.0, |(_, m)| *m);
            (v.shape.as_slice(), m)
        })
        .collect();
    let arena = if params.is_empty() { None } else { Some(Arena::new(gpu, &params)?) };
    let plan = training_plan(values, ops, (outputs, backward));
    let n = values.len();
    let describe = |b: usize| match b.checked_sub(n) {
        None => format!("activation {}", values[b].name),
        Some(i) if i < n => format!("the gradient of activation {}", values[i].name),
        Some(i) => format!("the rebuilt activation {}", values[i - n].name),
    };
    let slots = allocate_slots(gpu, &plan, |b| (describe(b), &values[b % n].shape))?;
    let mut param_views = arena.iter().flat_map(|a| a.views.iter());
    let tensors = values
        .iter()
        .enumerate()
        .map(|(i, v)| match v.role {
            Role::Param => Ok(param_views.next().expect("a view per parameter").0.clone()),
            _ => value_tensor(gpu, v, plan.slot_of[i], &slots).map_err(|e| named(&describe(i), &v.shape, e)),
        })
        .collect::<Result<Vec<_>>>()?;
    let needs = &backward.needs;
    let mut grad_views = arena.iter().flat_map(|a| a.views.iter());
    let grads = values
        .iter()
        .enumerate()
        .map(|(i, v)| match (v.role, needs[i], plan.slot_of[n + i]) {
            (Role::Param, _, _) => Ok(Some(grad_views.next().expect("a view per parameter").1.clone())),
            (_, true, Some(s)) => {
                slots[s].view(gpu, 0, &v.shape).map(Some).map_err(|e| named(&describe(n + i), &v.shape, e))
            }
            (_, true, None) => Tensor::empty(gpu, &v.shape).map(Some),
            (_, false, _) => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let recomputed = backward
        .rebuilt
        .iter()
        .map(|(&v, &bn)| {
            let buffer = match plan.slot_of[2 * n + v.0] {
                Some(s) => slots[s].view(gpu, 0, &values[v.0].shape)?,
                None => Tensor::empty(gpu, &values[v.0].shape)?,
            };
            Ok((v, (bn, buffer)))
        })
        .collect::<Result<_>>()?;
    Ok(TrainingTensors { tensors, grads, arena, recomputed })
}

/// The graph's tensors for inference: activations share slots by liveness ([`plan`]).
fn allocate_for_inference(
    gpu: &Gpu,
    values: &[Value],
    ops: &[Op],
    outputs: &[ValueId],
) -> Result<Vec<Tensor>> {
    let plan = plan::inference(values, ops, outputs);
    let slots = allocate_slots(gpu, &plan, |b| (format!("activation {}", values[b].name), &values[b].shape))?;
    values
        .iter()
        .zip(&plan.slot_of)
        .map(|(v, &slot)| {
            value_tensor(gpu, v, slot, &slots)
                .map_err(|e| named(&format!("activation {}", v.name), &v.shape, e))
        })
        .collect()
}

/// An allocation error naming the planned buffer it was for.
fn named(what: &str, shape: &[usize], e: Error) -> Error {
    Error::Invalid(format!("allocating {what} {shape:?}: {e}"))
}

/// A plan's slots: the buffers planned tensors are views of, each as large as its largest
/// tenant (kernels bind slabs of those beyond a binding). An allocation error names that
/// tenant (`describe`: a planned buffer's name and shape).
fn allocate_slots<'a>(
    gpu: &Gpu,
    plan: &plan::Plan,
    describe: impl Fn(usize) -> (String, &'a Vec<usize>),
) -> Result<Vec<Tensor>> {
    let largest_tenant = |slot: usize| {
        let tenants = plan.slot_of.iter().enumerate().filter(|(_, s)| **s == Some(slot)).map(|(b, _)| b);
        tenants.max_by_key(|&b| describe(b).1.iter().product::<usize>()).expect("a slot has a tenant")
    };
    let slot = |(s, &n): (usize, &usize)| {
        Tensor::empty_of(gpu, &[n], plan.element).map_err(|e| {
            let (what, shape) = describe(largest_tenant(s));
            named(&what, shape, e)
        })
    };
    plan.slot_elems.iter().enumerate().map(slot).collect()
}

/// A value's tensor: a view of its planned slot, a buffer of its own, or for a value
/// computed inside a fused kernel, a one-element placeholder that `Graph::tensor` refuses
/// to hand out.
fn value_tensor(gpu: &Gpu, v: &Value, slot: Option<usize>, slots: &[Tensor]) -> Result<Tensor> {
    match (slot, v.role) {
        (Some(s), _) => slots[s].view(gpu, 0, &v.shape),
        (None, Role::Fused) => Tensor::empty_of(gpu, &[1], v.dtype),
        _ => Tensor::empty_of(gpu, &v.shape, v.dtype),
    }
}

/// An error naming `what` and the first element of `t` that is NaN or infinite.
fn check_finite(gpu: &Gpu, t: &Tensor, what: &str) -> Result<()> {
    match t.to_vec(gpu)?.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        None => Ok(()),
        Some((i, v)) => Err(Error::Invalid(format!(
            "non-finite value {v} at element {i} of {what} (shape {:?})",
            t.shape()
        ))),
    }
}

/// FLOPs of a graph's products (see [`GraphBuilder::flops`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flops {
    pub forward: u64,
    pub backward: u64,
}

/// Device memory of an eval graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryReport {
    /// Bytes of the buffers the graph holds (shared activation slots counted once).
    pub planned: u64,
    /// Bytes every tensor would take with a buffer of its own.
    pub unshared: u64,
    /// The largest single tensor (name, bytes): what must fit one storage binding.
    pub largest: (String, u64),
}

/// Device memory of a training step, planned (see [`GraphBuilder::plan_training_memory`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainingMemory {
    /// What is alive at the plan's peak (none for a graph without activations).
    pub peak: Option<PeakMemory>,
    /// Activations and their gradients, sharing buffers by liveness across the forward and
    /// backward passes (the gradients callers read or write keep buffers of their own).
    pub activations: u64,
    /// The same with a buffer per activation and per gradient (no planning).
    pub activations_unshared: u64,
    /// The parameters, their gradients and the momentum buffers: one arena each.
    pub parameters: u64,
    pub gradients: u64,
    pub momentum: u64,
    /// Inputs and running statistics.
    pub fixed: u64,
}

/// The step of a training pass at which the most activation and gradient bytes are alive:
/// which pass of which node it is, those bytes by kind, and the largest tensors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeakMemory {
    /// "the forward of X", "the backward of X" or "recomputing the ReLU of X", X the node's
    /// output value.
    pub at: String,
    /// Activations kept for the backward or still to be read, and gradients, and values
    /// rebuilt in the backward ([`Recompute`]).
    pub activations: u64,
    pub gradients: u64,
    pub recomputed: u64,
    /// The largest tensors alive then, largest first.
    pub largest: Vec<(String, u64)>,
}

impl TrainingMemory {
    /// Every planned byte.
    pub fn total(&self) -> u64 {
        self.activations + self.parameters + self.gradients + self.momentum + self.fixed
    }
}

/// Bytes as MiB, for the memory reports.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

impl std::fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB planned (activations share buffers by liveness), {:.1} MiB with a buffer per \
             tensor; largest tensor {} at {:.1} MiB",
            mib(self.planned),
            mib(self.unshared),
            self.largest.0,
            mib(self.largest.1)
        )
    }
}

impl std::fmt::Display for TrainingMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB planned: activations and their gradients {:.1} MiB (shared by liveness; {:.1} MiB \
             with a buffer each), parameters {:.1} MiB, their gradients {:.1} MiB, momentum {:.1} MiB, \
             inputs and running statistics {:.1} MiB",
            mib(self.total()),
            mib(self.activations),
            mib(self.activations_unshared),
            mib(self.parameters),
            mib(self.gradients),
            mib(self.momentum),
            mib(self.fixed)
        )?;
        if let Some(p) = &self.peak {
            let largest: Vec<String> =
                p.largest.iter().map(|(name, b)| format!("{name} {:.1}", mib(*b))).collect();
            write!(
                f,
                "\npeak at {}: {:.1} MiB alive: activations {:.1} MiB, gradients {:.1} MiB, recomputed {:.1} MiB; \
                 largest (MiB): {}",
                p.at,
                mib(p.activations + p.gradients + p.recomputed),
                mib(p.activations),
                mib(p.gradients),
                mib(p.recomputed),
                largest.join(", ")
            )?;
        }
        Ok(())
    }
}

/// What a loss term computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSpec {
    /// The term's name, by which [`LossTerms::value`] finds it (HRNet-OCR: `aux`, `main`).
    pub name: &'static str,
    /// The term's weight in the total (HRNet-OCR: 0.4 for aux, 1 for the main output).
    pub weight: f32,
    pub ignore_label: u32,
    pub reduction: Reduction,
    /// How logits are resized to the label size.
    pub align_corners: bool,
    /// A `[K]` input of per-class weights (PyTorch's `weight=`), or none.
    pub class_weight: Option<ValueId>,
}

/// A loss term's value after a forward pass, before its weight.
#[derive(Clone, Debug, PartialEq)]
pub struct LossTerm {
    pub name: &'static str,
    pub weight: f32,
    pub value: f32,
}

/// A graph's loss terms, read back together.
#[derive(Clone, Debug, PartialEq)]
pub struct LossTerms(pub Vec<LossTerm>);

impl LossTerms {
    /// The weighted sum, the loss the backward pass differentiates.
    pub fn total(&self) -> f32 {
        self.0.iter().map(|t| t.weight * t.value).sum()
    }

    /// The value of the term called `name`; an error naming the terms there are otherwise.
    pub fn value(&self, name: &str) -> Result<f32> {
        self.0.iter().find(|t| t.name == name).map(|t| t.value).ok_or_else(|| {
            let names: Vec<&str> = self.0.iter().map(|t| t.name).collect();
            Error::Invalid(format!("no loss term {name:?}; the graph has {names:?}"))
        })
    }
}

/// A data-parallel training step's meeting points: synchronized batch norms' exchanges in
/// the forward and the backward, and gradient buckets (some reduced at an exchange, the rest
/// at points of their own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeetingPoints {
    pub forward_exchanges: usize,
    pub backward_exchanges: usize,
    pub buckets: usize,
    pub buckets_at_exchanges: usize,
}

/// A recorded graph with its tensors.
pub struct Graph {
    values: Vec<Value>,
    tensors: Vec<Tensor>,
    /// Gradient of each value that has one (training only).
    grads: Vec<Option<Tensor>>,
    recorded: Recorded,
    outputs: Vec<ValueId>,
    by_name: HashMap<String, ValueId>,
    seed: u32,
    /// Training only: the parameter arena and its recorded SGD step.
    optimizer: Option<Optimizer>,
    /// The precision the convolutions' weights run at.
    precision: Precision,
    /// Whose kernel-variant choices recording takes.
    tuner: Option<Arc<Tuner>>,
    /// Eval graphs: whether the packed weights may be stale. Set whenever a parameter or
    /// running statistic is handed out (it may be written through the reference), cleared
    /// by the forward that repacks.
    weights_touched: AtomicBool,
    /// Training graphs: whether a forward pass ran since the last backward. The backward
    /// reads what the forward kept and frees it as it goes (the buffers are shared by
    /// liveness), so each backward needs a forward of its own.
    forwarded: AtomicBool,
    /// Training graphs: the values the backward rebuilds, each with the node that rebuilds
    /// it and its buffer.
    recomputed: HashMap<ValueId, (usize, Tensor)>,
    /// Training graphs: the rank and ranks it was recorded for.
    parallel: DataParallel,
}

struct Optimizer {
    arena: Arena,
    step: Option<(SgdConfig, Vec<Dispatch>)>,
}

impl Graph {
    /// The precision the convolutions' weights run at: what was asked for, or `F32` where
    /// the adapter lacks `SHADER_F16`.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    fn t(&self, v: ValueId) -> &Tensor {
        &self.tensors[v.0]
    }

    fn id(&self, name: &str) -> Result<ValueId> {
        self.by_name.get(name).copied().ok_or_else(|| {
            let mut names: Vec<&str> =
                self.values.iter().filter(|v| v.role.is_set()).map(|v| v.name.as_str()).collect();
            names.sort_unstable();
            let shown = names.iter().take(12).copied().collect::<Vec<_>>().join(", ");
            Error::Invalid(format!("the graph has no tensor named {name:?} (it has {shown}, ...)"))
        })
    }

    /// The tensor named `name` (an input, parameter or running statistic).
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        let id = self.id(name)?;
        match self.values[id.0].role {
            Role::Fused => {
                return Err(Error::Invalid(format!(
                    "{name:?} is computed inside a fused kernel and not stored (build with fusion disabled to read it)"
                )))
            }
            Role::Param | Role::State => self.weights_touched.store(true, Ordering::Release),
            _ => {}
        }
        Ok(self.t(id))
    }

    /// The gradient of the tensor named `name` (after [`Graph::backward`]).
    pub fn grad(&self, name: &str) -> Result<&Tensor> {
        let id = self.id(name)?;
        self.grads.get(id.0).and_then(Option::as_ref).ok_or_else(|| {
            Error::Invalid(format!("{name:?} has no gradient (eval graph, or nothing it feeds is trained)"))
        })
    }

    /// Uploads `data` into the f32 tensor named `name`.
    pub fn set(&self, gpu: &Gpu, name: &str, data: &[f32]) -> Result<()> {
        self.tensor(name)?.write(gpu, data)
    }

    /// The graph's `i`-th output.
    pub fn output(&self, i: usize) -> &Tensor {
        self.t(self.outputs[i])
    }

    /// Names and shapes of the trainable parameters, in the order they were added.
    pub fn parameters(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.values.iter().filter(|v| v.role == Role::Param).map(|v| (v.name.as_str(), v.shape.as_slice()))
    }

    /// Names of the running statistics.
    pub fn buffers(&self) -> impl Iterator<Item = &str> {
        self.values.iter().filter(|v| v.role == Role::State).map(|v| v.name.as_str())
    }

    /// Runs the forward pass: one command buffer. An eval graph repacks its convolution
    /// weights in the same command buffer when they may have changed since the last pass
    /// (built, loaded, or handed out by [`Graph::tensor`]), and not otherwise.
    pub fn forward(&self, gpu: &Gpu) -> Result<()> {
        self.repacking(|prepare| gpu.submit(prepare.iter().chain(&self.recorded.forward)))?;
        self.forwarded.store(true, Ordering::Release);
        Ok(())
    }

    /// Runs `submit` with the weight packing if the weights may have changed since it last
    /// ran, else with nothing; a failed submission leaves the weights marked for repacking.
    fn repacking(&self, submit: impl FnOnce(&[Dispatch]) -> Result<()>) -> Result<()> {
        let touched = self.weights_touched.swap(false, Ordering::AcqRel);
        let prepare = if touched { &self.recorded.prepare[..] } else { &[] };
        submit(prepare).inspect_err(|_| {
            self.weights_touched.fetch_or(touched, Ordering::AcqRel);
        })
    }

    /// Runs the forward pass node by node and reads every value back: the first input,
    /// parameter or statistic that holds a NaN or infinity, or else the first node that
    /// produces one, is named in the error. Slow (a readback per node); for finding where
    /// a model goes wrong.
    pub fn forward_checked(&self, gpu: &Gpu) -> Result<()> {
        let name = |v: ValueId| self.values[v.0].name.as_str();
        for (i, v) in self.values.iter().enumerate() {
            if v.role.is_set() && v.dtype != DType::U32 {
                let what = match v.role {
                    Role::Param => "parameter",
                    Role::State => "running statistic",
                    _ => "input",
                };
                check_finite(gpu, &self.tensors[i], &format!("{what} {}", v.name))?;
            }
        }
        self.repacking(|prepare| if prepare.is_empty() { Ok(()) } else { gpu.submit(prepare) })?;
        for node in &self.recorded.nodes {
            gpu.submit(&self.recorded.forward[node.dispatches.clone()])?;
            for &y in node.writes.iter().filter(|y| self.values[y.0].dtype != DType::U32) {
                let reads: Vec<&str> = node.reads.iter().map(|&r| name(r)).collect();
                let what = format!("{}, the output of the node reading {}", name(y), reads.join(", "));
                check_finite(gpu, self.t(y), &what)?;
            }
        }
        self.forwarded.store(true, Ordering::Release);
        Ok(())
    }

    /// Runs the backward pass of the last forward: one command buffer. Without loss nodes it
    /// starts from the outputs' gradients, which the caller writes first
    /// (`graph.grad(output)?.write(..)`). Parameter gradients are added to what they hold.
    /// The backward frees the forward's values as it goes, so a second backward needs a
    /// forward of its own.
    pub fn backward(&self, gpu: &Gpu) -> Result<()> {
        if self.grads.is_empty() {
            return Err(Error::Invalid("backward: the graph was built for eval".into()));
        }
        if !self.forwarded.swap(false, Ordering::AcqRel) {
            return Err(Error::Invalid(
                "backward: no forward pass since the last backward (it reuses the forward's buffers)".into(),
            ));
        }
        gpu.submit(&self.recorded.backward)
    }

    /// The gradient tensor of output `i`, for graphs without loss nodes.
    pub fn output_grad(&self, i: usize) -> Result<&Tensor> {
        self.grads.get(self.outputs[i].0).and_then(Option::as_ref).ok_or_else(|| {
            Error::Invalid("the graph was built for eval, or its output needs no gradient".into())
        })
    }

    /// The total loss (sum of weight x term) after a forward pass.
    pub fn loss(&self, gpu: &Gpu) -> Result<f32> {
        Ok(self.loss_terms(gpu)?.total())
    }

    /// Every loss term after a forward pass, in the order they were added: all read back
    /// from the device together.
    pub fn loss_terms(&self, gpu: &Gpu) -> Result<LossTerms> {
        if self.recorded.losses.is_empty() {
            return Err(Error::Invalid("the graph has no loss".into()));
        }
        let tensors: Vec<&Tensor> = self.recorded.losses.iter().map(|l| &l.value).collect();
        let values = crate::tensor::read_many(gpu, &tensors)?;
        let terms = self.recorded.losses.iter().zip(values);
        Ok(LossTerms(terms.map(|(l, v)| LossTerm { name: l.name, weight: l.weight, value: v[0] }).collect()))
    }

    /// Sets the dropout seed of the next step (forward and backward use the same masks).
    pub fn set_seed(&mut self, gpu: &Gpu, seed: u32) -> Result<()> {
        self.seed = seed;
        for d in &self.recorded.dropouts {
            d.reseed(gpu, seed);
        }
        Ok(())
    }

    /// One SGD step over every parameter at learning rate `lr` (times each parameter's
    /// multiplier): one dispatch per arena chunk, recorded on first use.
    pub fn sgd_step(&mut self, gpu: &Gpu, config: &SgdConfig, lr: f32) -> Result<()> {
        let step = self.prepare_sgd(gpu, config, lr)?;
        gpu.submit(step)
    }

    /// A whole training step in one command buffer: the parameter gradients cleared (one
    /// clear of their arena), forward, backward and the SGD step at `lr` (the caller sets
    /// the inputs first).
    pub fn train_step(&mut self, gpu: &Gpu, config: &SgdConfig, lr: f32) -> Result<()> {
        if self.grads.is_empty() {
            return Err(Error::Invalid("train_step: the graph was built for eval".into()));
        }
        self.prepare_sgd(gpu, config, lr)?;
        // The step's own backward consumes its forward.
        self.forwarded.store(false, Ordering::Release);
        gpu.submit_after_clearing(&self.gradient_arena(), self.step_dispatches())
    }

    /// A training step of rank `comm.rank()` of a data-parallel group, each rank on its
    /// slice of the global batch ([`GraphBuilder::data_parallel`]): the forward and the
    /// backward run in segments between their meeting points (synchronized batch norms'
    /// exchanges, gradient buckets); each bucket's mean over the ranks is taken while the
    /// device runs the next segment, and written back before the SGD step, which then
    /// leaves every rank with the same weights.
    pub fn train_step_across(
        &mut self,
        gpu: &Gpu,
        config: &SgdConfig,
        lr: f32,
        comm: &mut Comm,
    ) -> Result<()> {
        if self.grads.is_empty() {
            return Err(Error::Invalid("train_step_across: the graph was built for eval".into()));
        }
        if (comm.rank(), comm.ranks()) != (self.parallel.rank, self.parallel.ranks) {
            return Err(Error::Invalid(format!(
                "the graph was recorded for rank {} of {}; the collective is rank {} of {}",
                self.parallel.rank,
                self.parallel.ranks,
                comm.rank(),
                comm.ranks()
            )));
        }
        if self.parallel.ranks == 1 {
            return self.train_step(gpu, config, lr);
        }
        self.prepare_sgd(gpu, config, lr)?;
        self.forwarded.store(false, Ordering::Release);
        let arena = self.gradient_arena();
        let recorded = &self.recorded;
        run_between(gpu, comm, &recorded.forward, &recorded.forward_syncs, &arena)?;
        run_between(gpu, comm, &recorded.backward, &recorded.backward_syncs, &[])?;
        let step = self.optimizer.as_ref().and_then(|o| o.step.as_ref()).map(|(_, d)| d);
        gpu.submit(step.into_iter().flatten())
    }

    /// Where a data-parallel step meets the other ranks (empty on one rank).
    pub fn meeting_points(&self) -> MeetingPoints {
        let backward = &self.recorded.backward_syncs;
        let buckets = backward.iter().filter(|p| !p.bucket.is_empty());
        MeetingPoints {
            forward_exchanges: self.recorded.forward_syncs.len(),
            backward_exchanges: backward.iter().filter(|p| p.exchange.is_some()).count(),
            buckets: buckets.clone().count(),
            buckets_at_exchanges: buckets.filter(|p| p.exchange.is_some()).count(),
        }
    }

    /// The optimizer's dispatches, recorded on first use and set to `lr`.
    fn prepare_sgd(&mut self, gpu: &Gpu, config: &SgdConfig, lr: f32) -> Result<&[Dispatch]> {
        let opt = self.optimizer.as_mut().ok_or_else(|| {
            Error::Invalid(
                "sgd_step: the graph has no optimizer (built for eval, or without parameters)".into(),
            )
        })?;
        match &opt.step {
            Some((c, step)) if c == config => opt.arena.set_lr(gpu, step, config, lr),
            _ => opt.step = Some((*config, opt.arena.step(gpu, config, lr)?)),
        }
        Ok(&opt.step.as_ref().expect("recorded above").1[..])
    }

    /// The optimizer's momentum buffer of each parameter, by parameter name (training only).
    pub fn momentum(&self) -> Result<Vec<(&str, &Tensor)>> {
        let opt = self.optimizer.as_ref().ok_or_else(|| {
            Error::Invalid(
                "momentum: the graph has no optimizer (built for eval, or without parameters)".into(),
            )
        })?;
        Ok(self.parameters().map(|(name, _)| name).zip(&opt.arena.momentum_views).collect())
    }

    /// Sets every parameter gradient to zero.
    pub fn zero_grads(&self, gpu: &Gpu) -> Result<()> {
        match self.gradient_arena() {
            arena if arena.is_empty() => Ok(()),
            arena => gpu.submit_after_clearing(&arena, []),
        }
    }

    /// The parameters' gradients: the chunks of one arena in a training graph, so a clear
    /// per chunk zeroes them.
    fn gradient_arena(&self) -> Vec<(&wgpu::Buffer, u64, u64)> {
        let arena = self.optimizer.iter().flat_map(|o| o.arena.grads());
        arena.map(|g| (g.buffer(), g.offset(), g.bytes())).collect()
    }

    /// Bytes of the device buffers the graph's tensors hold (values, gradients, the
    /// optimizer's arenas; a buffer shared by several tensors counted once): what its memory
    /// plan became. Kernels' own scratch buffers are not counted.
    pub fn tensor_bytes(&self) -> u64 {
        let arena = self.optimizer.iter().flat_map(|o| o.arena.tensors());
        let all = self.tensors.iter().chain(self.grads.iter().flatten()).chain(arena);
        let buffers: HashMap<usize, u64> = all.map(Tensor::storage).collect();
        buffers.values().sum()
    }

    /// The recorded forward dispatches (for profiling and benchmarks). In an eval graph
    /// they leave out the weight packing, which runs only after the weights change
    /// ([`Graph::prepare_dispatches`]).
    pub fn forward_dispatches(&self) -> &[Dispatch] {
        &self.recorded.forward
    }

    /// An eval graph's weight packing: one dispatch per convolution.
    pub fn prepare_dispatches(&self) -> &[Dispatch] {
        &self.recorded.prepare
    }

    /// The recorded backward dispatches.
    pub fn backward_dispatches(&self) -> &[Dispatch] {
        &self.recorded.backward
    }

    /// A training step's dispatches in order: forward, backward and, once a step has
    /// recorded it, the optimizer's.
    pub fn step_dispatches(&self) -> Vec<&Dispatch> {
        let optimizer =
            self.optimizer.as_ref().and_then(|o| o.step.as_ref()).into_iter().flat_map(|(_, d)| d);
        self.recorded.forward.iter().chain(&self.recorded.backward).chain(optimizer).collect()
    }
}

/// Runs `dispatches` in segments between the meeting `points` (the `clears` zeroed at the
/// start): at each, the exchange's tensors and the bucket's gradients are copied back with
/// the segment; an exchange completes before the next segment starts (its result feeds
/// it), while a bucket's mean is taken after the next segment is submitted, so the device
/// runs on meanwhile. A bucket's gradients are final, so writing the mean back at once is
/// safe: the queue writes it before any later segment runs.
fn run_between(
    gpu: &Gpu,
    comm: &mut Comm,
    dispatches: &[Dispatch],
    points: &[SyncPoint],
    clears: &[(&wgpu::Buffer, u64, u64)],
) -> Result<()> {
    let mut start = 0;
    let mut clears = clears;
    let mut pending: Option<(PendingBucket, &[Tensor])> = None;
    for point in points {
        let exchanged = point.exchange.as_ref().map_or_else(Vec::new, |e| e.reads());
        let reads: Vec<_> = exchanged.iter().copied().chain(&point.bucket).map(Tensor::range).collect();
        let staged = gpu.submit_staged(clears, &dispatches[start..point.at], &reads)?;
        (clears, start) = (&[], point.at);
        if let Some((bucket, grads)) = pending.take() {
            reduce_bucket(gpu, comm, bucket.bytes(gpu)?, grads)?;
        }
        match &point.exchange {
            Some(exchange) => {
                let mut bytes = staged.read(gpu)?;
                let grads = bytes.split_off(exchanged.len());
                let read: Vec<Vec<f32>> = bytes.iter().map(|b| bytemuck::pod_collect_to_vec(b)).collect();
                exchange.apply(gpu, &comm.all_gather_f64(&exchange.local(&read))?)?;
                pending = Some((PendingBucket::Read(grads), &point.bucket));
            }
            None => pending = Some((PendingBucket::Staged(staged), &point.bucket)),
        }
    }
    gpu.submit_after_clearing(clears, &dispatches[start..])?;
    match pending {
        Some((bucket, grads)) => reduce_bucket(gpu, comm, bucket.bytes(gpu)?, grads),
        None => Ok(()),
    }
}

/// A bucket's gradients on their way to the host, or there.
enum PendingBucket {
    Staged(crate::gpu::Staged),
    Read(Vec<Vec<u8>>),
}

impl PendingBucket {
    fn bytes(self, gpu: &Gpu) -> Result<Vec<Vec<u8>>> {
        match self {
            PendingBucket::Staged(staged) => staged.read(gpu),
            PendingBucket::Read(bytes) => Ok(bytes),
        }
    }
}

/// Replaces each gradient of a bucket by its mean over the ranks.
fn reduce_bucket(gpu: &Gpu, comm: &mut Comm, bytes: Vec<Vec<u8>>, grads: &[Tensor]) -> Result<()> {
    if grads.is_empty() {
        return Ok(());
    }
    let mut all: Vec<f32> = bytes.iter().flat_map(|b| bytemuck::pod_collect_to_vec::<u8, f32>(b)).collect();
    comm.mean_f32(&mut all)?;
    let mut at = 0;
    for g in grads {
        g.write(gpu, &all[at..at + g.numel()])?;
        at += g.numel();
    }
    Ok(())
}
