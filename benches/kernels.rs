//! Every kernel alone, forward and each backward, at HRNet's shapes: the stage-2..4 branch
//! widths of W18 (18/36/72/144) and W48 (48/96/192/384) for a 256 x 512 input (branches at
//! 64x128, 32x64, 16x32, 8x16), plus the fuse-layer and OCR-head convolutions.
//! Throughput is FLOP/s (2 x multiply-adds) for convolutions and bytes/s (minimum traffic)
//! for memory-bound kernels. Each group name carries the adapter's name, so results from
//! different GPUs and backends sit side by side.
//!
//! `cargo bench --bench kernels -- conv2d_forward` runs one group.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hrnet_ocr::gpu::{total_cost, Dispatch};
use hrnet_ocr::kernels::batch_norm::{self, BatchNormGrads, BatchNormParams, EPS, MOMENTUM};
use hrnet_ocr::kernels::conv2d::{self, Conv2dSpec};
use hrnet_ocr::kernels::elementwise;
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
        let fwd = [conv2d::forward(&gpu, s, &x, &w, Some(&b), &y).unwrap()];
        bench(c, &gpu, "conv2d_forward", &case.name, &fwd, false);
        let bwd_x = [conv2d::backward_input(&gpu, s, &gy, &w, &gx, false).unwrap()];
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

criterion_group!(kernels, convolutions, memory_bound);
criterion_main!(kernels);
