// Batched matrix product c[b] (+)= a'[b] @ b'[b] where a' (m x k) and b' (k x n) are read
// through strides, so either operand may be a transpose (or any strided view) without a
// copy; c is row-major [batch, m, n]. Each invocation owns a 16 x 16 tile of c in registers
// (a mat4x4 of four column quads per row) and uses no workgroup memory (barriers are what
// CPU drivers such as lavapipe pay for). A workgroup shares its 16 rows and spans column
// blocks, so the 16 loads of a' per step of k are uniform (one load for a whole SIMD batch
// on a CPU driver) and only the 16 of b' are gathered. On lavapipe at 512^3 this ran 3.2x
// faster than 4 x 4 tiles with both operands gathered, and 1.9x faster than 16 x 4.

#if F16
enable f16;
#end

struct Params {
    batch: u32, m: u32, n: u32, k: u32,
    // a'[i, kk] = a[batch * a_batch + i * a_row + kk * a_col]
    a_batch: u32, a_row: u32, a_col: u32, flags: u32,
    // b'[kk, j] = b[batch * b_batch + kk * b_row + j * b_col]
    b_batch: u32, b_row: u32, b_col: u32, _pad: u32,
}

const ACCUMULATE: u32 = 1u;

#include "common.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
// Built with F16 (shader matmul_f16, half-precision inference), a, b and c are f16 (see
// Act in common.wgsl); products and sums stay f32.
@group(0) @binding(1) var<storage, read> a: array<Act>;
@group(0) @binding(2) var<storage, read> b: array<Act>;
@group(0) @binding(3) var<storage, read_write> c: array<Act>;

@compute @workgroup_size(WG)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let n_tiles = (p.n + 15u) / 16u;
    let col_blocks = (n_tiles + WG - 1u) / WG;
    let row_groups = (p.m + 15u) / 16u;
    let wg = wid.x + wid.y * nwg.x;
    if wg >= p.batch * row_groups * col_blocks { return; }
    let tile = (wg % col_blocks) * WG + lid;
    // Invocations past the last tile return: a CPU driver then skips their SIMD batches.
    if tile >= n_tiles { return; }
    let j0 = tile * 16u;
    let i0 = ((wg / col_blocks) % row_groups) * 16u;
    let bt = wg / (col_blocks * row_groups);
    // Rows and columns past the edge re-read the last one; their sums are not stored.
    let c0 = column_quad(bt, j0);
    let c1 = column_quad(bt, j0 + 4u);
    let c2 = column_quad(bt, j0 + 8u);
    let c3 = column_quad(bt, j0 + 12u);
    let r0 = row(bt, i0);
    let r1 = row(bt, i0 + 1u);
    let r2 = row(bt, i0 + 2u);
    let r3 = row(bt, i0 + 3u);
    let r4 = row(bt, i0 + 4u);
    let r5 = row(bt, i0 + 5u);
    let r6 = row(bt, i0 + 6u);
    let r7 = row(bt, i0 + 7u);
    let r8 = row(bt, i0 + 8u);
    let r9 = row(bt, i0 + 9u);
    let r10 = row(bt, i0 + 10u);
    let r11 = row(bt, i0 + 11u);
    let r12 = row(bt, i0 + 12u);
    let r13 = row(bt, i0 + 13u);
    let r14 = row(bt, i0 + 14u);
    let r15 = row(bt, i0 + 15u);
    var m0 = mat4x4<f32>();
    var m1 = mat4x4<f32>();
    var m2 = mat4x4<f32>();
    var m3 = mat4x4<f32>();
    var m4 = mat4x4<f32>();
    var m5 = mat4x4<f32>();
    var m6 = mat4x4<f32>();
    var m7 = mat4x4<f32>();
    var m8 = mat4x4<f32>();
    var m9 = mat4x4<f32>();
    var m10 = mat4x4<f32>();
    var m11 = mat4x4<f32>();
    var m12 = mat4x4<f32>();
    var m13 = mat4x4<f32>();
    var m14 = mat4x4<f32>();
    var m15 = mat4x4<f32>();
    for (var kk = 0u; kk < p.k; kk++) {
        let ak = kk * p.a_col;
        let bk = kk * p.b_row;
        // Row kk of b' at the tile's 16 columns, as four column quads.
        let bm = mat4x4<f32>(gather(c0 + bk), gather(c1 + bk), gather(c2 + bk), gather(c3 + bk));
        m0 += f32(a[r0 + ak]) * bm;
        m1 += f32(a[r1 + ak]) * bm;
        m2 += f32(a[r2 + ak]) * bm;
        m3 += f32(a[r3 + ak]) * bm;
        m4 += f32(a[r4 + ak]) * bm;
        m5 += f32(a[r5 + ak]) * bm;
        m6 += f32(a[r6 + ak]) * bm;
        m7 += f32(a[r7 + ak]) * bm;
        m8 += f32(a[r8 + ak]) * bm;
        m9 += f32(a[r9 + ak]) * bm;
        m10 += f32(a[r10 + ak]) * bm;
        m11 += f32(a[r11 + ak]) * bm;
        m12 += f32(a[r12 + ak]) * bm;
        m13 += f32(a[r13 + ak]) * bm;
        m14 += f32(a[r14 + ak]) * bm;
        m15 += f32(a[r15 + ak]) * bm;
    }
    store(bt, i0, j0, m0);
    store(bt, i0 + 1u, j0, m1);
    store(bt, i0 + 2u, j0, m2);
    store(bt, i0 + 3u, j0, m3);
    store(bt, i0 + 4u, j0, m4);
    store(bt, i0 + 5u, j0, m5);
    store(bt, i0 + 6u, j0, m6);
    store(bt, i0 + 7u, j0, m7);
    store(bt, i0 + 8u, j0, m8);
    store(bt, i0 + 9u, j0, m9);
    store(bt, i0 + 10u, j0, m10);
    store(bt, i0 + 11u, j0, m11);
    store(bt, i0 + 12u, j0, m12);
    store(bt, i0 + 13u, j0, m13);
    store(bt, i0 + 14u, j0, m14);
    store(bt, i0 + 15u, j0, m15);
}

