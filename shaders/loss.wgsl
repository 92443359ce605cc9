// Pixel-wise cross entropy over the class axis of NCHW logits, with an ignore label and
// optional class weights (PyTorch's mean: sum(w * nll) / sum(w) over pixels not ignored;
// or, with ALL_PIXELS, sum(w * nll) over them / every pixel: the official train loop's
// mean of an unreduced loss), and OHEM cross entropy (HRNet-OCR's OhemCrossEntropy: keep
// the pixels whose target-class probability is below max(the min_kept-th smallest,
// thresh); plain mean of w * nll over them).
//
// Only three passes read the logits, each over a class range (`first_class`,
// `slab_classes`) of `n` images: all classes of the batch when they fit a storage binding,
// else one slab of one image per launch, the slabs of a pixel in class order.
// ce_max and ce_sum_exp leave each pixel's (max logit, sum of exp(logit - max), target
// logit) in `stats`, summing in class order however the classes are cut, so the
// bits do not depend on the cut; ce_backward writes the gradient of a class range.
// Cross entropy: ce_max -> ce_sum_exp -> ce_partials -> ce_finalize; backward: ce_backward.
// OHEM first finds the min_kept-th smallest target probability exactly, by a 4-pass radix
// select over its float bits (non-negative floats order like their bits): ohem_probs, then
// 4 x (ohem_histogram, ohem_select). Counting uses integer atomics, which are exact and
// order-independent; every float sum runs in a fixed order, partial sums over chunks of
// pixels that never span two images (ce_partials, an invocation per chunk, or on GPUs
// ce_partials_tree, a workgroup per chunk: trees.wgsl). A batch with no pixel left gives
// loss 0 and gradient 0.

