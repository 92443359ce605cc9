//! Test support: the shared device, a seeded RNG, fixture loading, comparison with
//! diagnostics, and plain CPU references of every kernel (accumulating in f64).

use hrnet_ocr::data::SplitMix;
use hrnet_ocr::kernels::conv2d::Conv2dSpec;
use hrnet_ocr::{Gpu, GpuOptions, Tensor};
use std::collections::HashMap;
use std::future::Future;

/// One device for the whole test process: every lavapipe device starts its own threads.
static GPU: std::sync::OnceLock<Gpu> = std::sync::OnceLock::new();

/// The test device. No adapter is a failure (with the install hint), never a skip.
pub fn gpu() -> &'static Gpu {
    #[cfg(not(target_arch = "wasm32"))]
    return GPU.get_or_init(|| match Gpu::with_options(&GpuOptions::from_env()) {
        Ok(g) => {
            eprintln!("testing on {}", g.describe());
            g
        }
        Err(e) => panic!("{e}"),
    });
    #[cfg(target_arch = "wasm32")]
    GPU.get().expect("the browser suite opens the device first (open_gpu)")
}

/// Opens the test device in a browser, where it can only be awaited; once per page.
#[cfg(target_arch = "wasm32")]
pub async fn open_gpu() {
    if GPU.get().is_none() {
        let gpu = Gpu::open(&GpuOptions::default()).await.unwrap_or_else(|e| panic!("{e}"));
        wasm_bindgen_test::console_log!("testing on {}", gpu.describe());
        let _ = GPU.set(gpu);
    }
}

/// Awaits a future of a test body written once for both suites: natively it blocks here;
/// the browser suite awaits the bodies itself, and a blocking wait there fails.
pub fn wait<T>(body: impl Future<Output = T>) -> T {
    #[cfg(not(target_arch = "wasm32"))]
    return pollster::block_on(body);
    #[cfg(target_arch = "wasm32")]
    {
        drop(body);
        panic!("a blocking wait in the browser suite: await the test body instead");
    }
}

/// A file of the tiny test model under `tests/fixtures/model/`.
pub fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/model/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The tiny HRNet-OCR test configuration (`tiny_ocr.yaml`).
pub fn tiny_config() -> hrnet_ocr::model::Config {
    hrnet_ocr::model::Config::load(&fixture_path("tiny_ocr.yaml")).unwrap()
}

/// The tiny model's weights and running statistics (`tiny_weights.safetensors`).
pub fn tiny_weights() -> Vec<hrnet_ocr::model::weights::NamedTensor> {
    hrnet_ocr::model::weights::read(std::path::Path::new(&fixture_path("tiny_weights.safetensors"))).unwrap()
}

/// A fresh seed per run (printed, so a failure can be replayed with HRNET_TEST_SEED).
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("HRNET_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("{test}: seed {seed} (HRNET_TEST_SEED={seed} replays it)");
    seed
}

/// Test data from the library's SplitMix64 generator.
pub struct Rng(SplitMix);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [lo, hi] (inclusive).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// A tensor holding `data`, with the shape's element count checked.
pub fn upload(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::from_slice(gpu(), shape, data).expect("upload")
}

/// An output tensor filled with NaN, so any element a kernel fails to write fails the test.
pub fn poisoned(shape: &[usize]) -> Tensor {
    Tensor::full(gpu(), shape, f32::NAN).expect("allocate output")
}

pub fn download(t: &Tensor) -> Vec<f32> {
    t.to_vec(gpu()).expect("download")
}

/// [`download`] as a future, for test bodies that also run in the browser.
pub async fn fetch(t: &Tensor) -> Vec<f32> {
    t.read(gpu()).await.expect("download")
}

/// [`fetch`] of a u32 tensor.
pub async fn fetch_u32(t: &Tensor) -> Vec<u32> {
    t.read_u32(gpu()).await.expect("download")
}

/// Relative L2 error ||got - want|| / ||want|| (absolute when `want` is all zeros).
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (f64::from(g) - f64::from(w)).powi(2);
        norm += f64::from(w).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Asserts `got` matches `want` within `tol` relative L2 error; on failure prints the max
/// absolute difference and the first differing values.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, expected {}", got.len(), want.len());
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (expected {}): unwritten or overflowed", got[i], want[i]);
    }
    let err = rel_l2(got, want);
    if err <= tol {
        return;
    }
    let (imax, dmax) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0, 0.0f32), |best, (i, d)| if d > best.1 { (i, d) } else { best });
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let first: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| (*g - *w).abs() > 1e-6 * scale.max(1e-30))
        .take(6)
        .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
        .collect();
    panic!(
        "{what}: relative L2 error {err:.3e} > {tol:.0e}; max |diff| {dmax:.3e} at {imax} \
         (got {}, want {}); first differences: {}",
        got[imax],
        want[imax],
        first.join(", ")
    );
}

