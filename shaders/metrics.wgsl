// Argmax over the class axis of NCHW scores, and the confusion matrix that mIoU is computed
// from: confusion[label * classes + prediction] += 1 for every pixel whose label is not
// ignored. Counts are integer atomics: exact and independent of order.

struct Params {
    n: u32, classes: u32, hw: u32, ignore_label: u32,
    // argmax over a slab of classes: the first class bound (see argmax_classes_slab)
    first_class: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> prediction: array<u32>;
@group(0) @binding(3) var<storage, read> labels: array<u32>;
@group(0) @binding(4) var<storage, read_write> confusion: array<atomic<u32>>;
// The predictions argmax_classes wrote, as confusion_accumulate reads them.
@group(0) @binding(5) var<storage, read> prediction_in: array<u32>;
// The running best score of argmax_classes_slab.
@group(0) @binding(6) var<storage, read_write> best_scores: array<f32>;

// The first class with the highest score (as torch.argmax).
@compute @workgroup_size(WG)
fn argmax_classes(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let px = linear_index(gid, nwg);
    if px >= p.n * p.hw { return; }
    let base = (px / p.hw) * p.classes * p.hw + px % p.hw;
    var best = 0u;
    var best_score = scores[base];
    for (var k = 1u; k < p.classes; k++) {
        let s = scores[base + k * p.hw];
        if s > best_score {
            best = k;
            best_score = s;
        }
    }
    prediction[px] = best;
}

// The argmax over classes first_class..first_class + classes of scores too large for one
// binding, one slab of classes at a time in order: the first slab starts the running best
// (score and class), each later one replaces it only where a class beats it, so the result
// is argmax_classes' to the bit (ties keep the first class).
@compute @workgroup_size(WG)
fn argmax_classes_slab(@builtin(global_invocation_id) gid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let px = linear_index(gid, nwg);
    if px >= p.n * p.hw { return; }
    let base = (px / p.hw) * p.classes * p.hw + px % p.hw;
    let first = p.first_class == 0u;
    var best = select(prediction[px], 0u, first);
    var best_score = select(best_scores[px], scores[base], first);
    for (var k = select(0u, 1u, first); k < p.classes; k++) {
        let s = scores[base + k * p.hw];
        if s > best_score {
            best = p.first_class + k;
            best_score = s;
        }
    }
    prediction[px] = best;
    best_scores[px] = best_score;
}

@compute @workgroup_size(WG)
fn confusion_accumulate(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>) {
    let px = linear_index(gid, nwg);
    if px >= p.n * p.hw { return; }
    let label = labels[px];
    let pred = prediction_in[px];
    if label == p.ignore_label || label >= p.classes || pred >= p.classes { return; }
    atomicAdd(&confusion[label * p.classes + pred], 1u);
}
