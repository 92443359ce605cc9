//! Peer benchmark for hrnet-ocr's kernels: runs the cases of `benches/peers/shapes.txt` on burn's
//! wgpu backend (Vulkan, with fusion and autotune, as burn's default wgpu backend) and prints one
//! JSON object per case and pass on stdout.
//!
//! Usage: `hrnet-ocr-peer-burn SHAPES_FILE [--iters N]`

use std::{env, fmt, fs, process::ExitCode, time::Instant};

use burn::tensor::{
    Device, Distribution, Tensor, activation::softmax, module::conv2d, ops::ConvOptions, wgpu::WgpuBackend,
};

const PEER: &str = "burn-wgpu";
const DEFAULT_ITERS: usize = 10;

/// Shader language cubecl compiles to: SPIR-V needs burn's `vulkan` feature, else WGSL.
const SHADER: &str = if cfg!(feature = "spirv") { "wgpu<spirv>" } else { "wgpu<wgsl>" };

/// One line of the shapes file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// Batch-1 NCHW convolution without bias, dilation 1.
    Conv { ci: usize, co: usize, h: usize, w: usize, k: usize, stride: usize, pad: usize },
    /// `[m, k] x [k, n]`.
    Matmul { m: usize, k: usize, n: usize },
    /// Softmax along the last axis of a `[rows, len]` tensor.
    Softmax { rows: usize, len: usize },
}

impl Case {
    /// Parses one line; `Ok(None)` for blank and comment-only lines.
    fn parse(line: &str) -> Result<Option<Self>, String> {
        let line = line.split('#').next().unwrap_or_default().trim();
        let mut fields = line.split_whitespace();
        let Some(kind) = fields.next() else {
            return Ok(None);
        };
        let nums = fields
            .map(|field| field.parse::<usize>().map_err(|err| format!("`{field}` in `{line}`: {err}")))
            .collect::<Result<Vec<_>, _>>()?;
        let case = match (kind, nums.as_slice()) {
            ("conv", &[ci, co, h, w, k, stride, pad]) => Self::Conv { ci, co, h, w, k, stride, pad },
            ("matmul", &[m, k, n]) => Self::Matmul { m, k, n },
            ("softmax", &[rows, len]) => Self::Softmax { rows, len },
            _ => return Err(format!("unrecognised case `{line}`")),
        };
        case.validate().map_err(|err| format!("`{line}`: {err}"))?;
        Ok(Some(case))
    }

    fn validate(&self) -> Result<(), String> {
        match *self {
            Self::Conv { h, w, k, stride, .. } => {
                if stride == 0 || k == 0 {
                    return Err("kernel size and stride must be non-zero".into());
                }
                if self.conv_out_hw().is_none() {
                    return Err(format!("kernel {k}x{k} does not fit the padded {h}x{w} input"));
                }
                Ok(())
            }
            Self::Matmul { .. } | Self::Softmax { .. } => Ok(()),
        }
    }

    /// Output height and width of a convolution case.
    fn conv_out_hw(&self) -> Option<(usize, usize)> {
        let Self::Conv { h, w, k, stride, pad, .. } = *self else {
            return None;
        };
        let out = |len: usize| Some((len + 2 * pad).checked_sub(k)? / stride + 1);
        Some((out(h)?, out(w)?))
    }

    /// Floating-point operations of one forward call, where throughput is meaningful.
    fn forward_flops(&self) -> Option<f64> {
        match *self {
            Self::Conv { ci, co, k, .. } => {
                let (ho, wo) = self.conv_out_hw()?;
                Some(2.0 * (ci * co * k * k * ho * wo) as f64)
            }
            Self::Matmul { m, k, n } => Some(2.0 * (m * k * n) as f64),
            Self::Softmax { .. } => None,
        }
    }
}