/// Tensors and per-case metadata of one fixture file under `tests/fixtures/`.
pub struct Fixture {
    name: String,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    labels: HashMap<String, Vec<u32>>,
    pub metadata: HashMap<String, String>,
}

impl Fixture {
    pub fn load(file: &str) -> Self {
        let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        #[cfg(not(target_arch = "wasm32"))]
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        #[cfg(target_arch = "wasm32")]
        let bytes = crate::embedded_fixture(file).to_vec();
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (mut tensors, mut labels) = (HashMap::new(), HashMap::new());
        for (name, view) in st.tensors() {
            let words = view.data().chunks_exact(4).map(|b| [b[0], b[1], b[2], b[3]]);
            match view.dtype() {
                safetensors::Dtype::F32 => {
                    tensors.insert(name, (view.shape().to_vec(), words.map(f32::from_le_bytes).collect()));
                }
                safetensors::Dtype::I32 => {
                    let values = words.map(|w| u32::try_from(i32::from_le_bytes(w)).expect("label >= 0"));
                    labels.insert(name, values.collect());
                }
                safetensors::Dtype::I64 => {
                    let values = view.data().chunks_exact(8).map(|b| {
                        u32::try_from(i64::from_le_bytes(b.try_into().expect("8 bytes"))).expect("label >= 0")
                    });
                    labels.insert(name, values.collect());
                }
                other => panic!("{path}: {name} is {other:?}"),
            }
        }
        Fixture {
            name: file.to_string(),
            tensors,
            labels,
            metadata: meta.metadata().clone().unwrap_or_default(),
        }
    }

    pub fn get(&self, name: &str) -> &[f32] {
        &self.entry(name).1
    }

    /// The names of the float tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn shape(&self, name: &str) -> &[usize] {
        &self.entry(name).0
    }

    fn entry(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.tensors.get(name).unwrap_or_else(|| panic!("{}: no tensor {name}", self.name))
    }

    /// An int32 tensor (labels) as u32.
    pub fn labels(&self, name: &str) -> &[u32] {
        self.labels.get(name).unwrap_or_else(|| panic!("{}: no int32 tensor {name}", self.name))
    }

    /// Case names (`case0`, `case1`, ...) with their integer parameters, in order.
    pub fn cases(&self) -> Vec<(String, Vec<usize>)> {
        self.cases_with("case")
            .into_iter()
            .map(|(k, v)| (k, v.iter().map(|&x| x as usize).collect()))
            .collect()
    }

    /// Cases named `{prefix}0`, `{prefix}1`, ... with their numeric parameters, in order.
    pub fn cases_with(&self, prefix: &str) -> Vec<(String, Vec<f64>)> {
        let mut cases: Vec<(String, Vec<f64>)> = self
            .metadata
            .iter()
            .filter(|(k, _)| k.strip_prefix(prefix).is_some_and(|n| n.parse::<usize>().is_ok()))
            .map(|(k, v)| {
                (k.clone(), v.split_whitespace().map(|s| s.parse().expect("numeric metadata")).collect())
            })
            .collect();
        cases.sort_by_key(|(k, _)| k[prefix.len()..].parse::<usize>().unwrap_or(usize::MAX));
        assert!(!cases.is_empty(), "{}: no {prefix} cases", self.name);
        cases
    }
}

// ---------------------------------------------------------------- CPU references

/// Sizes of one convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvDims {
    pub n: usize,
    pub ci: usize,
    pub h: usize,
    pub w: usize,
    pub co: usize,
    pub kh: usize,
    pub kw: usize,
    pub spec: Conv2dSpec,
}

impl ConvDims {
    pub fn out(&self) -> [usize; 2] {
        self.spec.output_size(self.h, self.w, self.kh, self.kw).expect("valid convolution")
    }
    pub fn x_shape(&self) -> [usize; 4] {
        [self.n, self.ci, self.h, self.w]
    }
    pub fn w_shape(&self) -> [usize; 4] {
        [self.co, self.ci, self.kh, self.kw]
    }
    pub fn y_shape(&self) -> [usize; 4] {
        let [ho, wo] = self.out();
        [self.n, self.co, ho, wo]
    }

