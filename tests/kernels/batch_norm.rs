use crate::common::*;
use hrnet_ocr::kernels::batch_norm::{self, BatchNormGrads, BatchNormParams, EPS, MOMENTUM};
use hrnet_ocr::kernels::sums::Summing;
use hrnet_ocr::Tensor;

const TOL: f64 = 1e-5;

struct Layer {
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
}

impl Layer {
    fn new(gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32]) -> Self {
        let c = gamma.len();
        Layer {
            gamma: upload(&[c], gamma),
            beta: upload(&[c], beta),
            mean: upload(&[c], mean),
            var: upload(&[c], var),
        }
    }

    fn params(&self) -> BatchNormParams<'_> {
        BatchNormParams {
            gamma: &self.gamma,
            beta: &self.beta,
            running_mean: &self.mean,
            running_var: &self.var,
            eps: EPS,
            momentum: MOMENTUM,
        }
    }
}

struct Results {
    y: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    gx: Vec<f32>,
    ggamma: Vec<f32>,
    gbeta: Vec<f32>,
    y_eval: Vec<f32>,
}

/// Eval forward (with the initial running statistics), then training forward and backward
/// with `summing`'s channel sums.
async fn run(dims: [usize; 4], x: &[f32], layer: &Layer, gy: &[f32], summing: Summing) -> Results {
    let gpu = gpu();
    let c = dims[1];
    let (xt, gyt) = (upload(&dims, x), upload(&dims, gy));
    let (y, y_eval, gx) = (poisoned(&dims), poisoned(&dims), poisoned(&dims));
    let (ggamma, gbeta) = (poisoned(&[c]), poisoned(&[c]));
    let saved = poisoned(&batch_norm::saved_shape(c));
    let bn = layer.params();
    let mut ds = batch_norm::forward_eval(gpu, &xt, &bn, &y_eval).unwrap();
    ds.extend(batch_norm::forward_train_with(gpu, &xt, &bn, &saved, &y, summing).unwrap());
    let grads = BatchNormGrads {
        grad_x: &gx,
        grad_gamma: &ggamma,
        grad_beta: &gbeta,
        accumulate_x: false,
        accumulate_params: false,
    };
    ds.extend(batch_norm::backward_with(gpu, &xt, &bn, &saved, &gyt, &grads, summing).unwrap());
    gpu.run(&ds).unwrap();
    Results {
        y: fetch(&y).await,
        running_mean: fetch(&layer.mean).await,
        running_var: fetch(&layer.var).await,
        gx: fetch(&gx).await,
        ggamma: fetch(&ggamma).await,
        gbeta: fetch(&gbeta).await,
        y_eval: fetch(&y_eval).await,
    }
}

#[test]
fn batch_norm_matches_pytorch_fixtures() {
    wait(batch_norm_matches_pytorch_fixtures_body());
}

/// The body of [`batch_norm_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn batch_norm_matches_pytorch_fixtures_body() {
    let f = Fixture::load("batch_norm.safetensors");
    for (case, p) in f.cases() {
        let dims: [usize; 4] = p[..].try_into().expect("n c h w");
        let g = |t: &str| f.get(&format!("{case}.{t}"));
        for summing in summings() {
            assert!(summing.runs_on(gpu()), "{summing:?} does not run on the test adapter");
            let layer = Layer::new(g("weight"), g("bias"), g("running_mean"), g("running_var"));
            let r = run(dims, g("x"), &layer, g("grad_out"), summing).await;
            let what = |t: &str| format!("{case} {dims:?} {summing:?} {t}");
            assert_close(&what("out"), &r.y, g("out"), TOL);
            assert_close(&what("out_eval"), &r.y_eval, g("out_eval"), TOL);
            assert_close(&what("running_mean"), &r.running_mean, g("running_mean_new"), TOL);
            assert_close(&what("running_var"), &r.running_var, g("running_var_new"), TOL);
            assert_close(&what("grad_x"), &r.gx, g("grad_x"), TOL);
            assert_close(&what("grad_weight"), &r.ggamma, g("grad_weight"), TOL);
            assert_close(&what("grad_bias"), &r.gbeta, g("grad_bias"), TOL);
        }
    }
}

