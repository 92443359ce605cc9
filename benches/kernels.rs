//! Every kernel alone, forward and each backward, at HRNet's shapes: the stage-2..4 branch
//! widths of W18 (18/36/72/144) and W48 (48/96/192/384) for a 256 x 512 input (branches at
//! 64x128, 32x64, 16x32, 8x16), plus the fuse-layer and OCR-head convolutions.
//! Throughput is FLOP/s (2 x multiply-adds) for convolutions and bytes/s (minimum traffic)
//! for memory-bound kernels. Each group name carries the adapter's name, so results from
//! different GPUs and backends sit side by side.
//!
//! The OCR head's kernels run at its real sizes for that input: a 64x128 feature map,
//! 19 classes, MID 512, KEY 256; the losses and metrics at the 256x512 label size.
//!
//! `cargo bench --bench kernels -- conv2d_forward` runs one group.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hrnet_ocr::gpu::{total_cost, Dispatch};
use hrnet_ocr::kernels::batch_norm::{self, BatchNormGrads, BatchNormParams, EPS, MOMENTUM};
use hrnet_ocr::kernels::conv2d::{self, Conv2dSpec};
use hrnet_ocr::kernels::dropout::Dropout2d;
use hrnet_ocr::kernels::loss::{CrossEntropy, Ohem};
use hrnet_ocr::kernels::matmul::Matmul;
use hrnet_ocr::kernels::ocr::{self, AttentionGrads};
use hrnet_ocr::kernels::sgd::{Arena, SgdConfig};
use hrnet_ocr::kernels::softmax::{self, Axis};
use hrnet_ocr::kernels::{concat, elementwise, metrics, resize};
use hrnet_ocr::{Gpu, Tensor};
use std::time::Duration;

struct ConvCase {
    name: String,
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    k: usize,
    spec: Conv2dSpec,
}

fn conv_cases() -> Vec<ConvCase> {
    let same3 = Conv2dSpec::square(1, 1, 1);
    let mut cases = Vec::new();
    for widths in [[18, 36, 72, 144], [48, 96, 192, 384]] {
        for (b, &c) in widths.iter().enumerate() {
            let (h, w) = (64 >> b, 128 >> b);
            let name = format!("3x3 {c}->{c} {h}x{w}");
            cases.push(ConvCase { name, ci: c, co: c, h, w, k: 3, spec: same3 });
        }
        let (c0, c1) = (widths[0], widths[1]);
        cases.push(ConvCase {
            name: format!("3x3/2 {c0}->{c1} 64x128"),
            ci: c0,
            co: c1,
            h: 64,
            w: 128,
            k: 3,
            spec: Conv2dSpec::square(2, 1, 1),
        });
        cases.push(ConvCase {
            name: format!("1x1 {c1}->{c0} 32x64"),
            ci: c1,
            co: c0,
            h: 32,
            w: 64,
            k: 1,
            spec: Conv2dSpec::square(1, 0, 1),
        });
    }
    cases.push(ConvCase {
        name: "1x1 270->512 64x64 (OCR)".into(),
        ci: 270,
        co: 512,
        h: 64,
        w: 64,
        k: 1,
        spec: Conv2dSpec::square(1, 0, 1),
    });
    cases
}

fn filled(gpu: &Gpu, shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    // Cheap deterministic values in [-1, 1]; the data does not change the timing.
    let data: Vec<f32> = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 8_388_608.0 - 1.0)
        .collect();
    Tensor::from_slice(gpu, shape, &data).expect("allocate benchmark tensor")
}

/// Times `dispatches` submitted together and waited for, per iteration.
fn bench(c: &mut Criterion, gpu: &Gpu, group: &str, id: &str, dispatches: &[Dispatch], bytes_only: bool) {
    let cost = total_cost(dispatches);
    let mut g = c.benchmark_group(format!("{group} [{}]", gpu.info().name));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    g.throughput(if bytes_only { Throughput::Bytes(cost.bytes) } else { Throughput::Elements(cost.flops) });
    g.bench_function(BenchmarkId::from_parameter(id), |b| b.iter(|| gpu.run(dispatches).expect("run")));
    g.finish();
}