    /// Calls `f(n, co, ci, oy, ox, ky, kx, iy, ix)` for every multiply-add of the convolution.
    fn each_tap(&self, mut f: impl FnMut([usize; 9])) {
        let [ho, wo] = self.out();
        let s = self.spec;
        for n in 0..self.n {
            for co in 0..self.co {
                for oy in 0..ho {
                    for ox in 0..wo {
                        for ci in 0..self.ci {
                            for ky in 0..self.kh {
                                let iy =
                                    (oy * s.stride[0] + ky * s.dilation[0]) as isize - s.padding[0] as isize;
                                if iy < 0 || iy >= self.h as isize {
                                    continue;
                                }
                                for kx in 0..self.kw {
                                    let ix = (ox * s.stride[1] + kx * s.dilation[1]) as isize
                                        - s.padding[1] as isize;
                                    if ix < 0 || ix >= self.w as isize {
                                        continue;
                                    }
                                    f([n, co, ci, oy, ox, ky, kx, iy as usize, ix as usize]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn xi(&self, n: usize, c: usize, y: usize, x: usize) -> usize {
        ((n * self.ci + c) * self.h + y) * self.w + x
    }
    fn yi(&self, n: usize, c: usize, y: usize, x: usize) -> usize {
        let [ho, wo] = self.out();
        ((n * self.co + c) * ho + y) * wo + x
    }
    fn wi(&self, co: usize, ci: usize, ky: usize, kx: usize) -> usize {
        ((co * self.ci + ci) * self.kh + ky) * self.kw + kx
    }

    pub fn forward(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![0f64; self.y_shape().iter().product()];
        self.each_tap(|[n, co, ci, oy, ox, ky, kx, iy, ix]| {
            y[self.yi(n, co, oy, ox)] +=
                f64::from(w[self.wi(co, ci, ky, kx)]) * f64::from(x[self.xi(n, ci, iy, ix)]);
        });
        let hw = y.len() / (self.n * self.co);
        y.iter()
            .enumerate()
            .map(|(i, v)| (v + bias.map_or(0.0, |b| f64::from(b[(i / hw) % self.co]))) as f32)
            .collect()
    }

    pub fn backward_input(&self, gy: &[f32], w: &[f32]) -> Vec<f32> {
        let mut gx = vec![0f64; self.x_shape().iter().product()];
        self.each_tap(|[n, co, ci, oy, ox, ky, kx, iy, ix]| {
            gx[self.xi(n, ci, iy, ix)] +=
                f64::from(w[self.wi(co, ci, ky, kx)]) * f64::from(gy[self.yi(n, co, oy, ox)]);
        });
        gx.into_iter().map(|v| v as f32).collect()
    }

    /// The L2 norm of every term the weight gradient sums.
    pub fn backward_weight_terms(&self, x: &[f32], gy: &[f32]) -> f64 {
        let mut sq = 0f64;
        self.each_tap(|[n, co, ci, oy, ox, _, _, iy, ix]| {
            sq += (f64::from(x[self.xi(n, ci, iy, ix)]) * f64::from(gy[self.yi(n, co, oy, ox)])).powi(2);
        });
        sq.sqrt()
    }

    pub fn backward_weight(&self, x: &[f32], gy: &[f32]) -> Vec<f32> {
        let mut gw = vec![0f64; self.w_shape().iter().product()];
        self.each_tap(|[n, co, ci, oy, ox, ky, kx, iy, ix]| {
            gw[self.wi(co, ci, ky, kx)] +=
                f64::from(x[self.xi(n, ci, iy, ix)]) * f64::from(gy[self.yi(n, co, oy, ox)]);
        });
        gw.into_iter().map(|v| v as f32).collect()
    }
}

/// Per-channel sums over N x H x W.
pub fn channel_sums(x: &[f32], [n, c, h, w]: [usize; 4], f: impl Fn(usize, f64) -> f64) -> Vec<f64> {
    let hw = h * w;
    let mut sums = vec![0f64; c];
    for (i, &v) in x.iter().enumerate().take(n * c * hw) {
        sums[(i / hw) % c] += f(i, f64::from(v));
    }
    sums
}

/// Training-mode batch norm: (y, new running mean, new running var, mean, inv std).
pub struct BnTrain {
    pub y: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
    pub mean: Vec<f64>,
    pub inv_std: Vec<f64>,
}

pub fn bn_train(x: &[f32], dims: [usize; 4], gamma: &[f32], beta: &[f32], rm: &[f32], rv: &[f32]) -> BnTrain {
    let [n, c, h, w] = dims;
    let count = (n * h * w) as f64;
    let mean: Vec<f64> = channel_sums(x, dims, |_, v| v).iter().map(|s| s / count).collect();
    let hw = h * w;
    let var: Vec<f64> =
        channel_sums(x, dims, |i, v| (v - mean[(i / hw) % c]).powi(2)).iter().map(|s| s / count).collect();
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
    let y = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / hw) % c;
            ((f64::from(v) - mean[ch]) * inv_std[ch] * f64::from(gamma[ch]) + f64::from(beta[ch])) as f32
        })
        .collect();
    let running_mean = (0..c).map(|ch| (0.9 * f64::from(rm[ch]) + 0.1 * mean[ch]) as f32).collect();
    let running_var =
        (0..c).map(|ch| (0.9 * f64::from(rv[ch]) + 0.1 * var[ch] * count / (count - 1.0)) as f32).collect();
    BnTrain { y, running_mean, running_var, mean, inv_std }
}

pub fn bn_eval(x: &[f32], dims: [usize; 4], gamma: &[f32], beta: &[f32], rm: &[f32], rv: &[f32]) -> Vec<f32> {
    let [_, c, h, w] = dims;
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / (h * w)) % c;
            let inv = 1.0 / (f64::from(rv[ch]) + 1e-5).sqrt();
            ((f64::from(v) - f64::from(rm[ch])) * inv * f64::from(gamma[ch]) + f64::from(beta[ch])) as f32
        })
        .collect()
}

/// Training-mode batch-norm backward: (grad_x, grad_gamma, grad_beta).
pub fn bn_backward(x: &[f32], dims: [usize; 4], gamma: &[f32], gy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let [n, c, h, w] = dims;
    let hw = h * w;
    let count = (n * hw) as f64;
    let dummy = vec![0.0; c];
    let BnTrain { mean, inv_std, .. } = bn_train(x, dims, gamma, &dummy, &dummy, &dummy);
    let x_hat = |i: usize| (f64::from(x[i]) - mean[(i / hw) % c]) * inv_std[(i / hw) % c];
    let sum_g = channel_sums(gy, dims, |_, g| g);
    let sum_gx = channel_sums(gy, dims, |i, g| g * x_hat(i));
    let gx = gy
        .iter()
        .enumerate()
        .map(|(i, &g)| {
            let ch = (i / hw) % c;
            (f64::from(gamma[ch])
                * inv_std[ch]
                * (f64::from(g) - sum_g[ch] / count - x_hat(i) * sum_gx[ch] / count)) as f32
        })
        .collect();
    (gx, sum_gx.iter().map(|&v| v as f32).collect(), sum_g.iter().map(|&v| v as f32).collect())
}

/// `[outer, len, inner]` softmax of `scale * x` along the middle axis, in f64.
pub fn softmax_ref(x: &[f32], [outer, len, inner]: [usize; 3], scale: f64) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * len + j) * inner + i;
            let m = (0..len).map(|j| scale * f64::from(x[at(j)])).fold(f64::MIN, f64::max);
            let s: f64 = (0..len).map(|j| (scale * f64::from(x[at(j)]) - m).exp()).sum();
            for j in 0..len {
                y[at(j)] = ((scale * f64::from(x[at(j)]) - m).exp() / s) as f32;
            }
        }
    }
    y
}

