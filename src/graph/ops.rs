//! The graph's node types and how each records its forward and backward dispatches.

use super::{Graph, LossSpec, Mode, Recompute, Role, Value, ValueId};
use crate::dist::DataParallel;
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu};
use crate::kernels::batch_norm::{self, BatchNormGrads, BatchNormParams, BnClass};
use crate::kernels::conv2d::{self, Conv2dSpec, Precision};
use crate::kernels::dropout::{Dropout2d, SeededDispatch};
use crate::kernels::loss::{CrossEntropy, LossClass, LossPass};
use crate::kernels::matmul::Matmul;
use crate::kernels::ocr::{self, AttentionGrads};
use crate::kernels::softmax::{self, Axis};
use crate::kernels::sums::{self, Summing};
use crate::kernels::tuning::{self, ConvForward, ConvInputGrad, ConvWeightGrad};
use crate::kernels::{concat, elementwise, metrics, resize};
use crate::tensor::Tensor;
use std::collections::{HashMap, HashSet};

#[derive(Clone)]
pub(super) enum Op {
    Conv2d {
        spec: Conv2dSpec,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        y: ValueId,
    },
    /// Inference only: a convolution with its batch norm (gamma, beta, mean, var) folded
    /// in, then an optional residual add and ReLU (see `fuse.rs`).
    ConvFused {
        spec: Conv2dSpec,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        bn: [ValueId; 4],
        residual: Option<ValueId>,
        relu: bool,
        y: ValueId,
    },
    BatchNorm {
        x: ValueId,
        gamma: ValueId,
        beta: ValueId,
        mean: ValueId,
        var: ValueId,
        y: ValueId,
    },
    Relu {
        x: ValueId,
        y: ValueId,
    },
    Add {
        a: ValueId,
        b: ValueId,
        y: ValueId,
    },
    AddRelu {
        a: ValueId,
        b: ValueId,
        y: ValueId,
    },
    /// Eval only: the first class of highest score per pixel, `[N, H, W]` u32.
    Argmax {
        x: ValueId,
        y: ValueId,
    },
    Resize {
        x: ValueId,
        y: ValueId,
        align_corners: bool,
    },
    Concat {
        inputs: Vec<ValueId>,
        y: ValueId,
        align_corners: bool,
    },
    SpatialGather {
        regions: ValueId,
        feats: ValueId,
        probs: ValueId,
        y: ValueId,
    },
    /// OCR's pixel-region attention, or a self-attention (keys and values at every pixel):
    /// the similarity scaled by `scale` (`None`: `KEY^-0.5`).
    ObjectAttention {
        query: ValueId,
        key: ValueId,
        value: ValueId,
        scale: Option<f32>,
        sim: ValueId,
        y: ValueId,
    },
    AdaptiveAvgPool {
        x: ValueId,
        y: ValueId,
    },
    /// Per image, `y = op(a) @ op(b)`, each operand `[N, C, H, W]` read as the `C x HW`
    /// matrix (transposed where its flag says).
    Product {
        a: (ValueId, bool),
        b: (ValueId, bool),
        y: ValueId,
    },
    Softmax {
        x: ValueId,
        y: ValueId,
        axis: SoftmaxAxis,
        scale: f32,
    },
    /// `y = gamma * a + b`, `gamma` a learnt scalar.
    ScaledAdd {
        a: ValueId,
        gamma: ValueId,
        b: ValueId,
        y: ValueId,
    },
    Dropout {
        x: ValueId,
        y: ValueId,
        layer: Dropout2d,
    },
    Loss {
        logits: ValueId,
        labels: ValueId,
        spec: LossSpec,
    },
}

impl Op {
    /// The values a node reads (and may pass gradients to), and the one it writes.
    pub(super) fn io(&self) -> (Vec<ValueId>, Option<ValueId>) {
        match self {
            Op::Conv2d { x, weight, bias, y, .. } => {
                ([Some(*x), Some(*weight), *bias].into_iter().flatten().collect(), Some(*y))
            }
            Op::ConvFused { x, weight, bias, bn, residual, y, .. } => {
                let ins = [Some(*x), Some(*weight), *bias, Some(bn[0]), Some(bn[1]), *residual];
                (ins.into_iter().flatten().collect(), Some(*y))
            }
            Op::BatchNorm { x, gamma, beta, y, .. } => (vec![*x, *gamma, *beta], Some(*y)),
            Op::Relu { x, y } | Op::Argmax { x, y } | Op::Resize { x, y, .. } | Op::Dropout { x, y, .. } => {
                (vec![*x], Some(*y))
            }
            Op::Add { a, b, y } | Op::AddRelu { a, b, y } => (vec![*a, *b], Some(*y)),
            Op::Concat { inputs, y, .. } => (inputs.clone(), Some(*y)),
            Op::SpatialGather { regions, feats, y, .. } => (vec![*regions, *feats], Some(*y)),
            Op::ObjectAttention { query, key, value, y, .. } => (vec![*query, *key, *value], Some(*y)),
            Op::AdaptiveAvgPool { x, y } | Op::Softmax { x, y, .. } => (vec![*x], Some(*y)),
            Op::Product { a, b, y } => (vec![a.0, b.0], Some(*y)),
            Op::ScaledAdd { a, gamma, b, y } => (vec![*a, *gamma, *b], Some(*y)),
            Op::Loss { logits, labels, .. } => (vec![*logits, *labels], None),
        }
    }