impl fmt::Display for Case {
    /// The case name every peer uses to join results.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Conv { ci, co, h, w, k, stride, .. } => {
                write!(f, "conv {ci}->{co} {k}x{k} s{stride} {h}x{w}")
            }
            Self::Matmul { m, k, n } => write!(f, "matmul {m}x{k}x{n}"),
            Self::Softmax { rows, len } => write!(f, "softmax {rows}x{len}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    /// Forward, then the gradients of every input (data and weights / both operands).
    ForwardBackward,
}

impl Pass {
    const ALL: [Self; 2] = [Self::Forward, Self::ForwardBackward];

    fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::ForwardBackward => "forward+backward",
        }
    }

    /// Work relative to the forward pass: backward costs two forwards (input and weight grads).
    fn flops_factor(self) -> f64 {
        match self {
            Self::Forward => 1.0,
            Self::ForwardBackward => 3.0,
        }
    }
}

/// Wall-clock times of one case and pass, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// The first call: shader compilation, autotune and fusion tracing included.
    first_ms: f64,
    /// Mean of the timed calls that follow it.
    mean_ms: f64,
}

/// Waits for the device to finish, keeping `outputs` alive until then so fusion cannot skip them.
fn finish<T>(device: &Device, outputs: T) {
    device.sync().expect("device sync failed");
    drop(outputs);
}

/// Times one warm-up call, then `iters` calls; `call` must sync the device before returning.
fn time_calls(iters: usize, mut call: impl FnMut()) -> Timing {
    let start = Instant::now();
    call();
    let first_ms = start.elapsed().as_secs_f64() * 1e3;

    let start = Instant::now();
    for _ in 0..iters {
        call();
    }
    let mean_ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
    Timing { first_ms, mean_ms }
}

/// Benchmarks `op` on `inputs` for one pass.
///
/// The backward pass seeds the output gradient with a fixed random tensor of `out_shape`, as
/// `(op(inputs) * upstream).sum().backward()`, and reads back every input's gradient.
fn bench_op<const D: usize>(
    device: &Device,
    pass: Pass,
    iters: usize,
    inputs: Vec<Tensor<D>>,
    out_shape: [usize; D],
    op: impl Fn(Vec<Tensor<D>>) -> Tensor<D>,
) -> Timing {
    match pass {
        Pass::Forward => time_calls(iters, || finish(device, op(inputs.clone()))),
        Pass::ForwardBackward => {
            let inputs: Vec<_> = inputs.into_iter().map(|input| input.autodiff().require_grad()).collect();
            let upstream = random(out_shape, device);
            device.sync().expect("device sync failed");
            time_calls(iters, || {
                let output = op(inputs.clone());
                let grads = (output * upstream.clone()).sum().backward();
                let input_grads: Vec<_> =
                    inputs.iter().map(|input| input.grad(&grads).expect("missing input gradient")).collect();
                finish(device, (input_grads, grads));
            })
        }
    }
}

/// A standard-normal random tensor (as `torch.randn` in the PyTorch peer).
fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn bench_case(device: &Device, case: Case, pass: Pass, iters: usize) -> Timing {
    match case {
        Case::Conv { ci, co, h, w, k, stride, pad } => {
            let (ho, wo) = case.conv_out_hw().expect("validated case");
            let options = ConvOptions::new([stride; 2], [pad; 2], [1; 2], 1);
            let inputs = vec![random([1, ci, h, w], device), random([co, ci, k, k], device)];
            bench_op(device, pass, iters, inputs, [1, co, ho, wo], |inputs| {
                let [x, weight] = <[_; 2]>::try_from(inputs).expect("two inputs");
                conv2d(x, weight, None, options.clone())
            })
        }
        Case::Matmul { m, k, n } => {
            let inputs = vec![random([m, k], device), random([k, n], device)];
            bench_op(device, pass, iters, inputs, [m, n], |inputs| {
                let [a, b] = <[_; 2]>::try_from(inputs).expect("two inputs");
                a.matmul(b)
            })
        }
        Case::Softmax { rows, len } => {
            let inputs = vec![random([rows, len], device)];
            bench_op(device, pass, iters, inputs, [rows, len], |inputs| {
                let [x] = <[_; 1]>::try_from(inputs).expect("one input");
                softmax(x, 1)
            })
        }
    }
}