#[test]
fn batch_norm_matches_cpu_on_random_shapes() {
    let mut rng = Rng::new(seed("batch_norm_matches_cpu_on_random_shapes"));
    for i in 0..60 {
        // Every tenth shape is large enough that the channel reductions are split.
        let big = i % 10 == 0;
        let dims =
            [rng.range(1, 4), rng.range(1, 12), rng.range(1, if big { 80 } else { 17 }), rng.range(1, 23)];
        // Two values per channel normalise to exactly -1 and +1, and the input gradient is
        // then zero but for eps: an f32 result is pure cancellation error there (PyTorch's
        // too). From three values on the gradient is well conditioned.
        if dims[0] * dims[2] * dims[3] < 3 {
            continue;
        }
        // Each summing in turn, the big shapes too.
        check_random_shape(&mut rng, dims, summings()[(i / 10 + i) % summings().len()]);
    }
    // Images long enough that the tree splits each into several chunks.
    for dims in [[1, 2, 300, 500], [2, 1, 260, 300]] {
        for summing in summings() {
            check_random_shape(&mut rng, dims, summing);
        }
    }
}

/// A layer of `dims` with random values (channel means far from zero), against the CPU.
fn check_random_shape(rng: &mut Rng, dims: [usize; 4], summing: Summing) {
    let [n, c, h, w] = dims;
    // Channels with means far from zero test the variance's accuracy.
    let offsets: Vec<f32> = (0..c).map(|_| 20.0 * rng.normal()).collect();
    let x: Vec<f32> = (0..n * c * h * w).map(|i| offsets[(i / (h * w)) % c] + 3.0 * rng.normal()).collect();
    let gamma = rng.normals(c);
    let beta = rng.normals(c);
    let mean = rng.normals(c);
    let var: Vec<f32> = (0..c).map(|_| 0.5 + rng.uniform() as f32).collect();
    let gy = rng.normals(x.len());
    let r = wait(run(dims, &x, &Layer::new(&gamma, &beta, &mean, &var), &gy, summing));
    let want = bn_train(&x, dims, &gamma, &beta, &mean, &var);
    let (gx, ggamma, gbeta) = bn_backward(&x, dims, &gamma, &gy);
    let what = |t: &str| format!("{dims:?} {summing:?} {t}");
    assert_close(&what("out"), &r.y, &want.y, TOL);
    assert_close(&what("out_eval"), &r.y_eval, &bn_eval(&x, dims, &gamma, &beta, &mean, &var), TOL);
    // (1 - momentum) * old + momentum * batch mean may cancel far below its terms.
    let abs_means = channel_sums(&x, dims, |_, v| v.abs());
    let count = (n * h * w) as f64;
    let terms = mean
        .iter()
        .zip(&abs_means)
        .map(|(&m, &s)| (0.9 * f64::from(m).abs() + 0.1 * s / count).powi(2))
        .sum::<f64>()
        .sqrt();
    assert_close_to_terms(&what("running_mean"), &r.running_mean, &want.running_mean, terms, TOL);
    assert_close(&what("running_var"), &r.running_var, &want.running_var, TOL);
    assert_close(&what("grad_x"), &r.gx, &gx, TOL);
    // Per-channel sums of grad_y (and grad_y * x_hat) cancel well below their terms.
    let want = bn_train(&x, dims, &gamma, &beta, &mean, &var);
    let x_hat = |i: usize| {
        let ch = (i / (h * w)) % c;
        (f64::from(x[i]) - want.mean[ch]) * want.inv_std[ch]
    };
    let terms = channel_terms_norm(&gy, dims, |i, g| g * x_hat(i));
    assert_close_to_terms(&what("grad_weight"), &r.ggamma, &ggamma, terms, TOL);
    assert_close_to_terms(&what("grad_bias"), &r.gbeta, &gbeta, channel_terms_norm(&gy, dims, |_, g| g), TOL);
}

/// Where the adapter has SUBGROUP, the subgroup summing gives the tree's bits: statistics,
/// outputs, running statistics and every gradient.
#[test]
fn subgroup_summing_gives_the_trees_bits() {
    if !has_subgroup_summing() {
        return;
    }
    let mut rng = Rng::new(seed("batch_norm_subgroup_bits"));
    let dims = [2, rng.range(1, 20), rng.range(20, 90), rng.range(20, 90)];
    let c = dims[1];
    let (x, gy) = (rng.normals(dims.iter().product()), rng.normals(dims.iter().product()));
    let (gamma, beta, mean) = (rng.normals(c), rng.normals(c), rng.normals(c));
    let var: Vec<f32> = rng.normals(c).iter().map(|v| 0.5 + v.abs()).collect();
    let layer = || Layer::new(&gamma, &beta, &mean, &var);
    let (tree, subgroup) = (
        wait(run(dims, &x, &layer(), &gy, Summing::Tree)),
        wait(run(dims, &x, &layer(), &gy, Summing::Subgroup)),
    );
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for (what, a, b) in [
        ("out", &tree.y, &subgroup.y),
        ("running mean", &tree.running_mean, &subgroup.running_mean),
        ("running var", &tree.running_var, &subgroup.running_var),
        ("grad x", &tree.gx, &subgroup.gx),
        ("grad gamma", &tree.ggamma, &subgroup.ggamma),
        ("grad beta", &tree.gbeta, &subgroup.gbeta),
    ] {
        assert!(bits(a) == bits(b), "{dims:?} {what}: the subgroup summing differs from the tree's");
    }
}