    /// Every value a node writes: its output and what it keeps for the backward.
    pub(super) fn writes(&self) -> Vec<ValueId> {
        match self {
            Op::SpatialGather { probs, y, .. } => vec![*probs, *y],
            Op::ObjectAttention { sim, y, .. } => vec![*sim, *y],
            op => op.io().1.into_iter().collect(),
        }
    }

    /// Every value a node reads.
    pub(super) fn reads(&self) -> Vec<ValueId> {
        self.io().0
    }

    /// The values whose data the node's backward reads (besides its output's gradient and
    /// the parameters): what a training step must keep from the forward pass.
    pub(super) fn backward_reads(&self) -> Vec<ValueId> {
        match self {
            Op::Conv2d { x, .. } | Op::BatchNorm { x, .. } => vec![*x],
            Op::Relu { y, .. } | Op::AddRelu { y, .. } => vec![*y],
            Op::SpatialGather { feats, probs, .. } => vec![*feats, *probs],
            Op::ObjectAttention { query, key, value, sim, .. } => vec![*query, *key, *value, *sim],
            Op::Product { a, b, .. } => vec![a.0, b.0],
            Op::Softmax { y, .. } => vec![*y],
            Op::ScaledAdd { a, .. } => vec![*a],
            Op::Loss { logits, labels, .. } => vec![*logits, *labels],
            // Shapes only; the dropout mask comes back from its seed.
            Op::Add { .. } | Op::Resize { .. } | Op::Concat { .. } | Op::Dropout { .. } => Vec::new(),
            Op::AdaptiveAvgPool { .. } => Vec::new(),
            Op::ConvFused { .. } | Op::Argmax { .. } => Vec::new(),
        }
    }

    /// The values the node's backward writes a gradient to (`needs`: which values need
    /// one); a value that needs none still gets the writes of kernels that compute it
    /// anyway, into a discarded buffer.
    fn grad_targets(&self, needs: &[bool]) -> Vec<ValueId> {
        let needed = |vs: &[ValueId]| vs.iter().copied().filter(|v| needs[v.0]).collect::<Vec<_>>();
        match self {
            Op::Conv2d { x, weight, bias, .. } => {
                [needed(&[*x]), vec![*weight], bias.iter().copied().collect()].concat()
            }
            Op::Relu { x, .. }
            | Op::Resize { x, .. }
            | Op::AdaptiveAvgPool { x, .. }
            | Op::Softmax { x, .. } => needed(&[*x]),
            Op::Product { a, b, .. } => needed(&[a.0, b.0]),
            Op::Concat { inputs, .. } => needed(inputs),
            Op::Loss { logits, .. } => vec![*logits],
            Op::ConvFused { .. } | Op::Argmax { .. } => Vec::new(),
            op => op.reads(),
        }
    }
}

impl Op {
    /// Multiply-adds of the node's products (convolutions and matrix products; what
    /// PyTorch's FlopCounterMode counts, at two FLOPs each) in its forward pass.
    pub(super) fn forward_macs(&self, values: &[Value]) -> u64 {
        let numel = |v: ValueId| values[v.0].shape.iter().product::<usize>() as u64;
        let dim = |v: ValueId, i: usize| values[v.0].shape[i] as u64;
        match *self {
            Op::Conv2d { weight, y, .. } | Op::ConvFused { weight, y, .. } => {
                numel(y) * (numel(weight) / dim(weight, 0))
            }
            // Per image: the context `C x K` over the pixels.
            Op::SpatialGather { regions, y, .. } => {
                numel(y) * (numel(regions) / dim(regions, 0) / dim(regions, 1))
            }
            // The similarities `HW x K` over the key channels, the output `CV x HW` over the keys.
            Op::ObjectAttention { query, sim, y, .. } => numel(sim) * dim(query, 1) + numel(y) * dim(sim, 2),
            Op::Product { a, b, .. } => {
                let mm = product_of(values, a, b);
                (mm.batch * mm.m * mm.k * mm.n) as u64
            }
            _ => 0,
        }
    }

    /// Multiply-adds of the products the node's backward runs, `needs` saying which values
    /// get a gradient: a convolution's weight gradient and, where its input needs one, its
    /// input gradient; a matrix product's operands that need one; the OCR operators run
    /// every product of their backward (twice the forward's).
    pub(super) fn backward_macs(&self, values: &[Value], needs: &[bool]) -> u64 {
        let forward = self.forward_macs(values);
        match *self {
            Op::Conv2d { x, .. } => forward * (1 + u64::from(needs[x.0])),
            Op::SpatialGather { .. } | Op::ObjectAttention { .. } => 2 * forward,
            Op::Product { a, b, .. } => forward * (u64::from(needs[a.0 .0]) + u64::from(needs[b.0 .0])),
            _ => 0,
        }
    }
}

