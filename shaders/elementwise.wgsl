// Elementwise ReLU, add, fused add + ReLU and the scaled add of a learnt scalar, with their
// backward passes. Backward entries
// either overwrite or accumulate into the gradient (flag bits), so a tensor read by
// several nodes sums its gradients without extra add kernels.

#if F16
enable f16;
#end

struct Params {
    len: u32, flags: u32, _pad0: u32, _pad1: u32,
}

// Accumulate into grad_a / grad_b instead of overwriting.
const ACCUMULATE_A: u32 = 1u;
const ACCUMULATE_B: u32 = 2u;

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
// Built with F16 (shader elementwise_f16, half-precision inference), a, b and out are f16.
@group(0) @binding(1) var<storage, read> a: array<Act>;
@group(0) @binding(2) var<storage, read> b: array<Act>;
@group(0) @binding(3) var<storage, read_write> out: array<Act>;
@group(0) @binding(4) var<storage, read> grad_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad_a: array<f32>;
@group(0) @binding(6) var<storage, read_write> grad_b: array<f32>;
// The learnt scalar of scaled_add (one element; a parameter, f32 at either precision).
@group(0) @binding(7) var<storage, read> gamma: array<f32>;

fn store_grad_a(i: u32, g: f32) {
    grad_a[i] = select(0.0, grad_a[i], (p.flags & ACCUMULATE_A) != 0u) + g;
}

fn store_grad_b(i: u32, g: f32) {
    grad_b[i] = select(0.0, grad_b[i], (p.flags & ACCUMULATE_B) != 0u) + g;
}

// out = max(a, 0)
@compute @workgroup_size(WG)
fn relu_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    out[i] = max(a[i], Act(0.0));
}

// grad_a = grad_out where a > 0, else 0. `a` may be the ReLU's input or its output: both
// are positive at the same places.
@compute @workgroup_size(WG)
fn relu_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    store_grad_a(i, select(0.0, grad_out[i], f32(a[i]) > 0.0));
}

// out = a + b
@compute @workgroup_size(WG)
fn add_forward(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    out[i] = Act(f32(a[i]) + f32(b[i]));
}

// grad_a = grad_b = grad_out
@compute @workgroup_size(WG)
fn add_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    store_grad_a(i, grad_out[i]);
    store_grad_b(i, grad_out[i]);
}

// out = max(a + b, 0)
@compute @workgroup_size(WG)
fn add_relu_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    out[i] = Act(max(f32(a[i]) + f32(b[i]), 0.0));
}

// grad_a = grad_b = grad_out where the output (bound as `a`) is positive, else 0.
@compute @workgroup_size(WG)
fn add_relu_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    let g = select(0.0, grad_out[i], f32(a[i]) > 0.0);
    store_grad_a(i, g);
    store_grad_b(i, g);
}

// out = gamma * a + b (DANet's attention output scaled by a learnt scalar, plus its input)
@compute @workgroup_size(WG)
fn scaled_add_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    out[i] = Act(gamma[0] * f32(a[i]) + f32(b[i]));
}

// grad_a = gamma * grad_out, grad_b = grad_out (gamma's own gradient is a sum: products)
@compute @workgroup_size(WG)
fn scaled_add_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    store_grad_a(i, gamma[0] * grad_out[i]);
    store_grad_b(i, grad_out[i]);
}
