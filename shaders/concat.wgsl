// Channel concat and split as one copy between channel ranges of two NCHW tensors:
// dst[n, dst_offset + c] (+)= src[n, src_offset + c] for c < channels. Concat copies each
// input into its slice; the backward (split) copies each slice's gradient back out.

struct Params {
    n: u32, channels: u32, hw: u32, flags: u32,
    src_channels: u32, src_offset: u32, dst_channels: u32, dst_offset: u32,
}

const ACCUMULATE: u32 = 1u;

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

fn linear_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(WG)
fn copy_channels(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if idx >= p.n * p.channels * p.hw { return; }
    let s = idx % p.hw;
    let c = (idx / p.hw) % p.channels;
    let n = idx / (p.hw * p.channels);
    let source = (n * p.src_channels + p.src_offset + c) * p.hw + s;
    let dest = (n * p.dst_channels + p.dst_offset + c) * p.hw + s;
    dst[dest] = select(0.0, dst[dest], (p.flags & ACCUMULATE) != 0u) + src[source];
}