/// Softmax backward from the output `y`.
pub fn softmax_backward_ref(y: &[f32], gy: &[f32], [outer, len, inner]: [usize; 3], scale: f64) -> Vec<f32> {
    let mut gx = vec![0f32; y.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * len + j) * inner + i;
            let dot: f64 = (0..len).map(|j| f64::from(gy[at(j)]) * f64::from(y[at(j)])).sum();
            for j in 0..len {
                gx[at(j)] = (scale * f64::from(y[at(j)]) * (f64::from(gy[at(j)]) - dot)) as f32;
            }
        }
    }
    gx
}

/// Row-major batched product `[b, m, k] @ [b, k, n]`, operands given as closures over
/// (batch, row, col) so transposes need no copies.
pub fn matmul_ref(
    (b, m, k, n): (usize, usize, usize, usize),
    a: impl Fn(usize, usize, usize) -> f32,
    bm: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    let mut c = vec![0f32; b * m * n];
    for t in 0..b {
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|kk| f64::from(a(t, i, kk)) * f64::from(bm(t, kk, j))).sum();
                c[(t * m + i) * n + j] = s as f32;
            }
        }
    }
    c
}

/// Like [`assert_close`] for results that are sums of terms whose norm is `terms_norm`: a
/// sum that cancels far below its terms carries f32 rounding of the terms' size, which no
/// f32 kernel avoids, so the error is measured against the larger of the two norms.
pub fn assert_close_to_terms(what: &str, got: &[f32], want: &[f32], terms_norm: f64, tol: f64) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let diff: f64 = got.iter().zip(want).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = want.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    let scale = norm.max(terms_norm);
    assert!(
        diff <= tol * scale,
        "{what}: error {diff:.3e} > {tol:.0e} x {scale:.3e} (result norm {norm:.3e}, terms {terms_norm:.3e})"
    );
}

