//! Memory planning: each planned buffer (an activation, or in training also an activation's
//! gradient) gets a slot of a shared buffer that it holds from the step that first writes it
//! to the last step that reads or writes it; slots are reused best-fit. A step's new buffers
//! take their slots before its finished ones give theirs back, so no kernel writes over what
//! it reads.
//!
//! Inference plans the forward nodes. Training plans the forward nodes and then the backward
//! of each node in reverse, over activations and their gradients: an activation lives until
//! the last forward node or backward kernel that reads it ([`Op::backward_reads`]), a
//! gradient from its first contribution until the backward of the node that made the value.

use super::ops::Op;
use super::{Role, Value, ValueId};

pub(super) struct Plan {
    /// The slot of each planned buffer.
    pub slot_of: Vec<Option<usize>>,
    /// Each slot's size in elements.
    pub slot_elems: Vec<usize>,
}

/// One step of a pass: the planned buffers it reads and writes, by buffer index.
pub(super) struct Step {
    pub reads: Vec<usize>,
    pub writes: Vec<usize>,
}

/// Plans buffers of `numel` elements (`None`: not planned) over `steps`; the `keep` buffers
/// are never given back.
pub(super) fn plan(numel: &[Option<usize>], steps: &[Step], keep: &[usize]) -> Plan {
    let mut last_use = vec![None; numel.len()];
    for (i, step) in steps.iter().enumerate() {
        for &b in step.reads.iter().chain(&step.writes) {
            last_use[b] = Some(i);
        }
    }
    let mut plan = Plan { slot_of: vec![None; numel.len()], slot_elems: Vec::new() };
    let mut free: Vec<usize> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        for &b in &step.writes {
            let Some(need) = numel[b] else { continue };
            if plan.slot_of[b].is_some() {
                continue;
            }
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, &s)| plan.slot_elems[s] >= need)
                .min_by_key(|(_, &s)| plan.slot_elems[s]);
            let slot = match best {
                Some((k, _)) => free.swap_remove(k),
                None => {
                    plan.slot_elems.push(need);
                    plan.slot_elems.len() - 1
                }
            };
            plan.slot_of[b] = Some(slot);
        }
        for &b in step.reads.iter().chain(&step.writes) {
            if last_use[b] == Some(i) && !keep.contains(&b) {
                if let Some(slot) = plan.slot_of[b] {
                    if !free.contains(&slot) {
                        free.push(slot);
                    }
                }
            }
        }
    }
    plan
}

fn numel(v: &Value) -> usize {
    v.shape.iter().product()
}

/// The forward pass of an eval graph: buffers are values, activations planned.
pub(super) fn inference(values: &[Value], ops: &[Op], outputs: &[ValueId]) -> Plan {
    let planned: Vec<Option<usize>> =
        values.iter().map(|v| (v.role == Role::Activation).then(|| numel(v))).collect();
    let steps: Vec<Step> = ops.iter().map(forward_step).collect();
    plan(&planned, &steps, &outputs.iter().map(|v| v.0).collect::<Vec<_>>())
}

fn forward_step(op: &Op) -> Step {
    Step {
        reads: op.reads().iter().map(|v| v.0).collect(),
        writes: op.writes().iter().map(|v| v.0).collect(),
    }
}

/// A training step: buffer `i < n` is value `i`, buffer `n + i` the gradient of value `i`.
/// `grad_planned[i]` says whether value i's gradient is planned (an activation's that the
/// backward computes; parameters' live in the optimizer arena, and the gradients a caller
/// writes or reads are kept apart). `backward` is the backward schedule: the nodes whose
/// backward runs, in order, with the values each writes a gradient to.
pub(super) fn training(
    values: &[Value],
    ops: &[Op],
    outputs: &[ValueId],
    grad_planned: &[bool],
    backward: &[(usize, Vec<ValueId>)],
) -> Plan {
    let n = values.len();
    let mut planned: Vec<Option<usize>> =
        values.iter().map(|v| (v.role == Role::Activation).then(|| numel(v))).collect();
    planned.extend(values.iter().zip(grad_planned).map(|(v, &p)| p.then(|| numel(v))));
    let mut steps: Vec<Step> = ops.iter().map(forward_step).collect();
    for (at, targets) in backward {
        let op = &ops[*at];
        let mut reads: Vec<usize> = op.backward_reads().iter().map(|v| v.0).collect();
        if let (_, Some(y)) = op.io() {
            reads.push(n + y.0);
        }
        steps.push(Step { reads, writes: targets.iter().map(|v| n + v.0).collect() });
    }
    plan(&planned, &steps, &outputs.iter().map(|v| v.0).collect::<Vec<_>>())
}
