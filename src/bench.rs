//! Kernel benchmarks: every kernel alone at HRNet's shapes (or at the shapes of a peer
//! comparison file), timed on the adapter at hand against a roofline measured there.
//!
//! Throughput counts FLOPs as 2 x multiply-adds and bytes as the minimum traffic (each
//! input read once, each output written once). The roofline is two numbers measured on
//! the same adapter with the engine's own kernels: the bandwidth of the faster of a
//! channel copy and a ReLU over 64 MiB, and the arithmetic rate of the faster of the
//! matmul at 1024^3 and a 3x3 convolution 64->64 at 128x128 (both are GEMMs, the
//! convolution an implicit one). A case's roofline fraction is the time the binding one
//! of the two would allow, `max(flops / peak_flops, bytes / peak_bytes)`, over the time
//! measured: how close a kernel comes to the best this engine shows on that adapter.
//!
//! Used by `hrnet-ocr bench --kernels` and by the criterion benchmark `benches/kernels.rs`.

use crate::error::{Error, Result};
use crate::gpu::{total_cost, Cost, Dispatch, Gpu};
use crate::graph::{Flops, Mode};
use crate::kernels::batch_norm::{self, BatchNormGrads, BatchNormParams};
use crate::kernels::conv2d::{self, Conv2dSpec, Precision};
use crate::kernels::dropout::Dropout2d;
use crate::kernels::loss::{CrossEntropy, Ohem, Reduction};
use crate::kernels::matmul::Matmul;
use crate::kernels::ocr::{self, AttentionGrads};
use crate::kernels::sgd::{Arena, SgdConfig};
use crate::kernels::softmax::{self, Axis};
use crate::kernels::sums::Summing;
use crate::kernels::tuning::{ConvForward, ConvInputGrad, ConvWeightGrad, Tunable};
use crate::kernels::{concat, elementwise, metrics, resize};
use crate::model::heads::{self, ComparisonSize, ContextHead};
use crate::tensor::{DType, Tensor};
use std::time::{Duration, Instant};

/// One benchmark: a kernel family, the pass (`forward`, `backward_input`, ...) and the
/// shape, with the dispatches that run it.
pub struct KernelCase {
    pub kernel: String,
    pub pass: String,
    pub case: String,
    pub dispatches: Vec<Dispatch>,
    /// Memory-bound kernels report bytes/s as their throughput, the others FLOP/s.
    pub memory_bound: bool,
    /// Wall time to record the case (pipeline compilation the first time a kernel is met).
    pub setup: Duration,
}

impl KernelCase {
    pub fn cost(&self) -> Cost {
        total_cost(&self.dispatches)
    }
}

/// What one case measured.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Wall time of the first run (submit and wait), plus the case's setup.
    pub first_ms: f64,
    /// Mean and fastest wall time of a run (one submission, waited for).
    pub mean_ms: f64,
    pub best_ms: f64,
    /// Device time of one run from timestamp queries, where the adapter has them.
    pub device_ms: Option<f64>,
    /// CPU time the whole process spent per run (Linux): on a CPU driver such as lavapipe
    /// this is the kernel's real cost, unaffected by other load on the machine.
    pub cpu_ms: Option<f64>,
    pub runs: usize,
}

/// User + system CPU time of this process so far, in milliseconds (Linux only).
fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // The kernel's clock tick is 100 Hz on every mainstream Linux configuration.
    Some(ticks * 10.0)
}

/// The two ceilings measured on an adapter.
#[derive(Clone, Copy, Debug)]
pub struct Roofline {
    pub gbytes_per_s: f64,
    pub gflops: f64,
}

impl Roofline {
    /// The fraction of the roofline that `cost` done in `ms` reaches.
    pub fn fraction(&self, cost: Cost, ms: f64) -> f64 {
        let bound_s =
            (cost.flops as f64 / (self.gflops * 1e9)).max(cost.bytes as f64 / (self.gbytes_per_s * 1e9));
        bound_s / (ms * 1e-3)
    }
}