fn convolutions(c: &mut Criterion) {
    let gpu = Gpu::new().expect("a GPU adapter");
    for case in conv_cases() {
        let x = filled(&gpu, &[1, case.ci, case.h, case.w], 1);
        let w = filled(&gpu, &[case.co, case.ci, case.k, case.k], 2);
        let b = filled(&gpu, &[case.co], 3);
        let y_shape = conv2d::output_shape(&case.spec, x.shape(), &w).expect("valid case");
        let y = Tensor::empty(&gpu, &y_shape).unwrap();
        let gy = filled(&gpu, &y_shape, 4);
        let gx = Tensor::empty(&gpu, x.shape()).unwrap();
        let gw = Tensor::empty(&gpu, w.shape()).unwrap();
        let gb = Tensor::empty(&gpu, b.shape()).unwrap();
        let s = &case.spec;
        let fwd = conv2d::forward(&gpu, s, &x, &w, Some(&b), &y).unwrap();
        bench(c, &gpu, "conv2d_forward", &case.name, &fwd, false);
        let bwd_x = conv2d::backward_input(&gpu, s, &gy, &w, &gx, false).unwrap();
        bench(c, &gpu, "conv2d_backward_input", &case.name, &bwd_x, false);
        let bwd_w = conv2d::backward_weight(&gpu, s, &x, &gy, &gw, false).unwrap();
        bench(c, &gpu, "conv2d_backward_weight", &case.name, &bwd_w, false);
        let bwd_b = conv2d::backward_bias(&gpu, &gy, &gb, false).unwrap();
        bench(c, &gpu, "conv2d_backward_bias", &case.name, &bwd_b, true);
    }
}

fn memory_bound(c: &mut Criterion) {
    let gpu = Gpu::new().expect("a GPU adapter");
    for (ch, h, w) in [(18, 128, 256), (48, 128, 256), (144, 16, 32), (720, 64, 64)] {
        let id = format!("{ch}x{h}x{w}");
        let shape = [1, ch, h, w];
        let x = filled(&gpu, &shape, 1);
        let other = filled(&gpu, &shape, 2);
        let gy = filled(&gpu, &shape, 3);
        let y = Tensor::empty(&gpu, &shape).unwrap();
        let (gx, gb) = (Tensor::empty(&gpu, &shape).unwrap(), Tensor::empty(&gpu, &shape).unwrap());
        let params: Vec<Tensor> = (0..4).map(|i| filled(&gpu, &[ch], 10 + i)).collect();
        let var = Tensor::full(&gpu, &[ch], 1.0).unwrap();
        let bn = BatchNormParams {
            gamma: &params[0],
            beta: &params[1],
            running_mean: &params[2],
            running_var: &var,
            eps: EPS,
            momentum: MOMENTUM,
        };
        let saved = Tensor::empty(&gpu, &batch_norm::saved_shape(ch)).unwrap();
        let (gg, gbeta) = (Tensor::empty(&gpu, &[ch]).unwrap(), Tensor::empty(&gpu, &[ch]).unwrap());
        let train = batch_norm::forward_train(&gpu, &x, &bn, &saved, &y).unwrap();
        bench(c, &gpu, "batch_norm_train_forward", &id, &train, true);
        bench(
            c,
            &gpu,
            "batch_norm_eval_forward",
            &id,
            &[batch_norm::forward_eval(&gpu, &x, &bn, &y).unwrap()],
            true,
        );
        let grads = BatchNormGrads {
            grad_x: &gx,
            grad_gamma: &gg,
            grad_beta: &gbeta,
            accumulate_x: false,
            accumulate_params: false,
        };
        let backward = batch_norm::backward(&gpu, &x, &bn, &saved, &gy, &grads).unwrap();
        bench(c, &gpu, "batch_norm_backward", &id, &backward, true);
        bench(c, &gpu, "relu_forward", &id, &[elementwise::relu_forward(&gpu, &x, &y).unwrap()], true);
        bench(
            c,
            &gpu,
            "relu_backward",
            &id,
            &[elementwise::relu_backward(&gpu, &x, &gy, &gx, false).unwrap()],
            true,
        );
        bench(c, &gpu, "add_forward", &id, &[elementwise::add_forward(&gpu, &x, &other, &y).unwrap()], true);
        let add_bwd = elementwise::add_backward(&gpu, &gy, (&gx, false), (&gb, false)).unwrap();
        bench(c, &gpu, "add_backward", &id, &[add_bwd], true);
        bench(
            c,
            &gpu,
            "add_relu_forward",
            &id,
            &[elementwise::add_relu_forward(&gpu, &x, &other, &y).unwrap()],
            true,
        );
        let add_relu_bwd = elementwise::add_relu_backward(&gpu, &x, &gy, (&gx, false), (&gb, true)).unwrap();
        bench(c, &gpu, "add_relu_backward", &id, &[add_relu_bwd], true);
    }
}

