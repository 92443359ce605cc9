// 2-D convolution (NCHW input, OIHW weight, groups = 1) and its backward passes.
//
// Most kernels give every invocation a register tile and use no workgroup memory: CPU
// drivers such as lavapipe pay dearly for workgroupBarrier. Each pass is one body (a
// #template, see src/gpu/compose.rs) stamped twice: a "narrow" 16 x 4 tile (16 output
// channels x 4 pixels for the forward, 16 input channels x 4 columns for the input
// gradient, 16 output x 4 input channels for the weight gradient) whose sums per channel
// are a vec4, and a "wide" 16 x 16 one whose sums are a mat4x4 of four quads: every value
// loaded then feeds 16 multiply-adds instead of 4, which ran 1.5x to 2.8x faster on
// lavapipe where the shape fills the tile. The accumulators are named variables unrolled
// by #for, not arrays: dynamically indexed arrays spill on lavapipe. conv2d_forward_tiled,
// an implicit GEMM through workgroup memory, is the variant for GPUs; src/kernels/tuning.rs
// times the forward's variants per adapter. Optional inputs (bias, folded batch norm,
// residual) are entry points of their own, so no kernel binds what it does not read.
// Reductions run in a fixed order, so results are bit-reproducible.
//
// Built with F16 (shader conv2d_f16, half-precision inference), the forward keeps its
// packed weights and its activations (x, y, residual; see Act in common.wgsl) at half
// precision: half the traffic, each weight rounded to half once as it is packed, products
// and sums still f32.
#if F16
enable f16;
#end

struct Params {
    n: u32, ci: u32, h: u32, w: u32,
    co: u32, kh: u32, kw: u32, ho: u32,
    wo: u32, stride_h: u32, stride_w: u32, pad_h: u32,
    pad_w: u32, dil_h: u32, dil_w: u32, flags: u32,
    // backward_weight only: output rows (n, oy) per chunk of the pixel reduction
    chunk_rows: u32,
    // the folded batch norm's epsilon
    eps: f32,
    // A slab of a convolution split over bindings (see src/kernels/slabs.rs) reads the whole
    // weight, bias and batch norm, or writes into the whole weight gradient: the weight's
    // input channels per row, the first input channel and the first output channel of the
    // slab.
    weight_ci: u32, weight_ci0: u32, co0: u32, _pad0: u32,
}

// The input gradient and weight gradient add to what their output holds; the forward adds
// the partial sum of the earlier input slabs.
const ACCUMULATE: u32 = 1u;
const RELU: u32 = 2u;
// The forward's packing writes a zero shift: an input slab before the last.
const NO_SHIFT: u32 = 4u;

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Act>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<Act>;
@group(0) @binding(5) var<storage, read> grad_y: array<f32>;
@group(0) @binding(6) var<storage, read_write> grad_x: array<f32>;
// grad_weight, or per-chunk partial sums [chunk][co][ci][kh][kw] when the reduction is split
@group(0) @binding(7) var<storage, read_write> grad_weight: array<f32>;
// The weight repacked as vec4s of 4 channels (see conv2d_pack_weight), so one load
// fetches the weights of a whole register-tile row: written by the packing at binding 16,
// read by the convolutions here.
@group(0) @binding(8) var<storage, read> packed_weight: array<vec4<Act>>;
@group(0) @binding(16) var<storage, read_write> packed_out: array<vec4<Act>>;

fn packed(i: u32) -> vec4<f32> {
    return vec4<f32>(packed_weight[i]);
}
// Each output channel's additive term (bias and folded batch norm): written by the
// forward's weight packing, read by the forward's epilogue.
@group(0) @binding(9) var<storage, read_write> shift_out: array<f32>;
@group(0) @binding(10) var<storage, read> shift: array<f32>;
@group(0) @binding(11) var<storage, read> bn_gamma: array<f32>;
@group(0) @binding(12) var<storage, read> bn_beta: array<f32>;
@group(0) @binding(13) var<storage, read> bn_mean: array<f32>;
@group(0) @binding(14) var<storage, read> bn_var: array<f32>;
@group(0) @binding(15) var<storage, read> residual: array<Act>;

// The forward's register tiles: y[n, co0..co0+16, the invocation's pixels] = shift +
// sum over ky, kx, ci of weight * x, then the epilogue; a<J> accumulates output channel
// co0 + J at the tile's pixels (a vec4 of one quad or a mat4x4 of four, ACC). A workgroup
// shares one channel group: the weight indices are uniform, so a CPU driver loads each
// weight once for the whole SIMD batch instead of once per invocation; only the input is
// gathered, and each value gathered feeds 16 multiply-adds. The tap loop is outside the
// channel loop, so padding and addresses are worked out once per tap. Channel groups past
// the last re-read the last packed group; their sums are never stored.
#template forward_registers(ENTRY, T, ACC, PIXELS, EPILOGUE)
@compute @workgroup_size(WG)
fn ${ENTRY}(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let co_tiles = (p.co + 3u) / 4u;
    let groups = (co_tiles + 3u) / 4u;
    let pixels = p.ho * p.wo;
    let blocks = (pixels + ${PIXELS}u * WG - 1u) / (${PIXELS}u * WG);
    let wg = wid.x + wid.y * nwg.x;
    if wg >= p.n * groups * blocks { return; }
    let block = wg % blocks;
    let t0 = ((wg / blocks) % groups) * 4u;
    let n = wg / (blocks * groups);
    let px = pixels_${T}(block, lid);
    // Invocations past the map return: a CPU driver then skips their SIMD batches.
    if px.q0.x >= pixels { return; }
#for J in 0..16
    var a${J}: ${ACC};
#end
    let image = n * p.ci * p.h * p.w;
    for (var ky = 0u; ky < p.kh; ky++) {
        for (var kx = 0u; kx < p.kw; kx++) {
            let taps = taps_${T}(px, ky, kx, image);
            var tap = (ky * p.kw + kx) * p.ci * co_tiles;
            var plane = 0u;
            for (var c = 0u; c < p.ci; c++) {
                let xs = gather_x_${T}(taps, plane);
#for G in 0..4
                let w${G} = packed(tap + min(t0 + ${G}u, co_tiles - 1u));
#end
#for J in 0..16
                a${J} += w${J / 4}[${J % 4}] * xs;
#end
                plane += p.h * p.w;
                tap += co_tiles;
            }
        }
    }
    let co0 = t0 * 4u;
#for J in 0..16
    store_y_${T}${EPILOGUE}(n, co0 + ${J}u, px, a${J});
#end
}
#end

