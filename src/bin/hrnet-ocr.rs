//! The `hrnet-ocr` command line.

use hrnet_ocr::gpu::{list_adapters, GpuOptions};
use hrnet_ocr::graph::{Graph, GraphBuilder, LossSpec, Mode};
use hrnet_ocr::kernels::loss::{self, Ohem};
use hrnet_ocr::model::hrnet::{self, OCR_DROPOUT};
use hrnet_ocr::model::weights::{self, NamedTensor};
use hrnet_ocr::model::Config;
use hrnet_ocr::{Error, Gpu, Result};
use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "\
hrnet-ocr: HRNet-OCR semantic segmentation on WGSL compute shaders

usage:
  hrnet-ocr info
      every adapter found, and the limits and features of the one chosen
  hrnet-ocr forward --config C --weights W --input in.safetensors --output out.safetensors
                    [--dump] [--report-memory] [--profile]
      eval-mode forward of the tensor `input` [N, 3, H, W]; writes `aux` and `out`
      (with --dump also `feats`, `context` and `ocr_feats`); prints the forward time,
      and with --profile each kernel's share of the device time
  hrnet-ocr backward --config C --weights W --input in.safetensors --label label.safetensors
                     --output out.safetensors [--no-dropout] [--seed S]
      one training-mode forward and backward; writes `loss`, `aux`, `out`,
      `grad/<key>` for every parameter and `buffer/<key>` for the updated statistics
  hrnet-ocr convert in.pth out.safetensors
      a PyTorch checkpoint (legacy or zip) to safetensors with the official names
  hrnet-ocr train --config C --synthetic --out DIR [--weights W] [--steps 1000] [--batch 2]
                  [--size 96] [--crop 64] [--seed 1] [--save-every 100]
      trains on the built-in procedural scenes (random rescale, crop, flip); writes
      DIR/weights.safetensors atomically every --save-every steps and at the end
  hrnet-ocr eval --config C --weights W --synthetic [--seed 2] [--count 50] [--size 96]
      per-class IoU, mIoU and pixel accuracy on procedural scenes of another seed

C is a preset (w18-small-v2, w18, w32, w48) or an official experiment YAML file;
W is a .pth or .safetensors file.

