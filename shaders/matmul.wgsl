// Batched matrix product c[b] (+)= a'[b] @ b'[b] where a' (m x k) and b' (k x n) are read
// through strides, so either operand may be a transpose (or any strided view) without a
// copy; c is row-major [batch, m, n]. Each invocation owns a 4 x 4 tile of c in registers
// and uses no workgroup memory (barriers are what CPU drivers such as lavapipe pay for).

struct Params {
    batch: u32, m: u32, n: u32, k: u32,
    // a'[i, kk] = a[batch * a_batch + i * a_row + kk * a_col]
    a_batch: u32, a_row: u32, a_col: u32, flags: u32,
    // b'[kk, j] = b[batch * b_batch + kk * b_row + j * b_col]
    b_batch: u32, b_row: u32, b_col: u32, _pad: u32,
}

const ACCUMULATE: u32 = 1u;

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

fn linear_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(WG)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let n_tiles = (p.n + 3u) / 4u;
    let m_tiles = (p.m + 3u) / 4u;
    let idx = linear_index(gid, nwg);
    if idx >= p.batch * m_tiles * n_tiles { return; }
    let j0 = (idx % n_tiles) * 4u;
    let i0 = ((idx / n_tiles) % m_tiles) * 4u;
    let bt = idx / (n_tiles * m_tiles);
    // Rows and columns past the edge re-read the last one; their sums are not stored.
    let rows = min(vec4<u32>(i0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.m - 1u)) * p.a_row
        + vec4<u32>(bt * p.a_batch);
    let cols = min(vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.n - 1u)) * p.b_col
        + vec4<u32>(bt * p.b_batch);
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < p.k; kk++) {
        let ak = kk * p.a_col;
        let bk = kk * p.b_row;
        let bv = vec4<f32>(b[cols.x + bk], b[cols.y + bk], b[cols.z + bk], b[cols.w + bk]);
        acc0 += a[rows.x + ak] * bv;
        acc1 += a[rows.y + ak] * bv;
        acc2 += a[rows.z + ak] * bv;
        acc3 += a[rows.w + ak] * bv;
    }
    store(bt, i0, j0, acc0);
    store(bt, i0 + 1u, j0, acc1);
    store(bt, i0 + 2u, j0, acc2);
    store(bt, i0 + 3u, j0, acc3);
}

fn store(bt: u32, i: u32, j0: u32, v: vec4<f32>) {
    if i >= p.m { return; }
    let row = (bt * p.m + i) * p.n;
    let keep = (p.flags & ACCUMULATE) != 0u;
    for (var j = 0u; j < 4u && j0 + j < p.n; j++) {
        c[row + j0 + j] = select(0.0, c[row + j0 + j], keep) + v[j];
    }
}