/// The values a training graph rebuilds in the backward under `mode` instead of keeping them
/// from the forward, each with the node that rebuilds it:
/// - each ReLU output whose input a batch norm made, from that batch norm (its input and
///   saved batch statistics);
/// - with [`Recompute::Convolutions`], each convolution output a batch norm reads, by
///   running the convolution again from its input (kept, or itself rebuilt first).
pub(super) fn rebuilt_values(ops: &[Op], mode: Recompute) -> HashMap<ValueId, usize> {
    let made_by: HashMap<ValueId, usize> =
        ops.iter().enumerate().filter_map(|(at, op)| op.io().1.map(|y| (y, at))).collect();
    // The node that made `v`, if `is` it.
    let maker = |v: &ValueId, is: fn(&Op) -> bool| made_by.get(v).copied().filter(|&at| is(&ops[at]));
    ops.iter()
        .filter_map(|op| match (op, mode) {
            (_, Recompute::Nothing) => None,
            (Op::Relu { x, y }, _) => maker(x, |op| matches!(op, Op::BatchNorm { .. })).map(|at| (*y, at)),
            (Op::BatchNorm { x, .. }, Recompute::Convolutions) => {
                maker(x, |op| matches!(op, Op::Conv2d { .. })).map(|at| (*x, at))
            }
            _ => None,
        })
        .collect()
}

/// One step of a training graph's backward pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum BackwardStep {
    /// The backward of the node at this place of the op list, with the values it writes a
    /// gradient to.
    Node(usize, Vec<ValueId>),
    /// A value rebuilt (see [`rebuilt_values`]), just before its first reader.
    Rebuild(ValueId),
}

/// A training graph's backward, derived from its nodes once and shared by the memory plan,
/// the allocation and the recording, so they cannot disagree.
pub(super) struct Backward {
    /// Which values need a gradient: parameters, inputs that ask for one, and every
    /// activation computed from one of those.
    pub needs: Vec<bool>,
    /// Whether a value's gradient already holds a contribution when the pass starts:
    /// parameters' accumulate across passes; without loss nodes the caller gives the outputs'.
    pub written_at_start: Vec<bool>,
    /// The nodes whose backward runs, last node first, each with the values it writes a
    /// gradient to (a node runs when its output got a gradient, or it is a loss); before
    /// each, the rebuilds of what it reads that is rebuilt and not yet there.
    pub schedule: Vec<BackwardStep>,
    /// The values rebuilt in the backward, each with the node that rebuilds it.
    pub rebuilt: HashMap<ValueId, usize>,
}

impl Backward {
    pub(super) fn of(values: &[Value], ops: &[Op], outputs: &[ValueId], mode: Recompute) -> Self {
        let mut needs: Vec<bool> = values
            .iter()
            .map(|v| matches!(v.role, Role::Param | Role::Input { requires_grad: true }))
            .collect();
        for op in ops {
            if let (ins, Some(y)) = op.io() {
                needs[y.0] = ins.iter().any(|v| needs[v.0]);
            }
        }
        let mut written_at_start: Vec<bool> = values.iter().map(|v| v.role == Role::Param).collect();
        if !ops.iter().any(|op| matches!(op, Op::Loss { .. })) {
            for o in outputs {
                written_at_start[o.0] = true;
            }
        }
        let rebuilt = rebuilt_values(ops, mode);
        let mut written = written_at_start.clone();
        let mut schedule = Vec::new();
        let mut there = HashSet::new();
        for (at, op) in ops.iter().enumerate().rev() {
            if let (_, Some(y)) = op.io() {
                if !written[y.0] {
                    continue;
                }
            }
            for v in op.backward_reads() {
                rebuild(v, ops, &rebuilt, &mut there, &mut schedule);
            }
            let targets = op.grad_targets(&needs);
            for v in &targets {
                written[v.0] = true;
            }
            schedule.push(BackwardStep::Node(at, targets));
        }
        Backward { needs, written_at_start, schedule, rebuilt }
    }
}

/// Schedules the rebuild of `v` if it is rebuilt and not `there` yet, after those of the
/// rebuilt values its rebuilding node reads.
fn rebuild(
    v: ValueId,
    ops: &[Op],
    rebuilt: &HashMap<ValueId, usize>,
    there: &mut HashSet<ValueId>,
    schedule: &mut Vec<BackwardStep>,
) {
    let Some(&node) = rebuilt.get(&v) else { return };
    if !there.insert(v) {
        return;
    }
    for input in ops[node].reads() {
        rebuild(input, ops, rebuilt, there, schedule);
    }
    schedule.push(BackwardStep::Rebuild(v));
}

/// Where a node's forward dispatches sit, and its values.
pub(super) struct NodeRecord {
    pub dispatches: std::ops::Range<usize>,
    pub reads: Vec<ValueId>,
    pub writes: Vec<ValueId>,
}

/// Everything recorded at build time.
#[derive(Default)]
pub(super) struct Recorded {
    /// Eval graphs only: each convolution's weight packing, which depends on the weights
    /// alone and runs before the first forward after they change (see `Graph::forward`).
    pub prepare: Vec<Dispatch>,
    pub forward: Vec<Dispatch>,
    pub backward: Vec<Dispatch>,
    pub losses: Vec<RecordedLoss>,
    /// The dropout launches, reseeded each step.
    pub dropouts: Vec<SeededDispatch>,
    /// Batch statistics a training forward keeps for the backward, by the node's output.
    saved: HashMap<ValueId, Tensor>,
    /// Each loss node's recorded pass, by the node's place in the op list.
    loss_passes: HashMap<usize, LossPass>,
    /// Each node's forward dispatches (a range of `forward`) with what it reads and writes,
    /// for the checked forward.
    pub nodes: Vec<NodeRecord>,
    /// Data-parallel training: where the ranks meet in the forward and in the backward, in
    /// order.
    pub forward_syncs: Vec<SyncPoint>,
    pub backward_syncs: Vec<SyncPoint>,
}

