//! Activation memory planning for inference: each activation gets a slot of a shared buffer
//! that it holds from the node that writes it to the last node that reads it; slots are
//! reused best-fit. Training keeps every activation for the backward pass instead.

use super::ops::Op;
use super::{Role, Value, ValueId};

pub(super) struct Plan {
    /// The slot of each value, for activations.
    pub slot_of: Vec<Option<usize>>,
    /// Each slot's size in elements.
    pub slot_elems: Vec<usize>,
}

/// Plans the activations of `ops`; the `keep` values (the graph's outputs) are never freed.
pub(super) fn plan(values: &[Value], ops: &[Op], keep: &[ValueId]) -> Plan {
    let mut last_use = vec![None; values.len()];
    for (i, op) in ops.iter().enumerate() {
        for v in op.reads().into_iter().chain(op.writes()) {
            last_use[v.0] = Some(i);
        }
    }
    let numel = |v: ValueId| values[v.0].shape.iter().product::<usize>();
    let mut plan = Plan { slot_of: vec![None; values.len()], slot_elems: Vec::new() };
    let mut free: Vec<usize> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        for v in op.writes() {
            if values[v.0].role != Role::Activation || plan.slot_of[v.0].is_some() {
                continue;
            }
            let need = numel(v);
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
            plan.slot_of[v.0] = Some(slot);
        }
        for v in op.reads().into_iter().chain(op.writes()) {
            if last_use[v.0] == Some(i) && !keep.contains(&v) {
                if let Some(slot) = plan.slot_of[v.0] {
                    if !free.contains(&slot) {
                        free.push(slot);
                    }
                }
            }
        }
    }
    plan
}
