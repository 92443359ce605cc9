// Argmax over the class axis of NCHW scores, and the confusion matrix that mIoU is computed
// from: confusion[label * classes + prediction] += 1 for every pixel whose label is not
// ignored. Counts are integer atomics: exact and independent of order.

struct Params {
    n: u32, classes: u32, hw: u32, ignore_label: u32,
}

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> prediction: array<u32>;
@group(0) @binding(3) var<storage, read> labels: array<u32>;
@group(0) @binding(4) var<storage, read_write> confusion: array<atomic<u32>>;
// The predictions argmax_classes wrote, as confusion_accumulate reads them.
@group(0) @binding(5) var<storage, read> prediction_in: array<u32>;

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