/// Which pass a meeting point belongs to.
#[derive(Clone, Copy)]
enum Pass {
    Forward,
    Backward,
}

/// A point of a pass where data-parallel ranks meet, after its first `at` dispatches: a
/// synchronized batch norm's exchange, and the parameter gradients complete by then that
/// go to the ranks' all-reduce (a bucket; empty while too few bytes are ready).
pub(super) struct SyncPoint {
    pub at: usize,
    pub exchange: Option<batch_norm::Exchange>,
    pub bucket: Vec<Tensor>,
}

/// A loss term of the graph: its name, the one-element tensor its value lands in, and its
/// weight in the total.
pub(super) struct RecordedLoss {
    pub name: &'static str,
    pub value: Tensor,
    pub weight: f32,
}

impl Graph {
    fn cross_entropy(&self, spec: &LossSpec) -> CrossEntropy<'_> {
        let class_weight = spec.class_weight.map(|v| self.t(v));
        CrossEntropy { ignore_label: spec.ignore_label, class_weight, reduction: spec.reduction }
    }

    fn bn_params(&self, op: &Op) -> BatchNormParams<'_> {
        let Op::BatchNorm { gamma, beta, mean, var, .. } = *op else {
            unreachable!("bn_params is only called for batch-norm nodes")
        };
        self.bn_of([gamma, beta, mean, var])
    }

    /// A batch norm's parameters from its (gamma, beta, running mean, running var) values.
    fn bn_of(&self, [gamma, beta, mean, var]: [ValueId; 4]) -> BatchNormParams<'_> {
        BatchNormParams {
            gamma: self.t(gamma),
            beta: self.t(beta),
            running_mean: self.t(mean),
            running_var: self.t(var),
            eps: batch_norm::EPS,
            momentum: batch_norm::MOMENTUM,
        }
    }

    /// How a training batch norm over `x` sums its channel sums (both passes).
    fn bn_summing(&self, gpu: &Gpu, x: &Tensor) -> Result<Summing> {
        Ok(sums::choose(self.tuner.as_deref(), gpu, &BnClass::of(x)?))
    }

    /// A convolution forward at the graph's weight precision. An eval graph keeps the
    /// weight packing apart (it runs only after the weights change); a training graph packs
    /// in every forward, since every step changes the weights.
    fn conv_forward(
        &self,
        gpu: &Gpu,
        spec: &Conv2dSpec,
        [x, weight, y]: [&Tensor; 3],
        epilogue: &conv2d::Epilogue,
    ) -> Result<conv2d::ForwardDispatches> {
        let class = conv2d::class(spec, x.shape(), weight.shape(), self.precision)?;
        let variant = tuning::choose::<ConvForward>(self.tuner.as_deref(), gpu, &class);
        conv2d::forward_with(gpu, spec, x, weight, epilogue, self.precision, variant, y)
    }

    /// The forward's share of a convolution's launches (see [`Recorded::prepare`]).
    fn keep_packing_apart(&mut self, d: conv2d::ForwardDispatches, mode: Mode) -> Vec<Dispatch> {
        match mode {
            Mode::Eval => {
                let (packs, convs): (Vec<_>, Vec<_>) = d.pairs.into_iter().unzip();
                self.recorded.prepare.extend(packs);
                convs
            }
            Mode::Train => d.into_vec(),
        }
    }

    pub(super) fn record_forward(&mut self, gpu: &Gpu, ops: &[Op], mode: Mode) -> Result<()> {
        for (at, op) in ops.iter().enumerate() {
            let mut d = match op {
                &Op::Conv2d { spec, x, weight, bias, y } => {
                    let epilogue = conv2d::Epilogue { bias: bias.map(|b| self.t(b)), ..Default::default() };
                    let d =
                        self.conv_forward(gpu, &spec, [self.t(x), self.t(weight), self.t(y)], &epilogue)?;
                    self.keep_packing_apart(d, mode)
                }
                &Op::ConvFused { spec, x, weight, bias, bn, residual, relu, y } => {
                    let epilogue = conv2d::Epilogue {
                        bias: bias.map(|b| self.t(b)),
                        batch_norm: Some(self.bn_of(bn)),
                        residual: residual.map(|r| self.t(r)),
                        relu,
                    };
                    let d =
                        self.conv_forward(gpu, &spec, [self.t(x), self.t(weight), self.t(y)], &epilogue)?;
                    self.keep_packing_apart(d, mode)
                }
                &Op::BatchNorm { x, y, .. } => {
                    let bn = self.bn_params(op);
                    match mode {
                        Mode::Eval => batch_norm::forward_eval(gpu, self.t(x), &bn, self.t(y))?,
                        Mode::Train => {
                            let saved = Tensor::empty(gpu, &batch_norm::saved_shape(self.t(x).shape()[1]))?;
                            let summing = self.bn_summing(gpu, self.t(x))?;
                            let pass = batch_norm::forward_train_synced(
                                gpu,
                                self.t(x),
                                &bn,
                                (&saved, self.t(y)),
                                summing,
                                self.batch_norm_ranks(),
                            )?;
                            self.recorded.saved.insert(y, saved);
                            let start = self.recorded.forward.len();
                            self.synchronized(pass, start, Pass::Forward)
                        }
                    }
                }
                &Op::Relu { x, y } => elementwise::relu_forward(gpu, self.t(x), self.t(y))?,
                &Op::Argmax { x, y } => metrics::argmax(gpu, self.t(x), self.t(y))?,
                &Op::Add { a, b, y } => elementwise::add_forward(gpu, self.t(a), self.t(b), self.t(y))?,
                &Op::AddRelu { a, b, y } => {
                    elementwise::add_relu_forward(gpu, self.t(a), self.t(b), self.t(y))?
                }
                &Op::Resize { x, y, align_corners } => {
                    resize::forward(gpu, self.t(x), self.t(y), 0, align_corners)?
                }
                Op::Concat { inputs, y, align_corners } => {
                    let mut d = Vec::new();
                    let mut offset = 0;
                    for &x in inputs {
                        let (xt, yt) = (self.t(x), self.t(*y));
                        let c = xt.shape()[1];
                        d.extend(if xt.shape()[2..] == yt.shape()[2..] {
                            concat::copy_channels(gpu, (xt, 0), (yt, offset), c, false)?
                        } else {
                            resize::forward(gpu, xt, yt, offset, *align_corners)?
                        });
                        offset += c;
                    }
                    d
                }
                &Op::SpatialGather { regions, feats, probs, y } => ocr::spatial_gather_forward(
                    gpu,
                    self.tuner.as_deref(),
                    self.t(regions),
                    self.t(feats),
                    self.t(probs),
                    self.t(y),
                )?,
                &Op::ObjectAttention { query, key, value, scale, sim, y } => ocr::attention_forward(
                    gpu,
                    self.tuner.as_deref(),
                    scale,
                    (self.t(query), self.t(key), self.t(value)),
                    self.t(sim),
                    self.t(y),
                )?,
                &Op::AdaptiveAvgPool { x, y } => resize::adaptive_avg_pool(gpu, self.t(x), self.t(y), 0)?,
                &Op::Product { a, b, y } => {
                    let mm = product_of(&self.values, a, b);
                    mm.forward(gpu, self.tuner.as_deref(), self.t(a.0), self.t(b.0), self.t(y))?
                }
                &Op::Softmax { x, y, axis, scale } => {
                    let axis = axis.of(&self.values[x.0].shape);
                    let summing = softmax::summing(self.tuner.as_deref(), gpu, &axis);
                    softmax::forward_with(gpu, self.t(x), axis, scale, self.t(y), summing)?
                }
                &Op::ScaledAdd { a, gamma, b, y } => {
                    elementwise::scaled_add_forward(gpu, self.t(a), self.t(gamma), self.t(b), self.t(y))?
                }
                // In eval, dropout is the identity: a copy (of f16 activations too).
                &Op::Dropout { x, y, .. } if mode == Mode::Eval => {
                    let channels = self.t(x).dims4("dropout input")?[1];
                    concat::copy_channels(gpu, (self.t(x), 0), (self.t(y), 0), channels, false)?
                }
                &Op::Dropout { x, y, layer } => {
                    let seeded = self.placed(layer, x).forward(gpu, self.t(x), self.t(y), self.seed)?;
                    self.recorded.dropouts.extend(seeded.iter().cloned());
                    seeded.into_iter().map(|s| s.dispatch).collect()
                }
                &Op::Loss { logits, labels, spec } => {
                    let summing = sums::choose(self.tuner.as_deref(), gpu, &LossClass::of(self.t(logits))?);
                    let mut pass = self.cross_entropy(&spec).forward_with(
                        gpu,
                        self.t(logits),
                        self.t(labels),
                        summing,
                    )?;
                    let d = std::mem::take(&mut pass.forward);
                    let (name, weight) = (spec.name, spec.weight);
                    self.recorded.losses.push(RecordedLoss { name, value: pass.loss.clone(), weight });
                    self.recorded.loss_passes.insert(at, pass);
                    d
                }
            };
            let start = self.recorded.forward.len();
            self.recorded.forward.append(&mut d);
            let dispatches = start..self.recorded.forward.len();
            self.recorded.nodes.push(NodeRecord { dispatches, reads: op.reads(), writes: op.writes() });
        }
        Ok(())
    }

    /// Records the backward pass by `backward`'s schedule into the gradient tensors
    /// allocated with the graph.
    pub(super) fn record_backward(&mut self, gpu: &Gpu, ops: &[Op], backward: &Backward) -> Result<()> {
        let grads = std::mem::take(&mut self.grads);
        let written = backward.written_at_start.clone();
        let mut targets = Targets { needs: &backward.needs, written, discard: HashMap::new() };
        let mut buckets = Buckets::new(&self.values, ops, &grads, self.parallel);
        for step in &backward.schedule {
            let mut d = match step {
                BackwardStep::Rebuild(v) => self.rebuild(gpu, ops, *v)?,
                BackwardStep::Node(at, _) => {
                    let op = &ops[*at];
                    let gy = op.io().1.and_then(|y| grads[y.0].clone());
                    self.backward_of(gpu, (*at, op), gy, &grads, &mut targets)?
                }
            };
            let start = self.recorded.backward.len();
            self.recorded.backward.append(&mut d);
            if let (BackwardStep::Node(at, _), true) = (step, self.parallel.ranks > 1) {
                let span = (start, self.recorded.backward.len());
                buckets.node_done(&ops[*at], span, &mut self.recorded.backward_syncs);
            }
        }
        if self.parallel.ranks > 1 {
            buckets.finish(self.recorded.backward.len(), &mut self.recorded.backward_syncs);
        }
        self.grads = grads;
        Ok(())
    }

    /// Rebuilds `v` into its backward buffer from the node that made it (or, for a BN-ReLU
    /// output, the batch norm before the ReLU), as the forward computed it: the same
    /// kernels on the same inputs, so the same bits.
    fn rebuild(&self, gpu: &Gpu, ops: &[Op], v: ValueId) -> Result<Vec<Dispatch>> {
        let (node, into) = &self.recomputed[&v];
        match ops[*node] {
            Op::BatchNorm { x, y, .. } => batch_norm::normalize_relu_train(
                gpu,
                self.kept(x),
                &self.bn_params(&ops[*node]),
                &self.recorded.saved[&y],
                into,
            ),
            Op::Conv2d { spec, x, weight, bias, .. } => {
                let epilogue = conv2d::Epilogue { bias: bias.map(|b| self.t(b)), ..Default::default() };
                Ok(self.conv_forward(gpu, &spec, [self.kept(x), self.t(weight), into], &epilogue)?.into_vec())
            }
            _ => Err(Error::Invalid(format!(
                "{} is rebuilt from a node that is neither a batch norm nor a convolution",
                self.values[v.0].name
            ))),
        }
    }

    /// The ranks whose samples a batch norm's statistics cover: all, when synchronized;
    /// else this one alone.
    fn batch_norm_ranks(&self) -> usize {
        if self.parallel.synchronizes_batch_norm() {
            self.parallel.ranks
        } else {
            1
        }
    }

    /// A batch norm pass's dispatches, its exchange kept as a meeting point of the ranks
    /// when they synchronize batch norm (`start`: where the pass begins in its list).
    fn synchronized(&mut self, pass: batch_norm::SyncedPass, start: usize, which: Pass) -> Vec<Dispatch> {
        if self.parallel.synchronizes_batch_norm() {
            let point =
                SyncPoint { at: start + pass.exchange_at, exchange: Some(pass.exchange), bucket: Vec::new() };
            match which {
                Pass::Forward => self.recorded.forward_syncs.push(point),
                Pass::Backward => self.recorded.backward_syncs.push(point),
            }
        }
        pass.dispatches
    }

    /// A dropout layer placed at this rank's slice of the global batch, so each image's
    /// mask is the one it has on a single device.
    fn placed(&self, layer: Dropout2d, x: ValueId) -> Dropout2d {
        Dropout2d { first_image: self.parallel.rank * self.values[x.0].shape[0], ..layer }
    }

    /// What the backward reads of value `v`: its forward tensor, or where it was recomputed.
    fn kept(&self, v: ValueId) -> &Tensor {
        self.recomputed.get(&v).map_or_else(|| self.t(v), |(_, t)| t)
    }

    /// The backward dispatches of the op at place `at` of the op list.
    fn backward_of(
        &mut self,
        gpu: &Gpu,
        (at, op): (usize, &Op),
        gy: Option<Tensor>,
        grads: &[Option<Tensor>],
        tg: &mut Targets<'_>,
    ) -> Result<Vec<Dispatch>> {
        let mut target = |v: ValueId| tg.target(gpu, v, &grads[v.0], &self.values[v.0].shape);
        let gy = || gy.clone().expect("nodes with an output have its gradient");
        Ok(match op {
            Op::ConvFused { .. } => {
                return Err(Error::Invalid(
                    "fused convolutions exist only in eval graphs, which have no backward".into(),
                ))
            }
            Op::Argmax { .. } => {
                return Err(Error::Invalid("argmax has no gradient: it belongs in eval graphs".into()))
            }
            &Op::Conv2d { spec, x, weight, bias, .. } => {
                let gy = gy();
                let (xt, wt) = (self.kept(x), self.t(weight));
                let class = conv2d::class(&spec, xt.shape(), wt.shape(), Precision::F32)?;
                let tuner = self.tuner.as_deref();
                let mut d = Vec::new();
                if tg_needs(grads, x) {
                    let (gx, acc) = target(x)?;
                    let variant = tuning::choose::<ConvInputGrad>(tuner, gpu, &class);
                    d.extend(conv2d::backward_input_with(gpu, &spec, &gy, wt, &gx, acc, variant)?);
                }
                let (gw, acc) = target(weight)?;
                let variant = tuning::choose::<ConvWeightGrad>(tuner, gpu, &class);
                d.extend(conv2d::backward_weight_with(gpu, &spec, xt, &gy, &gw, acc, variant)?);
                if let Some(b) = bias {
                    let (gb, acc) = target(b)?;
                    d.extend(conv2d::backward_bias(gpu, &gy, &gb, acc)?);
                }
                d
            }
            &Op::BatchNorm { x, gamma, beta, y, .. } => {
                let (gx, accumulate_x) = target(x)?;
                let (grad_gamma, accumulate_params) = target(gamma)?;
                let (grad_beta, _) = target(beta)?;
                let g = BatchNormGrads {
                    grad_x: &gx,
                    grad_gamma: &grad_gamma,
                    grad_beta: &grad_beta,
                    accumulate_x,
                    accumulate_params,
                };
                let pass = batch_norm::backward_synced(
                    gpu,
                    self.kept(x),
                    &self.bn_params(op),
                    &self.recorded.saved[&y],
                    &gy(),
                    &g,
                    self.bn_summing(gpu, self.kept(x))?,
                    self.batch_norm_ranks(),
                )?;
                let start = self.recorded.backward.len();
                self.synchronized(pass, start, Pass::Backward)
            }
            &Op::Relu { x, y } => {
                if !tg_needs(grads, x) {
                    return Ok(Vec::new());
                }
                let (gx, acc) = target(x)?;
                elementwise::relu_backward(gpu, self.kept(y), &gy(), &gx, acc)?
            }
            &Op::Add { a, b, .. } => {
                let (ga, gb) = (target(a)?, target(b)?);
                elementwise::add_backward(gpu, &gy(), (&ga.0, ga.1), (&gb.0, gb.1))?
            }
            &Op::AddRelu { a, b, y } => {
                let (ga, gb) = (target(a)?, target(b)?);
                elementwise::add_relu_backward(gpu, self.kept(y), &gy(), (&ga.0, ga.1), (&gb.0, gb.1))?
            }
            &Op::Resize { x, align_corners, .. } => {
                if !tg_needs(grads, x) {
                    return Ok(Vec::new());
                }
                let (gx, acc) = target(x)?;
                resize::backward(gpu, &gy(), 0, &gx, align_corners, acc)?
            }
            Op::Concat { inputs, y, align_corners } => {
                let gy = gy();
                let mut d = Vec::new();
                let mut offset = 0;
                for &x in inputs {
                    let c = self.t(x).shape()[1];
                    if tg_needs(grads, x) {
                        let (gx, acc) = target(x)?;
                        d.extend(if self.t(x).shape()[2..] == self.t(*y).shape()[2..] {
                            concat::copy_channels(gpu, (&gy, offset), (&gx, 0), c, acc)?
                        } else {
                            resize::backward(gpu, &gy, offset, &gx, *align_corners, acc)?
                        });
                    }
                    offset += c;
                }
                d
            }
            &Op::SpatialGather { regions, feats, probs, .. } => {
                let (gr, gf) = (target(regions)?, target(feats)?);
                ocr::spatial_gather_backward(
                    gpu,
                    self.tuner.as_deref(),
                    self.kept(feats),
                    self.kept(probs),
                    &gy(),
                    (&gr.0, gr.1),
                    (&gf.0, gf.1),
                )?
            }
            &Op::ObjectAttention { query, key, value, scale, sim, .. } => {
                let (gq, gk, gv) = (target(query)?, target(key)?, target(value)?);
                let g = AttentionGrads { query: (&gq.0, gq.1), key: (&gk.0, gk.1), value: (&gv.0, gv.1) };
                let inputs = (self.kept(query), self.kept(key), self.kept(value));
                let (sim, tuner) = (self.kept(sim), self.tuner.as_deref());
                ocr::attention_backward(gpu, tuner, scale, inputs, sim, &gy(), &g)?
            }
            &Op::AdaptiveAvgPool { x, .. } => {
                if !tg_needs(grads, x) {
                    return Ok(Vec::new());
                }
                let (gx, acc) = target(x)?;
                resize::adaptive_avg_pool_backward(gpu, &gy(), 0, &gx, acc)?
            }
            &Op::Product { a, b, .. } => {
                let (mm, tuner, gy) = (product_of(&self.values, a, b), self.tuner.as_deref(), gy());
                let mut d = Vec::new();
                if tg_needs(grads, a.0) {
                    let (ga, acc) = target(a.0)?;
                    d.extend(mm.backward_a(gpu, tuner, &gy, self.kept(b.0), &ga, acc)?);
                }
                if tg_needs(grads, b.0) {
                    let (gb, acc) = target(b.0)?;
                    d.extend(mm.backward_b(gpu, tuner, self.kept(a.0), &gy, &gb, acc)?);
                }
                d
            }
            &Op::Softmax { x, y, axis, scale } => {
                if !tg_needs(grads, x) {
                    return Ok(Vec::new());
                }
                let (gx, acc) = target(x)?;
                let axis = axis.of(&self.values[x.0].shape);
                let summing = softmax::summing(self.tuner.as_deref(), gpu, &axis);
                softmax::backward_with(gpu, self.kept(y), &gy(), axis, scale, (&gx, acc), summing)?
            }
            &Op::ScaledAdd { a, gamma, b, .. } => {
                let (ga, gg, gb) = (target(a)?, target(gamma)?, target(b)?);
                let inputs = (self.kept(a), self.t(gamma));
                elementwise::scaled_add_backward(
                    gpu,
                    inputs,
                    &gy(),
                    (&ga.0, ga.1),
                    (&gb.0, gb.1),
                    (&gg.0, gg.1),
                )?
            }
            &Op::Dropout { x, layer, .. } => {
                let (gx, accumulate) = target(x)?;
                let layer = self.placed(layer, x);
                let seeded = layer.backward(gpu, &gy(), &gx, self.seed, accumulate)?;
                self.recorded.dropouts.extend(seeded.iter().cloned());
                seeded.into_iter().map(|s| s.dispatch).collect()
            }
            &Op::Loss { logits, labels, spec } => {
                let (gl, acc) = target(logits)?;
                let pass =
                    self.recorded.loss_passes.get(&at).ok_or_else(|| {
                        Error::Invalid(format!("loss node {at} has no recorded forward pass"))
                    })?;
                let ce = self.cross_entropy(&spec);
                ce.backward(gpu, pass, self.kept(logits), self.kept(labels), spec.weight, (&gl, acc))?
            }
        })
    }
}

