use crate::common::*;
use hrnet_ocr::kernels::matmul::{product_with, Matmul, MatmulKernel, Strided};
use hrnet_ocr::kernels::tuning::Tunable;

const TOL: f64 = 1e-5;

/// (c, grad_a, grad_b) with grad_a accumulated onto `old_a` when given.
async fn run(mm: &Matmul, a: &[f32], b: &[f32], gc: &[f32], old_a: Option<&[f32]>) -> [Vec<f32>; 3] {
    let gpu = gpu();
    let a_shape = if mm.trans_a { [mm.batch, mm.k, mm.m] } else { [mm.batch, mm.m, mm.k] };
    let b_shape = if mm.trans_b { [mm.batch, mm.n, mm.k] } else { [mm.batch, mm.k, mm.n] };
    let c_shape = [mm.batch, mm.m, mm.n];
    let (at, bt, gct) = (upload(&a_shape, a), upload(&b_shape, b), upload(&c_shape, gc));
    let c = poisoned(&c_shape);
    let ga = old_a.map_or_else(|| poisoned(&a_shape), |o| upload(&a_shape, o));
    let gb = poisoned(&b_shape);
    let ds = [
        mm.forward(gpu, None, &at, &bt, &c).unwrap(),
        mm.backward_a(gpu, None, &gct, &bt, &ga, old_a.is_some()).unwrap(),
        mm.backward_b(gpu, None, &at, &gct, &gb, false).unwrap(),
    ];
    gpu.run(ds.iter().flatten()).unwrap();
    [fetch(&c).await, fetch(&ga).await, fetch(&gb).await]
}

/// The same three products on the CPU, in the operands' stored layouts.
fn reference(mm: &Matmul, a: &[f32], b: &[f32], gc: &[f32]) -> [Vec<f32>; 3] {
    let Matmul { batch, m, k, n, trans_a, trans_b } = *mm;
    let op_a = |t: usize, i: usize, kk: usize| {
        if trans_a {
            a[(t * k + kk) * m + i]
        } else {
            a[(t * m + i) * k + kk]
        }
    };
    let op_b = |t: usize, kk: usize, j: usize| {
        if trans_b {
            b[(t * n + j) * k + kk]
        } else {
            b[(t * k + kk) * n + j]
        }
    };
    let c = matmul_ref((batch, m, k, n), op_a, op_b);
    let gcm = |t: usize, i: usize, j: usize| gc[(t * m + i) * n + j];
    // d op(a) = gc @ op(b)^T (m x k); d op(b) = op(a)^T @ gc (k x n); then into stored layout.
    let d_op_a = matmul_ref((batch, m, n, k), gcm, |t, j, kk| op_b(t, kk, j));
    let d_op_b = matmul_ref((batch, k, m, n), |t, kk, i| op_a(t, i, kk), gcm);
    let store = |d: &[f32], rows: usize, cols: usize, trans: bool| -> Vec<f32> {
        if !trans {
            return d.to_vec();
        }
        let mut s = vec![0f32; d.len()];
        for t in 0..batch {
            for i in 0..rows {
                for j in 0..cols {
                    s[(t * cols + j) * rows + i] = d[(t * rows + i) * cols + j];
                }
            }
        }
        s
    };
    [c, store(&d_op_a, m, k, trans_a), store(&d_op_b, k, n, trans_b)]
}

/// A product of random size (m and n below `max_mn`, k below 40), case `i` of the four
/// transpose combinations.
fn random_product(rng: &mut Rng, i: usize, max_mn: usize) -> Matmul {
    Matmul {
        batch: rng.range(1, 3),
        m: rng.range(1, max_mn),
        k: rng.range(1, 40),
        n: rng.range(1, max_mn),
        trans_a: i % 2 == 1,
        trans_b: (i / 2) % 2 == 1,
    }
}

#[test]
fn matmul_matches_pytorch_fixtures() {
    wait(matmul_matches_pytorch_fixtures_body());
}

