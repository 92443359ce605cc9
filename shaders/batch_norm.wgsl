// Batch normalisation over N x H x W per channel (NCHW), PyTorch semantics: training
// normalises with the biased batch variance and moves the running statistics by
// `momentum` towards the batch mean and the unbiased variance; eval uses the running
// statistics.
//
// Training forward: bn_stats_partials -> bn_stats_finalize -> bn_normalize_train.
// Training backward: bn_backward_partials -> bn_backward_finalize -> bn_backward_input.
// Channel reductions are split into chunks of samples (one invocation per channel and
// chunk, summed in order, then the chunks in order): no atomics, bit-reproducible.

struct Params {
    n: u32, c: u32, hw: u32, chunk_len: u32,
    flags: u32, eps: f32, momentum: f32,
    // bn_normalize_eval over a channel slab (see src/kernels/slabs.rs): its first channel
    first_channel: u32,
}

const ACCUMULATE: u32 = 1u;
// bn_normalize_train: a ReLU after the normalisation (recomputing a BN-ReLU output).
const RELU: u32 = 2u;

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> running_var: array<f32>;
// per channel: (batch mean minus the channel's first value, 1 / sqrt(biased variance + eps)).
// Keeping the mean relative to that shift keeps x_hat accurate when |mean| >> std.
@group(0) @binding(6) var<storage, read_write> saved: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read_write> y: array<f32>;
// per (chunk, channel) partial sums
@group(0) @binding(8) var<storage, read_write> partials: array<vec2<f32>>;
@group(0) @binding(9) var<storage, read> grad_y: array<f32>;
@group(0) @binding(10) var<storage, read_write> grad_x: array<f32>;
@group(0) @binding(11) var<storage, read_write> grad_gamma: array<f32>;
@group(0) @binding(12) var<storage, read_write> grad_beta: array<f32>;
// per channel: (sum of grad_y, sum of grad_y * x_hat)
@group(0) @binding(13) var<storage, read_write> grad_sums: array<vec2<f32>>;
// What a pass reads of what an earlier one wrote (or of the running statistics, in
// eval), read-only.
@group(0) @binding(14) var<storage, read> saved_in: array<vec2<f32>>;
@group(0) @binding(15) var<storage, read> partials_in: array<vec2<f32>>;
@group(0) @binding(16) var<storage, read> grad_sums_in: array<vec2<f32>>;
@group(0) @binding(17) var<storage, read> running_mean_in: array<f32>;
@group(0) @binding(18) var<storage, read> running_var_in: array<f32>;

fn chunk_count() -> u32 {
    return (p.n * p.hw + p.chunk_len - 1u) / p.chunk_len;
}

fn accumulate(old: f32, v: f32) -> f32 {
    return select(0.0, old, (p.flags & ACCUMULATE) != 0u) + v;
}

// Blocked, compensated (Kahan) summation of pairs: per-channel sums cancel heavily (the
// sum of grad_y * x_hat is far smaller than its terms). Terms are first summed in blocks
// of BLOCK, and the blocks Kahan-summed: a driver may legally reassociate the Kahan carry
// away, but not the blocking, which alone cuts the rounding error of an n-term sum from
// ~n to ~(BLOCK + n / BLOCK) ulps (in a 5-step training run it took the drift from
// PyTorch's float64 trajectory from 1e-3 to 1e-4).
const BLOCK: u32 = 32u;
struct Sum2 { total: vec2<f32>, carry: vec2<f32>, block: vec2<f32>, terms: u32 }

fn new_sum() -> Sum2 {
    return Sum2(vec2<f32>(0.0), vec2<f32>(0.0), vec2<f32>(0.0), 0u);
}

fn kahan_add(acc: ptr<function, Sum2>, v: vec2<f32>) {
    let y = v - (*acc).carry;
    let t = (*acc).total + y;
    (*acc).carry = (t - (*acc).total) - y;
    (*acc).total = t;
}

fn add(acc: ptr<function, Sum2>, v: vec2<f32>) {
    (*acc).block += v;
    (*acc).terms += 1u;
    if (*acc).terms == BLOCK {
        kahan_add(acc, (*acc).block);
        (*acc).block = vec2<f32>(0.0);
        (*acc).terms = 0u;
    }
}

fn total(acc: ptr<function, Sum2>) -> vec2<f32> {
    kahan_add(acc, (*acc).block);
    return (*acc).total;
}

// A channel's partial sums over its chunks, in chunk order.
fn chunk_total(ch: u32) -> vec2<f32> {
    var sums = new_sum();
    for (var k = 0u; k < chunk_count(); k++) {
        add(&sums, partials_in[k * p.c + ch]);
    }
    return total(&sums);
}

// The sample range [e0, e1) of a chunk, e = n * hw + s, visited as (plane start, s range).
struct Span { n0: u32, e0: u32, e1: u32 }

fn chunk_span(chunk: u32) -> Span {
    let e0 = chunk * p.chunk_len;
    return Span(e0 / p.hw, e0, min(p.n * p.hw, e0 + p.chunk_len));
}

// Sums of (x - shift) and (x - shift)^2 per (chunk, channel). Shifting by the channel's
// first value keeps the one-pass variance accurate when the mean is far from zero.
@compute @workgroup_size(WG)
fn bn_stats_partials(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if idx >= chunk_count() * p.c { return; }
    let ch = idx % p.c;
    let span = chunk_span(idx / p.c);
    let shift = x[ch * p.hw];
    var sums = new_sum();
    for (var n = span.n0; n * p.hw < span.e1; n++) {
        let plane = (n * p.c + ch) * p.hw;
        for (var s = max(span.e0, n * p.hw) - n * p.hw; s < min(p.hw, span.e1 - n * p.hw); s++) {
            let d = x[plane + s] - shift;
            add(&sums, vec2<f32>(d, d * d));
        }
    }
    partials[idx] = total(&sums);
}