/// Runs `dispatches` once untimed, then repeatedly for about `budget` (at least 3 and at
/// most 200 runs), each run one submission waited for.
pub fn time(gpu: &Gpu, dispatches: &[Dispatch], setup: Duration, budget: Duration) -> Result<Timing> {
    let start = Instant::now();
    gpu.run(dispatches)?;
    let first_ms = (start.elapsed() + setup).as_secs_f64() * 1e3;
    let mut times = Vec::new();
    let begun = Instant::now();
    let cpu_before = process_cpu_ms();
    while times.len() < 3 || (begun.elapsed() < budget && times.len() < 200) {
        let t = Instant::now();
        gpu.run(dispatches)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_ms = match (cpu_before, process_cpu_ms()) {
        (Some(a), Some(b)) if gpu.info().device_type == wgpu::DeviceType::Cpu => {
            Some((b - a) / times.len() as f64)
        }
        _ => None,
    };
    let device_ms = if gpu.has_timestamps() {
        let refs: Vec<&Dispatch> = dispatches.iter().collect();
        let ns: f64 = gpu.profile(&refs)?.iter().map(|t| t.nanoseconds).sum();
        Some(ns / 1e6)
    } else {
        None
    };
    Ok(Timing {
        first_ms,
        mean_ms: times.iter().sum::<f64>() / times.len() as f64,
        best_ms: times.iter().copied().fold(f64::INFINITY, f64::min),
        device_ms,
        cpu_ms,
        runs: times.len(),
    })
}

/// Measures the adapter's roofline (see the module docs), best of several runs each.
pub fn roofline(gpu: &Gpu) -> Result<Roofline> {
    let budget = Duration::from_millis(500);
    // The best rate (cost units per second / 1e9) of any of `candidates`.
    let best = |candidates: Vec<Vec<Dispatch>>, units: fn(Cost) -> u64| -> Result<f64> {
        let mut rate = 0.0f64;
        for dispatches in candidates {
            let amount = units(total_cost(&dispatches)) as f64;
            rate = rate.max(amount / (time(gpu, &dispatches, Duration::ZERO, budget)?.best_ms * 1e6));
        }
        Ok(rate)
    };
    let src = filled(gpu, &[1, 64, 512, 512], 1)?;
    let dst = Tensor::empty(gpu, src.shape())?;
    let copies = vec![
        concat::copy_channels(gpu, (&src, 0), (&dst, 0), 64, false)?,
        elementwise::relu_forward(gpu, &src, &dst)?,
    ];
    let gbytes_per_s = best(copies, |c| c.bytes)?;
    let (a, b) = (filled(gpu, &[1024, 1024], 2)?, filled(gpu, &[1024, 1024], 3)?);
    let c = Tensor::empty(gpu, &[1024, 1024])?;
    let mm = Matmul { batch: 1, m: 1024, k: 1024, n: 1024, trans_a: false, trans_b: false };
    let (x, weight) = (filled(gpu, &[1, 64, 128, 128], 4)?, filled(gpu, &[64, 64, 3, 3], 5)?);
    let y = Tensor::empty(gpu, x.shape())?;
    let gemms = vec![
        mm.forward(gpu, None, &a, &b, &c)?,
        conv2d::forward(gpu, &Conv2dSpec::square(1, 1, 1), &x, &weight, None, &y)?.into_vec(),
    ];
    Ok(Roofline { gbytes_per_s, gflops: best(gemms, |c| c.flops)? })
}

/// Cheap deterministic values in [-1, 1]; the data does not change the timing.
fn filled(gpu: &Gpu, shape: &[usize], seed: u32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 8_388_608.0 - 1.0)
        .collect();
    Tensor::from_slice(gpu, shape, &data)
}

/// Collects cases, timing each one's recording.
/// Collects the cases whose kernel, pass or shape contains `filter`.
struct Suite<'g> {
    gpu: &'g Gpu,
    filter: &'g str,
    cases: Vec<KernelCase>,
    since: Instant,
}

impl<'g> Suite<'g> {
    fn new(gpu: &'g Gpu, filter: &'g str) -> Self {
        Suite { gpu, filter, cases: Vec::new(), since: Instant::now() }
    }

    /// Whether a group of cases named by any of `names` may hold a wanted case (so its
    /// tensors are worth allocating).
    fn wants(&self, names: &[&str]) -> bool {
        self.filter.is_empty() || names.iter().any(|n| n.contains(self.filter))
    }

    fn t(&self, shape: &[usize], seed: u32) -> Result<Tensor> {
        filled(self.gpu, shape, seed)
    }

    fn e(&self, shape: &[usize]) -> Result<Tensor> {
        Tensor::empty(self.gpu, shape)
    }

    /// Adds a case if the filter wants it; its setup time is the time since the previous
    /// one was added.
    fn add(&mut self, kernel: &str, pass: &str, case: &str, dispatches: Vec<Dispatch>, memory_bound: bool) {
        if ![kernel, pass, case].iter().any(|n| n.contains(self.filter)) {
            return;
        }
        self.cases.push(KernelCase {
            kernel: kernel.into(),
            pass: pass.into(),
            case: case.into(),
            dispatches,
            memory_bound,
            setup: self.since.elapsed(),
        });
        self.since = Instant::now();
    }
}

