// Batch normalisation over N x H x W per channel (NCHW), PyTorch semantics: training
// normalises with the biased batch variance and moves the running statistics by
// `momentum` towards the batch mean and the unbiased variance; eval uses the running
// statistics.
//
// Training forward: bn_shift -> bn_stats_partials -> bn_stats_finalize -> bn_normalize_train.
// Training backward: bn_backward_partials -> bn_backward_finalize -> bn_backward_input.
// Channel reductions are split into chunks of samples within one image (one invocation per
// channel and chunk summing in order, or, on GPUs, a workgroup per chunk meeting in a
// fixed tree: trees.wgsl; then the chunks in order): no atomics, bit-reproducible. The
// per-element passes (shift, partials, normalisation, input gradient) may run over the
// whole layer or over channel slabs of one image each (a layer larger than a storage
// binding, see src/kernels/slabs.rs): a slab's launch has n = 1 and c = its channels, and
// finds its place in the layer's statistics and chunks from first_channel and
// first_chunk. The chunks never span images, so the slabs compute the very partial sums of
// the whole-layer launch.

struct Params {
    n: u32, c: u32, hw: u32, chunk_len: u32,
    flags: u32, eps: f32, momentum: f32,
    first_channel: u32,
    // The layer's channels (the stride of the partial sums) and samples per channel (N x H x W).
    layer_channels: u32, layer_samples: u32,
    // The chunk where this launch's image starts: image x chunks per image.
    first_chunk: u32, _pad0: u32,
}

const ACCUMULATE: u32 = 1u;
// bn_normalize_train: a ReLU after the normalisation (recomputing a BN-ReLU output).
const RELU: u32 = 2u;

#include "common.wgsl"
#include "trees.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> running_var: array<f32>;
// per channel: (batch mean minus the shift, 1 / sqrt(biased variance + eps), the shift, 0);
// the shift is the channel's first value in the batch. Keeping the mean relative to it
// keeps x_hat accurate when |mean| >> std.
@group(0) @binding(6) var<storage, read_write> saved: array<vec4<f32>>;
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
@group(0) @binding(14) var<storage, read> saved_in: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read> partials_in: array<vec2<f32>>;
@group(0) @binding(16) var<storage, read> grad_sums_in: array<vec2<f32>>;
@group(0) @binding(17) var<storage, read> running_mean_in: array<f32>;
@group(0) @binding(18) var<storage, read> running_var_in: array<f32>;

fn image_chunks() -> u32 {
    return (p.hw + p.chunk_len - 1u) / p.chunk_len;
}

// The chunks of this launch's images.
fn chunk_count() -> u32 {
    return p.n * image_chunks();
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
        add(&sums, partials_in[k * p.layer_channels + ch]);
    }
    return total(&sums);
}

// A (chunk, channel) of a partial-sums launch: the plane it sums over, its samples
// [s0, s1) there, and where its sums go in the layer's partials.
struct Span { plane: u32, s0: u32, s1: u32, out: u32, ch: u32 }

fn chunk_span(idx: u32) -> Span {
    let ch = idx % p.c;
    let chunk = idx / p.c;
    let n = chunk / image_chunks();
    let s0 = (chunk % image_chunks()) * p.chunk_len;
    let out = (p.first_chunk + chunk) * p.layer_channels + p.first_channel + ch;
    return Span((n * p.c + ch) * p.hw, s0, min(p.hw, s0 + p.chunk_len), out, ch);
}

// Each channel's shift: its first value in the batch (launched over image 0).
@compute @workgroup_size(WG)
fn bn_shift(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let ch = linear_index(gid, nwg);
    if ch >= p.c { return; }
    saved[p.first_channel + ch] = vec4<f32>(0.0, 0.0, x[ch * p.hw], 0.0);
}

// The partial sums of TERM over samples first, first + step, ... of the (chunk, channel)
// idx, blocked and compensated as above: a reduction's SUMS for trees.wgsl.
#template span_sums(NAME, TERM)
fn ${NAME}(idx: u32, first: u32, step: u32) -> vec2<f32> {
    let span = chunk_span(idx);
    var sums = new_sum();
    for (var s = span.s0 + first; s < span.s1; s += step) {
        add(&sums, ${TERM}(span, s));
    }
    return total(&sums);
}
#end

// The (chunk, channel) pairs of this launch, and where each one's sums go.
fn partial_count() -> u32 {
    return chunk_count() * p.c;
}

fn store_partial(idx: u32, sums: vec2<f32>) {
    partials[chunk_span(idx).out] = sums;
}

// (x - shift, (x - shift)^2) at sample s of the span. Shifting by the channel's first value
// keeps the one-pass variance accurate when the mean is far from zero.
fn stats_term(span: Span, s: u32) -> vec2<f32> {
    let d = x[span.plane + s] - saved_in[p.first_channel + span.ch].z;
    return vec2<f32>(d, d * d);
}

#stamp span_sums(stats_sums, stats_term)
#stamp chunk_reductions(bn_stats_partials, partial_count, stats_sums, tree_add, store_partial)

// Per channel: the batch mean and inverse deviation, and the running statistics update.
@compute @workgroup_size(WG)
fn bn_stats_finalize(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let ch = linear_index(gid, nwg);
    if ch >= p.c { return; }
    let sums = chunk_total(ch);
    let count = f32(p.layer_samples);
    let mean_shifted = sums.x / count;
    let variance = max(sums.y / count - mean_shifted * mean_shifted, 0.0);
    let shift = saved[ch].z;
    let mean = shift + mean_shifted;
    saved[ch] = vec4<f32>(mean_shifted, inverseSqrt(variance + p.eps), shift, 0.0);
    let unbiased = variance * count / (count - 1.0);
    running_mean[ch] = (1.0 - p.momentum) * running_mean[ch] + p.momentum * mean;
    running_var[ch] = (1.0 - p.momentum) * running_var[ch] + p.momentum * unbiased;
}

// The normalised value of element i of the launch's channel ch, with the batch statistics.
fn x_hat_train(i: u32, ch: u32) -> f32 {
    let stats = saved_in[p.first_channel + ch];
    return ((x[i] - stats.z) - stats.x) * stats.y;
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
    let c = p.first_channel + b.ch;
    let stats = saved_in[c];
    let shift = stats.z;
    let scale = gamma[c];
    let offset = beta[c];
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

// (grad_y, grad_y * x_hat) at sample s of the span: the backward's sums.
fn backward_term(span: Span, s: u32) -> vec2<f32> {
    let g = grad_y[span.plane + s];
    return vec2<f32>(g, g * x_hat_train(span.plane + s, span.ch));
}

#stamp span_sums(backward_sums, backward_term)
#stamp chunk_reductions(bn_backward_partials, partial_count, backward_sums, tree_add, store_partial)

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
    let c = p.first_channel + b.ch;
    let sums = grad_sums_in[c] / f32(p.layer_samples);
    let stats = saved_in[c];
    let shift = stats.z;
    let scale = gamma[c] * stats.y;
    for (var i = b.first + lid; i < min(b.first + 4u * WG, b.end); i += WG) {
        let x_hat = ((x[i] - shift) - stats.x) * stats.y;
        grad_x[i] = accumulate(grad_x[i], scale * (grad_y[i] - sums.x - x_hat * sums.y));
    }
}