/// Which axis of a value `[N, C, H, W]` a softmax node normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxAxis {
    /// Over the channels of each pixel.
    Channels,
    /// Over the pixels (`H x W`) of each channel.
    Pixels,
}

impl SoftmaxAxis {
    fn of(self, shape: &[usize]) -> Axis {
        let (n, c, hw) = (shape[0], shape[1], shape[2..].iter().product());
        match self {
            SoftmaxAxis::Channels => Axis { outer: n, len: c, inner: hw },
            SoftmaxAxis::Pixels => Axis { outer: n * c, len: hw, inner: 1 },
        }
    }
}

/// A product node's operands `[N, C, H, W]` read as each image's `C x HW` matrix
/// (transposed where its flag says): `N` products of `M x K` by `K x P`.
fn product_of(values: &[Value], (a, trans_a): (ValueId, bool), (b, trans_b): (ValueId, bool)) -> Matmul {
    let matrix = |v: ValueId| {
        let shape = &values[v.0].shape;
        (shape[1], shape[2..].iter().product::<usize>())
    };
    let ((ar, ac), (br, bc)) = (matrix(a), matrix(b));
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let n = if trans_b { br } else { bc };
    Matmul { batch: values[a.0].shape[0], m, k, n, trans_a, trans_b }
}

