use crate::common::*;
use hrnet_ocr::kernels::batch_norm::BatchNormParams;
use hrnet_ocr::kernels::conv2d::{self, Conv2dSpec, Precision};
use hrnet_ocr::kernels::tuning::{ConvForward, ConvInputGrad, ConvWeightGrad, Tunable};
use hrnet_ocr::Tensor;

/// Relative L2 tolerance for a single kernel in f32 (DESIGN.md).
const TOL: f64 = 1e-5;

struct Run {
    y: Vec<f32>,
    gx: Vec<f32>,
    gw: Vec<f32>,
    gb: Option<Vec<f32>>,
}

/// The gradients' register tiles a run takes.
type GradTiles = (ConvInputGrad, ConvWeightGrad);

/// Runs forward and all three backward kernels (the gradients in the `tiles` variants),
/// each into a NaN-poisoned output.
async fn run_all(d: &ConvDims, x: &[f32], w: &[f32], b: Option<&[f32]>, gy: &[f32], tiles: GradTiles) -> Run {
    let gpu = gpu();
    let (xt, wt, gyt) = (upload(&d.x_shape(), x), upload(&d.w_shape(), w), upload(&d.y_shape(), gy));
    let bt = b.map(|b| upload(&[d.co], b));
    let (y, gx, gw) = (poisoned(&d.y_shape()), poisoned(&d.x_shape()), poisoned(&d.w_shape()));
    let gb = poisoned(&[d.co]);
    let mut ds = conv2d::forward(gpu, &d.spec, &xt, &wt, bt.as_ref(), &y).unwrap().into_vec();
    ds.extend(conv2d::backward_input_with(gpu, &d.spec, &gyt, &wt, &gx, false, tiles.0).unwrap());
    ds.extend(conv2d::backward_weight_with(gpu, &d.spec, &xt, &gyt, &gw, false, tiles.1).unwrap());
    if b.is_some() {
        ds.extend(conv2d::backward_bias(gpu, &gyt, &gb, false).unwrap());
    }
    gpu.run(&ds).unwrap();
    let gb = match b {
        Some(_) => Some(fetch(&gb).await),
        None => None,
    };
    Run { y: fetch(&y).await, gx: fetch(&gx).await, gw: fetch(&gw).await, gb }
}

#[test]
fn conv2d_matches_pytorch_fixtures() {
    wait(conv2d_matches_pytorch_fixtures_body());
}

/// The body of [`conv2d_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn conv2d_matches_pytorch_fixtures_body() {
    let f = Fixture::load("conv2d.safetensors");
    for (case, p) in f.cases() {
        let [n, ci, h, w, co, kh, kw, stride, pad, dil, bias] = p[..] else { panic!("{case}: bad metadata") };
        let d = ConvDims { n, ci, h, w, co, kh, kw, spec: Conv2dSpec::square(stride, pad, dil) };
        let key = |t: &str| format!("{case}.{t}");
        let b = (bias == 1).then(|| f.get(&key("bias")));
        for tiles in [
            (ConvInputGrad::Narrow, ConvWeightGrad::Wide),
            (ConvInputGrad::Wide, ConvWeightGrad::Narrow),
            (ConvInputGrad::TiledK8, ConvWeightGrad::TiledK8),
            (ConvInputGrad::TiledK16, ConvWeightGrad::TiledK16),
        ] {
            let r =
                run_all(&d, f.get(&key("x")), f.get(&key("weight")), b, f.get(&key("grad_out")), tiles).await;
            assert_close(&format!("{case} {d:?} out"), &r.y, f.get(&key("out")), TOL);
            assert_close(&format!("{case} grad_x {tiles:?}"), &r.gx, f.get(&key("grad_x")), TOL);
            assert_close(&format!("{case} grad_weight {tiles:?}"), &r.gw, f.get(&key("grad_weight")), TOL);
            if let Some(gb) = r.gb {
                assert_close(&format!("{case} grad_bias"), &gb, f.get(&key("grad_bias")), TOL);
            }
        }
    }
}

fn random_dims(rng: &mut Rng, max_hw: usize) -> ConvDims {
    loop {
        let spec = Conv2dSpec {
            stride: [rng.range(1, 3), rng.range(1, 3)],
            padding: [rng.range(0, 3), rng.range(0, 3)],
            dilation: [rng.range(1, 2), rng.range(1, 2)],
        };
        let d = ConvDims {
            n: rng.range(1, 3),
            ci: rng.range(1, 9),
            h: rng.range(1, max_hw),
            w: rng.range(1, max_hw),
            co: rng.range(1, 9),
            kh: rng.range(1, 5),
            kw: rng.range(1, 5),
            spec,
        };
        if spec.output_size(d.h, d.w, d.kh, d.kw).is_ok() {
            return d;
        }
    }
}

