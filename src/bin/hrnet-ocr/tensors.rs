//! `info`, `forward`, `backward` and `convert`: the commands that work on tensor files
//! (for checking the engine against a reference) and on checkpoints.

use crate::model::config_and_weights;
use clap::Args;
use hrnet_ocr::data::image::check_labels;
use hrnet_ocr::gpu::{list_adapters, GpuOptions};
use hrnet_ocr::graph::{Graph, GraphBuilder, Mode, ValueId};
use hrnet_ocr::model::weights::{self, NamedTensor};
use hrnet_ocr::model::Config;
use hrnet_ocr::model::{hrnet, mmseg};
use hrnet_ocr::{Error, Gpu, Result};
use std::path::{Path, PathBuf};

/// The model and input of `forward` and `backward`.
#[derive(Args)]
pub struct TensorModelArgs {
    /// A preset or experiment YAML file
    #[arg(long, value_name = "C")]
    config: String,
    /// Weights: .safetensors or .pth
    #[arg(long, value_name = "W")]
    weights: PathBuf,
    /// A safetensors file with the tensor `input` [N, 3, H, W] (normalised planes)
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
}

#[derive(Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    model: TensorModelArgs,
    /// Where to write `aux` and `out` (safetensors)
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Also write `feats`, `context` and `ocr_feats`
    #[arg(long)]
    dump: bool,
    /// Print the planned device memory
    #[arg(long)]
    report_memory: bool,
    /// Print each kernel's share of the device time (timestamp queries)
    #[arg(long)]
    profile: bool,
}

#[derive(Args)]
pub struct BackwardArgs {
    #[command(flatten)]
    model: TensorModelArgs,
    /// A safetensors file with the tensor `label` [N, H, W] (integers; negative = ignore)
    #[arg(long, value_name = "FILE")]
    label: PathBuf,
    /// Where to write `loss`, `aux`, `out`, `grad/<key>` and `buffer/<key>`
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Turn the head's Dropout2d off
    #[arg(long)]
    no_dropout: bool,
    /// Dropout seed
    #[arg(long, default_value_t = 304)]
    seed: u32,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// A PyTorch checkpoint (.pth, legacy or zip) or safetensors file
    input: PathBuf,
    /// The file to write: .safetensors with the official names, or .pth: a zip-format
    /// PyTorch state dict with the official `model.` prefix, as the official tools/test.py
    /// loads it (TEST.MODEL_FILE)
    output: PathBuf,
    /// The output's format, `safetensors` or `pth` [default: by the output's extension]
    #[arg(long, value_name = "FORMAT")]
    to: Option<String>,
}

pub fn info() -> Result<()> {
    let options = GpuOptions::from_env();
    let adapters = list_adapters(options.backends.unwrap_or(wgpu::Backends::all()));
    println!("adapters found: {}", adapters.len());
    for a in &adapters {
        println!(
            "  {} | backend {:?} | {:?} | driver {} {}",
            a.name, a.backend, a.device_type, a.driver, a.driver_info
        );
    }
    println!("devices for --devices (device 0 is the default adapter):");
    for (i, a) in hrnet_ocr::gpu::device_list().iter().enumerate() {
        println!("  {i}: {} | backend {:?}", a.name, a.backend);
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
    println!("\nkernel variants on this adapter:");
    let tuner = hrnet_ocr::kernels::tuning::Tuner::from_env(&gpu);
    for v in hrnet_ocr::kernels::variants(&gpu, Some(&tuner)) {
        println!("  {:<32} {}\n  {:<32}   (why: {})", v.kernel, v.variant, "", v.why);
    }
    Ok(())
}

/// Reads one tensor of a safetensors file, converted to f32 (labels: i64, i32 or u8 to u32).
fn read_tensor(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: shown.clone(), source })?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Format { path: shown.clone(), what: e.to_string() })?;
    let view = file.tensor(name).map_err(|_| Error::Format {
        path: shown.clone(),
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
        other => return Err(Error::Format { path: shown, what: format!("tensor {name} is {other:?}") }),
    };
    Ok((view.shape().to_vec(), values))
}

fn read_input(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let (shape, values) = read_tensor(path, "input")?;
    if shape.len() != 4 || shape[1] != 3 {
        return Err(Error::Format {
            path: path.display().to_string(),
            what: format!("tensor input must be [N, 3, H, W], got {shape:?}"),
        });
    }
    Ok((shape, values.into_iter().map(|v| v as f32).collect()))
}

