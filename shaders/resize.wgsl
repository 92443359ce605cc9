// Resampling of NCHW maps to an explicit output size: bilinear resize, align_corners true
// or false (PyTorch's source-index rules), and adaptive average pooling (PyTorch's
// AdaptiveAvgPool2d: output cell i of a side covers inputs floor(i * in / out) up to
// ceil((i + 1) * in / out), so cells overlap when out does not divide in; PPM's pyramid
// and ASPP's image pooling). The output may be a channel slice of a wider tensor, so
// HRNet's final concat is written in place by the resizes. The backwards are gathers over
// the outputs that read each input pixel: deterministic, no atomics.

#if F16
enable f16;
#end

struct Params {
    n: u32, c: u32, h: u32, w: u32,
    ho: u32, wo: u32, align_corners: u32, flags: u32,
    // the output (and its gradient) has `out_channels` channels; this map is [out_offset, +c)
    out_offset: u32, out_channels: u32, _pad0: u32, _pad1: u32,
}

const ACCUMULATE: u32 = 1u;

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
// Built with F16 (shader resize_f16, half-precision inference), x and y are f16.
@group(0) @binding(1) var<storage, read> x: array<Act>;
@group(0) @binding(2) var<storage, read_write> y: array<Act>;
@group(0) @binding(3) var<storage, read> grad_y: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad_x: array<f32>;

// Input length per output step: (in - 1) / (out - 1) aligned (0 for one output), in / out otherwise.
fn ratio(len_in: u32, len_out: u32) -> f32 {
    if p.align_corners != 0u {
        return select(0.0, f32(len_in - 1u) / f32(len_out - 1u), len_out > 1u);
    }
    return f32(len_in) / f32(len_out);
}

// The two source indices an output index reads and the weight of the second.
struct Taps { i0: u32, i1: u32, t: f32 }

fn taps(dst: u32, len_in: u32, len_out: u32) -> Taps {
    var src: f32;
    if p.align_corners != 0u {
        src = f32(dst) * ratio(len_in, len_out);
    } else {
        src = max((f32(dst) + 0.5) * ratio(len_in, len_out) - 0.5, 0.0);
    }
    let i0 = min(u32(src), len_in - 1u);
    let i1 = min(i0 + 1u, len_in - 1u);
    return Taps(i0, i1, src - f32(i0));
}

// Output indices whose taps may include input index `i`, widened by one on each side
// against rounding; exact membership is tested with `taps` itself.
fn readers(i: u32, len_in: u32, len_out: u32) -> vec2<u32> {
    let r = ratio(len_in, len_out);
    if r == 0.0 || len_in == 1u { return vec2<u32>(0u, len_out); }
    var lo: f32;
    var hi: f32;
    if p.align_corners != 0u {
        lo = (f32(i) - 1.0) / r;
        hi = (f32(i) + 1.0) / r;
    } else {
        lo = (f32(i) - 0.5) / r - 0.5;
        hi = (f32(i) + 1.5) / r - 0.5;
    }
    let first = u32(max(floor(lo) - 1.0, 0.0));
    return vec2<u32>(min(first, len_out), min(u32(max(ceil(hi) + 2.0, 0.0)), len_out));
}

// Weight with which output index `o` reads input index `i`.
fn weight(o: u32, i: u32, len_in: u32, len_out: u32) -> f32 {
    let k = taps(o, len_in, len_out);
    return select(0.0, 1.0 - k.t, k.i0 == i) + select(0.0, k.t, k.i1 == i);
}

// Pixel idx of a launch over maps of width w and height h: its column, row and (n, c) plane.
struct Pixel { x: u32, y: u32, plane: u32 }

fn pixel(idx: u32, w: u32, h: u32) -> Pixel {
    return Pixel(idx % w, (idx / w) % h, idx / (w * h));
}

fn out_plane(n: u32, ch: u32) -> u32 {
    return ((n * p.out_channels + p.out_offset + ch) * p.ho) * p.wo;
}