/// Every kernel, forward and each backward, at HRNet's shapes: the stage-2..4 branch
/// widths of W18 (18/36/72/144) and W48 (48/96/192/384) for a 256 x 512 input (branches at
/// 64x128 .. 8x16), the fuse-layer convolutions, and the OCR head at its real sizes for
/// that input (a 64x128 feature map, 19 classes, MID 512, KEY 256), the losses and metrics
/// at the 256x512 label size. `filter` keeps the cases whose kernel, pass or shape contains it.
pub fn hrnet_suite(gpu: &Gpu, filter: &str) -> Result<Vec<KernelCase>> {
    let mut s = Suite::new(gpu, filter);
    convolutions(&mut s)?;
    memory_bound(&mut s)?;
    ocr_head(&mut s)?;
    losses_and_training(&mut s)?;
    Ok(s.cases)
}

fn convolutions(s: &mut Suite) -> Result<()> {
    let same3 = Conv2dSpec::square(1, 1, 1);
    let mut cases: Vec<(String, [usize; 5], Conv2dSpec)> = Vec::new();
    for widths in [[18, 36, 72, 144], [48, 96, 192, 384]] {
        for (b, &c) in widths.iter().enumerate() {
            let (h, w) = (64 >> b, 128 >> b);
            cases.push((format!("3x3 {c}->{c} {h}x{w}"), [c, c, h, w, 3], same3));
        }
        let (c0, c1) = (widths[0], widths[1]);
        cases.push((format!("3x3/2 {c0}->{c1} 64x128"), [c0, c1, 64, 128, 3], Conv2dSpec::square(2, 1, 1)));
        cases.push((format!("1x1 {c1}->{c0} 32x64"), [c1, c0, 32, 64, 1], Conv2dSpec::square(1, 0, 1)));
    }
    cases.push(("1x1 270->512 64x64 (OCR)".into(), [270, 512, 64, 64, 1], Conv2dSpec::square(1, 0, 1)));
    for (name, [ci, co, h, w, k], spec) in cases {
        if !s.wants(&["conv2d", "forward", "backward_input", "backward_weight", "backward_bias", &name]) {
            continue;
        }
        let x = s.t(&[1, ci, h, w], 1)?;
        let weight = s.t(&[co, ci, k, k], 2)?;
        let bias = s.t(&[co], 3)?;
        let y_shape = conv2d::output_shape(&spec, x.shape(), &weight)?;
        let y = s.e(&y_shape)?;
        let gy = s.t(&y_shape, 4)?;
        let (gx, gw, gb) = (s.e(x.shape())?, s.e(weight.shape())?, s.e(bias.shape())?);
        let gpu = s.gpu;
        s.add(
            "conv2d",
            "forward",
            &name,
            conv2d::forward(gpu, &spec, &x, &weight, Some(&bias), &y)?.into_vec(),
            false,
        );
        // Each variant forced (the plain rows are each family's untimed default), and f16
        // inference (activations and weights at half).
        let epilogue = conv2d::Epilogue { bias: Some(&bias), ..Default::default() };
        for &variant in ConvForward::ALL.iter().filter(|v| v.runs_on(gpu)) {
            let forced =
                conv2d::forward_with(gpu, &spec, &x, &weight, &epilogue, Precision::F32, variant, &y)?;
            s.add("conv2d", &format!("forward [{}]", variant.name()), &name, forced.into_vec(), false);
        }
        if gpu.supports_f16() {
            let default = ConvForward::default_for(gpu);
            let (x_half, y_half) =
                (Tensor::empty_of(gpu, x.shape(), DType::F16)?, Tensor::empty_of(gpu, &y_shape, DType::F16)?);
            x_half.write(gpu, &x.to_vec(gpu)?)?;
            let half = conv2d::forward_with(
                gpu,
                &spec,
                &x_half,
                &weight,
                &epilogue,
                Precision::F16,
                default,
                &y_half,
            )?;
            s.add("conv2d", "forward [f16]", &name, half.into_vec(), false);
        }
        let bwd_x = conv2d::backward_input(gpu, &spec, &gy, &weight, &gx, false)?;
        s.add("conv2d", "backward_input", &name, bwd_x, false);
        for &variant in ConvInputGrad::ALL.iter().filter(|v| v.runs_on(gpu)) {
            let forced = conv2d::backward_input_with(gpu, &spec, &gy, &weight, &gx, false, variant)?;
            s.add("conv2d", &format!("backward_input [{}]", variant.name()), &name, forced, false);
        }
        let bwd_w = conv2d::backward_weight(gpu, &spec, &x, &gy, &gw, false)?;
        s.add("conv2d", "backward_weight", &name, bwd_w, false);
        for &variant in ConvWeightGrad::ALL.iter().filter(|v| v.runs_on(gpu)) {
            let forced = conv2d::backward_weight_with(gpu, &spec, &x, &gy, &gw, false, variant)?;
            s.add("conv2d", &format!("backward_weight [{}]", variant.name()), &name, forced, false);
        }
        s.add("conv2d", "backward_bias", &name, conv2d::backward_bias(gpu, &gy, &gb, false)?, true);
    }
    Ok(())
}