fn check_against_cpu(test: &str, shapes: usize, max_hw: usize) {
    let mut rng = Rng::new(seed(test));
    for i in 0..shapes {
        let d = random_dims(&mut rng, max_hw);
        let x = rng.normals(d.x_shape().iter().product());
        let w = rng.normals(d.w_shape().iter().product());
        let b = rng.coin().then(|| rng.normals(d.co));
        let gy = rng.normals(d.y_shape().iter().product());
        // Every variant of each gradient in turn, paired differently, whatever the shape
        // would take untimed.
        let tiles = (
            ConvInputGrad::ALL[(i + 1) % ConvInputGrad::ALL.len()],
            ConvWeightGrad::ALL[i % ConvWeightGrad::ALL.len()],
        );
        let r = wait(run_all(&d, &x, &w, b.as_deref(), &gy, tiles));
        let d = (d, tiles);
        assert_close(&format!("{d:?} out"), &r.y, &d.0.forward(&x, &w, b.as_deref()), TOL);
        assert_close(&format!("{d:?} grad_x"), &r.gx, &d.0.backward_input(&gy, &w), TOL);
        // Weight and bias gradients are sums over pixels that may cancel far below their terms.
        let terms = d.0.backward_weight_terms(&x, &gy);
        assert_close_to_terms(
            &format!("{d:?} grad_weight"),
            &r.gw,
            &d.0.backward_weight(&x, &gy),
            terms,
            TOL,
        );
        if let Some(gb) = r.gb {
            let want: Vec<f32> =
                channel_sums(&gy, d.0.y_shape(), |_, g| g).iter().map(|&v| v as f32).collect();
            let terms = channel_terms_norm(&gy, d.0.y_shape(), |_, g| g);
            assert_close_to_terms(&format!("{d:?} grad_bias"), &gb, &want, terms, TOL);
        }
    }
}

#[test]
fn conv2d_matches_cpu_on_random_shapes() {
    check_against_cpu("conv2d_matches_cpu_on_random_shapes", 60, 20);
}

/// Large enough images that the weight and bias reductions are split into chunks.
#[test]
fn conv2d_split_reductions_match_cpu() {
    check_against_cpu("conv2d_split_reductions_match_cpu", 6, 90);
}

#[test]
fn conv2d_backward_accumulates_into_existing_gradients() {
    let gpu = gpu();
    let mut rng = Rng::new(seed("conv2d_backward_accumulates"));
    for i in 0..10 {
        let mut d = random_dims(&mut rng, 40);
        if i % 2 == 0 {
            // Enough channels for the wide weight-gradient tiles (16 input channels and more).
            (d.ci, d.co) = (rng.range(16, 40), rng.range(9, 40));
        }
        let x = rng.normals(d.x_shape().iter().product());
        let w = rng.normals(d.w_shape().iter().product());
        let gy = rng.normals(d.y_shape().iter().product());
        let (old_gx, old_gw, old_gb) = (rng.normals(x.len()), rng.normals(w.len()), rng.normals(d.co));
        let (xt, wt, gyt) = (upload(&d.x_shape(), &x), upload(&d.w_shape(), &w), upload(&d.y_shape(), &gy));
        let gx = upload(&d.x_shape(), &old_gx);
        let gw = upload(&d.w_shape(), &old_gw);
        let gb = upload(&[d.co], &old_gb);
        let mut ds = conv2d::backward_input(gpu, &d.spec, &gyt, &wt, &gx, true).unwrap();
        ds.extend(conv2d::backward_weight(gpu, &d.spec, &xt, &gyt, &gw, true).unwrap());
        ds.extend(conv2d::backward_bias(gpu, &gyt, &gb, true).unwrap());
        gpu.run(&ds).unwrap();
        let plus = |a: &[f32], b: Vec<f32>| a.iter().zip(b).map(|(a, b)| a + b).collect::<Vec<f32>>();
        assert_close("accumulated grad_x", &download(&gx), &plus(&old_gx, d.backward_input(&gy, &w)), TOL);
        assert_close(
            "accumulated grad_weight",
            &download(&gw),
            &plus(&old_gw, d.backward_weight(&x, &gy)),
            TOL,
        );
        // old + sum can cancel far below both, so the error is measured against the terms.
        let sums = channel_sums(&gy, d.y_shape(), |_, g| g).iter().map(|&v| v as f32).collect();
        let old_norm: f64 = old_gb.iter().map(|v| f64::from(*v).powi(2)).sum();
        let terms = (old_norm + channel_terms_norm(&gy, d.y_shape(), |_, g| g).powi(2)).sqrt();
        assert_close_to_terms("accumulated grad_bias", &download(&gb), &plus(&old_gb, sums), terms, TOL);
    }
}

