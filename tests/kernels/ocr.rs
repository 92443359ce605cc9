use crate::common::*;
use hrnet_ocr::kernels::ocr::{self, AttentionGrads};

const TOL: f64 = 1e-5;

/// Spatial gather: (context, grad_aux, grad_feats).
async fn gather_gpu(dims: [usize; 5], aux: &[f32], feats: &[f32], gc: &[f32]) -> [Vec<f32>; 3] {
    let gpu = gpu();
    let [n, k, c, h, w] = dims;
    let (at, ft, gct) = (upload(&[n, k, h, w], aux), upload(&[n, c, h, w], feats), upload(&[n, c, k, 1], gc));
    let (probs, ctx) = (poisoned(&[n, k, h, w]), poisoned(&[n, c, k, 1]));
    let (ga, gf) = (poisoned(&[n, k, h, w]), poisoned(&[n, c, h, w]));
    let mut ds = ocr::spatial_gather_forward(gpu, None, &at, &ft, &probs, &ctx).unwrap();
    ds.extend(
        ocr::spatial_gather_backward(gpu, None, &ft, &probs, &gct, (&ga, false), (&gf, false)).unwrap(),
    );
    gpu.run(&ds).unwrap();
    [fetch(&ctx).await, fetch(&ga).await, fetch(&gf).await]
}

fn gather_cpu(dims: [usize; 5], aux: &[f32], feats: &[f32], gc: &[f32]) -> [Vec<f32>; 3] {
    let [n, k, c, h, w] = dims;
    let hw = h * w;
    let p = softmax_ref(aux, [n * k, hw, 1], 1.0);
    // context[n, c, k] = sum_p feats[n, c, p] * probs[n, k, p]
    let ctx =
        matmul_ref((n, c, hw, k), |t, i, q| feats[(t * c + i) * hw + q], |t, q, j| p[(t * k + j) * hw + q]);
    let gf = matmul_ref((n, c, k, hw), |t, i, j| gc[(t * c + i) * k + j], |t, j, q| p[(t * k + j) * hw + q]);
    let gp =
        matmul_ref((n, k, c, hw), |t, j, i| gc[(t * c + i) * k + j], |t, i, q| feats[(t * c + i) * hw + q]);
    [ctx, softmax_backward_ref(&p, &gp, [n * k, hw, 1], 1.0), gf]
}

/// The L2 norm of the magnitudes summed into grad_aux: p * (|g| + sum_q p_q |g_q|), with
/// |g| the sum of the absolute terms of each c-term dot product.
fn grad_aux_terms_norm(dims: [usize; 5], aux: &[f32], feats: &[f32], gc: &[f32]) -> f64 {
    let [n, k, c, h, w] = dims;
    let hw = h * w;
    let p = softmax_ref(aux, [n * k, hw, 1], 1.0);
    let g_abs = matmul_ref(
        (n, k, c, hw),
        |t, j, i| gc[(t * c + i) * k + j].abs(),
        |t, i, q| feats[(t * c + i) * hw + q].abs(),
    );
    let mut sum = 0.0f64;
    for row in 0..n * k {
        let (p, g) = (&p[row * hw..(row + 1) * hw], &g_abs[row * hw..(row + 1) * hw]);
        let dot: f64 = p.iter().zip(g).map(|(&p, &g)| f64::from(p) * f64::from(g)).sum();
        sum += p.iter().zip(g).map(|(&p, &g)| (f64::from(p) * (f64::from(g) + dot)).powi(2)).sum::<f64>();
    }
    sum.sqrt()
}

#[test]
fn spatial_gather_matches_pytorch_fixtures() {
    wait(spatial_gather_matches_pytorch_fixtures_body());
}

/// The body of [`spatial_gather_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn spatial_gather_matches_pytorch_fixtures_body() {
    let f = Fixture::load("spatial_gather.safetensors");
    for (case, p) in f.cases() {
        let dims: [usize; 5] = p[..].try_into().unwrap();
        let g = |t: &str| f.get(&format!("{case}.{t}"));
        let got = gather_gpu(dims, g("aux"), g("feats"), g("grad_out")).await;
        for (name, (got, want)) in ["out", "grad_aux", "grad_feats"]
            .iter()
            .zip(got.iter().zip(["out", "grad_aux", "grad_feats"].map(g)))
        {
            assert_close(&format!("{case} {dims:?} {name}"), got, want, TOL);
        }
    }
}

#[test]
fn spatial_gather_matches_cpu_on_random_shapes() {
    let mut rng = Rng::new(seed("spatial_gather_matches_cpu"));
    for _ in 0..25 {
        let dims = [rng.range(1, 2), rng.range(1, 20), rng.range(1, 24), rng.range(1, 40), rng.range(1, 40)];
        let [n, k, c, h, w] = dims;
        let aux: Vec<f32> = rng.normals(n * k * h * w).iter().map(|v| 3.0 * v).collect();
        let (feats, gc) = (rng.normals(n * c * h * w), rng.normals(n * c * k));
        let got = wait(gather_gpu(dims, &aux, &feats, &gc));
        let want = gather_cpu(dims, &aux, &feats, &gc);
        assert_close(&format!("{dims:?} context"), &got[0], &want[0], TOL);
        assert_close(&format!("{dims:?} grad_feats"), &got[2], &want[2], TOL);
        // grad_aux = p * (g - sum_q p_q g_q) with g a c-term dot product: where the
        // difference cancels, f32 can only promise an error relative to the terms, as for
        // any reduction (the PyTorch fixtures above hold the result itself to 1e-5).
        let terms = grad_aux_terms_norm(dims, &aux, &feats, &gc);
        assert_close_to_terms(&format!("{dims:?} grad_aux"), &got[1], &want[1], terms, TOL);
    }
}