fn memory_bound(s: &mut Suite) -> Result<()> {
    let gpu = s.gpu;
    for (ch, h, w) in [(18, 128, 256), (48, 128, 256), (144, 16, 32), (720, 64, 64)] {
        let id = format!("{ch}x{h}x{w}");
        if !s.wants(&["batch_norm", "relu", "add", &id]) {
            continue;
        }
        let shape = [1, ch, h, w];
        let (x, other, gy) = (s.t(&shape, 1)?, s.t(&shape, 2)?, s.t(&shape, 3)?);
        let (y, gx, gb) = (s.e(&shape)?, s.e(&shape)?, s.e(&shape)?);
        let (gamma, beta, mean) = (s.t(&[ch], 10)?, s.t(&[ch], 11)?, s.t(&[ch], 12)?);
        let var = Tensor::full(gpu, &[ch], 1.0)?;
        let bn = BatchNormParams::with_defaults([&gamma, &beta, &mean, &var]);
        let saved = s.e(&batch_norm::saved_shape(ch))?;
        let (gg, gbeta) = (s.e(&[ch])?, s.e(&[ch])?);
        s.add("batch_norm", "eval_forward", &id, batch_norm::forward_eval(gpu, &x, &bn, &y)?, true);
        let grads = BatchNormGrads {
            grad_x: &gx,
            grad_gamma: &gg,
            grad_beta: &gbeta,
            accumulate_x: false,
            accumulate_params: false,
        };
        // Each summing of the training passes' channel sums.
        for summing in Summing::ALL.into_iter().filter(|v| v.runs_on(gpu)) {
            let forward = batch_norm::forward_train_with(gpu, &x, &bn, &saved, &y, summing)?;
            s.add("batch_norm", &format!("train_forward [{}]", summing.name()), &id, forward, true);
            let backward = batch_norm::backward_with(gpu, &x, &bn, &saved, &gy, &grads, summing)?;
            s.add("batch_norm", &format!("backward [{}]", summing.name()), &id, backward, true);
        }
        s.add("relu", "forward", &id, elementwise::relu_forward(gpu, &x, &y)?, true);
        s.add("relu", "backward", &id, elementwise::relu_backward(gpu, &x, &gy, &gx, false)?, true);
        s.add("add", "forward", &id, elementwise::add_forward(gpu, &x, &other, &y)?, true);
        let add_bwd = elementwise::add_backward(gpu, &gy, (&gx, false), (&gb, false))?;
        s.add("add", "backward", &id, add_bwd, true);
        s.add("add_relu", "forward", &id, elementwise::add_relu_forward(gpu, &x, &other, &y)?, true);
        let add_relu_bwd = elementwise::add_relu_backward(gpu, &x, &gy, (&gx, false), (&gb, true))?;
        s.add("add_relu", "backward", &id, add_relu_bwd, true);
    }
    Ok(())
}

