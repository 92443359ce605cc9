//! End to end: an eval forward and a training step (forward, backward, SGD) of the whole
//! model with random weights, at sizes lavapipe runs in seconds. Prints the planned device
//! memory of the forward next to the memory with a buffer per tensor.
//!
//! `HRNET_BENCH_CONFIG=w48 cargo bench --bench model` picks another preset.

use criterion::{criterion_group, criterion_main, Criterion};
use hrnet_ocr::graph::{Graph, GraphBuilder, Mode};
use hrnet_ocr::kernels::sgd::SgdConfig;
use hrnet_ocr::model::{hrnet, Config};
use hrnet_ocr::{Gpu, Tensor};
use std::time::Duration;

fn preset() -> String {
    std::env::var("HRNET_BENCH_CONFIG").unwrap_or_else(|_| "w18-small-v2".into())
}

/// The model with a fresh (deterministic) initialisation.
fn model(gpu: &Gpu, cfg: &Config, shape: [usize; 4], train: bool) -> Graph {
    let mut g = GraphBuilder::new();
    let x = g.input("input", &shape, false);
    let m = hrnet::build(&mut g, cfg, x, if train { hrnet::OCR_DROPOUT } else { 0.0 }).unwrap();
    if train {
        let labels = g.labels("label", &[shape[0], shape[2], shape[3]]);
        hrnet::add_losses(&mut g, cfg, [m.aux, m.out], labels).unwrap();
    } else {
        let r = g.plan_memory(&[m.aux, m.out]);
        eprintln!(
            "{} {shape:?} forward memory: {:.1} MiB planned, {:.1} MiB with a buffer per tensor",
            preset(),
            r.planned as f64 / 1048576.0,
            r.unshared as f64 / 1048576.0
        );
    }
    let graph = g.build(gpu, if train { Mode::Train } else { Mode::Eval }, &[m.aux, m.out]).unwrap();
    hrnet_ocr::train::initialise(gpu, &graph).unwrap();
    let input = Tensor::full(gpu, &shape, 0.5).unwrap();
    graph.set(gpu, "input", &input.to_vec(gpu).unwrap()).unwrap();
    if train {
        let labels: Vec<u32> =
            (0..shape[0] * shape[2] * shape[3]).map(|i| (i % cfg.num_classes) as u32).collect();
        graph.tensor("label").unwrap().write_u32(gpu, &labels).unwrap();
    }
    graph
}

fn end_to_end(c: &mut Criterion) {
    let gpu = Gpu::new().expect("a GPU adapter");
    let cfg = Config::preset(&preset()).unwrap();
    let adapter = &gpu.info().name;
    let mut g = c.benchmark_group(format!("model {} [{adapter}]", preset()));
    g.sample_size(10).warm_up_time(Duration::from_millis(100)).measurement_time(Duration::from_secs(5));
    let eval = model(&gpu, &cfg, [1, 3, 256, 512], false);
    g.bench_function("forward 1x3x256x512", |b| {
        b.iter(|| {
            eval.forward(&gpu).unwrap();
            gpu.wait().unwrap();
        })
    });
    let mut train = model(&gpu, &cfg, [2, 3, 256, 256], true);
    let sgd = SgdConfig { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    g.bench_function("training step 2x3x256x256", |b| {
        b.iter(|| {
            train.zero_grads(&gpu).unwrap();
            train.forward(&gpu).unwrap();
            train.backward(&gpu).unwrap();
            train.sgd_step(&gpu, &sgd, 0.01).unwrap();
            gpu.wait().unwrap();
        })
    });
    g.finish();
}

criterion_group!(model_benches, end_to_end);
criterion_main!(model_benches);