// Narrow: 4 pixels WG apart per invocation, so small maps (HRNet's deepest branches) fill
// more invocations.
#stamp forward_registers(conv2d_forward, narrow, vec4<f32>, 4, )
#stamp forward_registers(conv2d_forward_residual, narrow, vec4<f32>, 4, _residual)
// Wide (lavapipe's choice at nearly every HRNet shape, small maps included): 16 contiguous
// pixels per invocation (quad g, lane j is pixel block * 16 * WG + 16 * lid + 4g + j);
// against pixels WG apart that ran a 1x1 270->512 convolution 1.3x faster on lavapipe and
// 3x3 ones as fast.
#stamp forward_registers(conv2d_forward_wide, wide, mat4x4<f32>, 16, )
#stamp forward_registers(conv2d_forward_wide_residual, wide, mat4x4<f32>, 16, _residual)

struct PixelsNarrow {
    q0: vec4<u32>,
}

struct PixelsWide {
    q0: vec4<u32>,
    q1: vec4<u32>,
    q2: vec4<u32>,
    q3: vec4<u32>,
}

fn pixels_narrow(block: u32, lid: u32) -> PixelsNarrow {
    return PixelsNarrow(vec4<u32>(block * 4u * WG + lid) + vec4<u32>(0u, 1u, 2u, 3u) * WG);
}

fn pixels_wide(block: u32, lid: u32) -> PixelsWide {
    let first = block * 16u * WG + lid * 16u;
    return PixelsWide(quad(first), quad(first + 4u), quad(first + 8u), quad(first + 12u));
}

fn quad(first: u32) -> vec4<u32> {
    return vec4<u32>(first) + vec4<u32>(0u, 1u, 2u, 3u);
}

// Where the four output pixels `q` read the input through tap (ky, kx), in input channel
// 0 of the image at `image`, and whether they read inside it (outside is padding). Pixels
// past the last read as the last; their sums are never stored.
struct TapSource {
    at: vec4<u32>,
    inside: vec4<bool>,
}

fn tap_source(q: vec4<u32>, ky: u32, kx: u32, image: u32) -> TapSource {
    let qc = min(q, vec4<u32>(p.ho * p.wo - 1u));
    let iy = vec4<i32>((qc / p.wo) * p.stride_h + ky * p.dil_h) - i32(p.pad_h);
    let ix = vec4<i32>((qc % p.wo) * p.stride_w + kx * p.dil_w) - i32(p.pad_w);
    let top = vec4<i32>(i32(p.h) - 1);
    let right = vec4<i32>(i32(p.w) - 1);
    let inside = (iy >= vec4<i32>(0)) & (iy <= top) & (ix >= vec4<i32>(0)) & (ix <= right);
    let at = vec4<u32>(clamp(iy, vec4<i32>(0), top) * i32(p.w) + clamp(ix, vec4<i32>(0), right)) + vec4<u32>(image);
    return TapSource(at, inside);
}

fn gather_x(s: TapSource, plane: u32) -> vec4<f32> {
    let at = s.at + vec4<u32>(plane);
    return select(vec4<f32>(0.0), vec4<f32>(vec4<Act>(x[at.x], x[at.y], x[at.z], x[at.w])), s.inside);
}

struct TapsNarrow {
    s0: TapSource,
}

struct TapsWide {
    s0: TapSource,
    s1: TapSource,
    s2: TapSource,
    s3: TapSource,
}

fn taps_narrow(px: PixelsNarrow, ky: u32, kx: u32, image: u32) -> TapsNarrow {
    return TapsNarrow(tap_source(px.q0, ky, kx, image));
}

fn taps_wide(px: PixelsWide, ky: u32, kx: u32, image: u32) -> TapsWide {
    return TapsWide(tap_source(px.q0, ky, kx, image), tap_source(px.q1, ky, kx, image),
                    tap_source(px.q2, ky, kx, image), tap_source(px.q3, ky, kx, image));
}

fn gather_x_narrow(t: TapsNarrow, plane: u32) -> vec4<f32> {
    return gather_x(t.s0, plane);
}

fn gather_x_wide(t: TapsWide, plane: u32) -> mat4x4<f32> {
    return mat4x4<f32>(gather_x(t.s0, plane), gather_x(t.s1, plane), gather_x(t.s2, plane), gather_x(t.s3, plane));
}

