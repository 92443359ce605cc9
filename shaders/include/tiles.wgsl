// The GEMM through workgroup memory that the tiled variants share (the convolution's
// forward, input gradient and weight gradient, the matrix product): a workgroup of 64
// invocations (8 x 8) computes a block of 32 rows x 32 columns, each invocation rows
// 4 (lid / 8) .. + 4 and columns 4 (lid % 8) .. + 4, over K in slices of SLICE (8 or 16,
// an override the tuner picks). Per slice, every invocation stages SLICE / 8 quads of rows
// and as many of columns, then accumulates its 4 x 4 from workgroup memory, over k in
// order. Two barriers a slice are cheap on a GPU and costly on a CPU driver, so the tuner
// (src/kernels/tuning.rs) times the variants on the adapter.
override SLICE: u32 = 8u;
const MAX_SLICE: u32 = 16u;
var<workgroup> slice_rows: array<vec4<f32>, MAX_SLICE * 8u>;     // [k][row quad]
var<workgroup> slice_columns: array<vec4<f32>, MAX_SLICE * 8u>;  // [k][column quad]

// What one invocation stages at one k: a quad of rows and a quad of columns.
struct SlicePair {
    rows: vec4<f32>,
    columns: vec4<f32>,
}

// The GEMM itself, written once for every tiled kernel: accumulators ACC0 .. ACC3 (the
// invocation's rows, each a quad of columns) = the sum over k < DEPTH, in order, of rows
// x columns. LOAD(FROM, k) gives the invocation's quads at k (FROM holds what the
// kernel's loader works out once); past DEPTH the slice holds zeros. The two barriers
// keep staging and reading apart.
#template slice_gemm(ACC, DEPTH, LOAD, FROM)
#for R in 0..4
    var ${ACC}${R} = vec4<f32>(0.0);
#end
    for (var k0 = 0u; k0 < ${DEPTH}; k0 += SLICE) {
        for (var row = lid / 8u; row < SLICE; row += 8u) {
            var pair = SlicePair(vec4<f32>(0.0), vec4<f32>(0.0));
            if k0 + row < ${DEPTH} { pair = ${LOAD}(${FROM}, k0 + row); }
            slice_rows[row * 8u + lid % 8u] = pair.rows;
            slice_columns[row * 8u + lid % 8u] = pair.columns;
        }
        workgroupBarrier();
        for (var j = 0u; j < SLICE; j++) {
            let rows = slice_rows[j * 8u + lid / 8u];
            let columns = slice_columns[j * 8u + lid % 8u];
#for R in 0..4
            ${ACC}${R} += rows[${R}] * columns;
#end
        }
        workgroupBarrier();
    }
#end
