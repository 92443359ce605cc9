use crate::common::*;
use hrnet_ocr::kernels::softmax::{self, Axis};
use hrnet_ocr::kernels::sums::Summing;

const TOL: f64 = 1e-5;

/// The forward and backward with long rows' chunks summed by `summing`.
async fn run(x: &[f32], gy: &[f32], axis: Axis, scale: f32, summing: Summing) -> (Vec<f32>, Vec<f32>) {
    let gpu = gpu();
    assert!(summing.runs_on(gpu), "{summing:?} does not run on the test adapter");
    let shape = [axis.outer, axis.len, axis.inner];
    let (xt, gyt, y, gx) = (upload(&shape, x), upload(&shape, gy), poisoned(&shape), poisoned(&shape));
    let mut ds = softmax::forward_with(gpu, &xt, axis, scale, &y, summing).unwrap();
    ds.extend(softmax::backward_with(gpu, &y, &gyt, axis, scale, (&gx, false), summing).unwrap());
    gpu.run(&ds).unwrap();
    (fetch(&y).await, fetch(&gx).await)
}

#[test]
fn softmax_matches_pytorch_fixtures() {
    wait(softmax_matches_pytorch_fixtures_body());
}

/// The body of [`softmax_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn softmax_matches_pytorch_fixtures_body() {
    let f = Fixture::load("softmax.safetensors");
    for (case, p) in f.cases_with("case") {
        let axis = Axis { outer: p[0] as usize, len: p[1] as usize, inner: p[2] as usize };
        let g = |t: &str| f.get(&format!("{case}.{t}"));
        for summing in summings() {
            let (y, gx) = run(g("x"), g("grad_out"), axis, p[3] as f32, summing).await;
            assert_close(&format!("{case} {axis:?} {summing:?} out"), &y, g("out"), TOL);
            assert_close(&format!("{case} {axis:?} {summing:?} grad_x"), &gx, g("grad_x"), TOL);
        }
    }
}

#[test]
fn softmax_matches_cpu_on_random_shapes_both_axes() {
    let mut rng = Rng::new(seed("softmax_matches_cpu_on_random_shapes"));
    for i in 0..50 {
        // Alternate short rows (over K regions) and long rows (over pixels, split in chunks).
        let axis = if i % 2 == 0 {
            Axis { outer: rng.range(1, 40), len: rng.range(1, 30), inner: rng.range(1, 6) }
        } else {
            Axis { outer: rng.range(1, 4), len: rng.range(200, 9000), inner: rng.range(1, 2) }
        };
        // Each summing in turn over the long rows (i / 2 alternates them).
        check_random_axis(&mut rng, axis, [1.0, 0.0625, 2.5][i % 3], summings()[(i / 2) % summings().len()]);
    }
    // Rows long enough that the tree too splits them: 2 chunks a row (the second shorter)
    // along a middle axis, and 4 chunks a row.
    for axis in [Axis { outer: 1, len: 70_001, inner: 3 }, Axis { outer: 2, len: 200_000, inner: 1 }] {
        for summing in summings() {
            check_random_axis(&mut rng, axis, 0.5, summing);
        }
    }
}

/// A softmax along `axis` of random values, forward and backward against the CPU.
fn check_random_axis(rng: &mut Rng, axis: Axis, scale: f32, summing: Summing) {
    let n = axis.outer * axis.len * axis.inner;
    let x: Vec<f32> = rng.normals(n).iter().map(|v| 4.0 * v).collect();
    let gy = rng.normals(n);
    let (y, gx) = wait(run(&x, &gy, axis, scale, summing));
    let dims = [axis.outer, axis.len, axis.inner];
    let what = |t: &str| format!("{axis:?} {summing:?} {t}");
    assert_close(&what("out"), &y, &softmax_ref(&x, dims, f64::from(scale)), TOL);
    // The gradient is a difference of terms of size |scale * y * grad_y|; when the softmax
    // is peaked it cancels far below them.
    let want = softmax_backward_ref(&y, &gy, dims, f64::from(scale));
    let terms = y.iter().zip(&gy).map(|(y, g)| f64::from(scale * y * g).powi(2)).sum::<f64>().sqrt();
    assert_close_to_terms(&what("grad_x"), &gx, &want, terms, TOL);
}

/// Inputs of magnitude 1e4 give no inf or NaN, for short rows and chunked long rows. Such
/// rows are one-hot to f32 precision, so the exact gradient is ~0 and an f32 result is
/// rounding of O(|grad_y|) terms: the backward is held to an absolute bound of a few ulps
/// of |grad_y|, the forward to the usual relative one.
#[test]
fn softmax_is_stable_for_huge_inputs() {
    let mut rng = Rng::new(seed("softmax_is_stable_for_huge_inputs"));
    for axis in [Axis { outer: 3, len: 19, inner: 7 }, Axis { outer: 2, len: 131_072, inner: 1 }] {
        for summing in summings() {
            let n = axis.outer * axis.len * axis.inner;
            let x: Vec<f32> =
                (0..n).map(|_| if rng.coin() { 1e4 } else { -1e4 } * rng.uniform() as f32).collect();
            let gy = rng.normals(n);
            let (y, gx) = wait(run(&x, &gy, axis, 1.0, summing));
            let dims = [axis.outer, axis.len, axis.inner];
            let what = format!("{axis:?} {summing:?}");
            assert_close(&format!("{what} huge out"), &y, &softmax_ref(&x, dims, 1.0), TOL);
            assert!(gx.iter().all(|g| g.is_finite()), "{what}: non-finite gradient");
            let want = softmax_backward_ref(&y, &gy, dims, 1.0);
            let bound = 1e-6 * gy.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            let worst = gx.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
            assert!(worst <= bound, "{what}: gradient off by {worst:e}, bound {bound:e}");
        }
    }
}

/// The subgroup summing is the tree finished in subgroup shuffles: where the adapter has
/// SUBGROUP its results must be the tree's to the bit, forward and backward, on rows the
/// tree splits and on rows it does not.
#[test]
fn subgroup_summing_gives_the_trees_bits() {
    if !has_subgroup_summing() {
        return;
    }
    let mut rng = Rng::new(seed("softmax_subgroup_bits"));
    for axis in
        [Axis { outer: 3, len: rng.range(300, 9000), inner: 2 }, Axis { outer: 1, len: 150_001, inner: 1 }]
    {
        let n = axis.outer * axis.len * axis.inner;
        let (x, gy) = (rng.normals(n), rng.normals(n));
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let (tree, subgroup) =
            (wait(run(&x, &gy, axis, 1.5, Summing::Tree)), wait(run(&x, &gy, axis, 1.5, Summing::Subgroup)));
        assert!(bits(tree.0) == bits(subgroup.0), "{axis:?}: the subgroup softmax differs from the tree's");
        assert!(bits(tree.1) == bits(subgroup.1), "{axis:?}: the subgroup gradient differs from the tree's");
    }
}