// The forward's stores, with the epilogue y = relu(sum + shift (+ residual)): one set
// per EPILOGUE suffix, the residual read only by the `_residual` entry points.
#template stores(EPILOGUE, RESIDUAL)
fn store_y${EPILOGUE}(n: u32, co: u32, q: vec4<u32>, v: vec4<f32>) {
    if co >= p.co { return; }
    let pixels = p.ho * p.wo;
    let plane = (n * p.co + co) * pixels;
    for (var j = 0u; j < 4u; j++) {
        if q[j] >= pixels { continue; }
        let i = plane + q[j];
        var out = v[j] + shift[co];
        if (p.flags & ACCUMULATE) != 0u { out += f32(y[i]); }
#if ${RESIDUAL}
        out += f32(residual[i]);
#end
        if (p.flags & RELU) != 0u { out = max(out, 0.0); }
        y[i] = Act(out);
    }
}

fn store_y_narrow${EPILOGUE}(n: u32, co: u32, px: PixelsNarrow, v: vec4<f32>) {
    store_y${EPILOGUE}(n, co, px.q0, v);
}

// Output channel co at the 16 pixels of the quads, from the columns of `v`.
fn store_y_wide${EPILOGUE}(n: u32, co: u32, px: PixelsWide, v: mat4x4<f32>) {
    store_y${EPILOGUE}(n, co, px.q0, v[0]);
    store_y${EPILOGUE}(n, co, px.q1, v[1]);
    store_y${EPILOGUE}(n, co, px.q2, v[2]);
    store_y${EPILOGUE}(n, co, px.q3, v[3]);
}
#end

#stamp stores(, false)
#stamp stores(_residual, true)

#include "tiles.wgsl"

// The forward as an implicit GEMM through workgroup memory (tiles.wgsl), the variant for
// GPUs: rows are 32 output channels, columns 32 pixels of one image, K = (tap, input
// channel). Slices stage vec4s of packed weights and quads of input pixels (padding as
// zeros).

// A tiled convolution's workgroup: image n, group of 32 channels and block of 32 pixels,
// for `channels` x `pixels` per image; not inside past the last.
struct TileBlock { n: u32, group: u32, block: u32, inside: bool }

fn tile_block(wid: vec3<u32>, nwg: vec3<u32>, channels: u32, pixels: u32) -> TileBlock {
    let groups = (channels + 31u) / 32u;
    let blocks = (pixels + 31u) / 32u;
    let wg = wid.x + wid.y * nwg.x;
    return TileBlock(wg / (blocks * groups), (wg / blocks) % groups, wg % blocks, wg < p.n * groups * blocks);
}

#template forward_tiled(ENTRY, EPILOGUE)
@compute @workgroup_size(64)
fn ${ENTRY}(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let co_tiles = (p.co + 3u) / 4u;
    let at = tile_block(wid, nwg, p.co, p.ho * p.wo);
    if !at.inside { return; }
    let n = at.n;
    let group = at.group;
    let block = at.block;
    let depth = p.kh * p.kw * p.ci;
    // What this invocation stages: rows lid / 8 (+ 8, ...) of the slice, channel quad and
    // pixel quad lid % 8.
    let sq = lid % 8u;
    let tile = group * 8u + sq;
    let q_in = quad(block * 32u + sq * 4u);
    let image = n * p.ci * p.h * p.w;
    let stage = ForwardStage(tile, co_tiles, q_in, image);
    // What this invocation accumulates: channel quad `lid / 8`, pixel quad `lid % 8`.
#stamp slice_gemm(a, depth, load_forward, stage)
    let co0 = group * 32u + (lid / 8u) * 4u;
    let q = quad(block * 32u + (lid % 8u) * 4u);
#for J in 0..4
    store_y${EPILOGUE}(n, co0 + ${J}u, q, a${J});
#end
}
#end

#stamp forward_tiled(conv2d_forward_tiled, )
#stamp forward_tiled(conv2d_forward_tiled_residual, _residual)

// What a forward invocation stages from: its quad of packed output channels (`tile` of
// `co_tiles`), its quad of output pixels and its image's input.
struct ForwardStage {
    tile: u32,
    co_tiles: u32,
    q_in: vec4<u32>,
    image: u32,
}

// The packed weights and the input pixels at k = (tap, input channel).
fn load_forward(s: ForwardStage, k: u32) -> SlicePair {
    var w = vec4<f32>(0.0);
    if s.tile < s.co_tiles { w = packed(k * s.co_tiles + s.tile); }
    if is_pointwise() {
        // A plain GEMM: input pixel = output pixel, no tap to work out, nothing outside.
        let at = vec4<u32>(s.image + k * p.h * p.w) + min(s.q_in, vec4<u32>(p.h * p.w - 1u));
        return SlicePair(w, vec4<f32>(vec4<Act>(x[at.x], x[at.y], x[at.z], x[at.w])));
    }
    let tap = k / p.ci;
    return SlicePair(w, gather_x(tap_source(s.q_in, tap / p.kw, tap % p.kw, s.image), (k % p.ci) * p.h * p.w));
}

// A 1x1 convolution with stride 1 and no padding (uniform: from the parameters).
fn is_pointwise() -> bool {
    return p.kh * p.kw == 1u && p.stride_h * p.stride_w == 1u && p.pad_h + p.pad_w == 0u;
}