/// The L2 norm of `f(i, v)` over every element, summed per channel then combined: the size
/// of the terms a per-channel reduction adds up.
pub fn channel_terms_norm(x: &[f32], dims: [usize; 4], f: impl Fn(usize, f64) -> f64) -> f64 {
    channel_sums(x, dims, |i, v| f(i, v).powi(2)).iter().sum::<f64>().sqrt()
}

/// PyTorch's bilinear source taps of output index `o` (and OpenCV's INTER_LINEAR on floats
/// without `align_corners`): (i0, i1, weight of i1).
pub fn bilinear_taps(o: usize, len_in: usize, len_out: usize, align_corners: bool) -> (usize, usize, f64) {
    let src = if align_corners {
        if len_out > 1 {
            o as f64 * (len_in - 1) as f64 / (len_out - 1) as f64
        } else {
            0.0
        }
    } else {
        ((o as f64 + 0.5) * len_in as f64 / len_out as f64 - 0.5).max(0.0)
    };
    let i0 = (src.floor() as usize).min(len_in - 1);
    (i0, (i0 + 1).min(len_in - 1), src - i0 as f64)
}

/// `v` rounded to the nearest f16 value (ties to even), as an f32; `v` within f16's range.
pub fn round_to_half(v: f32) -> f32 {
    (v / half_quantum(v)).round_ties_even() * half_quantum(v)
}

/// The spacing of f16 values around `v`: 2^-24 below 2^-14 (subnormals), else 2^-10 of
/// `v`'s power of two.
pub fn half_quantum(v: f32) -> f32 {
    if v.abs() < 2f32.powi(-14) {
        2f32.powi(-24)
    } else {
        2f32.powi(v.abs().log2().floor() as i32 - 10)
    }
}

/// An f16 tensor holding `data` rounded to halves.
pub fn upload_half(shape: &[usize], data: &[f32]) -> Tensor {
    let t = Tensor::empty_of(gpu(), shape, hrnet_ocr::tensor::DType::F16).expect("allocate f16");
    t.write(gpu(), data).expect("upload f16");
    t
}

/// An f16 output tensor filled with NaN.
pub fn poisoned_half(shape: &[usize]) -> Tensor {
    let t = Tensor::empty_of(gpu(), shape, hrnet_ocr::tensor::DType::F16).expect("allocate f16");
    t.fill(gpu(), f32::NAN);
    t
}

/// f16 results against f32 ones computed from the same (exact-half) inputs: each must be
/// the f32 value rounded to a half, within one half's spacing (the f32 sums may round
/// differently near a tie) plus `slack` of the f32 values' RMS (sums of terms that cancel).
pub fn assert_rounded_to_half(what: &str, got: &[f32], want: &[f32], slack: f32) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, expected {}", got.len(), want.len());
    let rms = (want.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / want.len() as f64).sqrt() as f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let bound = half_quantum(w) + slack * rms;
        assert!(
            g.is_finite() && (g - w).abs() <= bound,
            "{what}: element {i} is {g}, f32 gives {w} (bound {bound:e})"
        );
    }
}

/// The reductions' summings the test adapter runs: the chunked sums and the tree always
/// (every test adapter allows 64 invocations a workgroup), the subgroup tree where it has
/// SUBGROUP.
pub fn summings() -> Vec<hrnet_ocr::kernels::sums::Summing> {
    use hrnet_ocr::kernels::sums::Summing;
    assert!(Summing::Tree.runs_on(gpu()), "the tree does not run on {}", gpu().describe());
    Summing::ALL.into_iter().filter(|s| s.runs_on(gpu())).collect()
}

/// Whether the test adapter runs the subgroup summing; says so when it does not (it then
/// runs the tree itself, which every test of the tree covers).
pub fn has_subgroup_summing() -> bool {
    let has = summings().contains(&hrnet_ocr::kernels::sums::Summing::Subgroup);
    if !has {
        eprintln!("{}: no SUBGROUP, the subgroup summing runs the tree itself", gpu().describe());
    }
    has
}