/// Synchronized batch norm: two ranks of one image each, their exchanges run on the host,
/// normalise, update the running statistics and back-propagate as one layer over both
/// images (the input gradient of each rank's slice; the weight gradients summed).
#[test]
fn synchronized_ranks_match_one_layer_over_their_images() {
    let mut rng = Rng::new(seed("synchronized batch norm"));
    let (c, h, w) = (12, 17, 23);
    let dims = [2, c, h, w];
    let per = c * h * w;
    // Channels far from zero and of unequal spread: the shifts of the ranks differ a lot.
    let x: Vec<f32> = (0..2 * per).map(|i| 40.0 * ((i / (h * w)) % c) as f32 + rng.normal() * 3.0).collect();
    let gy = rng.normals(2 * per);
    let (gamma, beta, mean) = (rng.normals(c), rng.normals(c), rng.normals(c));
    let new_layer = || Layer::new(&gamma, &beta, &mean, &vec![1.5; c]);
    let one = wait(run(dims, &x, &new_layer(), &gy, Summing::Chunked));

    let gpu = gpu();
    let rank_dims = [1, c, h, w];
    let layers = [new_layer(), new_layer()];
    let slice = |v: &[f32], r: usize| v[r * per..(r + 1) * per].to_vec();
    let xs: Vec<Tensor> = (0..2).map(|r| upload(&rank_dims, &slice(&x, r))).collect();
    let ys: Vec<Tensor> = (0..2).map(|_| poisoned(&rank_dims)).collect();
    let saved: Vec<Tensor> = (0..2).map(|_| poisoned(&batch_norm::saved_shape(c))).collect();
    // Both ranks' passes run up to their exchanges, which then combine both contributions.
    let exchange = |passes: &[batch_norm::SyncedPass]| {
        for p in passes {
            gpu.run(&p.dispatches[..p.exchange_at]).unwrap();
        }
        let all: Vec<Vec<f64>> = passes
            .iter()
            .map(|p| {
                let read: Vec<Vec<f32>> = p.exchange.reads().iter().map(|t| download(t)).collect();
                p.exchange.local(&read)
            })
            .collect();
        for p in passes {
            p.exchange.apply(gpu, &all).unwrap();
            gpu.run(&p.dispatches[p.exchange_at..]).unwrap();
        }
    };
    let forward: Vec<_> = (0..2)
        .map(|r| {
            let bn = layers[r].params();
            batch_norm::forward_train_synced(gpu, &xs[r], &bn, (&saved[r], &ys[r]), Summing::Chunked, 2)
                .unwrap()
        })
        .collect();
    exchange(&forward);
    let gys: Vec<Tensor> = (0..2).map(|r| upload(&rank_dims, &slice(&gy, r))).collect();
    let gxs: Vec<Tensor> = (0..2).map(|_| poisoned(&rank_dims)).collect();
    let ggs: Vec<[Tensor; 2]> = (0..2).map(|_| [poisoned(&[c]), poisoned(&[c])]).collect();
    let backward: Vec<_> = (0..2)
        .map(|r| {
            let grads = BatchNormGrads {
                grad_x: &gxs[r],
                grad_gamma: &ggs[r][0],
                grad_beta: &ggs[r][1],
                accumulate_x: false,
                accumulate_params: false,
            };
            let bn = layers[r].params();
            batch_norm::backward_synced(gpu, &xs[r], &bn, &saved[r], &gys[r], &grads, Summing::Chunked, 2)
                .unwrap()
        })
        .collect();
    exchange(&backward);
    for r in 0..2 {
        assert_close(&format!("rank {r} output"), &download(&ys[r]), &slice(&one.y, r), TOL);
        assert_close(&format!("rank {r} input gradient"), &download(&gxs[r]), &slice(&one.gx, r), TOL);
        assert_close(&format!("rank {r} running mean"), &download(&layers[r].mean), &one.running_mean, TOL);
        assert_close(&format!("rank {r} running var"), &download(&layers[r].var), &one.running_var, TOL);
    }
    let summed = |i: usize| -> Vec<f32> {
        download(&ggs[0][i]).iter().zip(download(&ggs[1][i])).map(|(a, b)| a + b).collect()
    };
    assert_close("weight gradient over the ranks", &summed(0), &one.ggamma, TOL);
    assert_close("bias gradient over the ranks", &summed(1), &one.gbeta, TOL);
}