/// The inference epilogue against the CPU composition: conv (+ bias), eval batch norm,
/// (+ residual), (ReLU), on random shapes with every combination of the optional terms.
#[test]
fn conv2d_fused_epilogue_matches_cpu_composition() {
    let gpu = gpu();
    let mut rng = Rng::new(seed("conv2d_fused_epilogue"));
    for i in 0..24 {
        let mut d = random_dims(&mut rng, 24);
        if i % 3 == 0 {
            // Wide enough for several channel groups and K slices of the tiled variant.
            (d.ci, d.co) = (rng.range(9, 40), rng.range(33, 80));
        }
        let (x, w) = (rng.normals(d.x_shape().iter().product()), rng.normals(d.w_shape().iter().product()));
        let b = (i % 2 == 0).then(|| rng.normals(d.co));
        let (fold, with_residual, relu) = (i % 3 != 0, i % 4 < 2, (i / 4) % 2 == 0);
        let gamma = rng.normals(d.co);
        let beta = rng.normals(d.co);
        let mean = rng.normals(d.co);
        let var: Vec<f32> = (0..d.co).map(|_| 0.2 + rng.uniform() as f32).collect();
        let residual = rng.normals(d.y_shape().iter().product());
        let eps = 1e-5;

        let plane = d.out()[0] * d.out()[1];
        let mut want = d.forward(&x, &w, b.as_deref());
        for (j, v) in want.iter_mut().enumerate() {
            let c = (j / plane) % d.co;
            if fold {
                *v = (*v - mean[c]) / (var[c] + eps).sqrt() * gamma[c] + beta[c];
            }
            if with_residual {
                *v += residual[j];
            }
            if relu {
                *v = v.max(0.0);
            }
        }

        let (xt, wt) = (upload(&d.x_shape(), &x), upload(&d.w_shape(), &w));
        let bt = b.as_ref().map(|b| upload(&[d.co], b));
        let [gt, bet, mt, vt] = [&gamma, &beta, &mean, &var].map(|v| upload(&[d.co], v));
        let rt = upload(&d.y_shape(), &residual);
        let epilogue = conv2d::Epilogue {
            bias: bt.as_ref(),
            batch_norm: fold.then_some(BatchNormParams {
                gamma: &gt,
                beta: &bet,
                running_mean: &mt,
                running_var: &vt,
                eps,
                momentum: 0.1,
            }),
            residual: with_residual.then_some(&rt),
            relu,
        };
        for &variant in ConvForward::ALL {
            let y = poisoned(&d.y_shape());
            let run = conv2d::forward_with(gpu, &d.spec, &xt, &wt, &epilogue, Precision::F32, variant, &y);
            gpu.run(&run.unwrap().into_vec()).unwrap();
            let what = format!(
                "{} {d:?} bias {} fold {fold} residual {with_residual} relu {relu}",
                variant.name(),
                b.is_some()
            );
            assert_close(&what, &download(&y), &want, TOL);
        }
    }
}

