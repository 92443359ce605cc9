//! Memory planning: each planned buffer (an activation, or in training also an activation's
//! gradient) lives from the step that first writes it to the last step that reads or writes
//! it, and is a view of a shared slot that no buffer it overlaps in time also uses. Slots
//! are assigned greedily, largest buffer first, each to the first slot free for its whole
//! lifetime (else a new slot of its size), so every slot is as large as its largest tenant
//! and small buffers fill the gaps big ones leave. Buffers alive at the same step never
//! share a slot, so no kernel writes over what it reads, and no dispatch binds one slot
//! twice.
//!
//! Inference plans the forward nodes. Training plans the forward nodes and then the backward
//! of each node in reverse, over activations and their gradients: an activation lives until
//! the last forward node or backward kernel that reads it ([`Op::backward_reads`]), a
//! gradient from its first contribution until the backward of the node that made the value.
//! A value the backward rebuilds ([`super::Recompute`]) is freed in the forward like any
//! value the backward does not read, and rebuilt into a buffer of its own just before its
//! first reader in the backward, which lives until its last reader.

use super::ops::{Backward, BackwardStep, Op};
use super::{DType, Role, Value, ValueId};

pub(super) struct Plan {
    /// Each planned buffer's slot.
    pub slot_of: Vec<Option<usize>>,
    /// Each slot's size in elements.
    pub slot_elems: Vec<usize>,
    /// The slots' element type: every planned value's (f32, or f16 for half-precision
    /// inference).
    pub element: DType,
    /// The step at which the most planned elements are alive, and the buffers alive then.
    pub peak: Option<(Node, Vec<usize>)>,
}

/// Which pass of which node (its place in the op list) a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Node {
    Forward(usize),
    Backward(usize),
    /// The value of this index rebuilt in the backward.
    Rebuild(usize),
}

impl Plan {
    /// Bytes of every slot.
    pub fn bytes(&self) -> u64 {
        self.slot_elems.iter().map(|&n| n as u64 * self.element.size()).sum()
    }
}

/// One step of a pass: the planned buffers it reads and writes, by buffer index.
pub(super) struct Step {
    pub reads: Vec<usize>,
    pub writes: Vec<usize>,
    pub node: Node,
}

/// Plans buffers of `numel` elements (`None`: not planned) over `steps`; the `keep` buffers
/// live to the end.
pub(super) fn plan(numel: &[Option<usize>], steps: &[Step], keep: &[usize]) -> Plan {
    // Each buffer's lifetime, inclusive: from its first write to its last use.
    let mut life: Vec<Option<(usize, usize)>> = vec![None; numel.len()];
    for (i, step) in steps.iter().enumerate() {
        for &b in &step.writes {
            if numel[b].is_some() {
                life[b] = Some(life[b].map_or((i, i), |(first, _)| (first, i)));
            }
        }
        for &b in &step.reads {
            if let Some((first, _)) = life[b] {
                life[b] = Some((first, i));
            }
        }
    }
    for &b in keep {
        if let Some((first, _)) = life[b] {
            life[b] = Some((first, usize::MAX));
        }
    }
    let mut order: Vec<usize> = (0..numel.len()).filter(|&b| life[b].is_some()).collect();
    order.sort_by_key(|&b| (std::cmp::Reverse(numel[b].unwrap_or(0)), life[b]));
    let peak = peak(numel, &life, steps);
    let mut plan =
        Plan { slot_of: vec![None; numel.len()], slot_elems: Vec::new(), element: DType::F32, peak };
    // Each slot's tenants' lifetimes.
    let mut tenants: Vec<Vec<(usize, usize)>> = Vec::new();
    for b in order {
        let (first, last) = life[b].unwrap_or_default();
        let free = |lives: &Vec<(usize, usize)>| lives.iter().all(|&(f, l)| l < first || last < f);
        let slot = tenants.iter().position(free).unwrap_or_else(|| {
            tenants.push(Vec::new());
            plan.slot_elems.push(numel[b].unwrap_or(0));
            tenants.len() - 1
        });
        tenants[slot].push((first, last));
        plan.slot_of[b] = Some(slot);
    }
    plan
}

