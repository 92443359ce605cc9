//! `bench`: forward and training-step wall time of the whole model at a size and batch,
//! with freshly initialised weights (speed does not depend on their values).

use crate::{model, parse_size};
use clap::Args;
use hrnet_ocr::data::augment::Sample;
use hrnet_ocr::data::SplitMix;
use hrnet_ocr::gpu::list_adapters;
use hrnet_ocr::graph::{GraphBuilder, Mode};
use hrnet_ocr::model::hrnet::{self, OCR_DROPOUT};
use hrnet_ocr::model::Config;
use hrnet_ocr::train::{initialise, TrainOptions, Trainer};
use hrnet_ocr::{Gpu, GpuOptions, Result};
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// A preset or experiment YAML file [default: the bundled model's config]
    #[arg(long, value_name = "C")]
    config: Option<String>,
    /// Input size, N or HxW
    #[arg(long, value_parser = parse_size, default_value = "512x1024")]
    size: [usize; 2],
    /// Images per pass
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed repetitions (after one untimed warm-up)
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Time the forward pass only
    #[arg(long)]
    forward_only: bool,
    /// Run on every adapter of every backend found and print one table, a column per adapter
    #[arg(long)]
    all_adapters: bool,
}

/// What one adapter measured: (mean, best) milliseconds of the forward and of a training
/// step, and the forward's planned device memory.
struct Measured {
    forward: (f64, f64),
    step: Option<(f64, f64)>,
    memory_mib: f64,
}

/// Mean and fastest of `iters` timed runs of `f`, in milliseconds, after one warm-up.
fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    Ok((mean, times.iter().copied().fold(f64::INFINITY, f64::min)))
}

fn report(what: &str, batch: usize, (mean, min): (f64, f64)) {
    println!(
        "{what:<14} {mean:>10.1} ms mean {min:>10.1} ms best {:>8.2} images/s",
        1e3 * batch as f64 / mean
    );
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let cfg = match &args.config {
        Some(c) => Config::load(c)?,
        None => model::bundled_config()?,
    };
    let [h, w] = args.size;
    let n = args.batch.max(1);
    let name = args.config.as_deref().unwrap_or("the bundled model");
    if args.all_adapters {
        return bench_all(args, &cfg, name);
    }
    let gpu = Gpu::new()?;
    println!("{name} at {n}x3x{h}x{w} on {}", gpu.describe());
    let m = measure(&gpu, &cfg, args)?;
    report("forward", n, m.forward);
    println!("{:<14} {:>10.1} MiB planned device memory", "", m.memory_mib);
    if let Some(step) = m.step {
        report("training step", n, step);
    }
    Ok(())
}

/// The same measurements on every adapter found, as one table.
fn bench_all(args: &BenchArgs, cfg: &Config, name: &str) -> Result<()> {
    let [h, w] = args.size;
    let n = args.batch.max(1);
    let mut columns = Vec::new();
    for info in list_adapters(wgpu::Backends::all()) {
        let options = GpuOptions {
            backends: Some(info.backend.into()),
            adapter_name: Some(info.name.clone()),
            ..GpuOptions::default()
        };
        let gpu = Gpu::with_options(&options)?;
        eprintln!("measuring on {}", gpu.describe());
        columns.push((format!("{} / {:?}", info.name, info.backend), measure(&gpu, cfg, args)?));
    }
    println!("{name} at {n}x3x{h}x{w}, ms (mean / best)");
    let width = columns.iter().map(|(c, _)| c.len()).max().unwrap_or(0).max(18);
    print!("{:<16}", "");
    for (c, _) in &columns {
        print!(" | {c:>width$}");
    }
    println!();
    let cell =
        |t: Option<(f64, f64)>| t.map_or("-".to_string(), |(mean, best)| format!("{mean:.1} / {best:.1}"));
    for (row, pick) in [("forward", 0), ("training step", 1)] {
        print!("{row:<16}");
        for (_, m) in &columns {
            print!(" | {:>width$}", cell(if pick == 0 { Some(m.forward) } else { m.step }));
        }
        println!();
    }
    Ok(())
}

/// Forward (and unless `--forward-only`, training-step) times on `gpu`.
fn measure(gpu: &Gpu, cfg: &Config, args: &BenchArgs) -> Result<Measured> {
    let [h, w] = args.size;
    let n = args.batch.max(1);
    let mut rng = SplitMix::new(7);
    let planes: Vec<f32> = (0..n * 3 * h * w).map(|_| rng.normal()).collect();
    let mut g = GraphBuilder::new();
    let x = g.input("input", &[n, 3, h, w], false);
    let m = hrnet::build(&mut g, cfg, x, 0.0)?;
    let memory = g.plan_memory(&[m.out]);
    let eval = g.build(gpu, Mode::Eval, &[m.out])?;
    initialise(gpu, &eval)?;
    eval.set(gpu, "input", &planes)?;
    let forward = time(args.iters, || {
        eval.forward(gpu)?;
        gpu.wait()
    })?;
    drop(eval);
    let memory_mib = memory.planned as f64 / 1_048_576.0;
    if args.forward_only {
        return Ok(Measured { forward, step: None, memory_mib });
    }
    let options = TrainOptions {
        batch: n,
        crop: [h, w],
        max_iter: usize::MAX,
        dropout: OCR_DROPOUT,
        head_keywords: Vec::new(),
        head_lr_mult: 1.0,
    };
    let mut trainer = Trainer::new(gpu, cfg.clone(), None, options)?;
    let samples: Vec<Sample> = planes
        .chunks_exact(3 * h * w)
        .map(|p| Sample {
            planes: p.to_vec(),
            labels: (0..h * w).map(|i| (i % cfg.num_classes) as u32).collect(),
        })
        .collect();
    let mut seed = 0;
    let step = time(args.iters, || {
        seed += 1;
        trainer.step(&samples, seed).map(|_| ())
    })?;
    Ok(Measured { forward, step: Some(step), memory_mib })
}