/// The body of [`matmul_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn matmul_matches_pytorch_fixtures_body() {
    let f = Fixture::load("matmul.safetensors");
    for (case, p) in f.cases() {
        let [batch, m, k, n, ta, tb] = p[..] else { panic!("{case}: metadata") };
        let mm = Matmul { batch, m, k, n, trans_a: ta == 1, trans_b: tb == 1 };
        let g = |t: &str| f.get(&format!("{case}.{t}"));
        let [c, ga, gb] = run(&mm, g("a"), g("b"), g("grad_out"), None).await;
        assert_close(&format!("{case} {mm:?} out"), &c, g("out"), TOL);
        assert_close(&format!("{case} grad_a"), &ga, g("grad_a"), TOL);
        assert_close(&format!("{case} grad_b"), &gb, g("grad_b"), TOL);
    }
}

#[test]
fn matmul_matches_cpu_on_random_shapes_and_transposes() {
    let mut rng = Rng::new(seed("matmul_matches_cpu_on_random_shapes"));
    for i in 0..60 {
        let mm = random_product(&mut rng, i, 40);
        let (a, b) = (rng.normals(mm.batch * mm.m * mm.k), rng.normals(mm.batch * mm.k * mm.n));
        let gc = rng.normals(mm.batch * mm.m * mm.n);
        let old = (i % 3 == 0).then(|| rng.normals(a.len()));
        let got = wait(run(&mm, &a, &b, &gc, old.as_deref()));
        let [c, mut ga, gb] = reference(&mm, &a, &b, &gc);
        if let Some(old) = &old {
            ga.iter_mut().zip(old).for_each(|(g, o)| *g += o);
        }
        assert_close(&format!("{mm:?} out"), &got[0], &c, TOL);
        assert_close(&format!("{mm:?} grad_a"), &got[1], &ga, TOL);
        assert_close(&format!("{mm:?} grad_b"), &got[2], &gb, TOL);
    }
}

#[test]
fn every_matmul_kernel_matches_cpu_on_random_products() {
    // `product` takes the tuner's kernel for the size class; each (register tiles, per
    // element, workgroup-memory tiles with either slice) must hold for any shape,
    // transpose and accumulation, so all run here whatever the size and the adapter.
    let gpu = gpu();
    let mut rng = Rng::new(seed("every_matmul_kernel_matches_cpu_on_random_products"));
    for i in 0..40 {
        let mm = random_product(&mut rng, i, 70);
        let (a, b) = (rng.normals(mm.batch * mm.m * mm.k), rng.normals(mm.batch * mm.k * mm.n));
        let old = (i % 3 == 0).then(|| rng.normals(mm.batch * mm.m * mm.n));
        let mut want = reference(&mm, &a, &b, &vec![0.0; mm.batch * mm.m * mm.n])[0].clone();
        if let Some(old) = &old {
            want.iter_mut().zip(old).for_each(|(w, o)| *w += o);
        }
        let (at, bt) = (upload(&[a.len()], &a), upload(&[b.len()], &b));
        let (av, bv) = (Strided::row_major(mm.m, mm.k), Strided::row_major(mm.k, mm.n));
        let av = if mm.trans_a { Strided::row_major(mm.k, mm.m).t() } else { av };
        let bv = if mm.trans_b { Strided::row_major(mm.n, mm.k).t() } else { bv };
        for &kernel in MatmulKernel::ALL {
            let c_shape = [mm.batch, mm.m, mm.n];
            let c = old.as_deref().map_or_else(|| poisoned(&c_shape), |o| upload(&c_shape, o));
            let d = product_with(gpu, kernel, mm.batch, (&at, av), (&bt, bv), &c, old.is_some()).unwrap();
            gpu.run(&d).unwrap();
            assert_close(
                &format!("{kernel:?} {mm:?} accumulate {}", old.is_some()),
                &download(&c),
                &want,
                TOL,
            );
        }
    }
}
