use crate::common::*;
use hrnet_ocr::kernels::resize;

const TOL: f64 = 1e-5;

/// PyTorch's adaptive pooling cell: inputs [floor(i * in / out), ceil((i + 1) * in / out)).
fn cell(i: usize, len_in: usize, len_out: usize) -> std::ops::Range<usize> {
    (i * len_in) / len_out..((i + 1) * len_in).div_ceil(len_out)
}

/// (forward, backward) on the CPU, in f64, straight from the definition: every cell's mean,
/// and each cell's gradient spread evenly over its inputs.
fn reference(x: &[f32], gy: &[f32], [n, c, h, w]: [usize; 4], [ho, wo]: [usize; 2]) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; n * c * ho * wo];
    let mut gx = vec![0f64; x.len()];
    for p in 0..n * c {
        for oy in 0..ho {
            for ox in 0..wo {
                let (rows, cols) = (cell(oy, h, ho), cell(ox, w, wo));
                let area = (rows.len() * cols.len()) as f64;
                let o = (p * ho + oy) * wo + ox;
                let mut sum = 0f64;
                for iy in rows.clone() {
                    for ix in cols.clone() {
                        sum += f64::from(x[(p * h + iy) * w + ix]);
                        gx[(p * h + iy) * w + ix] += f64::from(gy[o]) / area;
                    }
                }
                y[o] = (sum / area) as f32;
            }
        }
    }
    (y, gx.into_iter().map(|v| v as f32).collect())
}

#[test]
fn adaptive_avg_pool_matches_cpu_reference() {
    let gpu = gpu();
    let mut rng = Rng::new(seed("adaptive_avg_pool"));
    // PPM's bins and ASPP's image pooling, sizes that divide and that do not, and outputs
    // larger than the input (overlapping cells).
    let mut outs: Vec<[usize; 2]> = vec![[1, 1], [2, 2], [3, 3], [6, 6]];
    outs.extend((0..8).map(|_| [rng.range(1, 12), rng.range(1, 12)]));
    for out in outs {
        let dims = [rng.range(1, 3), rng.range(1, 9), rng.range(1, 40), rng.range(1, 40)];
        let [n, c, _, _] = dims;
        let x = rng.normals(dims.iter().product());
        let gy = rng.normals(n * c * out[0] * out[1]);
        let (want_y, want_gx) = reference(&x, &gy, dims, out);
        let (xt, gyt) = (upload(&dims, &x), upload(&[n, c, out[0], out[1]], &gy));
        let (y, gx) = (poisoned(&[n, c, out[0], out[1]]), poisoned(&dims));
        let mut d = resize::adaptive_avg_pool(gpu, &xt, &y, 0).unwrap();
        d.extend(resize::adaptive_avg_pool_backward(gpu, &gyt, 0, &gx, false).unwrap());
        gpu.run(&d).unwrap();
        assert_close(&format!("{dims:?} -> {out:?} out"), &download(&y), &want_y, TOL);
        assert_close(&format!("{dims:?} -> {out:?} grad_x"), &download(&gx), &want_gx, TOL);
        // Accumulating adds to what the gradient held.
        let old = rng.normals(x.len());
        let acc = upload(&dims, &old);
        gpu.run(&resize::adaptive_avg_pool_backward(gpu, &gyt, 0, &acc, true).unwrap()).unwrap();
        let summed: Vec<f32> = old.iter().zip(&want_gx).map(|(a, b)| a + b).collect();
        assert_close(&format!("{dims:?} -> {out:?} accumulated grad_x"), &download(&acc), &summed, TOL);
    }
}

#[test]
fn adaptive_avg_pool_refuses_mismatched_shapes_by_name() {
    let gpu = gpu();
    let x = upload(&[1, 4, 8, 8], &[0.0; 256]);
    let err =
        resize::adaptive_avg_pool(gpu, &x, &poisoned(&[1, 3, 2, 2]), 0).map(drop).unwrap_err().to_string();
    assert!(err.contains("adaptive pooling output") && err.contains("[1, 3, 2, 2]"), "{err}");
    let err = resize::adaptive_avg_pool(gpu, &x, &poisoned(&[4, 2, 2]), 0).map(drop).unwrap_err().to_string();
    assert!(err.contains("adaptive pooling output"), "{err}");
}