// The weight as vec4s of 4 channels of one axis, channels past the last zero:
// packed_out[(k * ci + c) * co_tiles + t] = weight[4t..4t+4, c, k] times the folded batch
// norm's scale, for the forward, with each output channel's additive term in shift_out;
// one entry point per optional term (bias, batch norm), so each binds only what it reads.
#template pack_forward(ENTRY, BIAS, BATCH_NORM)
@compute @workgroup_size(WG)
fn ${ENTRY}(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let tiles = (p.co + 3u) / 4u;
    let total = p.ci * p.kh * p.kw * tiles;
    let idx = linear_index(gid, nwg);
    if idx >= total { return; }
    for (var co = idx; co < p.co; co += total) {
        var additive = 0.0;
#if ${BIAS}
        additive = bias[p.co0 + co];
#end
#if ${BATCH_NORM}
        additive = bn_beta[p.co0 + co] + (additive - bn_mean[p.co0 + co]) * bn_scale(co);
#end
        shift_out[co] = select(additive, 0.0, (p.flags & NO_SHIFT) != 0u);
    }
    let t = idx % tiles;
    var v = weight_quad(t, (idx / tiles) % p.ci, (idx / tiles) / p.ci, false);
#if ${BATCH_NORM}
    let c = min(quad(4u * t), vec4<u32>(p.co - 1u));
    v *= vec4<f32>(bn_scale(c.x), bn_scale(c.y), bn_scale(c.z), bn_scale(c.w));
#end
    packed_out[idx] = vec4<Act>(v);
}
#end

#stamp pack_forward(conv2d_pack_weight, false, false)
#stamp pack_forward(conv2d_pack_weight_bias, true, false)
#stamp pack_forward(conv2d_pack_weight_batch_norm, false, true)
#stamp pack_forward(conv2d_pack_weight_bias_batch_norm, true, true)

// The folded batch norm's multiplier of output channel `co` of the slab: gamma / sqrt(var + eps).
fn bn_scale(co: u32) -> f32 {
    return bn_gamma[p.co0 + co] / sqrt(bn_var[p.co0 + co] + p.eps);
}

// For the input gradient: packed_out[(k * co + o) * ci_tiles + t] = weight[o, 4t..4t+4, k].
@compute @workgroup_size(WG)
fn conv2d_pack_weight_over_ci(@builtin(global_invocation_id) gid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>) {
    let tiles = (p.ci + 3u) / 4u;
    let idx = linear_index(gid, nwg);
    if idx >= p.co * p.kh * p.kw * tiles { return; }
    let t = idx % tiles;
    packed_out[idx] = vec4<Act>(weight_quad(t, (idx / tiles) % p.co, (idx / tiles) / p.co, true));
}

// The weights of channels 4t..4t+4 of the tiled axis (output channels, or input channels
// when `over_ci`), at channel `o` of the other axis and tap `k`; zero past the last.
fn weight_quad(t: u32, o: u32, k: u32, over_ci: bool) -> vec4<f32> {
    let tiled = select(p.co, p.ci, over_ci);
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u && 4u * t + j < tiled; j++) {
        let c = 4u * t + j;
        let co = select(c, o, over_ci);
        let ci = select(o, c, over_ci);
        v[j] = weight[((p.co0 + co) * p.weight_ci + p.weight_ci0 + ci) * p.kh * p.kw + k];
    }
    return v;
}

// The input gradient's register tiles: grad_x[n, ci0..ci0+16, iy, the invocation's
// columns] = sum over co, ky, kx of weight * grad_y at the output pixel that read this
// input pixel through (ky, kx), if any; a<J> accumulates input channel ci0 + J at the
// tile's columns (a vec4 of one quad or a mat4x4 of four, ACC), from the weight packed
// over input channels.
#template backward_input_registers(ENTRY, T, ACC, COLUMNS)
@compute @workgroup_size(WG)
fn ${ENTRY}(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let x_tiles = (p.w + ${COLUMNS - 1}u) / ${COLUMNS}u;
    let ci_tiles = (p.ci + 3u) / 4u;
    let groups = (ci_tiles + 3u) / 4u;
    let idx = linear_index(gid, nwg);
    if idx >= p.n * groups * p.h * x_tiles { return; }
    let ix0 = (idx % x_tiles) * ${COLUMNS}u;
    let iy = (idx / x_tiles) % p.h;
    let t0 = ((idx / (x_tiles * p.h)) % groups) * 4u;
    let n = idx / (x_tiles * p.h * groups);
    let sh = i32(p.stride_h);
#for J in 0..16
    var a${J}: ${ACC};
#end
    for (var ky = 0u; ky < p.kh; ky++) {
        let ty = i32(iy + p.pad_h) - i32(ky * p.dil_h);
        if ty < 0 || ty % sh != 0 || ty / sh >= i32(p.ho) { continue; }
        let oy = u32(ty / sh);
        for (var kx = 0u; kx < p.kw; kx++) {
            let columns = columns_${T}(ix0, kx);
            if !any_hit_${T}(columns) { continue; }
            let k = ky * p.kw + kx;
            for (var co = 0u; co < p.co; co++) {
                let row = ((n * p.co + co) * p.ho + oy) * p.wo;
                let gv = gather_grad_y_${T}(row, columns);
                let tap = (k * p.co + co) * ci_tiles;
#for G in 0..4
                let w${G} = packed(tap + min(t0 + ${G}u, ci_tiles - 1u));
#end
#for J in 0..16
                a${J} += w${J / 4}[${J % 4}] * gv;
#end
            }
        }
    }
    let ci0 = t0 * 4u;
#for J in 0..16
    store_grad_x_${T}(n, ci0 + ${J}u, iy, ix0, a${J});
#end
}
#end