fn ocr_head(s: &mut Suite) -> Result<()> {
    let gpu = s.gpu;
    let (k, mid, key, h, w) = (19, 512, 256, 64, 128);
    let id = format!("K{k} MID{mid} KEY{key} {h}x{w}");

    // Bilinear resize into the backbone's concat: 36 channels 32x64 -> 64x128 (W18's x1).
    if s.wants(&["resize", "concat"]) {
        let (x1, cat, g1) = (s.t(&[1, 36, 32, 64], 1)?, s.e(&[1, 270, 64, 128])?, s.e(&[1, 36, 32, 64])?);
        let rid = "36x32x64 -> 64x128 into 270 channels";
        s.add("resize", "forward", rid, resize::forward(gpu, &x1, &cat, 18, true)?, true);
        s.add("resize", "backward", rid, resize::backward(gpu, &cat, 18, &g1, true, false)?, true);
        let x0 = s.t(&[1, 18, 64, 128], 2)?;
        let copy = concat::copy_channels(gpu, (&x0, 0), (&cat, 0), 18, false)?;
        s.add("concat", "copy_channels", "18x64x128 into 270 channels", copy, true);
    }

    // PPM's finest pyramid level over the backbone's concat: 270 channels 64x128 -> 6x6.
    if s.wants(&["adaptive_avg_pool"]) {
        let (x, cells, gx) = (s.t(&[1, 270, 64, 128], 5)?, s.e(&[1, 270, 6, 6])?, s.e(&[1, 270, 64, 128])?);
        let pid = "270x64x128 -> 6x6";
        s.add("adaptive_avg_pool", "forward", pid, resize::adaptive_avg_pool(gpu, &x, &cells, 0)?, true);
        let backward = resize::adaptive_avg_pool_backward(gpu, &cells, 0, &gx, false)?;
        s.add("adaptive_avg_pool", "backward", pid, backward, true);
    }

    let (logits, probs, gp) = (s.t(&[1, k, h, w], 3)?, s.e(&[1, k, h, w])?, s.e(&[1, k, h, w])?);
    if s.wants(&["softmax"]) {
        let regions = Axis { outer: h * w, len: k, inner: 1 };
        s.add(
            "softmax",
            "forward",
            "over regions",
            softmax::forward(gpu, &logits, regions, 1.0, &probs)?,
            true,
        );
        let bwd = softmax::backward(gpu, &probs, &logits, regions, 1.0, &gp, false)?;
        s.add("softmax", "backward", "over regions", bwd, true);
        // Rows over pixels are long: each summing of their chunks.
        let pixels = Axis { outer: k, len: h * w, inner: 1 };
        for summing in Summing::ALL.into_iter().filter(|v| v.runs_on(gpu)) {
            let fwd = softmax::forward_with(gpu, &logits, pixels, 1.0, &probs, summing)?;
            s.add("softmax", &format!("forward [{}]", summing.name()), "over pixels", fwd, true);
            let bwd = softmax::backward_with(gpu, &probs, &logits, pixels, 1.0, (&gp, false), summing)?;
            s.add("softmax", &format!("backward [{}]", summing.name()), "over pixels", bwd, true);
        }
    }

    if s.wants(&["matmul"]) {
        let (a, b, m) = (s.t(&[512, 512], 4)?, s.t(&[512, 512], 5)?, s.e(&[512, 512])?);
        for (ta, tb) in [(false, false), (true, true)] {
            let mm = Matmul { batch: 1, m: 512, k: 512, n: 512, trans_a: ta, trans_b: tb };
            let name = format!("512^3 trans_a {ta} trans_b {tb}");
            s.add("matmul", "forward", &name, mm.forward(gpu, None, &a, &b, &m)?, false);
            s.add("matmul", "backward_a", &name, mm.backward_a(gpu, None, &m, &b, &a, false)?, false);
            s.add("matmul", "backward_b", &name, mm.backward_b(gpu, None, &a, &m, &b, false)?, false);
        }
    }

    let feats = s.t(&[1, mid, h, w], 6)?;
    let gfeats = s.e(&[1, mid, h, w])?;
    if s.wants(&["spatial_gather", "object_attention", "ocr"]) {
        let (context, gctx, gaux) = (s.e(&[1, mid, k, 1])?, s.t(&[1, mid, k, 1], 7)?, s.e(&[1, k, h, w])?);
        let fwd = ocr::spatial_gather_forward(gpu, None, &logits, &feats, &probs, &context)?;
        s.add("spatial_gather", "forward", &id, fwd, false);
        let bwd =
            ocr::spatial_gather_backward(gpu, None, &feats, &probs, &gctx, (&gaux, false), (&gfeats, false))?;
        s.add("spatial_gather", "backward", &id, bwd, false);
        let (query, keys, values) =
            (s.t(&[1, key, h, w], 8)?, s.t(&[1, key, k, 1], 9)?, s.t(&[1, key, k, 1], 10)?);
        let sim = s.e(&ocr::attention_map_shape(&query, &keys, &values)?)?;
        let (out, gout) = (s.e(&[1, key, h, w])?, s.t(&[1, key, h, w], 11)?);
        let (gq, gk, gv) = (s.e(&[1, key, h, w])?, s.e(&[1, key, k, 1])?, s.e(&[1, key, k, 1])?);
        let fwd = ocr::object_attention_forward(gpu, None, &query, &keys, &values, &sim, &out)?;
        s.add("object_attention", "forward", &id, fwd, false);
        let grads = AttentionGrads { query: (&gq, false), key: (&gk, false), value: (&gv, false) };
        let bwd = ocr::object_attention_backward(gpu, None, (&query, &keys, &values), &sim, &gout, &grads)?;
        s.add("object_attention", "backward", &id, bwd, false);
    }

    if s.wants(&["dropout"]) {
        let drop = Dropout2d { drop: 0.05, first_image: 0 };
        let did = "512x64x128";
        s.add(
            "dropout2d",
            "forward",
            did,
            drop.forward(gpu, &feats, &gfeats, 3)?.into_iter().map(|s| s.dispatch).collect(),
            true,
        );
        s.add(
            "dropout2d",
            "backward",
            did,
            drop.backward(gpu, &feats, &gfeats, 3, false)?.into_iter().map(|s| s.dispatch).collect(),
            true,
        );
    }
    Ok(())
}