fn tg_needs(grads: &[Option<Tensor>], v: ValueId) -> bool {
    grads[v.0].is_some()
}

/// Where each backward kernel writes a value's gradient, and whether it accumulates.
/// Gradient buckets for the ranks' all-reduce, formed as the backward is recorded: a
/// parameter's gradient joins the open bucket once the last node reading the parameter has
/// its backward recorded, and the bucket closes once it holds `bucket_bytes` (as PyTorch's
/// DDP buckets): with synchronized batch norm, at the next batch norm's exchange (the step
/// stops there anyway); without, at a point of its own after the node. The rest close at the
/// end of the backward.
struct Buckets {
    /// Per value: nodes reading it whose backward is still to come (parameters only).
    readers_left: Vec<usize>,
    /// The parameters' gradients, by value.
    params: Vec<Option<Tensor>>,
    open: Vec<Tensor>,
    bytes: u64,
    bucket_bytes: u64,
    /// Whether the backward has batch-norm exchanges to close buckets at.
    at_exchanges: bool,
}

impl Buckets {
    fn new(values: &[Value], ops: &[Op], grads: &[Option<Tensor>], parallel: DataParallel) -> Self {
        let is_param = |v: ValueId| values[v.0].role == Role::Param;
        let mut readers_left = vec![0; values.len()];
        for v in ops.iter().flat_map(Op::reads).filter(|&v| is_param(v)) {
            readers_left[v.0] += 1;
        }
        let params =
            grads.iter().enumerate().map(|(v, g)| g.clone().filter(|_| is_param(ValueId(v)))).collect();
        Buckets {
            readers_left,
            params,
            open: Vec::new(),
            bytes: 0,
            bucket_bytes: parallel.bucket_bytes,
            at_exchanges: parallel.synchronizes_batch_norm(),
        }
    }

