//! Dropout2d, SGD and the evaluation kernels (argmax, confusion matrix).

use crate::common::*;
use hrnet_ocr::kernels::dropout::{self, Dropout2d};
use hrnet_ocr::kernels::metrics;
use hrnet_ocr::kernels::sgd::{Arena, SgdConfig};
use hrnet_ocr::tensor::DType;
use hrnet_ocr::{Gpu, GpuOptions, Tensor};

const TOL: f64 = 1e-5;

async fn dropout_run(dims: [usize; 4], drop: f32, seed: u32, x: &[f32], gy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    placed_dropout_run(Dropout2d { drop, first_image: 0 }, dims, seed, (x, gy)).await
}

async fn placed_dropout_run(
    layer: Dropout2d,
    dims: [usize; 4],
    seed: u32,
    (x, gy): (&[f32], &[f32]),
) -> (Vec<f32>, Vec<f32>) {
    let gpu = gpu();
    let (xt, gyt, y, gx) = (upload(&dims, x), upload(&dims, gy), poisoned(&dims), poisoned(&dims));
    let ds =
        [layer.forward(gpu, &xt, &y, seed).unwrap(), layer.backward(gpu, &gyt, &gx, seed, false).unwrap()];
    gpu.run(ds.iter().flatten().map(|s| &s.dispatch)).unwrap();
    (fetch(&y).await, fetch(&gx).await)
}

/// A data-parallel rank's slice of a batch gets the masks its images have in the whole
/// batch.
#[test]
fn dropout_of_a_batch_slice_keeps_its_images_masks() {
    let mut rng = Rng::new(seed("placed dropout"));
    let (c, h, w) = (16, 3, 5);
    let per = c * h * w;
    let (x, gy) = (rng.normals(3 * per), rng.normals(3 * per));
    let seed = rng.next_u64() as u32;
    let whole = wait(dropout_run([3, c, h, w], 0.5, seed, &x, &gy));
    let layer = Dropout2d { drop: 0.5, first_image: 1 };
    let (y, gx) = wait(placed_dropout_run(layer, [2, c, h, w], seed, (&x[per..], &gy[per..])));
    assert_eq!((y.as_slice(), gx.as_slice()), (&whole.0[per..], &whole.1[per..]));
    assert_ne!(y[..per], whole.0[..per], "the slice took image 0's masks");
}

#[test]
fn dropout_drops_whole_channels_reproducibly_and_matches_cpu() {
    let mut rng = Rng::new(seed("dropout"));
    for _ in 0..30 {
        let dims = [rng.range(1, 3), rng.range(1, 40), rng.range(1, 9), rng.range(1, 9)];
        let [n, c, h, w] = dims;
        let drop = [0.05, 0.5, 0.0][rng.range(0, 2)];
        let seed = rng.next_u64() as u32;
        let (x, gy) = (rng.normals(n * c * h * w), rng.normals(n * c * h * w));
        let (y, gx) = wait(dropout_run(dims, drop, seed, &x, &gy));
        let scale = 1.0 / (1.0 - drop);
        let factor = |i: usize| {
            if dropout::keep(seed, drop, i / (c * h * w), c, (i / (h * w)) % c) {
                scale
            } else {
                0.0
            }
        };
        let want_y: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * factor(i)).collect();
        let want_gx: Vec<f32> = gy.iter().enumerate().map(|(i, g)| g * factor(i)).collect();
        assert_close(&format!("{dims:?} p {drop} forward"), &y, &want_y, TOL);
        assert_close(&format!("{dims:?} p {drop} backward"), &gx, &want_gx, TOL);
        let again = wait(dropout_run(dims, drop, seed, &x, &gy));
        assert_eq!(again.0, y, "same seed, same mask");
    }
}

#[test]
fn dropout_rate_is_close_to_p_and_seeds_differ() {
    let dims = [4, 2000, 1, 1];
    let x = vec![1.0f32; 8000];
    let (y, _) = wait(dropout_run(dims, 0.05, 7, &x, &x));
    let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
    // 8000 Bernoulli(0.05) draws: standard deviation 0.0024; 5 sigma either way.
    assert!((dropped - 0.05).abs() < 0.012, "dropped fraction {dropped}");
    let (y2, _) = wait(dropout_run(dims, 0.05, 8, &x, &x));
    assert_ne!(y, y2, "a different seed gives a different mask");
    assert!(Dropout2d { drop: 1.0, first_image: 0 }
        .forward(gpu(), &upload(&dims, &x), &poisoned(&dims), 1)
        .is_err());
}

/// PyTorch's SGD on the CPU in f64, one parameter tensor.
fn sgd_ref(p: &mut [f64], buf: &mut [f64], g: &[f32], lr: f64, c: &SgdConfig) {
    for i in 0..p.len() {
        let d = f64::from(g[i]) + f64::from(c.weight_decay) * p[i];
        buf[i] = f64::from(c.momentum) * buf[i] + d;
        let step = if c.nesterov { d + f64::from(c.momentum) * buf[i] } else { buf[i] };
        p[i] -= lr * step;
    }
}