@compute @workgroup_size(WG)
fn resize_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if idx >= p.n * p.c * p.ho * p.wo { return; }
    let o = pixel(idx, p.wo, p.ho);
    let ky = taps(o.y, p.h, p.ho);
    let kx = taps(o.x, p.w, p.wo);
    let plane = o.plane * p.h * p.w;
    let top = mix(f32(x[plane + ky.i0 * p.w + kx.i0]), f32(x[plane + ky.i0 * p.w + kx.i1]), kx.t);
    let bottom = mix(f32(x[plane + ky.i1 * p.w + kx.i0]), f32(x[plane + ky.i1 * p.w + kx.i1]), kx.t);
    y[out_plane(o.plane / p.c, o.plane % p.c) + o.y * p.wo + o.x] = Act(mix(top, bottom, ky.t));
}

// The backward of a separable resampling as a gather: input pixel (iy, ix) sums
// WEIGHT(oy, iy) * WEIGHT(ox, ix) * grad_y over the outputs RANGE says may read it.
#template gather_backward(ENTRY, RANGE, WEIGHT)
@compute @workgroup_size(WG)
fn ${ENTRY}(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if idx >= p.n * p.c * p.h * p.w { return; }
    let i = pixel(idx, p.w, p.h);
    let plane = out_plane(i.plane / p.c, i.plane % p.c);
    let rows = ${RANGE}(i.y, p.h, p.ho);
    let cols = ${RANGE}(i.x, p.w, p.wo);
    var sum = 0.0;
    for (var oy = rows.x; oy < rows.y; oy++) {
        let wy = ${WEIGHT}(oy, i.y, p.h, p.ho);
        if wy == 0.0 { continue; }
        for (var ox = cols.x; ox < cols.y; ox++) {
            sum += wy * ${WEIGHT}(ox, i.x, p.w, p.wo) * grad_y[plane + oy * p.wo + ox];
        }
    }
    grad_x[idx] = select(0.0, grad_x[idx], (p.flags & ACCUMULATE) != 0u) + sum;
}
#end

#stamp gather_backward(resize_backward, readers, weight)

// The inputs [start, end) output cell i of a side of `len_out` cells covers.
fn cell(i: u32, len_in: u32, len_out: u32) -> vec2<u32> {
    return vec2<u32>((i * len_in) / len_out, ((i + 1u) * len_in + len_out - 1u) / len_out);
}

// The output cells [first, last) whose range holds input index `j`: cell i starts at or
// before j exactly when i < (j + 1) * out / in, and ends after j exactly when
// i >= floor(j * out / in).
fn cells_over(j: u32, len_in: u32, len_out: u32) -> vec2<u32> {
    return vec2<u32>((j * len_out) / len_in, min(((j + 1u) * len_out + len_in - 1u) / len_in, len_out));
}

@compute @workgroup_size(WG)
fn adaptive_avg_pool_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if idx >= p.n * p.c * p.ho * p.wo { return; }
    let o = pixel(idx, p.wo, p.ho);
    let plane = o.plane * p.h * p.w;
    let rows = cell(o.y, p.h, p.ho);
    let cols = cell(o.x, p.w, p.wo);
    var sum = 0.0;
    for (var iy = rows.x; iy < rows.y; iy++) {
        for (var ix = cols.x; ix < cols.y; ix++) {
            sum += f32(x[plane + iy * p.w + ix]);
        }
    }
    let area = f32((rows.y - rows.x) * (cols.y - cols.x));
    y[out_plane(o.plane / p.c, o.plane % p.c) + o.y * p.wo + o.x] = Act(sum / area);
}

// The share of output cell o that each input it covers gets (`cells_over` gives only the
// cells that cover input i).
fn cell_weight(o: u32, i: u32, len_in: u32, len_out: u32) -> f32 {
    let c = cell(o, len_in, len_out);
    return 1.0 / f32(c.y - c.x);
}

#stamp gather_backward(adaptive_avg_pool_backward, cells_over, cell_weight)
