//! The executor, first form: a sequence of kernel nodes recorded once. A whole forward pass
//! is one command buffer, a whole backward pass another; nothing is read back in between.
//! The backward pass walks the nodes in reverse: a tensor read by several nodes gets the
//! sum of their gradients (the first writes, the rest accumulate), and parameter gradients
//! accumulate across backward passes until [`Graph::zero_grads`].

use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu};
use crate::kernels::batch_norm::{self, BatchNormGrads, BatchNormParams};
use crate::kernels::conv2d::{self, Conv2dSpec};
use crate::kernels::elementwise;
use crate::tensor::Tensor;
use std::collections::HashMap;

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
}

struct Value {
    name: String,
    shape: Vec<usize>,
    role: Role,
}

enum Op {
    Conv2d { spec: Conv2dSpec, x: ValueId, weight: ValueId, bias: Option<ValueId>, y: ValueId },
    BatchNorm { x: ValueId, gamma: ValueId, beta: ValueId, mean: ValueId, var: ValueId, y: ValueId },
    Relu { x: ValueId, y: ValueId },
    Add { a: ValueId, b: ValueId, y: ValueId },
    AddRelu { a: ValueId, b: ValueId, y: ValueId },
}

/// Whether batch norm uses batch statistics (and a backward pass is recorded) or the
/// running statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// Describes a graph: its inputs, parameters and nodes, with shapes checked as they are added.
#[derive(Default)]
pub struct GraphBuilder {
    values: Vec<Value>,
    ops: Vec<Op>,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    fn add_value(&mut self, name: String, shape: &[usize], role: Role) -> ValueId {
        self.values.push(Value { name, shape: shape.to_vec(), role });
        ValueId(self.values.len() - 1)
    }

    fn activation(&mut self, kind: &str, shape: &[usize]) -> ValueId {
        let name = format!("{kind}.{}", self.ops.len());
        self.add_value(name, shape, Role::Activation)
    }

    fn shape(&self, v: ValueId) -> &[usize] {
        &self.values[v.0].shape
    }

    /// A tensor the caller fills before each forward pass.
    pub fn input(&mut self, name: &str, shape: &[usize], requires_grad: bool) -> ValueId {
        self.add_value(name.to_string(), shape, Role::Input { requires_grad })
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
        let [_, ci, h, w] = dims4(&self.values[x.0])?;
        let [ho, wo] = spec.output_size(h, w, kernel[0], kernel[1])?;
        let n = self.shape(x)[0];
        let weight = self.param(&format!("{name}.weight"), &[out_channels, ci, kernel[0], kernel[1]]);
        let bias = bias.then(|| self.param(&format!("{name}.bias"), &[out_channels]));
        let y = self.activation(name, &[n, out_channels, ho, wo]);
        self.ops.push(Op::Conv2d { spec, x, weight, bias, y });
        Ok(y)
    }

    /// Batch norm with parameters `{name}.weight`, `{name}.bias` and running statistics
    /// `{name}.running_mean`, `{name}.running_var` (PyTorch's eps and momentum).
    pub fn batch_norm(&mut self, name: &str, x: ValueId) -> Result<ValueId> {
        let [_, c, _, _] = dims4(&self.values[x.0])?;
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
        crate::error::check_shape(&format!("{kind}: second operand"), self.shape(a), self.shape(b))?;
        if a == b {
            return Err(Error::Invalid(format!("{kind}: both operands are {}", self.values[a.0].name)));
        }
        let shape = self.shape(a).to_vec();
        Ok(self.activation(kind, &shape))
    }

    /// Allocates every tensor and records the forward (and, in training, backward) pass.
    pub fn build(self, gpu: &Gpu, mode: Mode, output: ValueId) -> Result<Graph> {
        let mut by_name = HashMap::new();
        for (i, v) in self.values.iter().enumerate() {
            if by_name.insert(v.name.clone(), ValueId(i)).is_some() {
                return Err(Error::Invalid(format!("two tensors of the graph are named {:?}", v.name)));
            }
        }
        let tensors = self.values.iter().map(|v| Tensor::empty(gpu, &v.shape)).collect::<Result<Vec<_>>>()?;
        let mut graph = Graph {
            values: self.values,
            tensors,
            grads: Vec::new(),
            saved: HashMap::new(),
            forward: Vec::new(),
            backward: Vec::new(),
            output,
            by_name,
        };
        graph.record_forward(gpu, &self.ops, mode)?;
        if mode == Mode::Train {
            graph.record_backward(gpu, &self.ops)?;
            graph.zero_grads(gpu);
        }
        Ok(graph)
    }
}

fn dims4(v: &Value) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(v.shape.as_slice()).map_err(|_| Error::Shape {
        what: v.name.clone(),
        expected: "[N, C, H, W]".into(),
        actual: format!("{:?}", v.shape),
    })
}

