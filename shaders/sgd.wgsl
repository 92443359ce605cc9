// SGD with momentum, weight decay and optional Nesterov, PyTorch's order of operations:
//   d = grad + weight_decay * param;  buf = momentum * buf + d;
//   step = nesterov ? d + momentum * buf : buf;  param -= lr * lr_mult * step.
// One dispatch updates every parameter of a model: parameters, gradients and momentum
// buffers each live in one flat arena, and a table of segments gives each parameter's
// learning-rate multiplier (HRNet-OCR's x10 head group). The buffer starts at zero, which
// makes the first step's buf equal d, as PyTorch's does.

struct Params {
    len: u32, segments: u32, nesterov: u32, _pad0: u32,
    lr: f32, momentum: f32, weight_decay: f32, _pad1: u32,
}

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> momentum_buf: array<f32>;
// segment s covers elements [segment_end[s - 1], segment_end[s])
@group(0) @binding(4) var<storage, read> segment_end: array<u32>;
@group(0) @binding(5) var<storage, read> segment_lr: array<f32>;

// The segment holding element i: binary search over the sorted ends.
fn segment_of(i: u32) -> u32 {
    var lo = 0u;
    var hi = p.segments - 1u;
    while lo < hi {
        let mid = (lo + hi) / 2u;
        if segment_end[mid] <= i { lo = mid + 1u; } else { hi = mid; }
    }
    return lo;
}

@compute @workgroup_size(WG)
fn sgd_step(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    let d = grad[i] + p.weight_decay * param[i];
    let buf = p.momentum * momentum_buf[i] + d;
    momentum_buf[i] = buf;
    let step = select(buf, d + p.momentum * buf, p.nesterov != 0u);
    param[i] -= p.lr * segment_lr[segment_of(i)] * step;
}
