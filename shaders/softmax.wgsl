// Softmax of scale * x along the middle axis of a tensor viewed as [outer, len, inner],
// and its backward. Both axes OCR needs fit: over pixels ([N*K, h*w, 1]) and over regions
// ([N*h*w, K, 1], or [N, K, h*w] for NCHW channels).
//
// Short rows: one invocation per row does everything (softmax_rows, softmax_backward_rows).
// Long rows (up to 256 x 512 pixels) are split into chunks so many invocations share a row:
// softmax_partials -> softmax_combine -> softmax_normalize, and for the backward
// softmax_backward_partials -> (ordered chunk sum) -> softmax_backward_apply. The partial
// passes have a _tree variant for GPUs, a workgroup per (chunk, row) (trees.wgsl). The
// running maximum keeps exp() finite for inputs of any magnitude; sums run in a fixed
// order.

#if F16
enable f16;
#end

struct Params {
    outer: u32, len: u32, inner: u32, chunk_len: u32,
    scale: f32, flags: u32, _pad0: u32, _pad1: u32,
}

const ACCUMULATE: u32 = 1u;

#include "common.wgsl"
#include "trees.wgsl"

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

// Online (max, sum of exp) over elements j0, j0 + step, ... below j1 of row r.
fn row_stats(r: u32, j0: u32, j1: u32, step: u32) -> vec2<f32> {
    var m = -3.4e38;
    var s = 0.0;
    for (var j = j0; j < j1; j += step) {
        let v = p.scale * f32(x[at(r, j)]);
        let m_new = max(m, v);
        s = s * exp(m - m_new) + exp(v - m_new);
        m = m_new;
    }
    return vec2<f32>(m, s);
}

// The (max, sum of exp) of two parts of a row as one: each sum rescaled to the larger max.
fn merge_stats(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

fn store_grad(i: u32, g: f32) {
    grad_x[i] = select(0.0, grad_x[i], (p.flags & ACCUMULATE) != 0u) + g;
}

@compute @workgroup_size(WG)
fn softmax_rows(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_index(gid, nwg);
    if r >= rows() { return; }
    let st = row_stats(r, 0u, p.len, 1u);
    for (var j = 0u; j < p.len; j++) {
        let i = at(r, j);
        y[i] = Act(exp(p.scale * f32(x[i]) - st.x) / st.y);
    }
}

// The (chunk, row) pairs of the partial passes, idx = chunk * rows + row.
fn partial_count() -> u32 {
    return chunks() * rows();
}

// The row of (chunk, row) idx and the chunk's elements [j0, j1) of it.
struct Chunk { r: u32, j0: u32, j1: u32 }

fn chunk_of(idx: u32) -> Chunk {
    let j0 = (idx / rows()) * p.chunk_len;
    return Chunk(idx % rows(), j0, min(p.len, j0 + p.chunk_len));
}

// (max, sum of exp) of (chunk, row) idx over its elements first, first + step, ...
fn chunk_stats(idx: u32, first: u32, step: u32) -> vec2<f32> {
    let c = chunk_of(idx);
    return row_stats(c.r, c.j0 + first, c.j1, step);
}

fn store_stats(idx: u32, st: vec2<f32>) {
    stats[idx] = st;
}

#stamp chunk_reductions(softmax_partials, partial_count, chunk_stats, merge_stats, store_stats)

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

// sum of grad_y * y over elements j0, j0 + step, ... below j1 of row r, in blocks of 32
// terms: the terms have both signs and the sum is far smaller than they are, so one
// running sum of hundreds of terms loses ~1e-5 of it (the region-logit gradient of OCR's
// gather showed it).
fn grad_dot(r: u32, j0: u32, j1: u32, step: u32) -> f32 {
    var total = 0.0;
    let block_span = 32u * step;
    for (var b = j0; b < j1; b += block_span) {
        var block = 0.0;
        for (var j = b; j < min(j1, b + block_span); j += step) {
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
    let dot = grad_dot(r, 0u, p.len, 1u);
    for (var j = 0u; j < p.len; j++) {
        let i = at(r, j);
        store_grad(i, p.scale * probs[i] * (grad_y[i] - dot));
    }
}

// The dot of (chunk, row) idx over its elements first, first + step, ... (in .x: the
// tree's type is a pair). The tree adds 64 blocked sums pairwise: as accurate as one.
fn chunk_dot(idx: u32, first: u32, step: u32) -> vec2<f32> {
    let c = chunk_of(idx);
    return vec2<f32>(grad_dot(c.r, c.j0 + first, c.j1, step), 0.0);
}

fn store_dot(idx: u32, dot: vec2<f32>) {
    dots[idx] = dot.x;
}

#stamp chunk_reductions(softmax_backward_partials, partial_count, chunk_dot, tree_add, store_dot)

@compute @workgroup_size(WG)
fn softmax_backward_apply(@builtin(global_invocation_id) gid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.outer * p.len * p.inner { return; }
    let r = (i / (p.len * p.inner)) * p.inner + i % p.inner;
    store_grad(i, p.scale * probs[i] * (grad_y[i] - dots_in[r]));
}