fn ocr_head(c: &mut Criterion) {
    let gpu = Gpu::new().expect("a GPU adapter");
    let (k, mid, key, h, w) = (19, 512, 256, 64, 128);
    let id = format!("K{k} MID{mid} KEY{key} {h}x{w}");
    let t = |shape: &[usize], seed| filled(&gpu, shape, seed);
    let e = |shape: &[usize]| Tensor::empty(&gpu, shape).unwrap();

    // Bilinear resize into the backbone's concat: 36 channels 32x64 -> 64x128 (W18's x1).
    let (x1, cat) = (t(&[1, 36, 32, 64], 1), e(&[1, 270, 64, 128]));
    let g1 = e(&[1, 36, 32, 64]);
    let rid = "36x32x64 -> 64x128 into 270 channels";
    bench(c, &gpu, "resize_forward", rid, &[resize::forward(&gpu, &x1, &cat, 18, true).unwrap()], true);
    bench(
        c,
        &gpu,
        "resize_backward",
        rid,
        &[resize::backward(&gpu, &cat, 18, &g1, true, false).unwrap()],
        true,
    );
    let x0 = t(&[1, 18, 64, 128], 2);
    let copy = concat::copy_channels(&gpu, (&x0, 0), (&cat, 0), 18, false).unwrap();
    bench(c, &gpu, "concat_copy_channels", "18x64x128 into 270 channels", &[copy], true);

    // Softmax along both of OCR's axes.
    let (logits, probs) = (t(&[1, k, h, w], 3), e(&[1, k, h, w]));
    let gp = e(&[1, k, h, w]);
    for (name, axis) in [
        ("over pixels", Axis { outer: k, len: h * w, inner: 1 }),
        ("over regions", Axis { outer: h * w, len: k, inner: 1 }),
    ] {
        let fwd = softmax::forward(&gpu, &logits, axis, 1.0, &probs).unwrap();
        bench(c, &gpu, "softmax_forward", name, &fwd, true);
        let bwd = softmax::backward(&gpu, &probs, &logits, axis, 1.0, &gp, false).unwrap();
        bench(c, &gpu, "softmax_backward", name, &bwd, true);
    }

    // Matmul 512^3, plain and with both operands transposed.
    let (a, b, m) = (t(&[512, 512], 4), t(&[512, 512], 5), e(&[512, 512]));
    for (ta, tb) in [(false, false), (true, true)] {
        let mm = Matmul { batch: 1, m: 512, k: 512, n: 512, trans_a: ta, trans_b: tb };
        let name = format!("512^3 trans_a {ta} trans_b {tb}");
        bench(c, &gpu, "matmul_forward", &name, &[mm.forward(&gpu, &a, &b, &m).unwrap()], false);
        bench(c, &gpu, "matmul_backward_a", &name, &[mm.backward_a(&gpu, &m, &b, &a, false).unwrap()], false);
        bench(c, &gpu, "matmul_backward_b", &name, &[mm.backward_b(&gpu, &a, &m, &b, false).unwrap()], false);
    }

    // Spatial gather and object attention.
    let feats = t(&[1, mid, h, w], 6);
    let (context, gctx) = (e(&[1, mid, k, 1]), t(&[1, mid, k, 1], 7));
    let (gaux, gfeats) = (e(&[1, k, h, w]), e(&[1, mid, h, w]));
    let fwd = ocr::spatial_gather_forward(&gpu, &logits, &feats, &probs, &context).unwrap();
    bench(c, &gpu, "spatial_gather_forward", &id, &fwd, false);
    let bwd =
        ocr::spatial_gather_backward(&gpu, &feats, &probs, &gctx, (&gaux, false), (&gfeats, false)).unwrap();
    bench(c, &gpu, "spatial_gather_backward", &id, &bwd, false);
    let (query, keys, values) = (t(&[1, key, h, w], 8), t(&[1, key, k, 1], 9), t(&[1, key, k, 1], 10));
    let sim = e(&ocr::attention_map_shape(&query, &keys, &values).unwrap());
    let (out, gout) = (e(&[1, key, h, w]), t(&[1, key, h, w], 11));
    let (gq, gk, gv) = (e(&[1, key, h, w]), e(&[1, key, k, 1]), e(&[1, key, k, 1]));
    let fwd = ocr::object_attention_forward(&gpu, &query, &keys, &values, &sim, &out).unwrap();
    bench(c, &gpu, "object_attention_forward", &id, &fwd, false);
    let grads = AttentionGrads { query: (&gq, false), key: (&gk, false), value: (&gv, false) };
    let bwd = ocr::object_attention_backward(&gpu, (&query, &keys, &values), &sim, &gout, &grads).unwrap();
    bench(c, &gpu, "object_attention_backward", &id, &bwd, false);

    // Dropout2d on the OCR features.
    let drop = Dropout2d { drop: 0.05 };
    bench(
        c,
        &gpu,
        "dropout2d_forward",
        "512x64x128",
        &[drop.forward(&gpu, &feats, &gfeats, 3).unwrap()],
        true,
    );
    bench(
        c,
        &gpu,
        "dropout2d_backward",
        "512x64x128",
        &[drop.backward(&gpu, &feats, &gfeats, 3, false).unwrap()],
        true,
    );
}