// Small products: one element of c per invocation. LLVM compiles it in tens of
// milliseconds where the 16 x 16 tiles take 1.5 s on lavapipe, which is most of a first
// segmentation's matmul cost when the product itself takes a fraction of a millisecond.
@compute @workgroup_size(WG)
fn matmul_per_element(@builtin(global_invocation_id) gid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * WG;
    if idx >= p.batch * p.m * p.n { return; }
    let j = idx % p.n;
    let i = (idx / p.n) % p.m;
    let bt = idx / (p.n * p.m);
    let ai = bt * p.a_batch + i * p.a_row;
    let bj = bt * p.b_batch + j * p.b_col;
    var sum = 0.0;
    for (var kk = 0u; kk < p.k; kk++) {
        sum += f32(a[ai + kk * p.a_col]) * f32(b[bj + kk * p.b_row]);
    }
    c[idx] = Act(select(0.0, f32(c[idx]), (p.flags & ACCUMULATE) != 0u) + sum);
}

#include "tiles.wgsl"

// The product through workgroup memory (tiles.wgsl), the variant for GPUs: 32 x 32
// elements of one c[bt]. Slices stage quads of a' (4 rows at one k) and of b' (4 columns
// at one k), zeros past k.

@compute @workgroup_size(64)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row_blocks = (p.m + 31u) / 32u;
    let col_blocks = (p.n + 31u) / 32u;
    let wg = wid.x + wid.y * nwg.x;
    if wg >= p.batch * row_blocks * col_blocks { return; }
    let j0 = (wg % col_blocks) * 32u;
    let i0 = ((wg / col_blocks) % row_blocks) * 32u;
    let bt = wg / (col_blocks * row_blocks);
    // What this invocation stages: rows lid / 8 (+ 8) of the slice, quad lid % 8.
    let sq = lid % 8u;
    let ai = vec4<u32>(i0 + 4u * sq) + vec4<u32>(0u, 1u, 2u, 3u);
    let bj = vec4<u32>(j0 + 4u * sq) + vec4<u32>(0u, 1u, 2u, 3u);
    // Rows and columns past the edge re-read the last one; their sums are not stored.
    let a_at = vec4<u32>(bt * p.a_batch) + min(ai, vec4<u32>(p.m - 1u)) * p.a_row;
    let b_at = vec4<u32>(bt * p.b_batch) + min(bj, vec4<u32>(p.n - 1u)) * p.b_col;
    let stage = ProductStage(a_at, b_at);
    // What it accumulates: rows 4 (lid / 8) + r, columns quad lid % 8.
#stamp slice_gemm(acc, p.k, load_product, stage)
    let i = i0 + 4u * (lid / 8u);
    let j = j0 + 4u * (lid % 8u);
#for R in 0..4
    store_quad(bt, i + ${R}u, j, acc${R});
#end
}

// Where an invocation's quads of a' (rows) and b' (columns) start, at k = 0.
struct ProductStage {
    a_at: vec4<u32>,
    b_at: vec4<u32>,
}

fn load_product(s: ProductStage, k: u32) -> SlicePair {
    let ak = s.a_at + vec4<u32>(k * p.a_col);
    return SlicePair(vec4<f32>(vec4<Act>(a[ak.x], a[ak.y], a[ak.z], a[ak.w])), gather(s.b_at + vec4<u32>(k * p.b_row)));
}

// Row i of c[bt] at columns j..j+4 (those inside c).
fn store_quad(bt: u32, i: u32, j: u32, v: vec4<f32>) {
    if i >= p.m { return; }
    let row = (bt * p.m + i) * p.n;
    let keep = (p.flags & ACCUMULATE) != 0u;
    for (var s = 0u; s < 4u && j + s < p.n; s++) {
        c[row + j + s] = Act(select(0.0, f32(c[row + j + s]), keep) + v[s]);
    }
}

// Offsets in b of columns j..j+4 of b'[bt] (the last column for those past the edge).
fn column_quad(bt: u32, j: u32) -> vec4<u32> {
    return min(vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.n - 1u)) * p.b_col + vec4<u32>(bt * p.b_batch);
}

fn gather(at: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(vec4<Act>(b[at.x], b[at.y], b[at.z], b[at.w]));
}

// Where row i of a'[bt] starts (the last row for i past the edge).
fn row(bt: u32, i: u32) -> u32 {
    return bt * p.a_batch + min(i, p.m - 1u) * p.a_row;
}

// Row i of c[bt] at columns j0..j0+16, from the four column quads of `v`.
fn store(bt: u32, i: u32, j0: u32, v: mat4x4<f32>) {
    if i >= p.m { return; }
    let row = (bt * p.m + i) * p.n;
    let keep = (p.flags & ACCUMULATE) != 0u;
    for (var j = 0u; j < 16u && j0 + j < p.n; j++) {
        let at = row + j0 + j;
        c[at] = Act(select(0.0, f32(c[at]), keep) + v[j / 4u][j % 4u]);
    }
}