// Per channel: the batch mean and inverse deviation, and the running statistics update.
@compute @workgroup_size(WG)
fn bn_stats_finalize(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let ch = linear_index(gid, nwg);
    if ch >= p.c { return; }
    let sums = chunk_total(ch);
    let count = f32(p.n * p.hw);
    let mean_shifted = sums.x / count;
    let variance = max(sums.y / count - mean_shifted * mean_shifted, 0.0);
    let mean = x[ch * p.hw] + mean_shifted;
    saved[ch] = vec2<f32>(mean_shifted, inverseSqrt(variance + p.eps));
    let unbiased = variance * count / (count - 1.0);
    running_mean[ch] = (1.0 - p.momentum) * running_mean[ch] + p.momentum * mean;
    running_var[ch] = (1.0 - p.momentum) * running_var[ch] + p.momentum * unbiased;
}

// The normalised value of element i of channel ch, with the batch statistics.
fn x_hat_train(i: u32, ch: u32) -> f32 {
    let stats = saved_in[ch];
    return ((x[i] - x[ch * p.hw]) - stats.x) * stats.y;
}

// The elementwise passes give each plane (n, ch) a run of workgroups of 4 x WG elements:
// the channel is then the same across a workgroup, so a CPU driver loads its statistics
// once per SIMD batch instead of gathering them per element. Invocation `lid` takes the
// elements WG apart from `first + lid`.
struct PlaneBlock { ch: u32, first: u32, end: u32 }

fn plane_block(wid: vec3<u32>, nwg: vec3<u32>) -> PlaneBlock {
    let wg = wid.x + wid.y * nwg.x;
    let blocks = (p.hw + 4u * WG - 1u) / (4u * WG);
    let plane = min(wg / blocks, p.n * p.c);
    let start = plane * p.hw;
    return PlaneBlock(plane % p.c, start + (wg % blocks) * 4u * WG, min(start + p.hw, p.n * p.c * p.hw));
}

// y = (x - mean) * inv_std * gamma + beta with the batch statistics.
@compute @workgroup_size(WG)
fn bn_normalize_train(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let b = plane_block(wid, nwg);
    let stats = saved_in[b.ch];
    let shift = x[b.ch * p.hw];
    let scale = gamma[b.ch];
    let offset = beta[b.ch];
    let relu = (p.flags & RELU) != 0u;
    for (var i = b.first + lid; i < min(b.first + 4u * WG, b.end); i += WG) {
        let v = ((x[i] - shift) - stats.x) * stats.y * scale + offset;
        y[i] = select(v, max(v, 0.0), relu);
    }
}

// y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta.
@compute @workgroup_size(WG)
fn bn_normalize_eval(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let b = plane_block(wid, nwg);
    let c = p.first_channel + b.ch;
    let mean = running_mean_in[c];
    let inv_std = inverseSqrt(running_var_in[c] + p.eps);
    let scale = gamma[c];
    let offset = beta[c];
    for (var i = b.first + lid; i < min(b.first + 4u * WG, b.end); i += WG) {
        y[i] = (x[i] - mean) * inv_std * scale + offset;
    }
}

// Sums of grad_y and grad_y * x_hat per (chunk, channel).
@compute @workgroup_size(WG)
fn bn_backward_partials(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if idx >= chunk_count() * p.c { return; }
    let ch = idx % p.c;
    let span = chunk_span(idx / p.c);
    var sums = new_sum();
    for (var n = span.n0; n * p.hw < span.e1; n++) {
        let plane = (n * p.c + ch) * p.hw;
        for (var s = max(span.e0, n * p.hw) - n * p.hw; s < min(p.hw, span.e1 - n * p.hw); s++) {
            let g = grad_y[plane + s];
            add(&sums, vec2<f32>(g, g * x_hat_train(plane + s, ch)));
        }
    }
    partials[idx] = total(&sums);
}

// Per channel: grad_beta = sum(grad_y), grad_gamma = sum(grad_y * x_hat); both kept for
// bn_backward_input.
@compute @workgroup_size(WG)
fn bn_backward_finalize(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>) {
    let ch = linear_index(gid, nwg);
    if ch >= p.c { return; }
    let sums = chunk_total(ch);
    grad_sums[ch] = sums;
    grad_beta[ch] = accumulate(grad_beta[ch], sums.x);
    grad_gamma[ch] = accumulate(grad_gamma[ch], sums.y);
}

// grad_x = gamma * inv_std * (grad_y - mean(grad_y) - x_hat * mean(grad_y * x_hat)).
@compute @workgroup_size(WG)
fn bn_backward_input(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let b = plane_block(wid, nwg);
    let sums = grad_sums_in[b.ch] / f32(p.n * p.hw);
    let stats = saved_in[b.ch];
    let shift = x[b.ch * p.hw];
    let scale = gamma[b.ch] * stats.y;
    for (var i = b.first + lid; i < min(b.first + 4u * WG, b.end); i += WG) {
        let x_hat = ((x[i] - shift) - stats.x) * stats.y;
        grad_x[i] = accumulate(grad_x[i], scale * (grad_y[i] - sums.x - x_hat * sums.y));
    }
}