#stamp backward_input_registers(conv2d_backward_input, narrow, vec4<f32>, 4)
// For rows of 16 columns and more.
#stamp backward_input_registers(conv2d_backward_input_wide, wide, mat4x4<f32>, 16)

// The output columns that input columns ix0..ix0+4 receive from through tap column kx, and
// whether each exists (inside the output, on the stride, and the input column real).
struct ColumnSource {
    ox: vec4<u32>,
    hit: vec4<bool>,
}

fn column_source(ix0: u32, kx: u32) -> ColumnSource {
    let sw = vec4<i32>(i32(p.stride_w));
    let tx = vec4<i32>(i32(ix0 + p.pad_w) - i32(kx * p.dil_w)) + vec4<i32>(0, 1, 2, 3);
    let hit = (tx >= vec4<i32>(0)) & (tx % sw == vec4<i32>(0)) & (tx / sw < vec4<i32>(i32(p.wo)))
        & (quad(ix0) < vec4<u32>(p.w));
    let ox = vec4<u32>(clamp(tx / sw, vec4<i32>(0), vec4<i32>(i32(p.wo) - 1)));
    return ColumnSource(ox, hit);
}

fn gather_grad_y(row: u32, s: ColumnSource) -> vec4<f32> {
    let at = vec4<u32>(row) + s.ox;
    return select(vec4<f32>(0.0), vec4<f32>(grad_y[at.x], grad_y[at.y], grad_y[at.z], grad_y[at.w]), s.hit);
}

struct ColumnsNarrow {
    s0: ColumnSource,
}

struct ColumnsWide {
    s0: ColumnSource,
    s1: ColumnSource,
    s2: ColumnSource,
    s3: ColumnSource,
}

fn columns_narrow(ix0: u32, kx: u32) -> ColumnsNarrow {
    return ColumnsNarrow(column_source(ix0, kx));
}

fn columns_wide(ix0: u32, kx: u32) -> ColumnsWide {
    return ColumnsWide(column_source(ix0, kx), column_source(ix0 + 4u, kx),
                       column_source(ix0 + 8u, kx), column_source(ix0 + 12u, kx));
}

fn any_hit_narrow(c: ColumnsNarrow) -> bool {
    return any(c.s0.hit);
}

fn any_hit_wide(c: ColumnsWide) -> bool {
    return any(c.s0.hit) || any(c.s1.hit) || any(c.s2.hit) || any(c.s3.hit);
}

fn gather_grad_y_narrow(row: u32, c: ColumnsNarrow) -> vec4<f32> {
    return gather_grad_y(row, c.s0);
}

fn gather_grad_y_wide(row: u32, c: ColumnsWide) -> mat4x4<f32> {
    return mat4x4<f32>(gather_grad_y(row, c.s0), gather_grad_y(row, c.s1),
                       gather_grad_y(row, c.s2), gather_grad_y(row, c.s3));
}

fn store_grad_x(n: u32, ci: u32, iy: u32, ix0: u32, v: vec4<f32>) {
    if ci >= p.ci { return; }
    let row = ((n * p.ci + ci) * p.h + iy) * p.w;
    add_grad_x(row + ix0, row + p.w, v);
}

// grad_x[i..i+4] (those before `end`) = v, or += v when accumulating.
fn add_grad_x(i: u32, end: u32, v: vec4<f32>) {
    let keep = (p.flags & ACCUMULATE) != 0u;
    for (var j = 0u; j < 4u && i + j < end; j++) {
        grad_x[i + j] = select(0.0, grad_x[i + j], keep) + v[j];
    }
}

// The input gradient as a GEMM through workgroup memory (tiles.wgsl), the variant for
// GPUs, in gather form (each input pixel sums what reached it; no atomics): rows are 32
// input channels, columns 32 pixels of one image's input, K = (tap, output channel).
// Slices stage vec4s of the weight packed over input channels and quads of the output
// gradient at the pixels each tap sent them to (zero where none: off the stride or
// outside the output).
@compute @workgroup_size(64)
fn conv2d_backward_input_tiled(@builtin(workgroup_id) wid: vec3<u32>,
                               @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let ci_tiles = (p.ci + 3u) / 4u;
    let pixels = p.h * p.w;
    let at = tile_block(wid, nwg, p.ci, pixels);
    if !at.inside { return; }
    let n = at.n;
    let group = at.group;
    let block = at.block;
    let depth = p.kh * p.kw * p.co;
    // What this invocation stages: rows lid / 8 (+ 8) of the slice, channel quad and pixel
    // quad lid % 8 (pixels past the last read as the last; their sums are never stored).
    let sq = lid % 8u;
    let tile = group * 8u + sq;
    let q_in = min(quad(block * 32u + sq * 4u), vec4<u32>(pixels - 1u));
    let image = n * p.co * p.ho * p.wo;
    let stage = InputGradStage(tile, ci_tiles, vec4<i32>(q_in / p.w), vec4<i32>(q_in % p.w), image);
    // What it accumulates: input channels 4 (lid / 8) + r of the group, pixel quad lid % 8.
#stamp slice_gemm(acc, depth, load_input_grad, stage)
    let first = block * 32u + 4u * (lid % 8u);
#for R in 0..4
    store_grad_x_pixels(n, group * 32u + 4u * (lid / 8u) + ${R}u, first, acc${R});
#end
}

