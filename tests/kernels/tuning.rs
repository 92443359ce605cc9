//! The variant tuning: measured once per shape class, kept on disk per adapter.

use crate::common::*;
use hrnet_ocr::kernels::conv2d::{Conv2dSpec, Precision};
use hrnet_ocr::kernels::tuning::{self, ConvClass, ConvForward, Tunable, Tuner, TuningCache};
use hrnet_ocr::{Gpu, GpuOptions};
use std::cell::Cell;

fn conv_class(ci: usize, co: usize, k: usize, stride: usize, out: [usize; 2]) -> ConvClass {
    ConvClass::new(ci, co, [k, k], &Conv2dSpec::square(stride, k / 2, 1), Precision::F32, out)
}

/// Timings in which `fast` wins and the others take `slower` times as long, counting the
/// calls.
fn timer(
    fast: ConvForward,
    slower: f64,
    calls: &Cell<usize>,
) -> impl Fn(ConvForward) -> hrnet_ocr::Result<f64> + '_ {
    move |v| {
        calls.set(calls.get() + 1);
        Ok(if v == fast { 1.0 } else { slower })
    }
}

/// The first request of a class times every variant and keeps the fastest; a second
/// device on the same cache file takes it from there without timing; a class too small
/// to time, or tuning off, takes the adapter's default untimed.
#[test]
fn tuning_keeps_the_fastest_variant_per_class_on_disk() {
    let mut rng = Rng::new(seed("tuning_keeps_the_fastest_variant"));
    let dir = std::env::temp_dir().join(format!("hrnet-tuning-{}", rng.next_u64()));
    let path = dir.join("tuning.tsv");
    // Made-up timings decide, so the test knows the answer: the faster variant is drawn.
    let fast = ConvForward::ALL[rng.range(0, ConvForward::ALL.len() - 1)];
    let timings = |calls| timer(fast, 2.0, calls);
    let class = conv_class(48, 48, 3, 1, [64, 128]);
    let gpu = gpu();
    if !ConvForward::TiledK8.runs_on(gpu) {
        panic!("{}: the tiled variant cannot run, nothing to choose between", gpu.describe());
    }
    let first = Tuner::new(gpu, TuningCache::File(path.clone()));
    let calls = Cell::new(0);
    assert_eq!(first.measure(gpu, &class, timings(&calls)).unwrap(), fast);
    assert_eq!(calls.get(), ConvForward::ALL.len(), "every variant must be timed once");
    assert_eq!(first.measure(gpu, &class, timings(&calls)).unwrap(), fast);
    assert_eq!(calls.get(), ConvForward::ALL.len(), "a known class must not be timed again");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&gpu.info().name) && text.contains(fast.name()), "cache file: {text}");

    let second = Tuner::new(gpu, TuningCache::File(path.clone()));
    // Recording takes the cached choice (it never measures: it has nothing to time with).
    assert_eq!(tuning::choose::<ConvForward>(Some(&second), gpu, &class), fast);
    let calls = Cell::new(0);
    assert_eq!(second.measure(gpu, &class, timings(&calls)).unwrap(), fast);
    assert_eq!(calls.get(), 0, "a cached class must not be timed");
    assert_eq!(second.choices().len(), 1);

    // A class too small to time is not timed: tuning settles it with the adapter kind's
    // runtime best, and recording then takes that instead of the untimed default.
    let tiny = conv_class(4, 4, 1, 1, [8, 8]);
    let calls = Cell::new(0);
    assert_eq!(tuning::choose::<ConvForward>(Some(&second), gpu, &tiny), ConvForward::default_for(gpu));
    let settled = second.measure(gpu, &tiny, timings(&calls)).unwrap();
    assert_eq!(settled, ConvForward::untimed_best(gpu, &tiny));
    assert_eq!(calls.get(), 0, "a tiny class is not timed");
    assert_eq!(tuning::choose::<ConvForward>(Some(&second), gpu, &tiny), settled);
    // Tiling 3x behind the register tiles is not timed again at the other slice depth.
    let calls = Cell::new(0);
    let other = conv_class(48, 96, 3, 2, [64, 128]);
    let chosen = second.measure(gpu, &other, timer(ConvForward::Registers, 5.0, &calls)).unwrap();
    assert_eq!((chosen, calls.get()), (ConvForward::Registers, ConvForward::ALL.len() - 1));

    let calls = Cell::new(0);
    let off = Tuner::new(gpu, TuningCache::Off);
    assert_eq!(off.measure(gpu, &class, timings(&calls)).unwrap(), ConvForward::default_for(gpu));
    assert_eq!(calls.get(), 0, "tuning off times nothing");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A cache file with lines of other adapters, unknown variants and garbage still loads
