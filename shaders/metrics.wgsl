// Argmax over the class axis of NCHW scores, and the confusion matrix that mIoU is computed
// from: confusion[label * classes + prediction] += 1 for every pixel whose label is not
// ignored. Counts are integer atomics: exact and independent of order.

#if F16
enable f16;
#end

struct Params {
    n: u32, classes: u32, hw: u32, ignore_label: u32,
    // argmax over a slab of classes: the first class bound (see argmax_classes_slab)
    first_class: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
// Built with F16 (shader metrics_f16, half-precision inference), the scores are f16.
@group(0) @binding(1) var<storage, read> scores: array<Act>;
@group(0) @binding(2) var<storage, read_write> prediction: array<u32>;
@group(0) @binding(3) var<storage, read> labels: array<u32>;
@group(0) @binding(4) var<storage, read_write> confusion: array<atomic<u32>>;
// The predictions argmax_classes wrote, as confusion_accumulate reads them.
@group(0) @binding(5) var<storage, read> prediction_in: array<u32>;
// The running best score of argmax_classes_slab.
@group(0) @binding(6) var<storage, read_write> best_scores: array<f32>;

// The best (class, score) of a pixel's classes from `k0` on, starting from `start`: the
// first class with the highest score (as torch.argmax).
struct Best { index: u32, score: f32 }

fn best_class(base: u32, k0: u32, start: Best) -> Best {
    var best = start;
    for (var k = k0; k < p.classes; k++) {
        let s = f32(scores[base + k * p.hw]);
        if s > best.score {
            best = Best(p.first_class + k, s);
        }
    }
    return best;
}

@compute @workgroup_size(WG)
fn argmax_classes(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let px = linear_index(gid, nwg);
    if px >= p.n * p.hw { return; }
    let base = (px / p.hw) * p.classes * p.hw + px % p.hw;
    prediction[px] = best_class(base, 1u, Best(0u, f32(scores[base]))).index;
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
    var best: Best;
    if p.first_class == 0u {
        best = best_class(base, 1u, Best(0u, f32(scores[base])));
    } else {
        best = best_class(base, 0u, Best(prediction[px], best_scores[px]));
    }
    prediction[px] = best.index;
    best_scores[px] = best.score;
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