/// Half-precision inference, every forward variant: f16 input, output and residual, weights
/// packed at half, sums at f32. With an input and weights that are exact halves each
/// output must be the f32 CPU reference rounded to a half; with any weights the error
/// against f32 must be a half's rounding (2^-11 relative), no more and no less. f32
/// activations at f16 precision are refused by name, and so is f16 on an adapter without
/// SHADER_F16.
#[test]
fn conv2d_f16_inference_matches_cpu_reference() {
    let gpu = gpu();
    let mut rng = Rng::new(seed("conv2d_f16_inference"));
    for i in 0..12 {
        let d = random_dims(&mut rng, 24);
        let x: Vec<f32> =
            rng.normals(d.x_shape().iter().product()).iter().map(|&v| round_to_half(v)).collect();
        let w: Vec<f32> = rng.normals(d.w_shape().iter().product()).iter().map(|v| v * 0.3).collect();
        let b =
            (i % 2 == 0).then(|| rng.normals(d.co).iter().map(|&v| round_to_half(v)).collect::<Vec<f32>>());
        let residual = (i % 3 == 0).then(|| rng.normals(d.y_shape().iter().product()));
        let residual = residual.map(|r| r.iter().map(|&v| round_to_half(v)).collect::<Vec<f32>>());
        let (xt, bt) = (upload_half(&d.x_shape(), &x), b.as_ref().map(|b| upload(&[d.co], b)));
        let rt = residual.as_ref().map(|r| upload_half(&d.y_shape(), r));
        let epilogue = conv2d::Epilogue { bias: bt.as_ref(), residual: rt.as_ref(), ..Default::default() };
        let variant = ConvForward::ALL[i % ConvForward::ALL.len()];
        let run = |w: &[f32]| {
            let (wt, y) = (upload(&d.w_shape(), w), poisoned_half(&d.y_shape()));
            conv2d::forward_with(gpu, &d.spec, &xt, &wt, &epilogue, Precision::F16, variant, &y)
                .map(|dispatches| gpu.run(&dispatches.into_vec()).map(|_| download(&y)).unwrap())
        };
        if !gpu.supports_f16() {
            let err = run(&w).expect_err("f16 ran on an adapter without SHADER_F16").to_string();
            assert!(err.contains("SHADER_F16"), "{err}");
            eprintln!("{}: no SHADER_F16, the f16 forward is refused: {err}", gpu.describe());
            return;
        }
        let want = |w: &[f32], bias: Option<&[f32]>| {
            let mut y = d.forward(&x, w, bias);
            for (y, r) in y.iter_mut().zip(residual.iter().flatten()) {
                *y += r;
            }
            y
        };
        let halves: Vec<f32> = w.iter().map(|&v| round_to_half(v)).collect();
        let what = format!("{} {d:?} exact halves", variant.name());
        assert_rounded_to_half(&what, &run(&halves).unwrap(), &want(&halves, b.as_deref()), 1e-5);
        // Measured against the weights' own term (the rest is exact halves either way); a
        // shape whose outputs all fall in the padding has no such term.
        let (got, exact) = (run(&w).unwrap(), want(&w, b.as_deref()));
        let term: f64 = d.forward(&x, &w, None).iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let diff: f64 = got.iter().zip(&exact).map(|(g, w)| f64::from(g - w).powi(2)).sum::<f64>().sqrt();
        if term == 0.0 {
            assert_rounded_to_half(&format!("{d:?} no weight term"), &got, &exact, 0.0);
            continue;
        }
        let err = diff / term;
        assert!(
            (2e-5..2e-3).contains(&err),
            "{d:?}: f16 inference is {err:.2e} from f32, not a half's rounding"
        );
        let (f32_x, y) = (upload(&d.x_shape(), &x), poisoned_half(&d.y_shape()));
        let wt = upload(&d.w_shape(), &w);
        let refused = conv2d::forward_with(gpu, &d.spec, &f32_x, &wt, &epilogue, Precision::F16, variant, &y);
        let err = refused.expect_err("f16 inference took an f32 input").to_string();
        assert!(err.contains("input") && err.contains("F16"), "{err}");
    }
}

/// 1x1 convolutions with stride 1 and no padding, which the workgroup-memory forward runs
/// as a plain GEMM (no taps): every forward variant against the CPU reference, at f32 and,
/// where the adapter has SHADER_F16, at f16 (the reference rounded to halves).
#[test]
fn pointwise_convolutions_match_cpu_reference() {
    let gpu = gpu();
    let mut rng = Rng::new(seed("pointwise_convolutions"));
    for i in 0..8 {
        let spec =
            Conv2dSpec { stride: [1, 1], padding: [0, 0], dilation: [rng.range(1, 2), rng.range(1, 2)] };
        let (h, w) = (rng.range(1, 40), rng.range(1, 40));
        let d = ConvDims {
            n: rng.range(1, 3),
            ci: rng.range(1, 70),
            h,
            w,
            co: rng.range(1, 70),
            kh: 1,
            kw: 1,
            spec,
        };
        let x: Vec<f32> =
            rng.normals(d.x_shape().iter().product()).iter().map(|&v| round_to_half(v)).collect();
        let wt: Vec<f32> =
            rng.normals(d.w_shape().iter().product()).iter().map(|&v| round_to_half(v)).collect();
        let want = d.forward(&x, &wt, None);
        let weight = upload(&d.w_shape(), &wt);
        for variant in ConvForward::ALL.iter().copied().filter(|v| v.runs_on(gpu)) {
            let run = |precision: Precision, xt: Tensor, y: Tensor| {
                let epilogue = Default::default();
                let launches =
                    conv2d::forward_with(gpu, &d.spec, &xt, &weight, &epilogue, precision, variant, &y)
                        .unwrap();
                gpu.run(&launches.into_vec()).unwrap();
                download(&y)
            };
            let got = run(Precision::F32, upload(&d.x_shape(), &x), poisoned(&d.y_shape()));
            assert_close(&format!("{} {d:?}", variant.name()), &got, &want, TOL);
            if gpu.supports_f16() && i % 2 == 0 {
                let got = run(Precision::F16, upload_half(&d.x_shape(), &x), poisoned_half(&d.y_shape()));
                assert_rounded_to_half(&format!("f16 {} {d:?}", variant.name()), &got, &want, 1e-5);
            }
        }
    }
}