/// The step at which the most elements of the buffers with lifetimes `life` are alive
/// (the first of equals), and the buffers alive then.
fn peak(
    numel: &[Option<usize>],
    life: &[Option<(usize, usize)>],
    steps: &[Step],
) -> Option<(Node, Vec<usize>)> {
    if steps.is_empty() {
        return None;
    }
    let mut change = vec![0i64; steps.len() + 1];
    for (b, l) in life.iter().enumerate() {
        if let (Some((first, last)), Some(n)) = (l, numel[b]) {
            change[*first] += n as i64;
            change[(*last).min(steps.len() - 1) + 1] -= n as i64;
        }
    }
    let alive = change.iter().scan(0i64, |sum, c| {
        *sum += c;
        Some(*sum)
    });
    let (at, _) = alive.take(steps.len()).enumerate().max_by_key(|&(i, a)| (a, std::cmp::Reverse(i)))?;
    let buffers = (0..life.len()).filter(|&b| life[b].is_some_and(|(f, l)| f <= at && at <= l)).collect();
    Some((steps[at].node, buffers))
}

fn numel(v: &Value) -> usize {
    v.shape.iter().product()
}

/// Whether a value is planned: a float activation (a u32 one, argmax's, has its own
/// buffer).
fn planned_value(v: &Value) -> Option<usize> {
    (v.role == Role::Activation && v.dtype != DType::U32).then(|| numel(v))
}

/// The forward pass of an eval graph: buffers are values, activations planned. The slots
/// hold the first float activation's element type (f16 at half precision); a float
/// activation of another type would have a buffer of its own.
pub(super) fn inference(values: &[Value], ops: &[Op], outputs: &[ValueId]) -> Plan {
    let element = values.iter().find(|v| planned_value(v).is_some()).map_or(DType::F32, |v| v.dtype);
    let planned: Vec<Option<usize>> =
        values.iter().map(|v| planned_value(v).filter(|_| v.dtype == element)).collect();
    let steps: Vec<Step> = ops.iter().enumerate().map(forward_step).collect();
    Plan { element, ..plan(&planned, &steps, &outputs.iter().map(|v| v.0).collect::<Vec<_>>()) }
}

fn forward_step((at, op): (usize, &Op)) -> Step {
    Step {
        reads: op.reads().iter().map(|v| v.0).collect(),
        writes: op.writes().iter().map(|v| v.0).collect(),
        node: Node::Forward(at),
    }
}

/// A training step: buffer `i < n` is value `i`, buffer `n + i` the gradient of value `i`,
/// buffer `2n + i` value `i` rebuilt. `grad_planned[i]` says whether value i's gradient is
/// planned (an activation's that the backward computes; parameters' live in the optimizer
/// arena, and the gradients a caller writes or reads are kept apart). `backward` gives the
/// backward's steps, node backwards and rebuilds, in order.
pub(super) fn training(
    values: &[Value],
    ops: &[Op],
    (outputs, grad_planned): (&[ValueId], &[bool]),
    backward: &Backward,
) -> Plan {
    let n = values.len();
    let mut planned: Vec<Option<usize>> = values.iter().map(planned_value).collect();
    planned.extend(values.iter().zip(grad_planned).map(|(v, &p)| p.then(|| numel(v))));
    planned.extend((0..n).map(|i| backward.rebuilt.contains_key(&ValueId(i)).then(|| numel(&values[i]))));
    // Where the backward reads a value: its forward buffer, or the buffer it is rebuilt in.
    let read = |v: &ValueId| if backward.rebuilt.contains_key(v) { 2 * n + v.0 } else { v.0 };
    let mut steps: Vec<Step> = ops.iter().enumerate().map(forward_step).collect();
    for step in &backward.schedule {
        steps.push(match step {
            BackwardStep::Rebuild(v) => Step {
                reads: ops[backward.rebuilt[v]].reads().iter().map(read).collect(),
                writes: vec![2 * n + v.0],
                node: Node::Rebuild(v.0),
            },
            BackwardStep::Node(at, targets) => {
                let op = &ops[*at];
                let mut reads: Vec<usize> = op.backward_reads().iter().map(read).collect();
                if let (_, Some(y)) = op.io() {
                    reads.push(n + y.0);
                }
                Step { reads, writes: targets.iter().map(|v| n + v.0).collect(), node: Node::Backward(*at) }
            }
        });
    }
    plan(&planned, &steps, &outputs.iter().map(|v| v.0).collect::<Vec<_>>())
}