// What an input-gradient invocation stages from: its quad of packed input channels (`tile`
// of `ci_tiles`), its quad of input pixels and its image's output gradient.
struct InputGradStage {
    tile: u32,
    ci_tiles: u32,
    iy: vec4<i32>,
    ix: vec4<i32>,
    image: u32,
}

// The weights packed over input channels and the output gradient at k = (tap, output
// channel), zero where the tap sent the pixel nowhere.
fn load_input_grad(s: InputGradStage, k: u32) -> SlicePair {
    var w = vec4<f32>(0.0);
    if s.tile < s.ci_tiles { w = packed(k * s.ci_tiles + s.tile); }
    let tap = k / p.co;
    let source = grad_y_source(s.iy, s.ix, tap / p.kw, tap % p.kw);
    let at = vec4<u32>(s.image + (k % p.co) * p.ho * p.wo) + source.at;
    return SlicePair(w, select(vec4<f32>(0.0), vec4<f32>(grad_y[at.x], grad_y[at.y], grad_y[at.z], grad_y[at.w]), source.hit));
}

// The output pixels (offsets in one output plane) that input pixels (iy, ix) were sent to
// through tap (ky, kx), and whether each exists (inside the output and on the stride).
struct GradSource {
    at: vec4<u32>,
    hit: vec4<bool>,
}

fn grad_y_source(iy: vec4<i32>, ix: vec4<i32>, ky: u32, kx: u32) -> GradSource {
    let sh = vec4<i32>(i32(p.stride_h));
    let sw = vec4<i32>(i32(p.stride_w));
    let ty = iy + vec4<i32>(i32(p.pad_h) - i32(ky * p.dil_h));
    let tx = ix + vec4<i32>(i32(p.pad_w) - i32(kx * p.dil_w));
    let hit = (ty >= vec4<i32>(0)) & (ty % sh == vec4<i32>(0)) & (ty / sh < vec4<i32>(i32(p.ho)))
        & (tx >= vec4<i32>(0)) & (tx % sw == vec4<i32>(0)) & (tx / sw < vec4<i32>(i32(p.wo)));
    let oy = vec4<u32>(clamp(ty / sh, vec4<i32>(0), vec4<i32>(i32(p.ho) - 1)));
    let ox = vec4<u32>(clamp(tx / sw, vec4<i32>(0), vec4<i32>(i32(p.wo) - 1)));
    return GradSource(oy * p.wo + ox, hit);
}

// Input channel ci of image n at pixels first..first+4 (those inside the plane).
fn store_grad_x_pixels(n: u32, ci: u32, first: u32, v: vec4<f32>) {
    if ci >= p.ci { return; }
    let plane = (n * p.ci + ci) * p.h * p.w;
    add_grad_x(plane + first, plane + p.h * p.w, v);
}

fn store_grad_x_narrow(n: u32, ci: u32, iy: u32, ix0: u32, v: vec4<f32>) {
    store_grad_x(n, ci, iy, ix0, v);
}

// Input channel ci, row iy, columns ix0..ix0+16 from the column quads of `v`.
fn store_grad_x_wide(n: u32, ci: u32, iy: u32, ix0: u32, v: mat4x4<f32>) {
    store_grad_x(n, ci, iy, ix0, v[0]);
    store_grad_x(n, ci, iy, ix0 + 4u, v[1]);
    store_grad_x(n, ci, iy, ix0 + 8u, v[2]);
    store_grad_x(n, ci, iy, ix0 + 12u, v[3]);
}

// The weight gradient's register tiles: grad_weight[co0..co0+16, the invocation's input
// channels, ky, kx] = sum over the chunk's output pixels of grad_y * x at the input pixel
// (ky, kx) reads; a<J> accumulates output channel co0 + J at the tile's input channels
// (a vec4 of one quad or a mat4x4 of four, ACC). Chunks cover whole output rows.
#template backward_weight_registers(ENTRY, T, ACC, CHANNELS)
@compute @workgroup_size(WG)
fn ${ENTRY}(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = weight_grad_tile(linear_index(gid, nwg), ${CHANNELS}u);
    if !t.valid { return; }
    let rows = p.n * p.ho;
    let ky = t.k / p.kw;
    let kx = t.k % p.kw;
    let cols = weight_tap_columns(kx);
    let hw = p.h * p.w;
    let ohw = p.ho * p.wo;
    // Plane offsets of the tile's input and output channels; channels past the last
    // re-read it.
    let xc = x_channels_${T}(t.ci0, hw);
#for G in 0..4
    let g${G} = channel_offsets(t.co0, ${4 * G}u, p.co, ohw);
#end
#for J in 0..16
    var a${J}: ${ACC};
#end
    let row_end = min(rows, (t.chunk + 1u) * p.chunk_rows);
    for (var r = t.chunk * p.chunk_rows; r < row_end; r++) {
        let n = r / p.ho;
        let oy = r % p.ho;
        let iy = i32(oy * p.stride_h + ky * p.dil_h) - i32(p.pad_h);
        if iy < 0 || iy >= i32(p.h) { continue; }
        let xb = (n * p.ci + t.ci0) * hw + u32(iy) * p.w;
        let gb = (n * p.co + t.co0) * ohw + oy * p.wo;
        for (var ox = cols.x; ox < cols.y; ox++) {
            let xs = gather_x_channels_${T}(xb + ox * p.stride_w + kx * p.dil_w - p.pad_w, xc);
            let gi = gb + ox;
#for G in 0..4
            let gy${G} = grad_y_quad(gi, g${G});
#end
#for J in 0..16
            a${J} += gy${J / 4}[${J % 4}] * xs;
#end
        }
    }
    let base = t.chunk * p.co * p.ci * p.kh * p.kw;
#for J in 0..16
    store_grad_weight_${T}(base, t.co0 + ${J}u, t.ci0, t.k, a${J});
#end
}
#end