/// The model's graph with `weights` loaded, with the names of its outputs in order: aux,
/// out, feats, context (OCR's head only), ocr_feats. With `train` (label shape, dropout) the
/// graph also holds the official loss.
fn model_graph(
    gpu: &Gpu,
    cfg: &Config,
    (weights, source): (&[NamedTensor], &Path),
    input: &[usize],
    train: Option<(&[usize], f32)>,
    report_memory: bool,
) -> Result<(Graph, Vec<&'static str>)> {
    let mut g = GraphBuilder::new();
    let x = g.input("input", input, false);
    let dropout = train.map_or(0.0, |(_, d)| d);
    let m = hrnet::build(&mut g, cfg, x, dropout)?;
    if let Some((label_shape, _)) = train {
        let labels = g.labels("label", label_shape);
        hrnet::add_losses(&mut g, cfg, [m.aux, m.out], labels)?;
    }
    let mode = if train.is_some() { Mode::Train } else { Mode::Eval };
    let named = [("aux", Some(m.aux)), ("out", Some(m.out)), ("feats", Some(m.feats))]
        .into_iter()
        .chain([("context", m.context), ("ocr_feats", Some(m.ocr_feats))]);
    let (names, outputs): (Vec<&'static str>, Vec<ValueId>) =
        named.filter_map(|(name, v)| v.map(|v| (name, v))).unzip();
    if report_memory {
        let binding = crate::mib(gpu.limits().max_storage_buffer_binding_size);
        println!("device memory: {} (the adapter binds up to {binding:.1} MiB)", g.plan_memory(&outputs));
    }
    let graph = g.build(gpu, mode, &outputs)?;
    weights::load_into(gpu, &graph, weights, &source.display().to_string())?;
    Ok((graph, names))
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

pub fn forward(args: &ForwardArgs) -> Result<()> {
    let (cfg, tensors) = config_and_weights(&args.model.config, &args.model.weights)?;
    let (shape, data) = read_input(&args.model.input)?;
    let gpu = Gpu::new()?;
    let weights = (&tensors[..], args.model.weights.as_path());
    let (graph, outputs) = model_graph(&gpu, &cfg, weights, &shape, None, args.report_memory)?;
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
    if args.profile {
        let profile = hrnet_ocr::bench::profile(&gpu, &dispatches.iter().collect::<Vec<_>>())?;
        crate::bench::print_profile(&profile, 12);
    }
    let names = if args.dump { &outputs[..] } else { &outputs[..2] };
    let out = output(&gpu, &graph, names)?;
    weights::write_safetensors(&args.output, &out)?;
    println!("wrote {} on {}", names.join(", "), gpu.describe());
    Ok(())
}

pub fn backward(args: &BackwardArgs) -> Result<()> {
    let (cfg, tensors) = config_and_weights(&args.model.config, &args.model.weights)?;
    let (shape, data) = read_input(&args.model.input)?;
    let label_path = &args.label;
    let shown = label_path.display().to_string();
    let (label_shape, values) = read_tensor(label_path, "label")?;
    if label_shape.len() != 3 || label_shape[0] != shape[0] {
        return Err(Error::Format {
            path: shown,
            what: format!("label must be [N, H, W] with N = {}, got {label_shape:?}", shape[0]),
        });
    }
    let ignore = cfg.ignore_index();
    let labels: Vec<u32> = values.iter().map(|&v| if v < 0.0 { ignore } else { v as u32 }).collect();
    check_labels(&labels, cfg.num_classes, ignore)
        .map_err(|e| Error::Format { path: shown, what: e.to_string() })?;
    let dropout = if args.no_dropout { 0.0 } else { cfg.head_dropout() };
    let gpu = Gpu::new()?;
    let (mut graph, _) = model_graph(
        &gpu,
        &cfg,
        (&tensors, &args.model.weights),
        &shape,
        Some((&label_shape, dropout)),
        false,
    )?;
    graph.set_seed(&gpu, args.seed)?;
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
    weights::write_safetensors(&args.output, &out)?;
    println!("loss {} on {}", out[0].data[0], gpu.describe());
    Ok(())
}

pub fn convert(args: &ConvertArgs) -> Result<()> {
    let tensors = weights::read(&args.input)?;
    match args.to.as_deref().or(args.output.extension().and_then(|e| e.to_str())) {
        Some("safetensors") => weights::write_safetensors(&args.output, &tensors)?,
        // mmsegmentation's `load_checkpoint` takes a plain state dict under its own names.
        Some("pth" | "pt" | "tar") if mmseg::is_mmsegmentation(&tensors) => {
            hrnet_ocr::formats::pth::write_pth(&args.output, &tensors)?
        }
        Some("pth" | "pt" | "tar") => {
            // The official test script keeps `k[6:]` of every key: the `model.` of its FullModel.
            let prefixed: Vec<_> = tensors
                .iter()
                .map(|t| weights::NamedTensor { name: format!("model.{}", t.name), ..t.clone() })
                .collect();
            hrnet_ocr::formats::pth::write_pth(&args.output, &prefixed)?
        }
        _ => {
            return Err(Error::Invalid(format!(
                "{}: the output format must be safetensors or pth (--to, or the extension)",
                args.output.display()
            )))
        }
    }
    println!("wrote {} tensors to {}", tensors.len(), args.output.display());
    Ok(())
}