/// Object attention: (out, grad_query, grad_key, grad_value).
async fn attention_gpu(dims: [usize; 5], q: &[f32], key: &[f32], v: &[f32], go: &[f32]) -> [Vec<f32>; 4] {
    let gpu = gpu();
    let [n, ch, k, h, w] = dims;
    let (qs, ks) = ([n, ch, h, w], [n, ch, k, 1]);
    let (qt, kt, vt, got) = (upload(&qs, q), upload(&ks, key), upload(&ks, v), upload(&qs, go));
    let sim = poisoned(&ocr::attention_map_shape(&qt, &kt, &vt).unwrap());
    let out = poisoned(&qs);
    let (gq, gk, gv) = (poisoned(&qs), poisoned(&ks), poisoned(&ks));
    let mut ds = ocr::object_attention_forward(gpu, None, &qt, &kt, &vt, &sim, &out).unwrap();
    let grads = AttentionGrads { query: (&gq, false), key: (&gk, false), value: (&gv, false) };
    ds.extend(ocr::object_attention_backward(gpu, None, (&qt, &kt, &vt), &sim, &got, &grads).unwrap());
    gpu.run(&ds).unwrap();
    [fetch(&out).await, fetch(&gq).await, fetch(&gk).await, fetch(&gv).await]
}

fn attention_cpu(dims: [usize; 5], q: &[f32], key: &[f32], v: &[f32], go: &[f32]) -> [Vec<f32>; 4] {
    let [n, ch, k, h, w] = dims;
    let hw = h * w;
    let scale = (ch as f64).powf(-0.5);
    let qa = |t: usize, c: usize, p: usize| q[(t * ch + c) * hw + p];
    let ka = |t: usize, c: usize, j: usize| key[(t * ch + c) * k + j];
    let va = |t: usize, c: usize, j: usize| v[(t * ch + c) * k + j];
    let goa = |t: usize, c: usize, p: usize| go[(t * ch + c) * hw + p];
    let logits = matmul_ref((n, hw, ch, k), |t, p, c| qa(t, c, p), ka);
    let sim = softmax_ref(&logits, [n * hw, k, 1], scale);
    let sa = |t: usize, p: usize, j: usize| sim[(t * hw + p) * k + j];
    let out = matmul_ref((n, ch, k, hw), va, |t, j, p| sa(t, p, j));
    let gv = matmul_ref((n, ch, hw, k), goa, sa);
    let gsim = matmul_ref((n, hw, ch, k), |t, p, c| goa(t, c, p), va);
    let gl = softmax_backward_ref(&sim, &gsim, [n * hw, k, 1], scale);
    let gla = |t: usize, p: usize, j: usize| gl[(t * hw + p) * k + j];
    let gq = matmul_ref((n, ch, k, hw), ka, |t, j, p| gla(t, p, j));
    let gk = matmul_ref((n, ch, hw, k), qa, gla);
    [out, gq, gk, gv]
}

const ATTENTION: [&str; 4] = ["out", "grad_query", "grad_key", "grad_value"];

#[test]
fn object_attention_matches_pytorch_fixtures() {
    wait(object_attention_matches_pytorch_fixtures_body());
}

/// The body of [`object_attention_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn object_attention_matches_pytorch_fixtures_body() {
    let f = Fixture::load("object_attention.safetensors");
    for (case, p) in f.cases() {
        let dims: [usize; 5] = p[..].try_into().unwrap();
        let g = |t: &str| f.get(&format!("{case}.{t}"));
        let got = attention_gpu(dims, g("query"), g("key"), g("value"), g("grad_out")).await;
        for (name, got) in ATTENTION.iter().zip(&got) {
            assert_close(&format!("{case} {dims:?} {name}"), got, g(name), TOL);
        }
    }
}

#[test]
fn object_attention_matches_cpu_on_random_shapes() {
    let mut rng = Rng::new(seed("object_attention_matches_cpu"));
    for _ in 0..25 {
        let dims = [rng.range(1, 2), rng.range(1, 40), rng.range(1, 20), rng.range(1, 12), rng.range(1, 12)];
        let [n, ch, k, h, w] = dims;
        let (q, key, v, go) = (
            rng.normals(n * ch * h * w),
            rng.normals(n * ch * k),
            rng.normals(n * ch * k),
            rng.normals(n * ch * h * w),
        );
        let got = wait(attention_gpu(dims, &q, &key, &v, &go));
        let want = attention_cpu(dims, &q, &key, &v, &go);
        for (name, (got, want)) in ATTENTION.iter().zip(got.iter().zip(&want)) {
            assert_close(&format!("{dims:?} {name}"), got, want, TOL);
        }
    }
}