environment:
  WGPU_BACKEND        backends to search: vulkan, metal, dx12, gl (comma-separated)
  WGPU_ADAPTER_NAME   use the first adapter whose name contains this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("info") if args.len() == 1 => info(),
        Some("forward") => {
            Flags::parse(&args[1..], &["dump", "report-memory", "profile"]).and_then(|f| forward(&f))
        }
        Some("backward") => Flags::parse(&args[1..], &["no-dropout"]).and_then(|f| backward(&f)),
        Some("convert") if args.len() == 3 => convert(&args[1], &args[2]),
        Some("train") => Flags::parse(&args[1..], &["synthetic"]).and_then(|f| train(&f)),
        Some("eval") => Flags::parse(&args[1..], &["synthetic"]).and_then(|f| eval(&f)),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` options and `--switch` flags.
struct Flags {
    values: HashMap<String, String>,
    switches: Vec<String>,
}

impl Flags {
    fn parse(args: &[String], switches: &[&str]) -> Result<Self> {
        let mut flags = Flags { values: HashMap::new(), switches: Vec::new() };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let name = arg
                .strip_prefix("--")
                .ok_or_else(|| Error::Invalid(format!("unexpected argument {arg:?}")))?;
            if switches.contains(&name) {
                flags.switches.push(name.to_string());
            } else {
                let value = it.next().ok_or_else(|| Error::Invalid(format!("--{name} needs a value")))?;
                flags.values.insert(name.to_string(), value.clone());
            }
        }
        Ok(flags)
    }

    fn get(&self, name: &str) -> Result<&str> {
        self.values
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| Error::Invalid(format!("--{name} is required")))
    }

    fn has(&self, switch: &str) -> bool {
        self.switches.iter().any(|s| s == switch)
    }
}

fn info() -> Result<()> {
    let options = GpuOptions::from_env();
    let adapters = list_adapters(options.backends.unwrap_or(wgpu::Backends::all()));
    println!("adapters found: {}", adapters.len());
    for a in &adapters {
        println!(
            "  {} | backend {:?} | {:?} | driver {} {}",
            a.name, a.backend, a.device_type, a.driver, a.driver_info
        );
    }
    let gpu = Gpu::with_options(&options)?;
    println!("\nchosen: {}", gpu.describe());
    let l = gpu.limits();
    println!("limits:");
    for (name, value) in [
        ("max_buffer_size", l.max_buffer_size),
        ("max_storage_buffer_binding_size", l.max_storage_buffer_binding_size),
        ("max_storage_buffers_per_shader_stage", u64::from(l.max_storage_buffers_per_shader_stage)),
        ("max_compute_workgroup_storage_size", u64::from(l.max_compute_workgroup_storage_size)),
        ("max_compute_invocations_per_workgroup", u64::from(l.max_compute_invocations_per_workgroup)),
        ("max_compute_workgroup_size_x", u64::from(l.max_compute_workgroup_size_x)),
        ("max_compute_workgroups_per_dimension", u64::from(l.max_compute_workgroups_per_dimension)),
        ("min_storage_buffer_offset_alignment", u64::from(l.min_storage_buffer_offset_alignment)),
    ] {
        println!("  {name:<40} {value}");
    }
    println!("features used: {:?}", gpu.features());
    println!("adapter features: {:?}", gpu.adapter_features());
    Ok(())
}

/// Reads one tensor of a safetensors file, converted to f32 (labels: i64, i32 or u8 to u32).
fn read_tensor(path: &str, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_string(), source })?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Format { path: path.to_string(), what: e.to_string() })?;
    let view = file.tensor(name).map_err(|_| Error::Format {
        path: path.to_string(),
        what: format!("no tensor named {name:?} (it has: {})", file.names().join(", ")),
    })?;
    let d = view.data();
    let values: Vec<f64> = match view.dtype() {
        safetensors::Dtype::F32 => {
            d.chunks_exact(4).map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect()
        }
        safetensors::Dtype::I64 => {
            d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f64).collect()
        }
        safetensors::Dtype::I32 => {
            d.chunks_exact(4).map(|b| f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect()
        }
        safetensors::Dtype::U8 => d.iter().map(|&b| f64::from(b)).collect(),
        other => {
            return Err(Error::Format { path: path.to_string(), what: format!("tensor {name} is {other:?}") })
        }
    };
    Ok((view.shape().to_vec(), values))
}

fn read_input(path: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let (shape, values) = read_tensor(path, "input")?;
    if shape.len() != 4 || shape[1] != 3 {
        return Err(Error::Format {
            path: path.into(),
            what: format!("tensor input must be [N, 3, H, W], got {shape:?}"),
        });
    }
    Ok((shape, values.into_iter().map(|v| v as f32).collect()))
}

/// The model's graph with its weights loaded; outputs [aux, out, feats, context, ocr_feats].
fn model_graph(
    gpu: &Gpu,
    cfg: &Config,
    flags: &Flags,
    input: &[usize],
    train: Option<(&[usize], f32)>,
) -> Result<Graph> {
    let mut g = GraphBuilder::new();
    let x = g.input("input", input, false);
    let dropout = train.map_or(0.0, |(_, d)| d);
    let m = hrnet::build(&mut g, cfg, x, dropout)?;
    if let Some((label_shape, _)) = train {
        let labels = g.labels("label", label_shape);
        let ignore = ignore_label(cfg)?;
        let ohem = cfg.ohem.map(|o| Ohem { thresh: o.thresh, min_kept: o.min_kept });
        for (logits, weight) in [(m.aux, cfg.balance_weights[0]), (m.out, cfg.balance_weights[1])] {
            g.cross_entropy(
                LossSpec { weight, ignore_label: ignore, ohem, align_corners: cfg.align_corners },
                logits,
                labels,
            )?;
        }
    }
    let mode = if train.is_some() { Mode::Train } else { Mode::Eval };
    let outputs = [m.aux, m.out, m.feats, m.context, m.ocr_feats];
    if flags.has("report-memory") {
        let r = g.plan_memory(&outputs);
        let mib = |b: u64| b as f64 / 1_048_576.0;
        println!(
            "device memory: {:.1} MiB planned (activations share buffers by liveness), {:.1} MiB with a \
             buffer per tensor; largest tensor {} at {:.1} MiB (the adapter binds up to {:.1} MiB)",
            mib(r.planned),
            mib(r.unshared),
            r.largest.0,
            mib(r.largest.1),
            mib(gpu.limits().max_storage_buffer_binding_size)
        );
    }
    let graph = g.build(gpu, mode, &outputs)?;
    let path = flags.get("weights")?;
    weights::load_into(gpu, &graph, &weights::read(Path::new(path))?, path)?;
    Ok(graph)
}

/// The ignore label as the u32 the kernels compare with (-1 in the PASCAL-Context files).
fn ignore_label(cfg: &Config) -> Result<u32> {
    match cfg.ignore_label {
        -1 => Ok(u32::MAX),
        l => u32::try_from(l).map_err(|_| Error::Invalid(format!("TRAIN.IGNORE_LABEL {l} is not supported"))),
    }
}

fn output(gpu: &Gpu, graph: &Graph, names: &[&str]) -> Result<Vec<NamedTensor>> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let t = graph.output(i);
            Ok(NamedTensor { name: name.to_string(), shape: t.shape().to_vec(), data: t.to_vec(gpu)? })
        })
        .collect()
}

fn forward(flags: &Flags) -> Result<()> {
    let gpu = Gpu::new()?;
    let cfg = Config::load(flags.get("config")?)?;
    let (shape, data) = read_input(flags.get("input")?)?;
    let graph = model_graph(&gpu, &cfg, flags, &shape, None)?;
    graph.set(&gpu, "input", &data)?;
    gpu.wait()?;
    let start = std::time::Instant::now();
    graph.forward(&gpu)?;
    gpu.wait()?;
    let dispatches = graph.forward_dispatches();
    println!(
        "forward: {:.1} ms, {} dispatches in one command buffer",
        start.elapsed().as_secs_f64() * 1e3,
        dispatches.len()
    );
    if flags.has("profile") {
        print_profile(&gpu, dispatches)?;
    }
    let names: &[&str] =
        if flags.has("dump") { &["aux", "out", "feats", "context", "ocr_feats"] } else { &["aux", "out"] };
    let out = output(&gpu, &graph, names)?;
    weights::write_safetensors(Path::new(flags.get("output")?), &out)?;
    println!("wrote {} on {}", names.join(", "), gpu.describe());
    Ok(())
}

/// Device time per kernel (entry point), largest first, from timestamp queries.
fn print_profile(gpu: &Gpu, dispatches: &[hrnet_ocr::gpu::Dispatch]) -> Result<()> {
    let timings = gpu.profile(&dispatches.iter().collect::<Vec<_>>())?;
    let total: f64 = timings.iter().map(|t| t.nanoseconds).sum();
    let mut by_kernel: Vec<(&str, f64, usize, u64)> = Vec::new();
    for (t, d) in timings.iter().zip(dispatches) {
        match by_kernel.iter_mut().find(|k| k.0 == t.label) {
            Some(k) => {
                k.1 += t.nanoseconds;
                k.2 += 1;
                k.3 += d.cost().flops;
            }
            None => by_kernel.push((t.label, t.nanoseconds, 1, d.cost().flops)),
        }
    }
    by_kernel.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("device time {:.1} ms; by kernel:", total / 1e6);
    for (label, ns, count, flops) in by_kernel.iter().take(12) {
        println!(
            "  {label:<28} {:>9.1} ms {:>5.1}% {count:>5} dispatches {:>7.2} GFLOP/s",
            ns / 1e6,
            100.0 * ns / total,
            *flops as f64 / ns
        );
    }
    Ok(())
}

fn backward(flags: &Flags) -> Result<()> {
    let gpu = Gpu::new()?;
    let cfg = Config::load(flags.get("config")?)?;
    let (shape, data) = read_input(flags.get("input")?)?;
    let label_path = flags.get("label")?;
    let (label_shape, values) = read_tensor(label_path, "label")?;
    if label_shape.len() != 3 || label_shape[0] != shape[0] {
        return Err(Error::Format {
            path: label_path.into(),
            what: format!("label must be [N, H, W] with N = {}, got {label_shape:?}", shape[0]),
        });
    }
    let ignore = ignore_label(&cfg)?;
    let labels: Vec<u32> = values.iter().map(|&v| if v < 0.0 { ignore } else { v as u32 }).collect();
    loss::check_labels(&labels, cfg.num_classes, ignore)
        .map_err(|e| Error::Format { path: label_path.into(), what: e.to_string() })?;
    let dropout = if flags.has("no-dropout") { 0.0 } else { OCR_DROPOUT };
    let mut graph = model_graph(&gpu, &cfg, flags, &shape, Some((&label_shape, dropout)))?;
    let seed = flags
        .values
        .get("seed")
        .map(|s| s.parse::<u32>())
        .transpose()
        .map_err(|_| Error::Invalid("--seed takes an integer".into()))?;
    graph.set_seed(&gpu, seed.unwrap_or(304))?;
    graph.set(&gpu, "input", &data)?;
    graph.tensor("label")?.write_u32(&gpu, &labels)?;
    graph.forward(&gpu)?;
    graph.backward(&gpu)?;
    let mut out = vec![NamedTensor { name: "loss".into(), shape: vec![1], data: vec![graph.loss(&gpu)?] }];
    out.extend(output(&gpu, &graph, &["aux", "out"])?);
    let params: Vec<String> = graph.parameters().map(|(n, _)| n.to_string()).collect();
    for name in params {
        let g = graph.grad(&name)?;
        out.push(NamedTensor {
            name: format!("grad/{name}"),
            shape: g.shape().to_vec(),
            data: g.to_vec(&gpu)?,
        });
    }
    for name in graph.buffers() {
        let t = graph.tensor(name)?;
        out.push(NamedTensor {
            name: format!("buffer/{name}"),
            shape: t.shape().to_vec(),
            data: t.to_vec(&gpu)?,
        });
    }
    weights::write_safetensors(Path::new(flags.get("output")?), &out)?;
    println!("loss {} on {}", out[0].data[0], gpu.describe());
    Ok(())
}

/// An optional numeric flag.
fn number<T: std::str::FromStr>(flags: &Flags, name: &str, default: T) -> Result<T> {
    match flags.values.get(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| Error::Invalid(format!("--{name} takes a number, got {v:?}"))),
    }
}

fn require_synthetic(flags: &Flags) -> Result<()> {
    if flags.has("synthetic") {
        Ok(())
    } else {
        Err(Error::Invalid(
            "only --synthetic (the built-in procedural scenes) is available as data so far".into(),
        ))
    }
}

fn train(flags: &Flags) -> Result<()> {
    use hrnet_ocr::data::augment::{augment, Augment};
    use hrnet_ocr::data::{procedural, SplitMix};
    use hrnet_ocr::train::{TrainOptions, Trainer};
    require_synthetic(flags)?;
    let gpu = Gpu::new()?;
    let cfg = Config::load(flags.get("config")?)?;
    if cfg.num_classes != procedural::CLASSES.len() {
        return Err(Error::Invalid(format!(
            "the procedural scenes have {} classes; the config says DATASET.NUM_CLASSES {}",
            procedural::CLASSES.len(),
            cfg.num_classes
        )));
    }
    let out_dir = Path::new(flags.get("out")?);
    std::fs::create_dir_all(out_dir)
        .map_err(|source| Error::Io { path: out_dir.display().to_string(), source })?;
    let (steps, batch, size, crop, seed, every) = (
        number(flags, "steps", 1000usize)?,
        number(flags, "batch", 2usize)?,
        number(flags, "size", 96usize)?,
        number(flags, "crop", 64usize)?,
        number(flags, "seed", 1u64)?,
        number(flags, "save-every", 100usize)?,
    );
    let initial = flags.values.get("weights").map(|w| weights::read(Path::new(w))).transpose()?;
    let options = TrainOptions {
        batch,
        crop: [crop, crop],
        max_iter: steps,
        dropout: OCR_DROPOUT,
        head_keywords: vec!["cls".into(), "aux".into(), "ocr".into()],
        head_lr_mult: 1.0,
    };
    let mut trainer = Trainer::new(&gpu, cfg.clone(), initial.as_deref(), options)?;
    let recipe =
        Augment { crop: [crop, crop], min_scale: 0.5, scale_steps: 16, flip: true, ignore_label: 255 };
    let mut rng = SplitMix::new(seed);
    let path = out_dir.join("weights.safetensors");
    let start = std::time::Instant::now();
    println!("training on {} for {steps} steps of {batch} x {crop}x{crop}", gpu.describe());
    for step in 0..steps {
        let samples: Vec<_> = (0..batch)
            .map(|i| {
                let s = procedural::scene(seed, (step * batch + i) as u64, size, size);
                augment(&s.image, &s.labels, &recipe, &mut rng)
            })
            .collect();
        let stats = trainer.step(&samples, step as u32)?;
        let done = step + 1;
        if done % 10 == 0 || done == steps {
            let secs = start.elapsed().as_secs_f64();
            println!(
                "step {done}/{steps}  loss {:.4}  lr {:.5}  {:.2} images/s  ETA {:.0} s",
                stats.loss,
                stats.lr,
                (done * batch) as f64 / secs,
                secs / done as f64 * (steps - done) as f64
            );
        }
        if done % every == 0 || done == steps {
            weights::write_safetensors(&path, &trainer.weights()?)?;
        }
    }
    println!("wrote {} after {:.0} s", path.display(), start.elapsed().as_secs_f64());
    Ok(())
}

fn eval(flags: &Flags) -> Result<()> {
    use hrnet_ocr::data::procedural;
    use hrnet_ocr::eval::Evaluation;
    use hrnet_ocr::infer::{Segmenter, Strategy};
    require_synthetic(flags)?;
    let gpu = Gpu::new()?;
    let cfg = Config::load(flags.get("config")?)?;
    let w = weights::read(Path::new(flags.get("weights")?))?;
    let (seed, count, size) =
        (number(flags, "seed", 2u64)?, number(flags, "count", 50u64)?, number(flags, "size", 96usize)?);
    let classes = cfg.num_classes;
    let mut segmenter = Segmenter::new(&gpu, cfg, w);
    let mut evaluation = Evaluation::new(&gpu, classes, 255)?;
    let start = std::time::Instant::now();
    for i in 0..count {
        let s = procedural::scene(seed, i, size, size);
        let seg = segmenter.segment(&s.image, &Strategy::Whole)?;
        evaluation.add(&gpu, &seg.classes, &s.labels)?;
    }
    let per_image = start.elapsed().as_secs_f64() / count.max(1) as f64;
    let scores = evaluation.scores(&gpu)?;
    for (c, iou) in scores.iou.iter().enumerate() {
        let name = procedural::CLASSES.get(c).copied().unwrap_or("?");
        println!("  {c:>3} {name:<12} IoU {iou:.4}");
    }
    println!(
        "mIoU {:.4}  pixel accuracy {:.4}  {:.1} ms per image on {}",
        scores.mean_iou,
        scores.pixel_accuracy,
        per_image * 1e3,
        gpu.describe()
    );
    Ok(())
}

fn convert(input: &str, output: &str) -> Result<()> {
    let tensors = weights::read(Path::new(input))?;
    weights::write_safetensors(Path::new(output), &tensors)?;
    println!("wrote {} tensors to {output}", tensors.len());
    Ok(())
}
