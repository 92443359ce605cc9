//! The variant tuning: measured once per shape class, kept on disk per adapter.

use crate::common::*;
use hrnet_ocr::gpu::TuningCache;
use hrnet_ocr::kernels::conv2d::Precision;
use hrnet_ocr::kernels::tuning::{self, ConvClass, ConvForward};
use hrnet_ocr::{Gpu, GpuOptions};
use std::cell::Cell;

fn gpu_with(tuning: TuningCache) -> Gpu {
    Gpu::with_options(&GpuOptions { tuning, ..GpuOptions::from_env() }).unwrap()
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
    let class = ConvClass::new(48, 48, [3, 3], [1, 1], Precision::F32, 64 * 128);
    let first = gpu_with(TuningCache::File(path.clone()));
    if !ConvForward::TiledK8.runs_on(&first) {
        panic!("{}: the tiled variant cannot run, nothing to choose between", first.describe());
    }
    let calls = Cell::new(0);
    assert_eq!(tuning::measure_conv_forward(&first, &class, timings(&calls)).unwrap(), fast);
    assert_eq!(calls.get(), ConvForward::ALL.len(), "every variant must be timed once");
    assert_eq!(tuning::measure_conv_forward(&first, &class, timings(&calls)).unwrap(), fast);
    assert_eq!(calls.get(), ConvForward::ALL.len(), "a known class must not be timed again");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&first.info().name) && text.contains(fast.name()), "cache file: {text}");

    let second = gpu_with(TuningCache::File(path.clone()));
    // Recording takes the cached choice (it never measures: it has nothing to time with).
    assert_eq!(tuning::conv_forward(&second, &class), fast);
    let calls = Cell::new(0);
    assert_eq!(tuning::measure_conv_forward(&second, &class, timings(&calls)).unwrap(), fast);
    assert_eq!(calls.get(), 0, "a cached class must not be timed");
    assert_eq!(tuning::choices(&second).len(), 1);

    // A class too small to time is not timed: tuning settles it with the adapter kind's
    // runtime best, and recording then takes that instead of the untimed default.
    let tiny = ConvClass::new(4, 4, [1, 1], [1, 1], Precision::F32, 64);
    let calls = Cell::new(0);
    assert_eq!(tuning::conv_forward(&second, &tiny), ConvForward::default_for(&second));
    let settled = tuning::measure_conv_forward(&second, &tiny, timings(&calls)).unwrap();
    assert_eq!(settled, ConvForward::untimed_best(&second));
    assert_eq!(calls.get(), 0, "a tiny class is not timed");
    assert_eq!(tuning::conv_forward(&second, &tiny), settled);
    // Tiling 3x behind the register tiles is not timed again at the other slice depth.
    let calls = Cell::new(0);
    let other = ConvClass::new(48, 96, [3, 3], [2, 2], Precision::F32, 64 * 128);
    let chosen =
        tuning::measure_conv_forward(&second, &other, timer(ConvForward::Registers, 5.0, &calls)).unwrap();
    assert_eq!((chosen, calls.get()), (ConvForward::Registers, ConvForward::ALL.len() - 1));

    let calls = Cell::new(0);
    let off = gpu_with(TuningCache::Off);
    assert_eq!(
        tuning::measure_conv_forward(&off, &class, timings(&calls)).unwrap(),
        ConvForward::default_for(&off)
    );
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
    let gpu = gpu_with(TuningCache::File(path.clone()));
    assert!(tuning::choices(&gpu).is_empty(), "{:?}", tuning::choices(&gpu));
    let class = ConvClass::new(64, 64, [3, 3], [1, 1], Precision::F32, 4096);
    let chosen = tuning::measure_conv_forward(&gpu, &class, |v| {
        Ok(if v == ConvForward::Registers { 2.0 } else { 3.0 })
    })
    .unwrap();
    assert_eq!(chosen, ConvForward::Registers);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(foreign), "another adapter's line was lost: {text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Building a graph measures nothing and writes nothing: on a fresh cache path it records
/// the adapter's defaults and leaves no file; `GraphBuilder::tune` is the step that
/// measures, writes the cache, and makes the next build record the measured choices.
#[test]
fn building_a_graph_never_measures_and_tune_does() {
    use hrnet_ocr::graph::{GraphBuilder, Mode};
    use hrnet_ocr::kernels::conv2d::Conv2dSpec;
    let mut rng = Rng::new(seed("building_a_graph_never_measures"));
    let dir = std::env::temp_dir().join(format!("hrnet-tuning-{}", rng.next_u64()));
    let path = dir.join("tuning.tsv");
    let gpu = gpu_with(TuningCache::File(path.clone()));
    let builder = || {
        let mut g = GraphBuilder::new();
        let x = g.input("x", &[1, 32, 64, 64], false);
        let y = g.conv2d("conv", x, [3, 3], 32, false, Conv2dSpec::square(1, 1, 1)).unwrap();
        (g, y)
    };
    let class = ConvClass::new(32, 32, [3, 3], [1, 1], Precision::F32, 64 * 64);
    let (g, y) = builder();
    let graph = g.build(&gpu, Mode::Eval, &[y]).unwrap();
    graph.forward(&gpu).unwrap();
    assert!(!path.exists() && !dir.exists(), "building and running a graph wrote {}", path.display());
    assert!(tuning::choices(&gpu).is_empty(), "building measured: {:?}", tuning::choices(&gpu));
    assert_eq!(tuning::conv_forward(&gpu, &class), ConvForward::default_for(&gpu));

    let (g, _) = builder();
    g.tune(&gpu).unwrap();
    let chosen = tuning::choices(&gpu);
    assert_eq!(chosen.len(), 1, "one convolution, one class: {chosen:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&chosen[0].1), "cache file: {text}");
    assert_eq!(tuning::conv_forward(&gpu, &class).name(), chosen[0].1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A cache file is shared by every device opened on one adapter: a device opened with
/// smaller workgroups never takes a cached choice it cannot run (the tiled GEMM needs 64).
#[test]
fn a_cached_choice_the_device_cannot_run_is_not_taken() {
    let mut rng = Rng::new(seed("a_cached_choice_the_device_cannot_run"));
    let dir = std::env::temp_dir().join(format!("hrnet-tuning-{}", rng.next_u64()));
    let path = dir.join("tuning.tsv");
    let class = ConvClass::new(48, 48, [3, 3], [1, 1], Precision::F32, 64 * 128);
    let full = gpu_with(TuningCache::File(path.clone()));
    let calls = Cell::new(0);
    let tiled =
        tuning::measure_conv_forward(&full, &class, timer(ConvForward::TiledK16, 3.0, &calls)).unwrap();
    assert_eq!(tiled, ConvForward::TiledK16);
    let small = Gpu::with_options(&GpuOptions {
        tuning: TuningCache::File(path.clone()),
        max_workgroup_size: Some(16),
        ..GpuOptions::from_env()
    })
    .unwrap();
    let chosen = tuning::conv_forward(&small, &class);
    assert!(chosen.runs_on(&small), "{chosen:?} on a device of {} invocations", small.workgroup_size());
    assert_eq!(chosen, ConvForward::default_for(&small));
    std::fs::remove_dir_all(&dir).unwrap();
}