#stamp backward_weight_registers(conv2d_backward_weight, narrow, vec4<f32>, 4)
// For 16 input channels and more.
#stamp backward_weight_registers(conv2d_backward_weight_wide, wide, mat4x4<f32>, 16)

// A weight-gradient invocation's tile: output channels co0..co0+16, `per` input channels
// from ci0, tap k, and chunk of output rows; not valid past the last tile. The tap varies
// fastest, so neighbouring invocations (a CPU driver's SIMD batch) read the same channel
// planes a pixel or a row apart and share cache lines: 1.14x faster over the W18 training
// step's weight gradients on lavapipe than with the input-channel group fastest.
struct WeightGradTile {
    valid: bool,
    ci0: u32,
    co0: u32,
    k: u32,
    chunk: u32,
}

fn weight_grad_tile(idx: u32, per: u32) -> WeightGradTile {
    let ci_groups = (p.ci + per - 1u) / per;
    let co_groups = (p.co + 15u) / 16u;
    let ksize = p.kh * p.kw;
    let chunks = (p.n * p.ho + p.chunk_rows - 1u) / p.chunk_rows;
    return WeightGradTile(
        idx < chunks * ksize * co_groups * ci_groups,
        ((idx / ksize) % ci_groups) * per,
        ((idx / (ksize * ci_groups)) % co_groups) * 16u,
        idx % ksize,
        idx / (ci_groups * co_groups * ksize),
    );
}

// The output columns [x, y) whose input column through tap column kx,
// ox * stride + kx * dil - pad, lies inside the image.
fn weight_tap_columns(kx: u32) -> vec2<u32> {
    let off_x = i32(kx * p.dil_w) - i32(p.pad_w);
    let sw = i32(p.stride_w);
    let lo = u32(max(0, (-off_x + sw - 1) / sw));
    let span = i32(p.w) - 1 - off_x;
    let hi = select(0u, u32(min(span / sw + 1, i32(p.wo))), span >= 0);
    return vec2<u32>(lo, hi);
}

// The weight gradient as a GEMM through workgroup memory (tiles.wgsl), the variant for
// GPUs: rows are 32 output channels, columns 32 (input channel, tap) of grad_weight,
// `[co][ci * kh * kw]` row-major, K = the output pixels of one chunk of output rows.
// Slices stage quads of output-gradient channels and of input values (the pixels the
// columns' taps read, zero in the padding). Partial sums per chunk are added in a fixed
// order after.
@compute @workgroup_size(64)
fn conv2d_backward_weight_tiled(@builtin(workgroup_id) wid: vec3<u32>,
                                @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32) {
    let taps = p.kh * p.kw;
    let columns = p.ci * taps;
    let co_blocks = (p.co + 31u) / 32u;
    let column_blocks = (columns + 31u) / 32u;
    let rows = p.n * p.ho;
    let chunks = (rows + p.chunk_rows - 1u) / p.chunk_rows;
    let wg = wid.x + wid.y * nwg.x;
    if wg >= chunks * co_blocks * column_blocks { return; }
    let c0 = (wg % column_blocks) * 32u;
    let co0 = ((wg / column_blocks) % co_blocks) * 32u;
    let chunk = wg / (column_blocks * co_blocks);
    let row0 = chunk * p.chunk_rows;
    let depth = (min(rows, row0 + p.chunk_rows) - row0) * p.wo;
    let ohw = p.ho * p.wo;
    // What this invocation stages: rows lid / 8 (+ 8) of the slice, quad lid % 8 of the
    // block's channels and of its columns (past the last, the last: never stored).
    let sq = lid % 8u;
    let g_planes = min(quad(co0 + 4u * sq), vec4<u32>(p.co - 1u)) * ohw;
    let column = min(quad(c0 + 4u * sq), vec4<u32>(columns - 1u));
    let ci = column / taps;
    let tap = column % taps;
    let off_y = vec4<i32>((tap / p.kw) * p.dil_h) - i32(p.pad_h);
    let off_x = vec4<i32>((tap % p.kw) * p.dil_w) - i32(p.pad_w);
    let stage = WeightGradStage(row0, g_planes, ci, off_y, off_x);
    // What it accumulates: channels 4 (lid / 8) + r of the block, column quad lid % 8.
#stamp slice_gemm(acc, depth, load_weight_grad, stage)
    let base = chunk * p.co * p.ci * taps;
    let first = c0 + 4u * (lid % 8u);
#for R in 0..4
    store_grad_weight_columns(base, co0 + 4u * (lid / 8u) + ${R}u, first, acc${R});
#end
}