fn losses_and_training(s: &mut Suite) -> Result<()> {
    let gpu = s.gpu;
    let (n, k, h, w) = (2, 19, 256, 512);
    let id = format!("{n}x{k}x{h}x{w}");
    if s.wants(&["cross_entropy", "argmax", "confusion"]) {
        let logits = s.t(&[n, k, h, w], 1)?;
        let labels: Vec<u32> =
            (0..n * h * w).map(|i| if i % 10 == 0 { 255 } else { (i % k) as u32 }).collect();
        let labels = Tensor::from_u32(gpu, &[n, h, w], &labels)?;
        let grad = s.e(&[n, k, h, w])?;
        for (name, reduction) in [
            ("cross_entropy", Reduction::Mean),
            ("ohem_cross_entropy", Reduction::Ohem(Ohem { thresh: 0.9, min_kept: 100_000 })),
        ] {
            let ce = CrossEntropy { ignore_label: 255, class_weight: None, reduction };
            // Each summing of the pixel chunks; the backward sums none.
            for summing in Summing::ALL.into_iter().filter(|v| v.runs_on(gpu)) {
                let pass = ce.forward_with(gpu, &logits, &labels, summing)?;
                s.add(name, &format!("forward [{}]", summing.name()), &id, pass.forward, true);
            }
            // The backward's row runs alone, from a pass recorded for it.
            let pass = ce.forward(gpu, &logits, &labels)?;
            let bwd = ce.backward(gpu, &pass, &logits, &labels, 1.0, (&grad, false))?;
            s.add(name, "backward", &id, bwd, true);
        }
        let prediction = Tensor::empty_of(gpu, &[n, h, w], DType::U32)?;
        let confusion = Tensor::from_u32(gpu, &[k, k], &vec![0; k * k])?;
        s.add("argmax", "forward", &id, metrics::argmax(gpu, &logits, &prediction)?, true);
        let conf = metrics::confusion(gpu, &prediction, &labels, k, 255, &confusion)?;
        s.add("confusion_matrix", "forward", &id, vec![conf], true);
    }

    // One SGD step over 4 M parameters in 200 tensors, a tenth of them at 10x the rate.
    if s.wants(&["sgd"]) {
        let shapes: Vec<[usize; 1]> = (0..200).map(|i| [10_000 + 100 * i]).collect();
        let spec: Vec<(&[usize], f32)> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_slice(), if i % 10 == 0 { 10.0 } else { 1.0 }))
            .collect();
        let arena = Arena::new(gpu, &spec)?;
        let config = SgdConfig { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
        let step = arena.step(gpu, &config, 0.01)?;
        let name = format!("{} parameters in 200 tensors", arena.numel());
        s.add("sgd", "step", &name, step, true);
    }
    Ok(())
}

/// One line of a peer-comparison shape file (see `benches/peers/shapes.txt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerShape {
    /// Batch 1, no bias, dilation 1.
    Conv {
        ci: usize,
        co: usize,
        h: usize,
        w: usize,
        k: usize,
        stride: usize,
        pad: usize,
    },
    Matmul {
        m: usize,
        k: usize,
        n: usize,
    },
    /// Softmax along the last axis of a `[rows, len]` tensor.
    Softmax {
        rows: usize,
        len: usize,
    },
}

impl PeerShape {
    /// The name every peer uses for this case.
    pub fn name(&self) -> String {
        match *self {
            PeerShape::Conv { ci, co, h, w, k, stride, .. } => {
                format!("conv {ci}->{co} {k}x{k} s{stride} {h}x{w}")
            }
            PeerShape::Matmul { m, k, n } => format!("matmul {m}x{k}x{n}"),
            PeerShape::Softmax { rows, len } => format!("softmax {rows}x{len}"),
        }
    }
}