/// Escapes `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_line(case: Case, pass: Pass, timing: Timing, iters: usize, adapter: &str) -> String {
    let gflops = case.forward_flops().map_or_else(
        || "null".to_owned(),
        |flops| format!("{:.3}", flops * pass.flops_factor() / (timing.mean_ms * 1e6)),
    );
    format!(
        "{{\"peer\":{},\"case\":{},\"pass\":{},\"ms\":{:.4},\"first_ms\":{:.2},\"gflops\":{gflops},\"iters\":{iters},\"adapter\":{}}}",
        json_string(PEER),
        json_string(&case.to_string()),
        json_string(pass.name()),
        timing.mean_ms,
        timing.first_ms,
        json_string(adapter),
    )
}

struct Args {
    shapes: String,
    iters: usize,
}

impl Args {
    fn parse() -> Result<Self, String> {
        let usage = "usage: hrnet-ocr-peer-burn SHAPES_FILE [--iters N]";
        let mut shapes = None;
        let mut iters = DEFAULT_ITERS;
        let mut args = env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--iters" => {
                    let value = args.next().ok_or(usage)?;
                    iters = value
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("--iters wants a positive integer, not `{value}`"))?;
                }
                "-h" | "--help" => return Err(usage.into()),
                _ if shapes.is_none() && !arg.starts_with('-') => shapes = Some(arg),
                _ => return Err(format!("unexpected argument `{arg}`\n{usage}")),
            }
        }
        Ok(Self { shapes: shapes.ok_or(usage)?, iters })
    }
}

fn run() -> Result<(), String> {
    let args = Args::parse()?;
    let text =
        fs::read_to_string(&args.shapes).map_err(|err| format!("cannot read {}: {err}", args.shapes))?;
    let cases =
        text.lines().filter_map(|line| Case::parse(line).transpose()).collect::<Result<Vec<_>, _>>()?;

    let (device, setup) = Device::wgpu_options()
        .graphics_api(WgpuBackend::Vulkan)
        .init_with_setup()
        .map_err(|err| format!("cannot start wgpu on Vulkan: {err}"))?;
    let info = setup.adapter.get_info();
    let adapter = format!("{} ({:?}, {}, {SHADER})", info.name, info.backend, info.driver_info);
    eprintln!("burn peer on {adapter}, {} timed calls per case", args.iters);
    device.seed(0x5eed);

    for case in cases {
        for pass in Pass::ALL {
            let timing = bench_case(&device, case, pass, args.iters);
            println!("{}", json_line(case, pass, timing, args.iters, &adapter));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_cases() {
        let conv = Case::parse("conv 18 36 64 64 3 2 1  # strided").unwrap().unwrap();
        assert_eq!(conv.to_string(), "conv 18->36 3x3 s2 64x64");
        assert_eq!(conv.conv_out_hw(), Some((32, 32)));
        assert_eq!(conv.forward_flops(), Some(2.0 * (18 * 36 * 9 * 32 * 32) as f64));
        let matmul = Case::parse("matmul 512 512 512").unwrap().unwrap();
        assert_eq!(matmul.to_string(), "matmul 512x512x512");
        let softmax = Case::parse("softmax 38 4096").unwrap().unwrap();
        assert_eq!(softmax.to_string(), "softmax 38x4096");
        assert_eq!(softmax.forward_flops(), None);
    }

    #[test]
    fn skips_comments_and_rejects_garbage() {
        assert_eq!(Case::parse("  # only a comment").unwrap(), None);
        assert_eq!(Case::parse("").unwrap(), None);
        assert!(Case::parse("conv 1 2 3").is_err());
        assert!(Case::parse("conv 1 1 2 2 5 1 0").is_err());
        assert!(Case::parse("pool 2 2").is_err());
    }

    #[test]
    fn escapes_json() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
