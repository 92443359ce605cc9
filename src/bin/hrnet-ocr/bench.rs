//! `bench`: per kernel (`--kernels`, `--shapes`), each case's time, throughput and fraction
//! of a roofline measured on the adapter; or end to end, the forward and training step of
//! a whole model with a per-kernel profile from GPU timestamps. Text or JSON lines, on one
//! adapter or every adapter found.

use crate::segment::PrecisionArg;
use crate::{mib, model, parse_size};
use clap::Args;
use hrnet_ocr::bench::{self, KernelCase, Profile, Roofline, Timing};
use hrnet_ocr::data::augment::Sample;
use hrnet_ocr::data::SplitMix;
use hrnet_ocr::dist::{CommStats, DataParallel};
use hrnet_ocr::gpu::list_adapters;
use hrnet_ocr::graph::Recompute;
use hrnet_ocr::graph::{GraphBuilder, Mode};
use hrnet_ocr::kernels::conv2d::Precision;
use hrnet_ocr::kernels::tuning::{Tuner, TuningCache};
use hrnet_ocr::model::heads::{ComparisonSize, ContextHead};
use hrnet_ocr::model::hrnet;
use hrnet_ocr::model::Config;
use hrnet_ocr::train::{initialise, TrainOptions, Trainer};
use hrnet_ocr::{Error, Gpu, GpuOptions, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A model and the input it runs on (bench, tune).
#[derive(Args)]
pub struct ModelInput {
    /// A preset or experiment YAML file [default: the bundled model's config]
    #[arg(long, value_name = "C")]
    config: Option<String>,
    /// Input size, N or HxW
    #[arg(long, value_parser = parse_size, default_value = "512x1024")]
    size: [usize; 2],
    /// Images per pass
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    input: ModelInput,
    /// Timed repetitions (after one untimed warm-up)
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Time the forward pass only
    #[arg(long)]
    forward_only: bool,
    /// End to end: the forward at f32 or f16 (activations and weights; the training step stays f32)
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
    /// Every kernel alone at HRNet's shapes instead of the whole model
    #[arg(long)]
    kernels: bool,
    /// With --kernels: only the cases whose kernel, pass or shape contains this text
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
    /// Per-kernel cases from a shape file (as benches/peers/shapes.txt) instead of HRNet's
    #[arg(long, value_name = "FILE")]
    shapes: Option<PathBuf>,
    /// With --kernels: timing budget per case, in milliseconds
    #[arg(long, default_value_t = 300)]
    budget_ms: u64,
    /// End to end: how many kernels of the profile to list
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print JSON lines (one object per case or pass) instead of tables
    #[arg(long)]
    json: bool,
    /// Run on every adapter of every backend found; tables get a column per adapter
    #[arg(long)]
    all_adapters: bool,
    /// Print the planned device memory of the forward and of a training step, from the
    /// shapes alone (no device needed), and exit
    #[arg(long)]
    plan_memory: bool,
    /// What the backward rebuilds instead of keeping it: less device memory, more time, the
    /// same results; bare --recompute means convolutions
    #[arg(long, value_enum, value_name = "WHAT", num_args = 0..=1, default_value = "bn-relu", default_missing_value = "convolutions")]
    recompute: crate::Recompute,
    /// The OCR paper's comparison of context heads (PPM, ASPP, DANet, self-attention, double
    /// attention, OCR, none) on one feature map: parameters, FLOPs, planned memory and time,
    /// forward and forward + backward (with --plan-memory: no device, no times)
    #[arg(long)]
    context_heads: bool,
    /// With --context-heads: the paper's 1x2048x128x128 -> 512, or a small 1x256x32x32 -> 64
    #[arg(long, value_enum, default_value = "small")]
    context_size: ContextSize,
    /// With --context-heads: the PyTorch table of tools/reference/context_heads.py to print
    /// beside the engine's; its parameter and FLOP counts must equal the engine's
    #[arg(long, value_name = "FILE")]
    reference: Option<PathBuf>,
    /// The data-parallel training step: the global batch of --batch images split over these
    /// devices (as `train --devices`: a rank per device, on threads), beside one device at
    /// the whole batch; each rank's time and communication per step, its share, the scaling
    #[arg(long, value_name = "LIST")]
    devices: Option<String>,
    /// With --devices: each device's own batch-norm statistics instead of synchronized ones
    #[arg(long)]
    per_device_bn: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ContextSize {
    Small,
    Paper,
}

impl From<ContextSize> for ComparisonSize {
    fn from(s: ContextSize) -> Self {
        match s {
            ContextSize::Small => ComparisonSize::Small,
            ContextSize::Paper => ComparisonSize::Paper,
        }
    }
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    if args.context_heads {
        return context_heads(args);
    }
    if args.plan_memory {
        return plan_memory(args);
    }
    if let Some(devices) = &args.devices {
        return data_parallel(args, &crate::parse_devices(devices)?);
    }
    let gpus = if args.all_adapters {
        // An adapter that is listed but will not open a device (a GL context on a headless
        // GPU machine, say) is skipped with a note; none opening is an error.
        let mut opened = Vec::new();
        for info in list_adapters(wgpu::Backends::all()) {
            let options = GpuOptions {
                backends: Some(info.backend.into()),
                adapter_name: Some(info.name.clone()),
                ..GpuOptions::default()
            };
            match Gpu::with_options(&options) {
                Ok(gpu) => opened.push(gpu),
                Err(e) => eprintln!("note: skipping {} ({:?}): {e}", info.name, info.backend),
            }
        }
        if opened.is_empty() {
            return Err(Error::Invalid("--all-adapters: no adapter opened a device".into()));
        }
        opened
    } else {
        vec![Gpu::new()?]
    };
    if args.kernels || args.shapes.is_some() {
        kernels(args, &gpus)
    } else {
        end_to_end(args, &gpus)
    }
}

/// A short name for an adapter: its name and backend.
fn adapter_name(gpu: &Gpu) -> String {
    format!("{} / {:?}", gpu.info().name, gpu.info().backend)
}

/// A JSON string literal.
fn js(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (`null` for a missing or non-finite value).
fn jn(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite()).map_or("null".into(), |v| format!("{v:.6}"))
}

/// What one case measured on one adapter.
struct CaseResult {
    kernel: String,
    pass: String,
    case: String,
    memory_bound: bool,
    timing: Timing,
    gflops: f64,
    gbps: f64,
    roofline: f64,
}

impl CaseResult {
    fn new(c: &KernelCase, timing: Timing, roofline: &Roofline) -> Self {
        let cost = c.cost();
        let ms = timing.mean_ms;
        CaseResult {
            kernel: c.kernel.clone(),
            pass: c.pass.clone(),
            case: c.case.clone(),
            memory_bound: c.memory_bound,
            gflops: cost.flops as f64 / (ms * 1e6),
            gbps: cost.bytes as f64 / (ms * 1e6),
            roofline: roofline.fraction(cost, ms),
            timing,
        }
    }

    /// The throughput that matters for this kernel, with its unit.
    fn throughput(&self) -> String {
        if self.memory_bound {
            format!("{:.2} GB/s", self.gbps)
        } else {
            format!("{:.2} GFLOP/s", self.gflops)
        }
    }
}

fn kernels(args: &BenchArgs, gpus: &[Gpu]) -> Result<()> {
    let shapes = match &args.shapes {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
            Some(bench::parse_peer_shapes(&text, &path.display().to_string())?)
        }
        None => None,
    };
    let filter = args.filter.as_deref().unwrap_or("");
    let budget = Duration::from_millis(args.budget_ms);
    let mut columns = Vec::new();
    for gpu in gpus {
        let roofline = bench::roofline(gpu)?;
        let cases = match &shapes {
            Some(s) => bench::peer_suite(gpu, s)?,
            None => bench::hrnet_suite(gpu, filter)?,
        };
        if cases.is_empty() {
            return Err(Error::Invalid(format!("no kernel case matches the filter {filter:?}")));
        }
        if !args.json {
            println!(
                "{}: roofline {:.2} GB/s (best copy), {:.2} GFLOP/s (best GEMM); {} cases",
                adapter_name(gpu),
                roofline.gbytes_per_s,
                roofline.gflops,
                cases.len()
            );
            println!(
                "{:<16} {:<22} {:<36} {:>9} {:>9} {:>9} {:>9} {:>17} {:>8} {:>9}",
                "kernel", "pass", "case", "ms", "best", "device", "cpu", "throughput", "roofline", "first ms"
            );
        }
        let mut results = Vec::new();
        for c in &cases {
            let r = CaseResult::new(c, bench::time(gpu, &c.dispatches, c.setup, budget)?, &roofline);
            if args.json {
                print_case_json(gpu, &roofline, &r);
            } else {
                let t = &r.timing;
                println!(
                    "{:<16} {:<22} {:<36} {:>9.3} {:>9.3} {:>9} {:>9} {:>17} {:>7.1}% {:>9.1}",
                    r.kernel,
                    r.pass,
                    r.case,
                    t.mean_ms,
                    t.best_ms,
                    t.device_ms.map_or("-".into(), |d| format!("{d:.3}")),
                    t.cpu_ms.map_or("-".into(), |d| format!("{d:.1}")),
                    r.throughput(),
                    100.0 * r.roofline,
                    t.first_ms
                );
            }
            results.push(r);
        }
        columns.push((adapter_name(gpu), results));
    }
    if args.all_adapters && !args.json {
        print_adapter_table(&columns);
    }
    Ok(())
}

fn print_case_json(gpu: &Gpu, roofline: &Roofline, r: &CaseResult) {
    let t = &r.timing;
    println!(
        "{{\"peer\":\"hrnet-ocr\",\"adapter\":{},\"backend\":{},\"kernel\":{},\"pass\":{},\"case\":{},\
         \"ms\":{},\"best_ms\":{},\"device_ms\":{},\"cpu_ms\":{},\"first_ms\":{},\"runs\":{},\"gflops\":{},\"gbps\":{},\
         \"roofline_fraction\":{},\"roofline_gflops\":{},\"roofline_gbps\":{}}}",
        js(&gpu.info().name),
        js(&format!("{:?}", gpu.info().backend)),
        js(&r.kernel),
        js(&r.pass),
        js(&r.case),
        jn(Some(t.mean_ms)),
        jn(Some(t.best_ms)),
        jn(t.device_ms),
        jn(t.cpu_ms),
        jn(Some(t.first_ms)),
        t.runs,
        jn(Some(r.gflops)),
        jn(Some(r.gbps)),
        jn(Some(r.roofline)),
        jn(Some(roofline.gflops)),
        jn(Some(roofline.gbytes_per_s)),
    );
}

/// One row per case, a column per adapter: mean ms and throughput. Cases are matched by
/// kernel, pass and shape, not position: adapters run different sets (no f16 cases without
/// SHADER_F16, no tiled variants below 64 invocations a workgroup); "-" where one lacks it.
fn print_adapter_table(columns: &[(String, Vec<CaseResult>)]) {
    let key = |r: &CaseResult| format!("{} {} {}", r.kernel, r.pass, r.case);
    let mut rows: Vec<String> = Vec::new();
    for r in columns.iter().flat_map(|(_, results)| results) {
        if !rows.contains(&key(r)) {
            rows.push(key(r));
        }
    }
    let width = columns.iter().map(|(c, _)| c.len()).max().unwrap_or(0).max(28);
    print!("\n{:<70}", "case (mean ms, throughput)");
    for (name, _) in columns {
        print!(" | {name:>width$}");
    }
    println!();
    for row in &rows {
        print!("{row:<70}");
        for (_, results) in columns {
            let cell = results
                .iter()
                .find(|r| key(r) == *row)
                .map_or("-".into(), |r| format!("{:.3} ms {}", r.timing.mean_ms, r.throughput()));
            print!(" | {cell:>width$}");
        }
        println!();
    }
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

/// The planned device memory of the model's forward and training step at the bench size.
fn plan_memory(args: &BenchArgs) -> Result<()> {
    let cfg = bench_config(args)?;
    let [h, w] = args.input.size;
    let n = args.input.batch.max(1);
    let mut g = GraphBuilder::new();
    let x = g.input("input", &[n, 3, h, w], false);
    let m = hrnet::build(&mut g, &cfg, x, 0.0)?;
    let precision = Precision::from(args.precision);
    g.set_precision(precision);
    println!("forward at {n}x3x{h}x{w}, {precision:?}: {}", g.plan_memory(&[m.out]));
    let training =
        hrnet_ocr::train::planned_memory(&cfg, &train_options(&cfg, n, [h, w], args.recompute.into()))?;
    println!("training step at {n}x3x{h}x{w}: {training}");
    Ok(())
}

fn bench_config(args: &BenchArgs) -> Result<Config> {
    match &args.input.config {
        Some(c) => Config::load(c),
        None => model::bundled_config(),
    }
}

/// The trainer's options a benchmark runs: the config's dropout, one group, and what the
/// backward rebuilds.
fn train_options(cfg: &Config, batch: usize, crop: [usize; 2], recompute: Recompute) -> TrainOptions {
    TrainOptions {
        batch,
        crop,
        max_iter: usize::MAX,
        extra: None,
        dropout: cfg.head_dropout(),
        head_keywords: Vec::new(),
        head_lr_mult: 1.0,
        tuning: TuningCache::from_env(),
        recompute,
        parallel: Default::default(),
    }
}

/// One pass of the whole model on one adapter: (mean, best) ms, dispatches, and the
/// per-kernel profile where the adapter has timestamps.
struct Pass {
    name: &'static str,
    times: (f64, f64),
    dispatches: usize,
    profile: Option<Profile>,
}

fn end_to_end(args: &BenchArgs, gpus: &[Gpu]) -> Result<()> {
    let cfg = bench_config(args)?;
    let [h, w] = args.input.size;
    let n = args.input.batch.max(1);
    let name = args.input.config.as_deref().unwrap_or("the bundled model");
    let mut columns = Vec::new();
    for gpu in gpus {
        if args.all_adapters {
            eprintln!("measuring on {}", gpu.describe());
        }
        let (passes, memory_mib) = measure(gpu, &cfg, args)?;
        for p in &passes {
            if args.json {
                print_pass_json(gpu, name, args, memory_mib, p);
            } else if !args.all_adapters {
                print_pass(gpu, name, args, p, args.top);
            }
        }
        if !args.json && !args.all_adapters {
            println!("{:<14} {:>10.1} MiB planned device memory (forward)", "", memory_mib);
            if !args.forward_only {
                let planned = hrnet_ocr::train::planned_memory(
                    &cfg,
                    &train_options(&cfg, n, [h, w], args.recompute.into()),
                )?;
                println!("{:<14} training step: {planned}", "");
            }
        }
        columns.push((adapter_name(gpu), passes));
    }
    if args.all_adapters && !args.json {
        println!("{name} at {n}x3x{h}x{w}, ms (mean / best)");
        let width = columns.iter().map(|(c, _)| c.len()).max().unwrap_or(0).max(18);
        print!("{:<16}", "");
        for (c, _) in &columns {
            print!(" | {c:>width$}");
        }
        println!();
        for (i, row) in ["forward", "training step"].iter().enumerate() {
            print!("{row:<16}");
            for (_, passes) in &columns {
                let cell =
                    passes.get(i).map_or("-".into(), |p| format!("{:.1} / {:.1}", p.times.0, p.times.1));
                print!(" | {cell:>width$}");
            }
            println!();
        }
    }
    Ok(())
}

fn print_pass(gpu: &Gpu, name: &str, args: &BenchArgs, p: &Pass, top: usize) {
    let [h, w] = args.input.size;
    let n = args.input.batch.max(1);
    let (mean, best) = p.times;
    println!(
        "{name} {} at {n}x3x{h}x{w} on {}: {mean:.1} ms mean, {best:.1} ms best, {:.2} images/s, \
         {} dispatches in one command buffer",
        p.name,
        gpu.describe(),
        1e3 * n as f64 / mean,
        p.dispatches
    );
    match &p.profile {
        Some(profile) => print_profile(profile, top),
        None => println!("  (no per-kernel profile: the adapter has no timestamp queries)"),
    }
}

/// The `top` kernels of a profile: device time, share, dispatches and throughput.
pub fn print_profile(profile: &Profile, top: usize) {
    println!("  device time {:.1} ms; top kernels:", profile.device_ms);
    for k in profile.kernels.iter().take(top) {
        println!(
            "  {:<30} {:>9.2} ms {:>5.1}% {:>5} dispatches {:>8.2} GFLOP/s {:>8.2} GB/s",
            k.kernel,
            k.ms,
            100.0 * k.share,
            k.dispatches,
            k.cost.flops as f64 / (k.ms * 1e6),
            k.cost.bytes as f64 / (k.ms * 1e6)
        );
    }
}

fn print_pass_json(gpu: &Gpu, name: &str, args: &BenchArgs, memory_mib: f64, p: &Pass) {
    let [h, w] = args.input.size;
    let profile = p.profile.as_ref().map_or("null".into(), |profile| {
        let kernels: Vec<String> = profile
            .kernels
            .iter()
            .map(|k| {
                format!(
                    "{{\"kernel\":{},\"ms\":{},\"share\":{},\"dispatches\":{},\"flops\":{},\"bytes\":{}}}",
                    js(k.kernel),
                    jn(Some(k.ms)),
                    jn(Some(k.share)),
                    k.dispatches,
                    k.cost.flops,
                    k.cost.bytes
                )
            })
            .collect();
        format!("{{\"device_ms\":{},\"kernels\":[{}]}}", jn(Some(profile.device_ms)), kernels.join(","))
    });
    println!(
        "{{\"peer\":\"hrnet-ocr\",\"adapter\":{},\"backend\":{},\"model\":{},\"case\":{},\"pass\":{},\"batch\":{},\
         \"height\":{h},\"width\":{w},\"ms\":{},\"best_ms\":{},\"dispatches\":{},\"memory_mib\":{},\"profile\":{}}}",
        js(&gpu.info().name),
        js(&format!("{:?}", gpu.info().backend)),
        js(name),
        js(&format!("{name}+ocr {}x3x{h}x{w}", args.input.batch.max(1))),
        js(p.name),
        args.input.batch.max(1),
        jn(Some(p.times.0)),
        jn(Some(p.times.1)),
        p.dispatches,
        jn(Some(memory_mib)),
        profile
    );
}

/// The forward (and unless `--forward-only`, the training step) on `gpu`, with the
/// forward's planned device memory in MiB.
fn measure(gpu: &Gpu, cfg: &Config, args: &BenchArgs) -> Result<(Vec<Pass>, f64)> {
    let [h, w] = args.input.size;
    let n = args.input.batch.max(1);
    let mut rng = SplitMix::new(7);
    let planes: Vec<f32> = (0..n * 3 * h * w).map(|_| rng.normal()).collect();
    let mut g = GraphBuilder::new();
    let x = g.input("input", &[n, 3, h, w], false);
    let m = hrnet::build(&mut g, cfg, x, 0.0)?;
    let memory_mib = crate::mib(g.plan_memory(&[m.out]).planned);
    g.set_precision(args.precision.into());
    g.tune(gpu, &Arc::new(Tuner::from_env(gpu)), Mode::Eval, &[m.out])?;
    let eval = g.build(gpu, Mode::Eval, &[m.out])?;
    if eval.precision() != args.precision.into() {
        eprintln!("note: {} lacks SHADER_F16; the forward runs f32 weights", gpu.describe());
    }
    initialise(gpu, &eval)?;
    eval.set(gpu, "input", &planes)?;
    let times = time(args.iters, || {
        eval.forward(gpu)?;
        gpu.wait()
    })?;
    let forward: Vec<_> = eval.forward_dispatches().iter().collect();
    let profile = gpu.has_timestamps().then(|| bench::profile(gpu, &forward)).transpose()?;
    let name = match eval.precision() {
        Precision::F32 => "forward",
        Precision::F16 => "forward (f16)",
    };
    let mut passes = vec![Pass { name, times, dispatches: forward.len(), profile }];
    drop(eval);
    if args.forward_only {
        return Ok((passes, memory_mib));
    }
    let options = train_options(cfg, n, [h, w], args.recompute.into());
    gpu.reset_peak_memory();
    let mut trainer = Trainer::new(gpu, cfg.clone(), None, options)?;
    let times = time_steps(&mut trainer, &bench_samples(cfg, args), args.iters)?;
    let step = trainer.graph().step_dispatches();
    let profile = gpu.has_timestamps().then(|| bench::profile(gpu, &step)).transpose()?;
    passes.push(Pass { name: "training step", times, dispatches: step.len(), profile });
    if !args.json && !args.all_adapters {
        use crate::mib;
        println!(
            "training step on the device: the graph's tensors hold {:.1} MiB; high-water mark {:.1} MiB \
             (with the kernels' scratch and the variant measurements)",
            mib(trainer.graph().tensor_bytes()),
            mib(gpu.tensor_memory().1)
        );
    }
    Ok((passes, memory_mib))
}

/// The training samples a benchmark steps on: the bench size's random images, labels
/// cycling through the classes.
fn bench_samples(cfg: &Config, args: &BenchArgs) -> Vec<Sample> {
    let [h, w] = args.input.size;
    let mut rng = SplitMix::new(7);
    (0..args.input.batch.max(1))
        .map(|_| Sample {
            planes: (0..3 * h * w).map(|_| rng.normal()).collect(),
            labels: (0..h * w).map(|i| (i % cfg.num_classes) as u32).collect(),
        })
        .collect()
}

/// (mean, best) ms of `iters` training steps on `samples` after a warm-up step.
fn time_steps(trainer: &mut Trainer, samples: &[Sample], iters: usize) -> Result<(f64, f64)> {
    let mut seed = 0;
    time(iters, || {
        seed += 1;
        trainer.step(samples, seed).map(|_| ())
    })
}

/// What one rank of `bench --devices` measured: (mean, best) ms per step, communication.
struct RankTiming {
    times: (f64, f64),
    /// Over `steps` steps.
    comm: CommStats,
    steps: usize,
    device: String,
}

/// `bench --devices`: the training step of the global batch on one device, then split over
/// `devices` (a rank per device on threads, synchronized batch norm unless
/// `--per-device-bn`): each rank's time per step, communication per step and its share.
fn data_parallel(args: &BenchArgs, devices: &[usize]) -> Result<()> {
    let cfg = bench_config(args)?;
    let [h, w] = args.input.size;
    let (global, ranks) = (args.input.batch.max(1), devices.len());
    if global % ranks != 0 {
        return Err(Error::Invalid(format!("--batch {global} does not split over {ranks} devices")));
    }
    let samples = bench_samples(&cfg, args);
    let recompute = args.recompute.into();
    let name = args.input.config.as_deref().unwrap_or("the bundled model");
    println!("{name}, training step of {global}x3x{h}x{w}, ms (mean / best):");
    let alone = {
        let gpu = crate::open_device(devices.first().copied())?;
        let mut one = Trainer::new(&gpu, cfg.clone(), None, train_options(&cfg, global, [h, w], recompute))?;
        let alone = time_steps(&mut one, &samples, args.iters)?;
        println!("  one device ({}): {:.1} / {:.1}", gpu.describe(), alone.0, alone.1);
        alone
    };
    let sync_batch_norm = !args.per_device_bn;
    let results = hrnet_ocr::dist::on_threads(ranks, |rank, comm| {
        let gpu = crate::open_device(Some(devices[rank]))?;
        let parallel = DataParallel::rank(rank, ranks, sync_batch_norm);
        let options = TrainOptions { parallel, ..train_options(&cfg, global / ranks, [h, w], recompute) };
        let mut trainer = Trainer::new(&gpu, cfg.clone(), None, options)?;
        trainer.join(comm)?;
        let slice = &samples[parallel.slice(global)];
        // The first step (variant measurements, pipelines) is left out of both the time and
        // the communication; `time` warms up with the second.
        trainer.step(slice, 0)?;
        trainer.take_comm_stats();
        let times = time(args.iters.max(2) - 1, || trainer.step(slice, 1).map(drop))?;
        let steps = args.iters.max(2);
        Ok(RankTiming { times, comm: trainer.take_comm_stats(), steps, device: gpu.describe() })
    })?;
    let bn = if sync_batch_norm { "synchronized batch norm" } else { "per-device batch norm" };
    println!("  {ranks} devices, {} images each, {bn}:", global / ranks);
    for (rank, r) in results.into_iter().enumerate() {
        let RankTiming { times: (mean, best), comm, steps, device } = r;
        let steps = steps as f64;
        let per_step = 1e3 * comm.seconds / steps;
        println!(
            "    rank {rank} ({device}): {mean:.1} / {best:.1}; communication {per_step:.1} ms per step \
             ({:.1}% of the step, {:.0} exchanges, {:.2} MiB sent); {:.2}x one device's images/s",
            100.0 * per_step / mean,
            comm.calls as f64 / steps,
            crate::mib(comm.bytes) / steps,
            alone.0 / mean
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct TuneArgs {
    #[command(flatten)]
    input: ModelInput,
    /// The forward at f32 or f16 (activations and weights; training always runs f32)
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
    /// Also the training step's kernels (the convolution gradients), at f32
    #[arg(long)]
    train: bool,
}

/// `tune`: measures the kernel variants for every shape class of a model at a size (the
/// forward's, and with `--train` the training step's), keeps the fastest in the tuning
/// cache, and lists the adapter's choices. Later `segment`, `eval`, `train` and `bench`
/// runs take them without measuring.
pub fn tune(args: &TuneArgs) -> Result<()> {
    let cfg = match &args.input.config {
        Some(c) => Config::load(c)?,
        None => model::bundled_config()?,
    };
    let gpu = Gpu::new()?;
    let [h, w] = args.input.size;
    let n = args.input.batch.max(1);
    let tuner = Arc::new(Tuner::from_env(&gpu));
    let start = Instant::now();
    let mut g = GraphBuilder::new();
    let x = g.input("input", &[n, 3, h, w], false);
    let m = hrnet::build(&mut g, &cfg, x, 0.0)?;
    g.set_precision(args.precision.into());
    g.tune(&gpu, &tuner, Mode::Eval, &[m.out])?;
    if args.train {
        let mut g = GraphBuilder::new();
        let x = g.input("input", &[n, 3, h, w], false);
        let m = hrnet::build(&mut g, &cfg, x, cfg.head_dropout())?;
        let labels = g.labels("label", &[n, h, w]);
        hrnet::add_losses(&mut g, &cfg, [m.aux, m.out], labels)?;
        g.tune(&gpu, &tuner, Mode::Train, &[m.aux, m.out])?;
    }
    let choices = tuner.choices();
    println!(
        "{} shape classes measured or cached in {:.1} s on {}",
        choices.len(),
        start.elapsed().as_secs_f64(),
        gpu.describe()
    );
    for (class, variant) in &choices {
        println!("  {class:<44} {variant}");
    }
    match tuner.cache().path() {
        Some(path) => println!("cache {}", path.display()),
        None => println!("kept in memory only (HRNET_OCR_TUNING={:?})", tuner.cache()),
    }
    Ok(())
}

/// One head's line of the reference table (`tools/reference/context_heads.py complexity`).
struct ReferenceRow {
    counts: [u64; 3],
    seconds: [Option<f64>; 2],
    peak_bytes: [Option<u64>; 2],
}

/// The reference table's rows of `size` by head, and its first comment (what made it).
fn read_reference(
    path: &std::path::Path,
    size: ComparisonSize,
) -> Result<(String, Vec<(String, ReferenceRow)>)> {
    let shown = path.display().to_string();
    let bad = |what: String| Error::Format { path: shown.clone(), what };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let source = text.lines().next().and_then(|l| l.strip_prefix("# ")).unwrap_or("").to_string();
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() != 9 {
            return Err(bad(format!("expected 9 columns (head size params flops_forward flops_backward \
                                    seconds_forward seconds_train peak_bytes_forward peak_bytes_train): {line:?}")));
        }
        if cols[1] != size.name() {
            continue;
        }
        let count =
            |i: usize| cols[i].parse::<u64>().map_err(|_| bad(format!("column {} of {line:?}", i + 1)));
        let opt = |i: usize| (cols[i] != "-").then_some(cols[i]);
        let seconds = |i: usize| {
            opt(i)
                .map(|v| v.parse::<f64>().map_err(|_| bad(format!("column {} of {line:?}", i + 1))))
                .transpose()
        };
        let bytes = |i: usize| {
            opt(i)
                .map(|v| v.parse::<u64>().map_err(|_| bad(format!("column {} of {line:?}", i + 1))))
                .transpose()
        };
        let row = ReferenceRow {
            counts: [count(2)?, count(3)?, count(4)?],
            seconds: [seconds(5)?, seconds(6)?],
            peak_bytes: [bytes(7)?, bytes(8)?],
        };
        rows.push((cols[0].to_string(), row));
    }
    if rows.is_empty() {
        return Err(bad(format!("no row of size {}", size.name())));
    }
    Ok((source, rows))
}

fn context_heads(args: &BenchArgs) -> Result<()> {
    let size = ComparisonSize::from(args.context_size);
    let ([n, c, h, w], dims, k) = size.dims();
    let gpu = if args.plan_memory { None } else { Some(Gpu::new()?) };
    let reference = args.reference.as_deref().map(|p| read_reference(p, size)).transpose()?;
    let on = gpu.as_ref().map_or("planned only, no device".to_string(), |g| g.describe());
    println!(
        "context heads on {n}x{c}x{h}x{w} -> {} channels (KEY {}, {k} regions), {on}",
        dims.mid, dims.key
    );
    println!(
        "{:<17} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "head", "params", "GFLOPs", "GFLOPs", "MiB", "MiB", "ms", "ms"
    );
    println!(
        "{:<17} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "", "", "fwd", "fwd+bwd", "fwd", "fwd+bwd", "fwd", "fwd+bwd"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let mut mismatches = Vec::new();
    let mut rows = Vec::new();
    for head in ContextHead::ALL {
        let r = bench::compare_context_head(gpu.as_ref(), head, size)?;
        let gflops = |f: u64| f as f64 / 1e9;
        println!(
            "{:<17} {:>11} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10} {:>10}",
            head.name(),
            r.params,
            gflops(r.flops.forward),
            gflops(r.flops.forward + r.flops.backward),
            mib(r.planned_forward),
            mib(r.planned_train),
            ms(r.forward_ms),
            ms(r.train_ms)
        );
        if let Some((_, table)) = &reference {
            let counts = [r.params, r.flops.forward, r.flops.backward];
            match table.iter().find(|(name, _)| name == head.name()) {
                Some((_, t)) if t.counts == counts => {}
                Some((_, t)) => {
                    mismatches.push(format!("{}: engine {counts:?}, reference {:?}", head.name(), t.counts))
                }
                None => mismatches.push(format!("{}: not in the reference table", head.name())),
            }
        }
        rows.push(r);
    }
    for r in &rows {
        for why in &r.not_timed {
            println!("{}: {why}", r.head.name());
        }
    }
    let Some((source, table)) = reference else { return Ok(()) };
    println!("\nthe reference ({source}):");
    println!(
        "{:<17} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "head", "params", "GFLOPs", "GFLOPs", "MiB", "MiB", "ms", "ms"
    );
    for r in &rows {
        let Some((_, t)) = table.iter().find(|(name, _)| name == r.head.name()) else { continue };
        let peak = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.1}", mib(b)));
        println!(
            "{:<17} {:>11} {:>9.1} {:>9.1} {:>9} {:>9} {:>10} {:>10}",
            r.head.name(),
            t.counts[0],
            t.counts[1] as f64 / 1e9,
            (t.counts[1] + t.counts[2]) as f64 / 1e9,
            peak(t.peak_bytes[0]),
            peak(t.peak_bytes[1]),
            ms(t.seconds[0].map(|s| s * 1e3)),
            ms(t.seconds[1].map(|s| s * 1e3))
        );
    }
    if !mismatches.is_empty() {
        return Err(Error::Invalid(format!(
            "the engine's parameter and FLOP counts differ from the reference's: {}",
            mismatches.join("; ")
        )));
    }
    println!("parameters and FLOPs (forward, backward) equal the reference's for every head");
    Ok(())
}
