// Softmax of scale * x along the middle axis of a tensor viewed as [outer, len, inner],
// and its backward. Both axes OCR needs fit: over pixels ([N*K, h*w, 1]) and over regions
// ([N*h*w, K, 1], or [N, K, h*w] for NCHW channels).
//
// Short rows: one invocation per row does everything (softmax_rows, softmax_backward_rows).
// Long rows (up to 256 x 512 pixels) are split into chunks so many invocations share a row:
// softmax_partials -> softmax_combine -> softmax_normalize, and for the backward
// softmax_backward_partials -> (ordered chunk sum) -> softmax_backward_apply. The running
// maximum keeps exp() finite for inputs of any magnitude; sums run in a fixed order.

#if F16
enable f16;
#end

struct Params {
    outer: u32, len: u32, inner: u32, chunk_len: u32,
    scale: f32, flags: u32, _pad0: u32, _pad1: u32,
}

const ACCUMULATE: u32 = 1u;

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
// Built with F16 (shader softmax_f16, half-precision inference), x and y are f16; the
// backward's bindings stay f32 (training runs f32).
@group(0) @binding(1) var<storage, read> x: array<Act>;
@group(0) @binding(2) var<storage, read_write> y: array<Act>;
// per (chunk, row): (max, sum of exp(v - max)); after softmax_combine, per row
@group(0) @binding(3) var<storage, read_write> stats: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> grad_y: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad_x: array<f32>;
// backward: per (chunk, row) partial sums of grad_y * y; after the chunk sum, per row
@group(0) @binding(6) var<storage, read_write> dots: array<f32>;
// What a pass reads of what an earlier one wrote: the forward's output (for the
// backward), the combined row stats, the summed dots.
@group(0) @binding(7) var<storage, read> probs: array<f32>;
@group(0) @binding(8) var<storage, read> row_stats_in: array<vec2<f32>>;
@group(0) @binding(9) var<storage, read> dots_in: array<f32>;

fn rows() -> u32 {
    return p.outer * p.inner;
}

fn chunks() -> u32 {
    return (p.len + p.chunk_len - 1u) / p.chunk_len;
}

// Flat index of element j of row r.
fn at(r: u32, j: u32) -> u32 {
    return ((r / p.inner) * p.len + j) * p.inner + r % p.inner;
}

// Online (max, sum of exp) over elements [j0, j1) of row r.
fn row_stats(r: u32, j0: u32, j1: u32) -> vec2<f32> {
    var m = -3.4e38;
    var s = 0.0;
    for (var j = j0; j < j1; j++) {
        let v = p.scale * f32(x[at(r, j)]);
        let m_new = max(m, v);
        s = s * exp(m - m_new) + exp(v - m_new);
        m = m_new;
    }
    return vec2<f32>(m, s);
}

fn store_grad(i: u32, g: f32) {
    grad_x[i] = select(0.0, grad_x[i], (p.flags & ACCUMULATE) != 0u) + g;
}

@compute @workgroup_size(WG)
fn softmax_rows(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_index(gid, nwg);
    if r >= rows() { return; }
    let st = row_stats(r, 0u, p.len);
    for (var j = 0u; j < p.len; j++) {
        let i = at(r, j);
        y[i] = Act(exp(p.scale * f32(x[i]) - st.x) / st.y);
    }
}

@compute @workgroup_size(WG)
fn softmax_partials(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if idx >= chunks() * rows() { return; }
    let r = idx % rows();
    let j0 = (idx / rows()) * p.chunk_len;
    stats[idx] = row_stats(r, j0, min(p.len, j0 + p.chunk_len));
}

// Merges the chunks of each row in order into stats[r].
@compute @workgroup_size(WG)
fn softmax_combine(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_index(gid, nwg);
    if r >= rows() { return; }
    var m = -3.4e38;
    for (var k = 0u; k < chunks(); k++) {
        m = max(m, stats[k * rows() + r].x);
    }
    var s = 0.0;
    for (var k = 0u; k < chunks(); k++) {
        let part = stats[k * rows() + r];
        s += part.y * exp(part.x - m);
    }
    stats[r] = vec2<f32>(m, s);
}

@compute @workgroup_size(WG)
fn softmax_normalize(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.outer * p.len * p.inner { return; }
    let r = (i / (p.len * p.inner)) * p.inner + i % p.inner;
    let st = row_stats_in[r];
    y[i] = Act(exp(p.scale * f32(x[i]) - st.x) / st.y);
}

// sum of grad_y * y over [j0, j1) of row r, in blocks of 32 terms: the terms have both
// signs and the sum is far smaller than they are, so one running sum of hundreds of
// terms loses ~1e-5 of it (the region-logit gradient of OCR's gather showed it).
fn grad_dot(r: u32, j0: u32, j1: u32) -> f32 {
    var total = 0.0;
    for (var b = j0; b < j1; b += 32u) {
        var block = 0.0;
        for (var j = b; j < min(j1, b + 32u); j++) {
            block += grad_y[at(r, j)] * probs[at(r, j)];
        }
        total += block;
    }
    return total;
}

// grad_x = scale * y * (grad_y - sum_j grad_y[j] * y[j]), one row per invocation.
@compute @workgroup_size(WG)
fn softmax_backward_rows(@builtin(global_invocation_id) gid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_index(gid, nwg);
    if r >= rows() { return; }
    let dot = grad_dot(r, 0u, p.len);
    for (var j = 0u; j < p.len; j++) {
        let i = at(r, j);
        store_grad(i, p.scale * probs[i] * (grad_y[i] - dot));
    }
}

@compute @workgroup_size(WG)
fn softmax_backward_partials(@builtin(global_invocation_id) gid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if idx >= chunks() * rows() { return; }
    let r = idx % rows();
    let j0 = (idx / rows()) * p.chunk_len;
    dots[idx] = grad_dot(r, j0, min(p.len, j0 + p.chunk_len));
}

@compute @workgroup_size(WG)
fn softmax_backward_apply(@builtin(global_invocation_id) gid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.outer * p.len * p.inner { return; }
    let r = (i / (p.len * p.inner)) * p.inner + i % p.inner;
    store_grad(i, p.scale * probs[i] * (grad_y[i] - dots_in[r]));
}