fn losses_and_training(c: &mut Criterion) {
    let gpu = Gpu::new().expect("a GPU adapter");
    let (n, k, h, w) = (2, 19, 256, 512);
    let id = format!("{n}x{k}x{h}x{w}");
    let logits = filled(&gpu, &[n, k, h, w], 1);
    let labels: Vec<u32> = (0..n * h * w).map(|i| if i % 10 == 0 { 255 } else { (i % k) as u32 }).collect();
    let labels = Tensor::from_u32(&gpu, &[n, h, w], &labels).unwrap();
    let grad = Tensor::empty(&gpu, &[n, k, h, w]).unwrap();
    for (name, ohem) in
        [("cross_entropy", None), ("ohem_cross_entropy", Some(Ohem { thresh: 0.7, min_kept: 100_000 }))]
    {
        let ce = CrossEntropy { ignore_label: 255, class_weight: None, ohem };
        let pass = ce.forward(&gpu, &logits, &labels).unwrap();
        bench(c, &gpu, &format!("{name}_forward"), &id, &pass.forward, true);
        let bwd = ce.backward(&gpu, &pass, &logits, &labels, 1.0, (&grad, false)).unwrap();
        bench(c, &gpu, &format!("{name}_backward"), &id, &[bwd], true);
    }
    let prediction = Tensor::empty_of(&gpu, &[n, h, w], hrnet_ocr::tensor::DType::U32).unwrap();
    let confusion = Tensor::from_u32(&gpu, &[k, k], &vec![0; k * k]).unwrap();
    bench(c, &gpu, "argmax", &id, &[metrics::argmax(&gpu, &logits, &prediction).unwrap()], true);
    let conf = metrics::confusion(&gpu, &prediction, &labels, k, 255, &confusion).unwrap();
    bench(c, &gpu, "confusion_matrix", &id, &[conf], true);

    // One SGD step over 4 M parameters in 200 tensors, a tenth of them at 10x the rate.
    let shapes: Vec<[usize; 1]> = (0..200).map(|i| [10_000 + 100 * i]).collect();
    let spec: Vec<(&[usize], f32)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_slice(), if i % 10 == 0 { 10.0 } else { 1.0 }))
        .collect();
    let arena = Arena::new(&gpu, &spec).unwrap();
    let config = SgdConfig { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    let step = arena.step(&gpu, &config, 0.01).unwrap();
    bench(c, &gpu, "sgd_step", &format!("{} parameters in 200 tensors", arena.params.numel()), &[step], true);
}

criterion_group!(kernels, convolutions, memory_bound, ocr_head, losses_and_training);
criterion_main!(kernels);