#[test]
fn sgd_matches_pytorch_fixtures() {
    wait(sgd_matches_pytorch_fixtures_body());
}

/// The body of [`sgd_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn sgd_matches_pytorch_fixtures_body() {
    let gpu = gpu();
    let f = Fixture::load("sgd.safetensors");
    for (case, p) in f.cases_with("case") {
        let (len, steps) = (p[0] as usize, p[1] as usize);
        let config = SgdConfig { momentum: p[2] as f32, weight_decay: p[3] as f32, nesterov: p[4] == 1.0 };
        let g = |t: &str| f.get(&format!("{case}.{t}"));
        let arena = Arena::new(gpu, &[(&[len], 1.0)]).unwrap();
        let (param, grad) = &arena.views[0];
        param.write(gpu, g("param")).unwrap();
        let step = arena.step(gpu, &config, 0.0).unwrap();
        for t in 0..steps {
            grad.write(gpu, &g("grads")[t * len..(t + 1) * len]).unwrap();
            arena.set_lr(gpu, &step, &config, g("lr")[t]);
            gpu.run(&step).unwrap();
        }
        assert_close(&format!("{case} param"), &fetch(param).await, g("param_final"), TOL);
        // With momentum 0 PyTorch keeps no buffer (the fixture stores zeros); ours is unused.
        if config.momentum != 0.0 {
            let momentum = fetch(&arena.momentum_views[0]).await;
            assert_close(&format!("{case} momentum"), &momentum, g("momentum_final"), TOL);
        }
    }
}

/// Many parameters with different learning-rate multipliers in one dispatch per step; and,
/// on a device whose storage bindings are too small for them all, in chunks of the arena
/// that each fit one, a dispatch per chunk, with the same results.
#[test]
fn sgd_updates_every_parameter_of_an_arena_in_one_dispatch_per_chunk() {
    let small =
        Gpu::with_options(&GpuOptions { max_storage_binding: Some(2048), ..GpuOptions::from_env() }).unwrap();
    let mut rng = Rng::new(seed("sgd_arena"));
    for (nesterov, gpu, chunked) in [(false, gpu(), false), (true, gpu(), false), (true, &small, true)] {
        let shapes: Vec<Vec<usize>> = (0..12).map(|_| vec![rng.range(1, 9), rng.range(1, 40)]).collect();
        let mults: Vec<f32> = (0..12).map(|i| if i % 3 == 0 { 10.0 } else { 1.0 }).collect();
        let spec: Vec<(&[usize], f32)> = shapes.iter().zip(&mults).map(|(s, &m)| (s.as_slice(), m)).collect();
        let arena = Arena::new(gpu, &spec).unwrap();
        let elements: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        assert_eq!(arena.chunks() > 1, chunked, "{elements} elements in {} chunks", arena.chunks());
        let config = SgdConfig { momentum: 0.9, weight_decay: 5e-4, nesterov };
        let mut params: Vec<Vec<f64>> = Vec::new();
        let mut bufs: Vec<Vec<f64>> = Vec::new();
        for (p, _) in &arena.views {
            let init = rng.normals(p.numel());
            p.write(gpu, &init).unwrap();
            params.push(init.iter().map(|&v| f64::from(v)).collect());
            bufs.push(vec![0.0; p.numel()]);
        }
        let step = arena.step(gpu, &config, 0.01).unwrap();
        for t in 0..3 {
            let lr = 0.01 * (1.0 - t as f32 / 10.0f32).powf(0.9);
            arena.set_lr(gpu, &step, &config, lr);
            for (i, (_, g)) in arena.views.iter().enumerate() {
                let grads = rng.normals(g.numel());
                g.write(gpu, &grads).unwrap();
                sgd_ref(&mut params[i], &mut bufs[i], &grads, f64::from(lr) * f64::from(mults[i]), &config);
            }
            gpu.run(&step).unwrap();
        }
        for (i, (p, _)) in arena.views.iter().enumerate() {
            let want: Vec<f32> = params[i].iter().map(|&v| v as f32).collect();
            assert_close(
                &format!("parameter {i} (x{}) nesterov {nesterov}, {} chunks", mults[i], arena.chunks()),
                &p.to_vec(gpu).unwrap(),
                &want,
                TOL,
            );
        }
    }
}

