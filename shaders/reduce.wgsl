// Deterministic sums without atomics: per-channel sums over N x H x W split into chunks
// (one invocation per channel and chunk, summing in order), and the ordered sum of such
// per-chunk partial results. The split is fixed by the shape, so results are
// bit-reproducible.

struct Params {
    // channel_sum: samples are [n][c][hw]; chunk_len samples of one channel per invocation
    n: u32, c: u32, hw: u32, chunk_len: u32,
    // sum_chunks: `chunks` partial arrays of `len` values each
    len: u32, chunks: u32, flags: u32,
    // channel_sum over a channel slab in one chunk: where its sums go in dst
    first_channel: u32,
}

const ACCUMULATE: u32 = 1u;

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
// [chunk][len] partial sums, or the final sums when there is one chunk
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

fn store(i: u32, v: f32) {
    dst[i] = select(0.0, dst[i], (p.flags & ACCUMULATE) != 0u) + v;
}

// dst[chunk * c + ch] = sum of src[n, ch, s] over the chunk's samples e = n * hw + s
// (at first_channel + ch for a slab summed in one chunk).
@compute @workgroup_size(WG)
fn channel_sum(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = p.n * p.hw;
    let chunks = (total + p.chunk_len - 1u) / p.chunk_len;
    let idx = linear_index(gid, nwg);
    if idx >= chunks * p.c { return; }
    let ch = idx % p.c;
    let chunk = idx / p.c;
    let e0 = chunk * p.chunk_len;
    let e1 = min(total, e0 + p.chunk_len);
    var sum = 0.0;
    for (var n = e0 / p.hw; n * p.hw < e1; n++) {
        let plane = (n * p.c + ch) * p.hw;
        let s1 = min(p.hw, e1 - n * p.hw);
        for (var s = max(e0, n * p.hw) - n * p.hw; s < s1; s++) {
            sum += src[plane + s];
        }
    }
    store(p.first_channel + idx, sum);
}

// dst[i] = sum over chunks of src[chunk * len + i], in chunk order.
@compute @workgroup_size(WG)
fn sum_chunks(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(gid, nwg);
    if i >= p.len { return; }
    var sum = 0.0;
    for (var k = 0u; k < p.chunks; k++) {
        sum += src[k * p.len + i];
    }
    store(i, sum);
}
