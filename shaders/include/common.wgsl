// What all kernels share, composed into each kernel file at its include line by the
// registry (src/gpu/registry.rs).

// The type activations are stored at: f16 in the half-precision inference modules (flag
// F16; their files `enable f16` first), else f32. Kernels load them as f32 and store them
// through Act(), so products and sums stay f32.
#if F16
alias Act = f16;
#else
alias Act = f32;
#end

// Invocations per workgroup; the engine sets it per adapter (gpu::Gpu::workgroup_size).
override WG: u32 = 64u;

// WebGPU caps each grid dimension (65535 by default), so a long 1-D range of workgroups is
// folded into x and y (gpu::Workgroups::cover); this is the invocation's index in the range.
fn linear_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}