/// Parses a shape file: `conv CI CO H W K STRIDE PAD`, `matmul M K N`, `softmax ROWS LEN`,
/// one per line, `#` starts a comment. Errors name `source` and the line.
pub fn parse_peer_shapes(text: &str, source: &str) -> Result<Vec<PeerShape>> {
    let mut shapes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |what: &str| Error::Format {
            path: source.into(),
            what: format!("line {}: {what}: {line:?}", i + 1),
        };
        let mut words = line.split_whitespace();
        let op = words.next().unwrap_or("");
        let numbers: Vec<usize> = words
            .map(|w| w.parse::<usize>().ok().filter(|&v| v <= 1 << 16))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("sizes must be integers from 0 to 65536"))?;
        // Every number but a convolution's padding (the last) must be positive.
        let sizes = if op == "conv" { &numbers[..numbers.len().saturating_sub(1)] } else { &numbers[..] };
        if sizes.contains(&0) {
            return Err(bad("sizes must be positive"));
        }
        let shape = match (op, numbers.as_slice()) {
            ("conv", &[ci, co, h, w, k, stride, pad]) => PeerShape::Conv { ci, co, h, w, k, stride, pad },
            ("matmul", &[m, k, n]) => PeerShape::Matmul { m, k, n },
            ("softmax", &[rows, len]) => PeerShape::Softmax { rows, len },
            _ => {
                return Err(bad(
                    "expected `conv CI CO H W K STRIDE PAD`, `matmul M K N` or `softmax ROWS LEN`",
                ))
            }
        };
        shapes.push(shape);
    }
    if shapes.is_empty() {
        return Err(Error::Format { path: source.into(), what: "no shapes".into() });
    }
    Ok(shapes)
}

/// Each peer shape as two cases: `forward`, and `forward+backward` (the forward and the
/// gradients of every input, in one submission).
pub fn peer_suite(gpu: &Gpu, shapes: &[PeerShape]) -> Result<Vec<KernelCase>> {
    let mut s = Suite::new(gpu, "");
    for shape in shapes {
        let name = shape.name();
        let (forward, backward, memory_bound) = match *shape {
            PeerShape::Conv { ci, co, h, w, k, stride, pad } => {
                let spec = Conv2dSpec { stride: [stride; 2], padding: [pad; 2], dilation: [1; 2] };
                let (x, weight) = (s.t(&[1, ci, h, w], 1)?, s.t(&[co, ci, k, k], 2)?);
                let y_shape = conv2d::output_shape(&spec, x.shape(), &weight)?;
                let (y, gy) = (s.e(&y_shape)?, s.t(&y_shape, 3)?);
                let (gx, gw) = (s.e(x.shape())?, s.e(weight.shape())?);
                let forward = conv2d::forward(gpu, &spec, &x, &weight, None, &y)?.into_vec();
                let mut backward = conv2d::backward_input(gpu, &spec, &gy, &weight, &gx, false)?;
                backward.extend(conv2d::backward_weight(gpu, &spec, &x, &gy, &gw, false)?);
                (forward, backward, false)
            }
            PeerShape::Matmul { m, k, n } => {
                let mm = Matmul { batch: 1, m, k, n, trans_a: false, trans_b: false };
                let (a, b, c) = (s.t(&[m, k], 1)?, s.t(&[k, n], 2)?, s.e(&[m, n])?);
                let (ga, gb) = (s.e(&[m, k])?, s.e(&[k, n])?);
                let forward = mm.forward(gpu, None, &a, &b, &c)?;
                let backward = [
                    mm.backward_a(gpu, None, &c, &b, &ga, false)?,
                    mm.backward_b(gpu, None, &a, &c, &gb, false)?,
                ]
                .concat();
                (forward, backward, false)
            }
            PeerShape::Softmax { rows, len } => {
                let axis = Axis { outer: rows, len, inner: 1 };
                let (x, y, gx) = (s.t(&[rows, len], 1)?, s.e(&[rows, len])?, s.e(&[rows, len])?);
                let forward = softmax::forward(gpu, &x, axis, 1.0, &y)?;
                let backward = softmax::backward(gpu, &y, &x, axis, 1.0, &gx, false)?;
                (forward, backward, true)
            }
        };
        let kernel = name.split(' ').next().unwrap_or("").to_string();
        let mut both = forward.clone();
        both.extend(backward);
        s.add(&kernel, "forward", &name, forward, memory_bound);
        s.add(&kernel, "forward+backward", &name, both, memory_bound);
    }
    Ok(s.cases)
}

/// Device time of one kernel (entry point) summed over its dispatches in a profiled run.
#[derive(Clone, Debug)]
pub struct KernelShare {
    pub kernel: &'static str,
    pub ms: f64,
    /// Of the run's total device time.
    pub share: f64,
    pub dispatches: usize,
    pub cost: Cost,
}

/// A profiled run: total device time and each kernel's share, largest first.
#[derive(Clone, Debug)]
pub struct Profile {
    pub device_ms: f64,
    pub dispatches: usize,
    pub kernels: Vec<KernelShare>,
}

