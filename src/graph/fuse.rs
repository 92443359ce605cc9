//! Inference fusion. In eval mode a convolution whose output only feeds a batch norm runs
//! with the batch norm folded into its weight as it is packed; if the batch norm's output
//! then only feeds a ReLU, a residual add or an add + ReLU, that runs in the same kernel's
//! stores. HRNet's blocks are all conv-BN-ReLU and conv-BN-add-ReLU, so this removes most
//! of the memory-bound passes of a forward. The intermediate values are never stored.

use super::ops::Op;
use super::{Role, Value, ValueId};

/// What a fused chain ends with.
enum Tail {
    Relu,
    Add { residual: ValueId, relu: bool },
}

/// Rewrites `ops` with every fusable chain as one `Op::ConvFused` at the chain's last
/// node (where the residual is ready); the chain's intermediate values become
/// `Role::Fused`. Values in `keep` (the outputs) are never fused away.
pub(super) fn fuse_for_inference(ops: Vec<Op>, values: &mut [Value], keep: &[ValueId]) -> Vec<Op> {
    let mut readers = vec![Vec::new(); values.len()];
    let mut writer = vec![None; values.len()];
    for (i, op) in ops.iter().enumerate() {
        for v in op.reads() {
            readers[v.0].push(i);
        }
        for v in op.writes() {
            writer[v.0] = Some(i);
        }
    }
    // The one node that reads `v`, if `v` is an intermediate no one else needs.
    let sole_reader = |v: ValueId| match readers[v.0][..] {
        [r] if !keep.contains(&v) => Some(r),
        _ => None,
    };

    let mut ops: Vec<Option<Op>> = ops.into_iter().map(Some).collect();
    for bn_at in 0..ops.len() {
        let Some(Op::BatchNorm { x: conv_out, gamma, beta, mean, var, y: bn_out }) = ops[bn_at] else {
            continue;
        };
        let conv_at = match writer[conv_out.0] {
            Some(c) if sole_reader(conv_out) == Some(bn_at) => c,
            _ => continue,
        };
        let Some(Op::Conv2d { spec, x, weight, bias, .. }) = ops[conv_at] else { continue };
        let tail = sole_reader(bn_out).and_then(|r| {
            let tail = match ops[r] {
                Some(Op::Relu { .. }) => Tail::Relu,
                Some(Op::Add { a, b, .. }) if a != b => {
                    Tail::Add { residual: if a == bn_out { b } else { a }, relu: false }
                }
                Some(Op::AddRelu { a, b, .. }) if a != b => {
                    Tail::Add { residual: if a == bn_out { b } else { a }, relu: true }
                }
                _ => return None,
            };
            Some((r, tail))
        });
        let (end, y, residual, relu) = match tail {
            Some((r, tail)) => {
                let y = ops[r].as_ref().and_then(|op| op.writes().first().copied()).expect("a tail writes");
                values[bn_out.0].role = Role::Fused;
                match tail {
                    Tail::Relu => (r, y, None, true),
                    Tail::Add { residual, relu } => (r, y, Some(residual), relu),
                }
            }
            None => (bn_at, bn_out, None, false),
        };
        values[conv_out.0].role = Role::Fused;
        ops[conv_at] = None;
        if end != bn_at {
            ops[bn_at] = None;
        }
        let bn = [gamma, beta, mean, var];
        ops[end] = Some(Op::ConvFused { spec, x, weight, bias, bn, residual, relu, y });
    }
    ops.into_iter().flatten().collect()
}