    /// `op`'s backward is recorded as dispatches `start..end` of the backward.
    fn node_done(&mut self, op: &Op, (start, end): (usize, usize), points: &mut Vec<SyncPoint>) {
        for v in op.reads() {
            if self.readers_left[v.0] == 0 {
                continue;
            }
            self.readers_left[v.0] -= 1;
            if let (0, Some(g)) = (self.readers_left[v.0], self.params[v.0].take()) {
                self.bytes += g.bytes();
                self.open.push(g);
            }
        }
        if self.bytes < self.bucket_bytes {
            return;
        }
        match points.last_mut() {
            // The node's own exchange: its weight and bias gradients are complete there.
            Some(p) if p.at >= start && p.exchange.is_some() => p.bucket = std::mem::take(&mut self.open),
            _ if self.at_exchanges => return,
            _ => points.push(SyncPoint { at: end, exchange: None, bucket: std::mem::take(&mut self.open) }),
        }
        self.bytes = 0;
    }

    /// The last bucket, at the end of the backward: every gradient not yet in one.
    fn finish(self, end: usize, points: &mut Vec<SyncPoint>) {
        let bucket = self.open.into_iter().chain(self.params.into_iter().flatten()).collect();
        points.push(SyncPoint { at: end, exchange: None, bucket });
    }
}

struct Targets<'a> {
    needs: &'a [bool],
    written: Vec<bool>,
    /// Gradients of values that need none still land somewhere in fused kernels.
    discard: HashMap<Vec<usize>, Tensor>,
}

impl Targets<'_> {
    fn target(
        &mut self,
        gpu: &Gpu,
        v: ValueId,
        grad: &Option<Tensor>,
        shape: &[usize],
    ) -> Result<(Tensor, bool)> {
        let acc = std::mem::replace(&mut self.written[v.0], true);
        match grad {
            Some(g) if self.needs[v.0] => Ok((g.clone(), acc)),
            _ => {
                if let Some(t) = self.discard.get(shape) {
                    return Ok((t.clone(), false));
                }
                let t = Tensor::empty(gpu, shape)?;
                self.discard.insert(shape.to_vec(), t.clone());
                Ok((t, false))
            }
        }
    }
}