/// this adapter's valid lines, and saving keeps the other adapters' lines.
#[test]
fn tuning_cache_survives_foreign_and_broken_lines() {
    let mut rng = Rng::new(seed("tuning_cache_survives"));
    let dir = std::env::temp_dir().join(format!("hrnet-tuning-{}", rng.next_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tuning.tsv");
    let foreign = "Some Other GPU|Metal|drv|1|0.1.0\tconv2d_forward 1x1 1x1/1x1 F32 px1\ttiled";
    std::fs::write(&path, format!("{foreign}\nnot a line\nx\ty\tno-such-variant\n")).unwrap();
    let gpu = gpu();
    let tuner = Tuner::new(gpu, TuningCache::File(path.clone()));
    assert!(tuner.choices().is_empty(), "{:?}", tuner.choices());
    let class = conv_class(64, 64, 3, 1, [64, 64]);
    let chosen = tuner
        .measure(gpu, &class, |v: ConvForward| Ok(if v == ConvForward::Registers { 2.0 } else { 3.0 }))
        .unwrap();
    assert_eq!(chosen, ConvForward::Registers);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(foreign), "another adapter's line was lost: {text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Building a graph measures nothing and writes nothing: on a fresh cache path it records
/// the adapter's defaults and leaves no file; `GraphBuilder::tune` is the step that
/// measures, writes the cache, and makes the next build record the measured choices. A
/// training graph's tuning covers the convolution gradients and the OCR head's products.
#[test]
fn building_a_graph_never_measures_and_tune_does() {
    use hrnet_ocr::graph::{GraphBuilder, Mode};
    use std::sync::Arc;
    let mut rng = Rng::new(seed("building_a_graph_never_measures"));
    let dir = std::env::temp_dir().join(format!("hrnet-tuning-{}", rng.next_u64()));
    let path = dir.join("tuning.tsv");
    let gpu = gpu();
    let tuner = Arc::new(Tuner::new(gpu, TuningCache::File(path.clone())));
    let builder = || {
        let mut g = GraphBuilder::new();
        let x = g.input("x", &[1, 32, 64, 64], false);
        let y = g.conv2d("conv", x, [3, 3], 32, false, Conv2dSpec::square(1, 1, 1)).unwrap();
        (g, y)
    };
    let class = conv_class(32, 32, 3, 1, [64, 64]);
    let (mut g, y) = builder();
    g.use_tuner(Arc::clone(&tuner));
    let graph = g.build(gpu, Mode::Eval, &[y]).unwrap();
    graph.forward(gpu).unwrap();
    assert!(!path.exists() && !dir.exists(), "building and running a graph wrote {}", path.display());
    assert!(tuner.choices().is_empty(), "building measured: {:?}", tuner.choices());
    assert_eq!(tuning::choose::<ConvForward>(Some(&tuner), gpu, &class), ConvForward::default_for(gpu));

    let (mut g, y) = builder();
    g.tune(gpu, &tuner, Mode::Eval, &[y]).unwrap();
    let chosen = tuner.choices();
    assert_eq!(chosen.len(), 1, "one convolution, one class: {chosen:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&chosen[0].1), "cache file: {text}");
    assert_eq!(tuning::choose::<ConvForward>(Some(&tuner), gpu, &class).name(), chosen[0].1);

    // The tiny model's training graph: every tuned family gets its classes (at 64 x 96 the
    // gather's softmax over 16 x 24 pixels takes the long rows' chunked path).
    let config = tiny_config();
    let mut g = GraphBuilder::new();
    let x = g.input("input", &[2, 3, 64, 96], false);
    let m = hrnet_ocr::model::hrnet::build(&mut g, &config, x, 0.0).unwrap();
    let labels = g.labels("label", &[2, 64, 96]);
    hrnet_ocr::model::hrnet::add_losses(&mut g, &config, [m.aux, m.out], labels).unwrap();
    g.tune(gpu, &tuner, Mode::Train, &[m.aux, m.out]).unwrap();
    let families: std::collections::BTreeSet<String> =
        tuner.choices().into_iter().map(|(k, _)| k.split(' ').next().unwrap().to_string()).collect();
    for family in [
        "conv2d_forward",
        "conv2d_backward_input",
        "conv2d_backward_weight",
        "matmul",
        "batch_norm_sums",
        "softmax_sums",
        "loss_sums",
    ] {
        assert!(families.contains(family), "{family} not tuned: {:?}", tuner.choices());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A cache file is shared by every device opened on one adapter: a device opened with
/// smaller workgroups never takes a cached choice it cannot run (the tiled GEMM needs 64).
#[test]
fn a_cached_choice_the_device_cannot_run_is_not_taken() {
    let mut rng = Rng::new(seed("a_cached_choice_the_device_cannot_run"));
    let dir = std::env::temp_dir().join(format!("hrnet-tuning-{}", rng.next_u64()));
    let path = dir.join("tuning.tsv");
    let class = conv_class(48, 48, 3, 1, [64, 128]);
    let full = gpu();
    let calls = Cell::new(0);
    let tiled = Tuner::new(full, TuningCache::File(path.clone()))
        .measure(full, &class, timer(ConvForward::TiledK16, 3.0, &calls))
        .unwrap();
    assert_eq!(tiled, ConvForward::TiledK16);
    let small =
        Gpu::with_options(&GpuOptions { max_workgroup_size: Some(16), ..GpuOptions::from_env() }).unwrap();
    let tuner = Tuner::new(&small, TuningCache::File(path.clone()));
    let chosen = tuning::choose::<ConvForward>(Some(&tuner), &small, &class);
    assert!(chosen.runs_on(&small), "{chosen:?} on a device of {} invocations", small.workgroup_size());
    assert_eq!(chosen, ConvForward::default_for(&small));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each chunk-sums family's timing proxy runs with either summing (tuning times them only
/// for classes of a million terms and more, which the tests' models do not reach).
#[test]
fn every_sums_family_times_either_summing_on_its_proxy() {
    use hrnet_ocr::kernels::batch_norm::BnClass;
    use hrnet_ocr::kernels::loss::LossClass;
    use hrnet_ocr::kernels::softmax::SoftmaxClass;
    use hrnet_ocr::kernels::sums::{Sums, SumsClass};
    fn time_each<C: SumsClass>(class: C) {
        for &variant in Sums::<C>::ALL {
            let ms = variant.time(gpu(), &class).unwrap_or_else(|e| panic!("{class:?} {variant:?}: {e}"));
            assert!(ms.is_finite() && ms > 0.0, "{class:?} {variant:?}: {ms} ms");
        }
    }
    time_each(BnClass { channels: 8, samples: 4096 });
    time_each(SoftmaxClass { rows: 4, len: 4096 });
    time_each(LossClass { classes: 5, pixels: 1 << 16 });
}
