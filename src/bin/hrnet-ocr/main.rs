//! The `hrnet-ocr` command line.

mod bench;
mod model;
mod segment;
mod tensors;
mod train;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

const ENVIRONMENT: &str = "\
Environment:
  WGPU_BACKEND        backends to search: vulkan, metal, dx12, gl (comma-separated)
  WGPU_ADAPTER_NAME   use the first adapter whose name contains this text
  HRNET_OCR_TUNING    kernel-variant tuning: off, memory, or a cache file
                      [default: $XDG_CACHE_HOME/hrnet-ocr/tuning.tsv]

Without --config and --weights, commands use the bundled model (models/procedural.yaml),
trained on the built-in procedural scenes.";

#[derive(Parser)]
#[command(
    name = "hrnet-ocr",
    version,
    about = "HRNet-OCR semantic segmentation on hand-written WGSL compute shaders",
    after_help = ENVIRONMENT
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists every adapter found, and the limits and features of the one chosen.
    Info,
    /// Segments images: writes a label PNG and a colour overlay PNG per image.
    Segment(segment::SegmentArgs),
    /// Trains a model (SGD, poly schedule, the official augmentation), with checkpoints.
    Train(train::TrainArgs),
    /// Per-class IoU, mIoU, pixel accuracy and time per image on a labelled set.
    Eval(segment::EvalArgs),
    /// Times the forward pass and the training step at a given size and batch.
    Bench(bench::BenchArgs),
    /// Measures the fastest convolution variants for a model on this adapter and caches them.
    Tune(bench::TuneArgs),
    /// Eval-mode forward of a tensor file; writes the model's outputs.
    Forward(tensors::ForwardArgs),
    /// One training-mode forward and backward; writes the loss, outputs and gradients.
    Backward(tensors::BackwardArgs),
    /// Converts weights: a PyTorch checkpoint (legacy or zip .pth) to safetensors, or either to an official .pth.
    Convert(tensors::ConvertArgs),
}

/// Which model to run: the bundled one unless both are given.
#[derive(Args, Clone, Debug)]
struct ModelArgs {
    /// A preset (w18-small-v2, w18, w32, w48) or an experiment YAML file [default: the bundled model's]
    #[arg(long, value_name = "C")]
    config: Option<String>,
    /// Weights: .safetensors, .pth, or a training checkpoint [default: the bundled model's]
    #[arg(long, value_name = "W")]
    weights: Option<PathBuf>,
}

/// How images are covered at inference (spec section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The whole image in one pass.
    Whole,
    /// Sliding windows of --crop every --stride, overlaps averaged.
    Slide,
    /// Every scale of --scales (whole or sliding) with its flip; exp-logits summed.
    MsFlip,
    /// The official repository's test of the config's dataset (its TEST keys: base size,
    /// crop, scales, flip), as tools/test.py runs it.
    Official,
}

/// What a training step's backward rebuilds instead of keeping it from the forward
/// (`--recompute`; every choice gives the same bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum Recompute {
    /// Keep everything the backward reads: the most memory, the least time.
    Nothing,
    /// Rebuild BN-ReLU outputs from the batch norms' inputs (an elementwise pass).
    #[default]
    BnRelu,
    /// Also rebuild the convolution outputs batch norms read, by running the convolutions
    /// again: the least memory, about one more forward pass.
    Convolutions,
}

impl From<Recompute> for hrnet_ocr::graph::Recompute {
    fn from(r: Recompute) -> Self {
        match r {
            Recompute::Nothing => Self::Nothing,
            Recompute::BnRelu => Self::BnRelu,
            Recompute::Convolutions => Self::Convolutions,
        }
    }
}

fn main() -> ExitCode {
    quiet_display_probes();
    log::set_logger(&NOTES).map(|()| log::set_max_level(log::LevelFilter::Warn)).ok();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => tensors::info(),
        Command::Segment(a) => segment::segment(&a),
        Command::Train(a) => train::train(&a),
        Command::Eval(a) => segment::eval(&a),
        Command::Bench(a) => bench::bench(&a),
        Command::Tune(a) => bench::tune(&a),
        Command::Forward(a) => tensors::forward(&a),
        Command::Backward(a) => tensors::backward(&a),
        Command::Convert(a) => tensors::convert(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The library's warnings (`log`), printed as notes; other crates' (wgpu's) stay quiet.
struct Notes;

static NOTES: Notes = Notes;

impl log::Log for Notes {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn && metadata.target().starts_with("hrnet_ocr")
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!("note: {}", record.args());
        }
    }

    fn flush(&self) {}
}

/// Mesa's Vulkan device-select layer (an implicit layer, on by default) connects to the
/// display server to rank GPUs; on a headless machine libwayland then prints "error:
/// XDG_RUNTIME_DIR is invalid or not set" though nothing failed. The engine chooses its
/// adapter itself, so the layer is switched off here, unless the user set its variable.
/// Called first thing, while the process has one thread.
fn quiet_display_probes() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// The devices of `--devices`: indices into [`hrnet_ocr::gpu::device_list`].
pub fn parse_devices(text: &str) -> hrnet_ocr::Result<Vec<usize>> {
    let count = hrnet_ocr::gpu::device_list().len();
    if text == "all" {
        return Ok((0..count).collect());
    }
    text.split(',')
        .map(|d| match d.trim().parse::<usize>() {
            Ok(i) if i < count => Ok(i),
            _ => Err(hrnet_ocr::Error::Invalid(format!(
                "--devices {text}: {d:?} is not a device (this machine has {count}: 0 to {}; `hrnet-ocr info` lists them)",
                count.saturating_sub(1)
            ))),
        })
        .collect()
}

/// Opens device `index` of the device list (the default adapter when none is named).
pub fn open_device(index: Option<usize>) -> hrnet_ocr::Result<hrnet_ocr::Gpu> {
    hrnet_ocr::Gpu::with_options(&hrnet_ocr::GpuOptions {
        adapter_index: index,
        ..hrnet_ocr::GpuOptions::from_env()
    })
}

/// Bytes as MiB, for the memory lines the commands print.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// `H` or `HxW`, as (height, width).
fn parse_size(s: &str) -> Result<[usize; 2], String> {
    let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|&n| n > 0);
    match s.split_once(['x', 'X']) {
        None => parse(s).map(|n| [n, n]),
        Some((h, w)) => parse(h).zip(parse(w)).map(|(h, w)| [h, w]),
    }
    .ok_or_else(|| format!("expected a positive size N or HxW, got {s:?}"))
}