async fn argmax_and_confusion(dims: [usize; 4], scores: &[f32], labels: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let gpu = gpu();
    let [n, k, h, w] = dims;
    let st = upload(&dims, scores);
    let yt = Tensor::from_u32(gpu, &[n, h, w], labels).unwrap();
    let pred = Tensor::from_u32(gpu, &[n, h, w], &vec![u32::MAX; n * h * w]).unwrap();
    let conf = Tensor::from_u32(gpu, &[k, k], &vec![0; k * k]).unwrap();
    let ds = [
        metrics::argmax(gpu, &st, &pred).unwrap(),
        vec![metrics::confusion(gpu, &pred, &yt, k, 255, &conf).unwrap()],
        vec![metrics::confusion(gpu, &pred, &yt, k, 255, &conf).unwrap()],
    ];
    gpu.run(ds.iter().flatten()).unwrap();
    assert_eq!(pred.dtype(), DType::U32);
    (fetch_u32(&pred).await, fetch_u32(&conf).await)
}

#[test]
fn argmax_and_confusion_match_pytorch_fixtures_exactly() {
    wait(argmax_and_confusion_match_pytorch_fixtures_exactly_body());
}

/// The body of [`argmax_and_confusion_match_pytorch_fixtures_exactly`], also awaited by the browser suite (tests/web.rs).
pub async fn argmax_and_confusion_match_pytorch_fixtures_exactly_body() {
    let f = Fixture::load("metrics.safetensors");
    for (case, p) in f.cases() {
        let dims: [usize; 4] = p[..].try_into().unwrap();
        let (pred, conf) =
            argmax_and_confusion(dims, f.get(&format!("{case}.logits")), f.labels(&format!("{case}.label")))
                .await;
        assert_eq!(pred, f.labels(&format!("{case}.pred")), "{case} argmax");
        // Accumulated twice: every count doubles.
        let want: Vec<u32> = f.labels(&format!("{case}.confusion")).iter().map(|c| 2 * c).collect();
        assert_eq!(conf, want, "{case} confusion");
    }
}

#[test]
fn argmax_and_confusion_match_cpu_on_random_shapes() {
    let mut rng = Rng::new(seed("argmax_and_confusion"));
    for _ in 0..30 {
        let dims = [rng.range(1, 3), rng.range(1, 20), rng.range(1, 30), rng.range(1, 30)];
        let [n, k, h, w] = dims;
        let scores = rng.normals(n * k * h * w);
        let labels: Vec<u32> = (0..n * h * w)
            .map(|_| if rng.range(0, 9) == 0 { 255 } else { rng.range(0, k - 1) as u32 })
            .collect();
        let (pred, conf) = wait(argmax_and_confusion(dims, &scores, &labels));
        let mut want_conf = vec![0u32; k * k];
        for px in 0..n * h * w {
            let base = (px / (h * w)) * k * h * w + px % (h * w);
            let best =
                (0..k)
                    .fold(0, |b, c| if scores[base + c * h * w] > scores[base + b * h * w] { c } else { b });
            assert_eq!(pred[px], best as u32, "{dims:?} pixel {px}");
            if labels[px] != 255 {
                want_conf[labels[px] as usize * k + best] += 2;
            }
        }
        assert_eq!(conf, want_conf, "{dims:?} confusion");
    }
}

/// A recorded dispatch reseeded for the next step gives that seed's mask.
#[test]
fn dropout_reseed_changes_the_recorded_mask() {
    let gpu = gpu();
    let dims = [2, 64, 3, 3];
    let x = vec![1.0f32; 2 * 64 * 9];
    let layer = Dropout2d { drop: 0.5, first_image: 0 };
    let (xt, y) = (upload(&dims, &x), poisoned(&dims));
    let mut seeded = layer.forward(gpu, &xt, &y, 1).unwrap();
    assert_eq!(seeded.len(), 1, "a small dropout is one launch");
    let forward = seeded.remove(0);
    forward.reseed(gpu, 2);
    gpu.run([&forward.dispatch]).unwrap();
    assert_eq!(download(&y), wait(dropout_run(dims, 0.5, 2, &x, &x)).0);
    assert_ne!(download(&y), wait(dropout_run(dims, 0.5, 1, &x, &x)).0);
}

/// The fixture builds the same counter-based mask in Python from the documented hash.
#[test]
fn dropout_matches_pytorch_fixtures() {
    wait(dropout_matches_pytorch_fixtures_body());
}

/// The body of [`dropout_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn dropout_matches_pytorch_fixtures_body() {
    let f = Fixture::load("dropout.safetensors");
    for (case, p) in f.cases_with("case") {
        let dims = [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize];
        let (seed, drop) = (p[4] as u32, p[5] as f32);
        let g = |t: &str| f.get(&format!("{case}.{t}"));
        let (y, gx) = dropout_run(dims, drop, seed, g("x"), g("grad_out")).await;
        assert_close(&format!("{case} out"), &y, g("out"), TOL);
        assert_close(&format!("{case} grad_x"), &gx, g("grad_x"), TOL);
        let [n, c, _, _] = dims;
        for (i, &kept) in g("keep").iter().enumerate() {
            assert_eq!(
                dropout::keep(seed, drop, i / c, c, i % c),
                kept == 1.0,
                "{case}: channel {i} of {n}x{c}"
            );
        }
    }
}
