// The GEMM through workgroup memory that the tiled variants share (the convolution's
// forward and weight gradient, the matrix product): a workgroup of 64 invocations (8 x 8)
// computes a block of 32 rows x 32 columns, each invocation rows 4 (lid / 8) .. + 4 and
// columns 4 (lid % 8) .. + 4, over K in slices of SLICE (8 or 16, an override the tuner
// picks). Per slice, every invocation stages SLICE / 8 quads of rows and as many of
// columns, then accumulates its 4 x 4 from workgroup memory, over k in order. Two barriers
// a slice are cheap on a GPU and costly on a CPU driver, so the tuner
// (src/kernels/tuning.rs) times the variants on the adapter.
override SLICE: u32 = 8u;
const MAX_SLICE: u32 = 16u;
var<workgroup> slice_rows: array<vec4<f32>, MAX_SLICE * 8u>;     // [k][row quad]
var<workgroup> slice_columns: array<vec4<f32>, MAX_SLICE * 8u>;  // [k][column quad]

// Row `k` of the slice at quad `sq`: 4 rows' and 4 columns' values at one k.
fn stage_slice(k: u32, sq: u32, rows: vec4<f32>, columns: vec4<f32>) {
    slice_rows[k * 8u + sq] = rows;
    slice_columns[k * 8u + sq] = columns;
}

// The invocation's accumulators ACC0 .. ACC3 (its rows, each a quad of columns) += the
// staged slice's product, between the barriers that keep staging and reading apart.
#template accumulate_slice(ACC)
        workgroupBarrier();
        for (var j = 0u; j < SLICE; j++) {
            let rows = slice_rows[j * 8u + lid / 8u];
            let columns = slice_columns[j * 8u + lid % 8u];
#for R in 0..4
            ${ACC}${R} += rows[${R}] * columns;
#end
        }
        workgroupBarrier();
#end