/// A recorded graph with its tensors.
pub struct Graph {
    values: Vec<Value>,
    tensors: Vec<Tensor>,
    /// Gradient of each value that has one (training only).
    grads: Vec<Option<Tensor>>,
    /// Batch statistics a training forward keeps for the backward, by the node's output.
    saved: HashMap<ValueId, Tensor>,
    forward: Vec<Dispatch>,
    backward: Vec<Dispatch>,
    output: ValueId,
    by_name: HashMap<String, ValueId>,
}

impl Graph {
    fn t(&self, v: ValueId) -> &Tensor {
        &self.tensors[v.0]
    }

    fn record_forward(&mut self, gpu: &Gpu, ops: &[Op], mode: Mode) -> Result<()> {
        for op in ops {
            let mut dispatches = match *op {
                Op::Conv2d { spec, x, weight, bias, y } => {
                    vec![conv2d::forward(
                        gpu,
                        &spec,
                        self.t(x),
                        self.t(weight),
                        bias.map(|b| self.t(b)),
                        self.t(y),
                    )?]
                }
                Op::BatchNorm { x, y, .. } => {
                    let bn = self.bn_params(op);
                    match mode {
                        Mode::Eval => {
                            vec![batch_norm::forward_eval(gpu, self.t(x), &bn, self.t(y))?]
                        }
                        Mode::Train => {
                            let saved = Tensor::empty(gpu, &batch_norm::saved_shape(self.t(x).shape()[1]))?;
                            let d = batch_norm::forward_train(gpu, self.t(x), &bn, &saved, self.t(y))?;
                            self.saved.insert(y, saved);
                            d
                        }
                    }
                }
                Op::Relu { x, y } => vec![elementwise::relu_forward(gpu, self.t(x), self.t(y))?],
                Op::Add { a, b, y } => vec![elementwise::add_forward(gpu, self.t(a), self.t(b), self.t(y))?],
                Op::AddRelu { a, b, y } => {
                    vec![elementwise::add_relu_forward(gpu, self.t(a), self.t(b), self.t(y))?]
                }
            };
            self.forward.append(&mut dispatches);
        }
        Ok(())
    }