// What a weight-gradient invocation stages from: the chunk's first output row, its quad of
// output-gradient planes, and its quad of columns' input channels and tap offsets.
struct WeightGradStage {
    row0: u32,
    g_planes: vec4<u32>,
    ci: vec4<u32>,
    off_y: vec4<i32>,
    off_x: vec4<i32>,
}

// The output gradient's channel quad and the input values the column quad's taps read
// (zero in the padding) at k, the chunk's k-th output pixel.
fn load_weight_grad(s: WeightGradStage, k: u32) -> SlicePair {
    let ohw = p.ho * p.wo;
    let r = s.row0 + k / p.wo;
    let ox = k % p.wo;
    let n = r / p.ho;
    let oy = r % p.ho;
    let gv = grad_y_quad(n * p.co * ohw + oy * p.wo + ox, s.g_planes);
    let iy = i32(oy * p.stride_h) + s.off_y;
    let ix = i32(ox * p.stride_w) + s.off_x;
    let inside = (iy >= vec4<i32>(0)) & (iy < vec4<i32>(i32(p.h))) & (ix >= vec4<i32>(0))
        & (ix < vec4<i32>(i32(p.w)));
    let at = ((vec4<u32>(n * p.ci) + s.ci) * p.h + vec4<u32>(max(iy, vec4<i32>(0)))) * p.w
        + vec4<u32>(max(ix, vec4<i32>(0)));
    let xv = select(vec4<f32>(0.0), x_quad(0u, min(at, vec4<u32>(arrayLength(&x) - 1u))), inside);
    return SlicePair(gv, xv);
}

// grad_weight[co, columns c..c+4] (column = input channel * kh * kw + tap) from `v`.
fn store_grad_weight_columns(base: u32, co: u32, c: u32, v: vec4<f32>) {
    let taps = p.kh * p.kw;
    if co >= p.co { return; }
    let keep = (p.flags & ACCUMULATE) != 0u;
    for (var j = 0u; j < 4u && c + j < p.ci * taps; j++) {
        let i = base + ((p.co0 + co) * p.weight_ci + p.weight_ci0) * taps + c + j;
        grad_weight[i] = select(0.0, grad_weight[i], keep) + v[j];
    }
}

// Offsets from channel `first`'s plane of channels first + skip .. + 4, each clamped to
// the last of `count` (channels past it re-read it; their sums are never stored).
fn channel_offsets(first: u32, skip: u32, count: u32, plane: u32) -> vec4<u32> {
    let c = min(quad(first + skip), vec4<u32>(count - 1u));
    return (c - vec4<u32>(first)) * plane;
}

fn x_quad(at: u32, offsets: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(vec4<Act>(x[at + offsets.x], x[at + offsets.y], x[at + offsets.z], x[at + offsets.w]));
}

fn grad_y_quad(at: u32, offsets: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(grad_y[at + offsets.x], grad_y[at + offsets.y], grad_y[at + offsets.z], grad_y[at + offsets.w]);
}

struct XChannelsNarrow {
    o0: vec4<u32>,
}

struct XChannelsWide {
    o0: vec4<u32>,
    o1: vec4<u32>,
    o2: vec4<u32>,
    o3: vec4<u32>,
}

fn x_channels_narrow(ci0: u32, hw: u32) -> XChannelsNarrow {
    return XChannelsNarrow(channel_offsets(ci0, 0u, p.ci, hw));
}

fn x_channels_wide(ci0: u32, hw: u32) -> XChannelsWide {
    return XChannelsWide(channel_offsets(ci0, 0u, p.ci, hw), channel_offsets(ci0, 4u, p.ci, hw),
                         channel_offsets(ci0, 8u, p.ci, hw), channel_offsets(ci0, 12u, p.ci, hw));
}

fn gather_x_channels_narrow(at: u32, c: XChannelsNarrow) -> vec4<f32> {
    return x_quad(at, c.o0);
}

fn gather_x_channels_wide(at: u32, c: XChannelsWide) -> mat4x4<f32> {
    return mat4x4<f32>(x_quad(at, c.o0), x_quad(at, c.o1), x_quad(at, c.o2), x_quad(at, c.o3));
}

fn store_grad_weight(base: u32, co: u32, ci0: u32, k: u32, v: vec4<f32>) {
    if co >= p.co { return; }
    let ksize = p.kh * p.kw;
    let keep = (p.flags & ACCUMULATE) != 0u;
    for (var j = 0u; j < 4u && ci0 + j < p.ci; j++) {
        let i = base + ((p.co0 + co) * p.weight_ci + p.weight_ci0 + ci0 + j) * ksize + k;
        grad_weight[i] = select(0.0, grad_weight[i], keep) + v[j];
    }
}

fn store_grad_weight_narrow(base: u32, co: u32, ci0: u32, k: u32, v: vec4<f32>) {
    store_grad_weight(base, co, ci0, k, v);
}

// grad_weight[co, ci0..ci0+16, k] from the input-channel quads of `v`.
fn store_grad_weight_wide(base: u32, co: u32, ci0: u32, k: u32, v: mat4x4<f32>) {
    store_grad_weight(base, co, ci0, k, v[0]);
    store_grad_weight(base, co, ci0 + 4u, k, v[1]);
    store_grad_weight(base, co, ci0 + 8u, k, v[2]);
    store_grad_weight(base, co, ci0 + 12u, k, v[3]);
}