/// Runs `dispatches` once with a timestamp around each and sums the times per kernel.
pub fn profile(gpu: &Gpu, dispatches: &[&Dispatch]) -> Result<Profile> {
    let timings = gpu.profile(dispatches)?;
    let total_ns: f64 = timings.iter().map(|t| t.nanoseconds).sum();
    let mut kernels: Vec<KernelShare> = Vec::new();
    for (t, d) in timings.iter().zip(dispatches) {
        let i = match kernels.iter().position(|k| k.kernel == t.label) {
            Some(i) => i,
            None => {
                let share = KernelShare {
                    kernel: t.label,
                    ms: 0.0,
                    share: 0.0,
                    dispatches: 0,
                    cost: Cost::default(),
                };
                kernels.push(share);
                kernels.len() - 1
            }
        };
        let k = &mut kernels[i];
        k.ms += t.nanoseconds / 1e6;
        k.dispatches += 1;
        k.cost.flops += d.cost().flops;
        k.cost.bytes += d.cost().bytes;
    }
    for k in &mut kernels {
        k.share = k.ms * 1e6 / total_ns.max(1.0);
    }
    kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(Profile { device_ms: total_ns / 1e6, dispatches: dispatches.len(), kernels })
}

/// One head of the context-head comparison (`hrnet-ocr bench --context-heads`).
#[derive(Clone, Debug)]
pub struct HeadComparison {
    pub head: ContextHead,
    pub params: u64,
    pub flops: Flops,
    /// Planned device memory of the forward (eval graph: parameters, input, activations).
    pub planned_forward: u64,
    /// Of a forward and backward (training graph: also the activations kept for the
    /// backward, every gradient; no optimizer state).
    pub planned_train: u64,
    /// Mean milliseconds of the forward, and of the forward and backward, when timed.
    pub forward_ms: Option<f64>,
    pub train_ms: Option<f64>,
    /// Why a pass was not timed: the error that stopped it (PPM's and ASPP's forward +
    /// backward at batch 1, whose batch norms would take statistics of one value per
    /// channel, refused as PyTorch refuses them; an attention map beyond the adapter's
    /// storage binding).
    pub not_timed: Vec<String>,
}

/// Counts, plans and (on `gpu`, when given) times `head` at `size`: the eval forward, and the
/// training forward with the backward from an output gradient of ones, each three runs after
/// a warm-up. Parameters are the fresh start's ([`crate::train::initialise`]).
pub fn compare_context_head(
    gpu: Option<&Gpu>,
    head: ContextHead,
    size: ComparisonSize,
) -> Result<HeadComparison> {
    let (g, out) = heads::comparison_graph(head, size)?;
    let train = g.plan_training_memory(&[out]);
    let mut row = HeadComparison {
        head,
        params: g.parameter_count(),
        flops: g.flops(&[out]),
        planned_forward: g.plan_memory(&[out]).planned,
        planned_train: train.total() - train.momentum,
        forward_ms: None,
        train_ms: None,
        not_timed: Vec::new(),
    };
    let Some(gpu) = gpu else { return Ok(row) };
    for mode in [Mode::Eval, Mode::Train] {
        match time_context_head(gpu, head, size, mode) {
            Ok(ms) if mode == Mode::Eval => row.forward_ms = Some(ms),
            Ok(ms) => row.train_ms = Some(ms),
            Err(e) => row.not_timed.push(format!("{} not timed: {e}", pass_name(mode))),
        }
    }
    Ok(row)
}

fn pass_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Eval => "forward",
        Mode::Train => "forward + backward",
    }
}

/// Mean milliseconds of `head`'s pass in `mode` at `size` (see [`compare_context_head`]).
fn time_context_head(gpu: &Gpu, head: ContextHead, size: ComparisonSize, mode: Mode) -> Result<f64> {
    let ([n, c, h, w], _, k) = size.dims();
    let input =
        |len: usize| -> Vec<f32> { (0..len).map(|i| (i * 7919 % 2001) as f32 / 1000.0 - 1.0).collect() };
    let (g, out) = heads::comparison_graph(head, size)?;
    let graph = g.build(gpu, mode, &[out])?;
    crate::train::initialise(gpu, &graph)?;
    graph.set(gpu, "x", &input(n * c * h * w))?;
    if head.reads_regions() {
        graph.set(gpu, "regions", &input(n * k * h * w))?;
    }
    graph.forward(gpu)?;
    let mut dispatches = graph.forward_dispatches().to_vec();
    if mode == Mode::Train {
        graph.output_grad(0)?.fill(gpu, 1.0);
        dispatches.extend_from_slice(graph.backward_dispatches());
    }
    Ok(time(gpu, &dispatches, Duration::ZERO, Duration::ZERO)?.mean_ms)
}
