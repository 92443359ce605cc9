// Channel concat and split as one copy between channel ranges of two NCHW tensors:
// dst[n, dst_offset + c] (+)= src[n, src_offset + c] for c < channels. Concat copies each
// input into its slice; the backward (split) copies each slice's gradient back out.

#if F16
enable f16;
#end

struct Params {
    n: u32, channels: u32, hw: u32, flags: u32,
    src_channels: u32, src_offset: u32, dst_channels: u32, dst_offset: u32,
}

const ACCUMULATE: u32 = 1u;

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
// Built with F16 (shader concat_f16, half-precision inference), src and dst are f16.
@group(0) @binding(1) var<storage, read> src: array<Act>;
@group(0) @binding(2) var<storage, read_write> dst: array<Act>;

// Each plane (n, c) copied gets a run of workgroups of 4 x WG values, invocation `lid`
// taking the values WG apart: the plane's offsets are then worked out once per workgroup
// (per-element integer division is scalarised, and slow, on CPU drivers).
@compute @workgroup_size(WG)
fn copy_channels(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let wg = wid.x + wid.y * nwg.x;
    let blocks = (p.hw + 4u * WG - 1u) / (4u * WG);
    let plane = wg / blocks;
    if plane >= p.n * p.channels { return; }
    let c = plane % p.channels;
    let n = plane / p.channels;
    let source = (n * p.src_channels + p.src_offset + c) * p.hw;
    let dest = (n * p.dst_channels + p.dst_offset + c) * p.hw;
    let first = (wg % blocks) * 4u * WG;
    for (var s = first + lid; s < min(first + 4u * WG, p.hw); s += WG) {
        dst[dest + s] = select(Act(0.0), dst[dest + s], (p.flags & ACCUMULATE) != 0u) + src[source + s];
    }
}
