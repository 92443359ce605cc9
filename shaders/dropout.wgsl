// Dropout2d: whole channels are zeroed with probability p (training only) and the kept
// ones scaled by 1 / (1 - p). The keep decision for (sample n, channel c) is a hash of
// (seed, n * C + c): a counter-based generator, so the backward rebuilds the same mask with
// nothing stored, and a step replays exactly from its seed.

struct Params {
    len: u32, channels: u32, hw: u32, seed: u32,
    drop: f32, flags: u32,
    // the mask unit (n * C + c) of the first element bound: non-zero for a channel slab
    first_unit: u32, _pad0: u32,
}

const ACCUMULATE: u32 = 1u;

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> grad_y: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad_x: array<f32>;

// A 32-bit integer hash (xorshift-multiply rounds); the same function is in the Rust docs
// of `kernels::dropout::keep` so callers can reproduce masks on the CPU.
fn hash(v: u32) -> u32 {
    var h = v;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

// The factor element i is multiplied by: 0 or 1 / (1 - drop).
fn factor(i: u32) -> f32 {
    let unit = p.first_unit + i / p.hw;
    let u = f32(hash(hash(p.seed) ^ unit) >> 8u) / 16777216.0;
    return select(0.0, 1.0 / (1.0 - p.drop), u >= p.drop);
}

@compute @workgroup_size(WG)
fn dropout_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    y[i] = x[i] * factor(i);
}

@compute @workgroup_size(WG)
fn dropout_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    grad_x[i] = select(0.0, grad_x[i], (p.flags & ACCUMULATE) != 0u) + grad_y[i] * factor(i);
}