struct Params {
    n: u32, classes: u32, hw: u32, chunk_len: u32,
    ignore_label: u32, flags: u32, grad_scale: f32, thresh: f32,
    min_kept: u32, radix_pass: u32, first_class: u32, slab_classes: u32,
    first_image: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

const ACCUMULATE: u32 = 1u;
const ALL_PIXELS: u32 = 2u;
// Written as the target probability of an ignored pixel: above every probability, so the
// selection never picks it.
const IGNORED_PROB: f32 = 2.0;

#include "common.wgsl"
#include "trees.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read> class_weight: array<f32>;
// per chunk of pixels: (sum of coefficient * nll, sum of denominators)
@group(0) @binding(4) var<storage, read_write> partials: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> loss: array<f32>;
// (loss numerator's denominator, 0): what the backward divides by
@group(0) @binding(6) var<storage, read_write> denom: array<f32>;
@group(0) @binding(7) var<storage, read_write> grad_logits: array<f32>;
@group(0) @binding(8) var<storage, read_write> target_prob: array<f32>;
@group(0) @binding(9) var<storage, read_write> histogram: array<atomic<u32>, 256>;
// radix select state: (prefix bits found so far, rank still sought, valid pixels, none valid)
@group(0) @binding(10) var<storage, read_write> select_state: array<u32, 4>;
// What a pass reads of what an earlier one wrote, read-only.
@group(0) @binding(11) var<storage, read> partials_in: array<vec2<f32>>;
@group(0) @binding(12) var<storage, read> denom_in: array<f32>;
@group(0) @binding(13) var<storage, read> target_prob_in: array<f32>;
@group(0) @binding(14) var<storage, read> select_state_in: array<u32, 4>;
// per pixel: (max logit, sum of exp(logit - max), target logit, 0)
@group(0) @binding(15) var<storage, read_write> stats: array<vec4<f32>>;
@group(0) @binding(16) var<storage, read> stats_in: array<vec4<f32>>;

fn pixels() -> u32 {
    return p.n * p.hw;
}

// Index of class `k` (of the launch's range) at pixel `px` (= image * hw + s) of the bound
// logits.
fn logit_index(px: u32, k: u32) -> u32 {
    return ((px / p.hw) * p.slab_classes + k - p.first_class) * p.hw + px % p.hw;
}

fn is_valid(label: u32) -> bool {
    return label != p.ignore_label && label < p.classes;
}

// log(sum over classes of exp(logit)) of a pixel, from its stats.
fn log_sum_exp(px: u32) -> f32 {
    let s = stats_in[px];
    return s.x + log(s.y);
}

// The running max over the classes, the first range starting it.
@compute @workgroup_size(WG)
fn ce_max(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let px = linear_index(gid, nwg);
    if px >= pixels() { return; }
    var m = select(stats[px].x, -3.4e38, p.first_class == 0u);
    for (var k = p.first_class; k < p.first_class + p.slab_classes; k++) {
        m = max(m, logits[logit_index(px, k)]);
    }
    stats[px] = vec4<f32>(m, 0.0, 0.0, 0.0);
}

// The running sum of exp(logit - max) in class order, and the target logit from the range
// that holds it.
@compute @workgroup_size(WG)
fn ce_sum_exp(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let px = linear_index(gid, nwg);
    if px >= pixels() { return; }
    var s = stats[px];
    let label = labels[px];
    for (var k = p.first_class; k < p.first_class + p.slab_classes; k++) {
        let x = logits[logit_index(px, k)];
        s.y += exp(x - s.x);
        if k == label { s.z = x; }
    }
    stats[px] = s;
}

fn image_chunks() -> u32 {
    return (p.hw + p.chunk_len - 1u) / p.chunk_len;
}

// The chunks of this launch's images.
fn chunk_count() -> u32 {
    return p.n * image_chunks();
}

// The pixels [x, y) of chunk `chunk` of the launch: `chunk_len` of one image (the last
// one of an image fewer).
fn chunk_pixels(chunk: u32) -> vec2<u32> {
    let image = chunk / image_chunks();
    let start = image * p.hw + (chunk % image_chunks()) * p.chunk_len;
    return vec2<u32>(start, min((image + 1u) * p.hw, start + p.chunk_len));
}

fn store_partials(chunk: u32, sums: vec2<f32>) {
    partials[p.first_image * image_chunks() + chunk] = sums;
}

// The loss and its gradient, one set of entry points per kind (SUFFIX): with class
// weights or without, OHEM or plain. Only the OHEM ones read the selection's outputs,
// only the weighted ones the class weights.
#template cross_entropy(SUFFIX, WEIGHTED, OHEM)
// (coefficient of the pixel's nll in the numerator, its share of the denominator).
fn pixel_terms${SUFFIX}(px: u32) -> vec2<f32> {
    let label = labels[px];
    let all_pixels = (p.flags & ALL_PIXELS) != 0u;
    if !is_valid(label) { return vec2<f32>(0.0, select(0.0, 1.0, all_pixels)); }
#if ${WEIGHTED}
    let w = class_weight[label];
#else
    let w = 1.0;
#end
#if ${OHEM}
    let threshold = max(bitcast<f32>(select_state_in[0]), p.thresh);
    let kept = select_state_in[3] == 0u && target_prob_in[px] < threshold;
    return select(vec2<f32>(0.0), vec2<f32>(w, 1.0), kept);
#else
    return vec2<f32>(w, select(w, 1.0, all_pixels));
#end
}

// (sum of coefficient * nll, sum of denominators) of a chunk over its pixels first,
// first + step, ...
fn chunk_sums${SUFFIX}(chunk: u32, first: u32, step: u32) -> vec2<f32> {
    let pixels = chunk_pixels(chunk);
    var sums = vec2<f32>(0.0);
    for (var px = pixels.x + first; px < pixels.y; px += step) {
        let terms = pixel_terms${SUFFIX}(px);
        if terms.x == 0.0 {
            sums.y += terms.y;
            continue;
        }
        let nll = log_sum_exp(px) - stats_in[px].z;
        sums += vec2<f32>(terms.x * nll, terms.y);
    }
    return sums;
}

#stamp chunk_reductions(ce_partials${SUFFIX}, chunk_count, chunk_sums${SUFFIX}, tree_add, store_partials)

// grad = grad_scale * coefficient / denominator * (softmax - one_hot(label)), over the
// launch's class range.
@compute @workgroup_size(WG)
fn ce_backward${SUFFIX}(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>) {
    let px = linear_index(gid, nwg);
    if px >= pixels() { return; }
    let terms = pixel_terms${SUFFIX}(px);
    let g = select(0.0, p.grad_scale * terms.x / denom_in[0], terms.x != 0.0 && denom_in[0] > 0.0);
    let label = labels[px];
    let lse = select(0.0, log_sum_exp(px), g != 0.0);
    let keep = (p.flags & ACCUMULATE) != 0u;
    for (var k = p.first_class; k < p.first_class + p.slab_classes; k++) {
        let i = logit_index(px, k);
        // An ignored pixel's exp(logit) may overflow; its gradient is 0 regardless.
        let d = select(0.0, g * (exp(logits[i] - lse) - select(0.0, 1.0, k == label)), g != 0.0);
        grad_logits[i] = select(0.0, grad_logits[i], keep) + d;
    }
}
#end

#stamp cross_entropy(, false, false)
#stamp cross_entropy(_weighted, true, false)
#stamp cross_entropy(_ohem, false, true)
#stamp cross_entropy(_weighted_ohem, true, true)

@compute @workgroup_size(1)
fn ce_finalize() {
    var sums = vec2<f32>(0.0);
    for (var c = 0u; c < chunk_count(); c++) {
        sums += partials_in[c];
    }
    loss[0] = select(0.0, sums.x / sums.y, sums.y > 0.0);
    denom[0] = sums.y;
}

// The target class's probability per pixel (IGNORED_PROB where ignored); clears the histogram.
@compute @workgroup_size(WG)
fn ohem_probs(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let px = linear_index(gid, nwg);
    if px < 256u { atomicStore(&histogram[px], 0u); }
    if px >= pixels() { return; }
    let label = labels[px];
    if !is_valid(label) {
        target_prob[px] = IGNORED_PROB;
        return;
    }
    target_prob[px] = exp(stats_in[px].z - log_sum_exp(px));
}

// Counts the next 8 bits of the probabilities whose higher bits match the prefix so far.
@compute @workgroup_size(WG)
fn ohem_histogram(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let px = linear_index(gid, nwg);
    if px >= pixels() { return; }
    let bits = bitcast<u32>(target_prob_in[px]);
    let shift = 24u - 8u * p.radix_pass;
    if p.radix_pass == 0u || (bits >> (shift + 8u)) == select_state_in[0] {
        atomicAdd(&histogram[(bits >> shift) & 255u], 1u);
    }
}

// Finds the bin holding the sought rank, extends the prefix by it and clears the histogram.
@compute @workgroup_size(1)
fn ohem_select() {
    if p.radix_pass == 0u {
        // Valid probabilities are at most 1.0 (top byte 0x3f); IGNORED_PROB's is 0x40.
        var valid = 0u;
        for (var b = 0u; b < 0x40u; b++) {
            valid += atomicLoad(&histogram[b]);
        }
        select_state[0] = 0u;
        select_state[1] = min(p.min_kept, max(valid, 1u) - 1u);
        select_state[2] = valid;
        select_state[3] = select(0u, 1u, valid == 0u);
    }
    var rank = select_state[1];
    var bin = 0u;
    for (; bin < 255u; bin++) {
        let count = atomicLoad(&histogram[bin]);
        if rank < count { break; }
        rank -= count;
    }
    select_state[0] = (select_state[0] << 8u) | bin;
    select_state[1] = rank;
    for (var b = 0u; b < 256u; b++) {
        atomicStore(&histogram[b], 0u);
    }
}