    fn bn_params(&self, op: &Op) -> BatchNormParams<'_> {
        let Op::BatchNorm { gamma, beta, mean, var, .. } = *op else {
            unreachable!("bn_params is only called for batch-norm nodes")
        };
        BatchNormParams {
            gamma: self.t(gamma),
            beta: self.t(beta),
            running_mean: self.t(mean),
            running_var: self.t(var),
            eps: batch_norm::EPS,
            momentum: batch_norm::MOMENTUM,
        }
    }

    /// Which values need a gradient: parameters, inputs that ask for one, and every
    /// activation computed from one of those.
    fn requires_grad(&self, ops: &[Op]) -> Vec<bool> {
        let mut needs: Vec<bool> = self
            .values
            .iter()
            .map(|v| matches!(v.role, Role::Param | Role::Input { requires_grad: true }))
            .collect();
        for op in ops {
            let (ins, y): (Vec<ValueId>, ValueId) = match *op {
                Op::Conv2d { x, weight, bias, y, .. } => {
                    ([Some(x), Some(weight), bias].into_iter().flatten().collect(), y)
                }
                Op::BatchNorm { x, gamma, beta, y, .. } => (vec![x, gamma, beta], y),
                Op::Relu { x, y } => (vec![x], y),
                Op::Add { a, b, y } | Op::AddRelu { a, b, y } => (vec![a, b], y),
            };
            needs[y.0] = ins.iter().any(|v| needs[v.0]);
        }
        needs
    }

    fn record_backward(&mut self, gpu: &Gpu, ops: &[Op]) -> Result<()> {
        let needs = self.requires_grad(ops);
        self.grads = needs
            .iter()
            .zip(&self.values)
            .map(|(&n, v)| n.then(|| Tensor::empty(gpu, &v.shape)).transpose())
            .collect::<Result<_>>()?;
        // Whether a value's gradient already holds a contribution in this pass: the output's
        // is given by the caller, parameters' accumulate across passes.
        let mut written: Vec<bool> = self.values.iter().map(|v| v.role == Role::Param).collect();
        written[self.output.0] = true;
        // Gradients of values that need none still have to land somewhere in fused kernels.
        let mut discard: HashMap<Vec<usize>, Tensor> = HashMap::new();
        let mut target = |v: ValueId, grads: &[Option<Tensor>]| -> Result<(Tensor, bool)> {
            let acc = std::mem::replace(&mut written[v.0], true);
            match &grads[v.0] {
                Some(g) => Ok((g.clone(), acc)),
                None => {
                    let shape = self.values[v.0].shape.clone();
                    let t = match discard.get(&shape) {
                        Some(t) => t.clone(),
                        None => Tensor::empty(gpu, &shape)?,
                    };
                    discard.insert(shape, t.clone());
                    Ok((t, false))
                }
            }
        };
        for op in ops.iter().rev() {
            let out = match *op {
                Op::Conv2d { y, .. } | Op::BatchNorm { y, .. } | Op::Relu { y, .. } => y,
                Op::Add { y, .. } | Op::AddRelu { y, .. } => y,
            };
            let Some(gy) = self.grads[out.0].clone() else {
                continue;
            };
            let mut dispatches = match *op {
                Op::Conv2d { spec, x, weight, bias, .. } => {
                    let mut d = Vec::new();
                    if needs[x.0] {
                        let (gx, acc) = target(x, &self.grads)?;
                        d.push(conv2d::backward_input(gpu, &spec, &gy, self.t(weight), &gx, acc)?);
                    }
                    let (gw, acc) = target(weight, &self.grads)?;
                    d.extend(conv2d::backward_weight(gpu, &spec, self.t(x), &gy, &gw, acc)?);
                    if let Some(b) = bias {
                        let (gb, acc) = target(b, &self.grads)?;
                        d.extend(conv2d::backward_bias(gpu, &gy, &gb, acc)?);
                    }
                    d
                }
                Op::BatchNorm { x, gamma, beta, y, .. } => {
                    let (gx, accumulate_x) = target(x, &self.grads)?;
                    let (grad_gamma, accumulate_params) = target(gamma, &self.grads)?;
                    let (grad_beta, _) = target(beta, &self.grads)?;
                    let grads = BatchNormGrads {
                        grad_x: &gx,
                        grad_gamma: &grad_gamma,
                        grad_beta: &grad_beta,
                        accumulate_x,
                        accumulate_params,
                    };
                    batch_norm::backward(gpu, self.t(x), &self.bn_params(op), &self.saved[&y], &gy, &grads)?
                }
                Op::Relu { x, y } => {
                    if !needs[x.0] {
                        continue;
                    }
                    let (gx, acc) = target(x, &self.grads)?;
                    vec![elementwise::relu_backward(gpu, self.t(y), &gy, &gx, acc)?]
                }
                Op::Add { a, b, .. } => {
                    let ga = target(a, &self.grads)?;
                    let gb = target(b, &self.grads)?;
                    vec![elementwise::add_backward(gpu, &gy, (&ga.0, ga.1), (&gb.0, gb.1))?]
                }
                Op::AddRelu { a, b, y } => {
                    let ga = target(a, &self.grads)?;
                    let gb = target(b, &self.grads)?;
                    vec![elementwise::add_relu_backward(gpu, self.t(y), &gy, (&ga.0, ga.1), (&gb.0, gb.1))?]
                }
            };
            self.backward.append(&mut dispatches);
        }
        Ok(())
    }

    fn id(&self, name: &str) -> Result<ValueId> {
        self.by_name.get(name).copied().ok_or_else(|| {
            let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
            names.sort_unstable();
            Error::Invalid(format!("the graph has no tensor named {name:?}; it has: {}", names.join(", ")))
        })
    }

    /// The tensor named `name` (an input, parameter, running statistic or activation).
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        Ok(self.t(self.id(name)?))
    }

    /// The gradient of the tensor named `name` (after [`Graph::backward`]).
    pub fn grad(&self, name: &str) -> Result<&Tensor> {
        let id = self.id(name)?;
        self.grads.get(id.0).and_then(Option::as_ref).ok_or_else(|| {
            Error::Invalid(format!("{name:?} has no gradient (eval graph, or nothing it feeds is trained)"))
        })
    }

    /// Uploads `data` into the tensor named `name`.
    pub fn set(&self, gpu: &Gpu, name: &str, data: &[f32]) -> Result<()> {
        self.tensor(name)?.write(gpu, data)
    }

    /// The graph's output.
    pub fn output(&self) -> &Tensor {
        self.t(self.output)
    }

    /// Names of the trainable parameters, in the order they were added.
    pub fn parameters(&self) -> impl Iterator<Item = &str> {
        self.values.iter().filter(|v| v.role == Role::Param).map(|v| v.name.as_str())
    }

    /// Runs the forward pass: one command buffer.
    pub fn forward(&self, gpu: &Gpu) -> Result<()> {
        gpu.submit(&self.forward)
    }

    /// Runs the backward pass from `grad_output` (the gradient of the output): one command
    /// buffer. Parameter gradients are added to what they hold.
    pub fn backward(&self, gpu: &Gpu, grad_output: &[f32]) -> Result<()> {
        let g = self.grads.get(self.output.0).and_then(Option::as_ref).ok_or_else(|| {
            Error::Invalid("backward: the graph was built for eval, or its output needs no gradient".into())
        })?;
        g.write(gpu, grad_output)?;
        gpu.submit(&self.backward)
    }

    /// Sets every parameter gradient to zero.
    pub fn zero_grads(&self, gpu: &Gpu) {
        for (v, g) in self.values.iter().zip(&self.grads) {
            if let (Role::Param, Some(g)) = (v.role, g) {
                g.fill(gpu, 0.0);
            }
        }
    }

    /// The recorded forward dispatches (for profiling and benchmarks).
    pub fn forward_dispatches(&self) -> &[Dispatch] {
        &self.forward
    }

    /// The recorded backward dispatches.
    pub fn backward_dispatches(&self) -> &[Dispatch] {
        &self.backward
    }
}
