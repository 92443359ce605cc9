//! Tensors larger than a storage binding: every kernel family run on a device whose
//! bindings are capped at 16 KiB (`GpuOptions::max_storage_binding`), so the small tensors
//! here are bound in channel slabs or flat chunks, against the same launch on the full
//! device. Each family must split (more dispatches than unsplit) and give the same bits,
//! except where a split changes the order of a sum (said at the test).

use crate::common::*;
use hrnet_ocr::gpu::Dispatch;
use hrnet_ocr::kernels::batch_norm::{self, BatchNormGrads, BatchNormParams};
use hrnet_ocr::kernels::conv2d::{self, Conv2dSpec, Epilogue, Precision};
use hrnet_ocr::kernels::dropout::Dropout2d;
use hrnet_ocr::kernels::ocr::AttentionGrads;
use hrnet_ocr::kernels::tuning::{ConvForward, Tunable};
use hrnet_ocr::kernels::{concat, elementwise, metrics, ocr, resize};
use hrnet_ocr::tensor::DType;
use hrnet_ocr::{Gpu, GpuOptions, Tensor};
use std::sync::OnceLock;

/// The narrow device's binding limit: 4096 floats. Channel planes are 16x16 (1 KiB), so
/// slab starts meet any adapter's offset alignment (at most 256 bytes).
const LIMIT: u64 = 16 << 10;

fn narrow() -> &'static Gpu {
    static NARROW: OnceLock<Gpu> = OnceLock::new();
    NARROW.get_or_init(|| {
        let options = GpuOptions { max_storage_binding: Some(LIMIT), ..GpuOptions::from_env() };
        let g = Gpu::with_options(&options).expect("the narrow device");
        assert_eq!(g.limits().max_storage_buffer_binding_size, LIMIT);
        g
    })
}

/// Records launches on a device over its input and output tensors.
type Record<'a> = dyn Fn(&Gpu, &[Tensor], &[Tensor]) -> Vec<Dispatch> + 'a;

/// A tensor's initial contents: data, or NaN so an element never written fails the test.
enum Init {
    Data(Vec<f32>),
    Poison,
}

/// The outputs of `record` over `inputs` into `outputs`, tensors of `dtype` (f32, or f16
/// for half-precision inference), on one device, and how many dispatches it recorded.
fn run_on(
    gpu: &Gpu,
    dtype: DType,
    inputs: &[(&[usize], &[f32])],
    outputs: &[(&[usize], &Init)],
    record: &Record<'_>,
) -> (Vec<Vec<f32>>, usize) {
    let tensor = |shape: &[usize], data: &[f32]| {
        let t = Tensor::empty_of(gpu, shape, dtype).unwrap();
        t.write(gpu, data).unwrap();
        t
    };
    let ins: Vec<Tensor> = inputs.iter().map(|(s, d)| tensor(s, d)).collect();
    let outs: Vec<Tensor> = outputs
        .iter()
        .map(|(s, init)| match init {
            Init::Data(d) => tensor(s, d),
            Init::Poison => tensor(s, &vec![f32::NAN; numel(s)]),
        })
        .collect();
    let d = record(gpu, &ins, &outs);
    gpu.run(&d).unwrap();
    (outs.iter().map(|t| t.to_vec(gpu).unwrap()).collect(), d.len())
}

/// Runs `record` on both devices; asserts the narrow one split the work and returns both
/// results (full device first).
fn both(
    what: &str,
    inputs: &[(&[usize], &[f32])],
    outputs: &[(&[usize], &Init)],
    record: &Record<'_>,
) -> [Vec<Vec<f32>>; 2] {
    both_at(DType::F32, what, inputs, outputs, record)
}

/// [`both`] over tensors of `dtype`.
fn both_at(
    dtype: DType,
    what: &str,
    inputs: &[(&[usize], &[f32])],
    outputs: &[(&[usize], &Init)],
    record: &Record<'_>,
) -> [Vec<Vec<f32>>; 2] {
    let (wide, whole) = run_on(gpu(), dtype, inputs, outputs, record);
    let (narrow, split) = run_on(narrow(), dtype, inputs, outputs, record);
    assert!(split > whole, "{what}: {split} dispatches on the narrow device, {whole} unsplit");
    [wide, narrow]
}

/// Asserts every output is the same to the bit on both devices (and was written).
fn assert_same_bits(what: &str, [wide, narrow]: &[Vec<Vec<f32>>; 2]) {
    for (i, (w, n)) in wide.iter().zip(narrow).enumerate() {
        if let Some(j) = n.iter().position(|v| v.is_nan()) {
            panic!("{what}: output {i} element {j} was not written in slabs");
        }
        let differ = w.iter().zip(n).position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(differ, None, "{what}: output {i} differs in slabs (at the element shown)");
    }
}

const X: [usize; 4] = [2, 24, 16, 16];

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

#[test]
fn elementwise_kernels_run_in_flat_chunks_bit_identically() {
    let mut rng = Rng::new(seed("elementwise_kernels_run_in_flat_chunks"));
    let (a, b, gy, old) =
        (rng.normals(numel(&X)), rng.normals(numel(&X)), rng.normals(numel(&X)), rng.normals(numel(&X)));
    let ins: [(&[usize], &[f32]); 3] = [(&X, &a), (&X, &b), (&X, &gy)];
    let poison = Init::Poison;
    let acc = Init::Data(old);
    let outs: [(&[usize], &Init); 6] =
        [(&X, &poison), (&X, &poison), (&X, &poison), (&X, &acc), (&X, &poison), (&X, &acc)];
    let r = both("elementwise", &ins, &outs, &|g, i, o| {
        [
            elementwise::relu_forward(g, &i[0], &o[0]).unwrap(),
            elementwise::add_forward(g, &i[0], &i[1], &o[1]).unwrap(),
            elementwise::add_relu_forward(g, &i[0], &i[1], &o[2]).unwrap(),
            elementwise::relu_backward(g, &o[0], &i[2], &o[3], true).unwrap(),
            elementwise::add_relu_backward(g, &o[2], &i[2], (&o[4], false), (&o[5], true)).unwrap(),
        ]
        .concat()
    });
    assert_same_bits("relu, add, add_relu forward and backward", &r);
}

#[test]
fn resize_and_channel_copies_run_in_channel_slabs_bit_identically() {
    let mut rng = Rng::new(seed("resize_and_channel_copies_run_in_channel_slabs"));
    // Into channels 16..40 of a 40-channel concat, and the gradient back out of it.
    let (small, cat) = ([2, 24, 8, 8], [2, 40, 16, 16]);
    let (x, gcat, src) = (rng.normals(numel(&small)), rng.normals(numel(&cat)), rng.normals(numel(&X)));
    let old = Init::Data(rng.normals(numel(&small)));
    let (poison, copy_old) = (Init::Poison, Init::Data(rng.normals(numel(&X))));
    let ins: [(&[usize], &[f32]); 3] = [(&small, &x), (&cat, &gcat), (&X, &src)];
    for align_corners in [true, false] {
        let outs: [(&[usize], &Init); 4] =
            [(&cat, &poison), (&small, &old), (&cat, &poison), (&X, &copy_old)];
        let r = both("resize and copy", &ins, &outs, &|g, i, o| {
            [
                // The concat is poisoned: its other channels come from the copy.
                concat::copy_channels(g, (&i[2], 0), (&o[0], 0), 16, false).unwrap(),
                resize::forward(g, &i[0], &o[0], 16, align_corners).unwrap(),
                resize::backward(g, &i[1], 16, &o[1], align_corners, true).unwrap(),
                concat::copy_channels(g, (&i[2], 0), (&o[2], 0), 24, false).unwrap(),
                concat::copy_channels(g, (&i[2], 0), (&o[2], 24), 16, false).unwrap(),
                concat::copy_channels(g, (&i[1], 16), (&o[3], 0), 24, true).unwrap(),
            ]
            .concat()
        });
        assert_same_bits(&format!("resize (align_corners {align_corners}) and channel copies"), &r);
    }
}

#[test]
fn dropout_runs_in_channel_slabs_with_the_same_masks() {
    let mut rng = Rng::new(seed("dropout_runs_in_channel_slabs"));
    let (x, gy) = (rng.normals(numel(&X)), rng.normals(numel(&X)));
    let layer = Dropout2d { drop: 0.5, first_image: 0 };
    let (poison, old) = (Init::Poison, Init::Data(rng.normals(numel(&X))));
    let ins: [(&[usize], &[f32]); 2] = [(&X, &x), (&X, &gy)];
    let outs: [(&[usize], &Init); 2] = [(&X, &poison), (&X, &old)];
    let r = both("dropout", &ins, &outs, &|g, i, o| {
        let mut d = layer.forward(g, &i[0], &o[0], 7).unwrap();
        d.extend(layer.backward(g, &i[1], &o[1], 7, true).unwrap());
        d.into_iter().map(|s| s.dispatch).collect()
    });
    assert_same_bits("dropout forward and backward", &r);
    let dropped = r[1][0].chunks(256).filter(|plane| plane.iter().all(|v| *v == 0.0)).count();
    assert!(dropped > 8 && dropped < 40, "{dropped} of 48 channels dropped at p = 0.5");
}

#[test]
fn eval_batch_norm_runs_in_channel_slabs_bit_identically() {
    let mut rng = Rng::new(seed("eval_batch_norm_runs_in_channel_slabs"));
    let c = X[1];
    let x = rng.normals(numel(&X));
    let (gamma, beta, mean) = (rng.normals(c), rng.normals(c), rng.normals(c));
    let var: Vec<f32> = rng.normals(c).iter().map(|v| v.abs() + 0.1).collect();
    let ins: [(&[usize], &[f32]); 5] = [(&X, &x), (&[c], &gamma), (&[c], &beta), (&[c], &mean), (&[c], &var)];
    let poison = Init::Poison;
    let r = both("batch norm", &ins, &[(&X, &poison)], &|g, i, o| {
        let bn = BatchNormParams {
            gamma: &i[1],
            beta: &i[2],
            running_mean: &i[3],
            running_var: &i[4],
            eps: batch_norm::EPS,
            momentum: batch_norm::MOMENTUM,
        };
        batch_norm::forward_eval(g, &i[0], &bn, &o[0]).unwrap()
    });
    assert_same_bits("eval batch norm", &r);
}

/// A training batch norm of `gamma, beta` with `running mean, running var`.
fn layer<'a>(affine: &'a [Tensor], running: &'a [Tensor]) -> BatchNormParams<'a> {
    BatchNormParams {
        gamma: &affine[0],
        beta: &affine[1],
        running_mean: &running[0],
        running_var: &running[1],
        eps: batch_norm::EPS,
        momentum: batch_norm::MOMENTUM,
    }
}

/// Training batch norm in slabs: each image's channel slab sums whole chunks of the
/// layer's reduction (chunks never span images), so the statistics, the running averages,
/// the output and every gradient are those of the whole layer to the bit. Two chunks per
/// image here.
#[test]
fn training_batch_norm_runs_in_channel_slabs_bit_identically() {
    let mut rng = Rng::new(seed("training_batch_norm_runs_in_channel_slabs"));
    let dims = [2, 8, 48, 32];
    let c = dims[1];
    let x: Vec<f32> = rng.normals(numel(&dims)).iter().map(|v| 3.0 * v + 1.0).collect();
    let (gamma, beta, gy) = (rng.normals(c), rng.normals(c), rng.normals(numel(&dims)));
    let ins: [(&[usize], &[f32]); 4] = [(&dims, &x), (&[c], &gamma), (&[c], &beta), (&dims, &gy)];
    let (mean, var) = (Init::Data(rng.normals(c)), Init::Data(vec![1.0; c]));
    let (poison, old_gx, old_params) =
        (Init::Poison, Init::Data(rng.normals(numel(&dims))), Init::Data(rng.normals(c)));
    let saved = batch_norm::saved_shape(c);
    let outs: [(&[usize], &Init); 7] = [
        (&[c], &mean),
        (&[c], &var),
        (&saved, &poison),
        (&dims, &poison),
        (&dims, &old_gx),
        (&[c], &old_params),
        (&[c], &old_params),
    ];
    for summing in summings() {
        assert!(summing.runs_on(narrow()), "{summing:?} does not run on the narrow device");
        let r = both("training batch norm", &ins, &outs, &|g, i, o| {
            let bn = layer(&i[1..3], &o[0..2]);
            let mut d = batch_norm::forward_train_with(g, &i[0], &bn, &o[2], &o[3], summing).unwrap();
            let grads = BatchNormGrads {
                grad_x: &o[4],
                grad_gamma: &o[5],
                grad_beta: &o[6],
                accumulate_x: true,
                accumulate_params: true,
            };
            d.extend(batch_norm::backward_with(g, &i[0], &bn, &o[2], &i[3], &grads, summing).unwrap());
            d
        });
        assert_same_bits(&format!("training batch norm forward and backward, {summing:?} sums"), &r);
    }
    let recompute = both("batch norm recompute", &ins, &outs, &|g, i, o| {
        let bn = layer(&i[1..3], &o[0..2]);
        let mut d = batch_norm::forward_train(g, &i[0], &bn, &o[2], &o[3]).unwrap();
        d.extend(batch_norm::normalize_relu_train(g, &i[0], &bn, &o[2], &o[4]).unwrap());
        d
    });
    assert_same_bits("a BN-ReLU output recomputed", &recompute);
}

/// A convolution split by output channels is exact; one split by input channels sums each
/// slab, then adds the partial sums in order: the same terms in another order, so it
/// matches to rounding (relative L2 1e-6), not to the bit.
#[test]
fn convolutions_run_in_input_and_output_slabs() {
    let mut rng = Rng::new(seed("convolutions_run_in_input_and_output_slabs"));
    let c = X[1];
    let x = rng.normals(numel(&X));
    for variant in ConvForward::ALL.iter().copied().filter(|v| v.runs_on(narrow())) {
        // 3x3 to 16 channels with bias, folded batch norm and ReLU: the input (24 KiB an
        // item) is cut in two; the output (16 KiB an item) fits.
        let co = 16;
        let (w, bias) = (rng.normals(co * c * 9), rng.normals(co));
        let (gamma, beta, mean) = (rng.normals(co), rng.normals(co), rng.normals(co));
        let var: Vec<f32> = rng.normals(co).iter().map(|v| v.abs() + 0.1).collect();
        let ins: [(&[usize], &[f32]); 7] = [
            (&X, &x),
            (&[co, c, 3, 3], &w),
            (&[co], &bias),
            (&[co], &gamma),
            (&[co], &beta),
            (&[co], &mean),
            (&[co], &var),
        ];
        let y = [2, co, 16, 16];
        let poison = Init::Poison;
        let [wide, narrow] = both("conv 3x3", &ins, &[(&y, &poison)], &|g, i, o| {
            let bn = BatchNormParams {
                gamma: &i[3],
                beta: &i[4],
                running_mean: &i[5],
                running_var: &i[6],
                eps: batch_norm::EPS,
                momentum: batch_norm::MOMENTUM,
            };
            let epilogue = Epilogue { bias: Some(&i[2]), batch_norm: Some(bn), residual: None, relu: true };
            let spec = Conv2dSpec::square(1, 1, 1);
            conv2d::forward_with(g, &spec, &i[0], &i[1], &epilogue, Precision::F32, variant, &o[0])
                .unwrap()
                .into_vec()
        });
        assert_close(&format!("conv 3x3 in input slabs, {}", variant.name()), &narrow[0], &wide[0], 1e-6);
        assert!(narrow[0].contains(&0.0), "the ReLU came with the last slab");

        // 1x1 to 40 channels with a residual: input and output both cut.
        let co = 40;
        let (w, res) = (rng.normals(co * c), rng.normals(2 * co * 256));
        let y = [2, co, 16, 16];
        let ins: [(&[usize], &[f32]); 3] = [(&X, &x), (&[co, c, 1, 1], &w), (&y, &res)];
        let [wide, narrow] = both("conv 1x1", &ins, &[(&y, &poison)], &|g, i, o| {
            let epilogue = Epilogue { residual: Some(&i[2]), relu: true, ..Default::default() };
            let spec = Conv2dSpec::square(1, 0, 1);
            conv2d::forward_with(g, &spec, &i[0], &i[1], &epilogue, Precision::F32, variant, &o[0])
                .unwrap()
                .into_vec()
        });
        assert_close(
            &format!("conv 1x1 in input and output slabs, {}", variant.name()),
            &narrow[0],
            &wide[0],
            1e-6,
        );
    }
}

#[test]
fn the_spatial_gather_runs_in_feature_slabs_bit_identically() {
    let mut rng = Rng::new(seed("the_spatial_gather_runs_in_feature_slabs"));
    let (k, c) = (8, X[1]);
    let aux_shape = [2, k, 16, 16];
    let (aux, feats) = (rng.normals(numel(&aux_shape)), rng.normals(numel(&X)));
    let ins: [(&[usize], &[f32]); 2] = [(&aux_shape, &aux), (&X, &feats)];
    let poison = Init::Poison;
    let outs: [(&[usize], &Init); 2] = [(&aux_shape, &poison), (&[2, c, k, 1], &poison)];
    let r = both("spatial gather", &ins, &outs, &|g, i, o| {
        ocr::spatial_gather_forward(g, None, &i[0], &i[1], &o[0], &o[1]).unwrap()
    });
    assert_same_bits("spatial gather forward", &r);
}

/// The argmax over classes in slabs carries the running best: the same classes, ties to
/// the first class across a slab boundary included.
#[test]
fn argmax_runs_in_class_slabs_with_the_same_classes() {
    let mut rng = Rng::new(seed("argmax_runs_in_class_slabs"));
    let [n, k, h, w] = X;
    let mut scores = rng.normals(numel(&X));
    for p in (0..h * w).step_by(3) {
        // Classes 3 and 20 (two slabs apart) tie for the best at every third pixel.
        for item in 0..n {
            let at = |class: usize| (item * k + class) * h * w + p;
            scores[at(3)] = 10.0;
            scores[at(20)] = 10.0;
        }
    }
    let run = |gpu: &Gpu| {
        let s = Tensor::from_slice(gpu, &X, &scores).unwrap();
        let pred = Tensor::from_u32(gpu, &[n, h, w], &vec![u32::MAX; n * h * w]).unwrap();
        let d = metrics::argmax(gpu, &s, &pred).unwrap();
        gpu.run(&d).unwrap();
        (pred.to_vec_u32(gpu).unwrap(), d.len())
    };
    let ((wide, whole), (narrow, split)) = (run(gpu()), run(narrow()));
    assert!(split > whole, "argmax: {split} dispatches on the narrow device, {whole} unsplit");
    assert_eq!(narrow, wide);
    assert!(
        wide.chunks(h * w).all(|item| item.iter().step_by(3).all(|&c| c == 3)),
        "ties go to the first class"
    );
}

/// A tensor no slab can bind (one channel plane beyond the limit) is refused, naming it.
#[test]
fn a_channel_plane_beyond_a_binding_is_refused_naming_it() {
    let g = narrow();
    let big = [1, 2, 64, 128];
    let (x, y) = (Tensor::zeros(g, &big).unwrap(), Tensor::zeros(g, &big).unwrap());
    let e = resize::forward(g, &x, &y, 0, true).expect_err("a 32 KiB plane cannot be bound").to_string();
    assert!(e.contains("[1, 2, 64, 128]") && e.contains("max_storage_buffer_binding_size"), "{e}");
}

/// A product whose single matrix is beyond a binding cannot be cut between matrices: it is
/// refused, naming the tensor, the limit and its size.
#[test]
fn a_matrix_beyond_a_binding_is_refused_naming_it() {
    use hrnet_ocr::kernels::matmul::{self, Strided};
    let g = narrow();
    let (a, b) = (Tensor::zeros(g, &[64, 128]).unwrap(), Tensor::zeros(g, &[128, 4]).unwrap());
    let c = Tensor::zeros(g, &[64, 4]).unwrap();
    let e = matmul::product(
        g,
        None,
        1,
        (&a, Strided::row_major(64, 128)),
        (&b, Strided::row_major(128, 4)),
        &c,
        false,
    )
    .expect_err("a 32 KiB operand")
    .to_string();
    assert!(
        e.contains("[64, 128]") && e.contains("max_storage_buffer_binding_size") && e.contains("16384"),
        "{e}"
    );
}

/// Batched products beyond a binding run in ranges of the batch, each matrix as in one
/// launch: the forward and both gradients (one accumulating), with either operand
/// transposed, are the same bits.
#[test]
fn matrix_products_run_in_batch_ranges_bit_identically() {
    use hrnet_ocr::kernels::matmul::Matmul;
    let mut rng = Rng::new(seed("matrix_products_run_in_batch_ranges"));
    for (trans_a, trans_b) in [(false, false), (true, false), (false, true)] {
        let mm = Matmul { batch: 6, m: 32, k: 24, n: 16, trans_a, trans_b };
        let (a, b, c) = ([6, 32, 24], [6, 24, 16], [6, 32, 16]);
        let (ad, bd, gcd, old) =
            (rng.normals(numel(&a)), rng.normals(numel(&b)), rng.normals(numel(&c)), rng.normals(numel(&a)));
        let ins: [(&[usize], &[f32]); 3] = [(&a, &ad), (&b, &bd), (&c, &gcd)];
        let (poison, acc) = (Init::Poison, Init::Data(old));
        let outs: [(&[usize], &Init); 3] = [(&c, &poison), (&a, &acc), (&b, &poison)];
        let r = both("matmul", &ins, &outs, &|g, i, o| {
            [
                mm.forward(g, None, &i[0], &i[1], &o[0]).unwrap(),
                mm.backward_a(g, None, &i[2], &i[1], &o[1], true).unwrap(),
                mm.backward_b(g, None, &i[0], &i[2], &o[2], false).unwrap(),
            ]
            .concat()
        });
        assert_same_bits(&format!("matmul {mm:?}"), &r);
    }
}

/// Softmax beyond a binding runs in ranges of its outer axis with the whole axis's
/// chunking: short rows along a middle axis, and long rows summed in chunks (3000 terms:
/// three chunked, one tree), forward and backward (accumulating), the same bits with each
/// summing.
#[test]
fn softmax_runs_in_outer_ranges_bit_identically() {
    use hrnet_ocr::kernels::softmax::{self, Axis};
    let mut rng = Rng::new(seed("softmax_runs_in_outer_ranges"));
    for axis in [Axis { outer: 4, len: 19, inner: 100 }, Axis { outer: 6, len: 3000, inner: 1 }] {
        for summing in summings() {
            assert!(summing.runs_on(narrow()), "{summing:?} does not run on the narrow device");
            let shape = [axis.outer, axis.len, axis.inner];
            let (x, gy, old) =
                (rng.normals(numel(&shape)), rng.normals(numel(&shape)), rng.normals(numel(&shape)));
            let ins: [(&[usize], &[f32]); 2] = [(&shape, &x), (&shape, &gy)];
            let (poison, acc) = (Init::Poison, Init::Data(old));
            let outs: [(&[usize], &Init); 2] = [(&shape, &poison), (&shape, &acc)];
            let r = both("softmax", &ins, &outs, &|g, i, o| {
                let mut d = softmax::forward_with(g, &i[0], axis, 0.7, &o[0], summing).unwrap();
                d.extend(softmax::backward_with(g, &o[0], &i[1], axis, 0.7, (&o[1], true), summing).unwrap());
                d
            });
            assert_same_bits(&format!("softmax {axis:?} {summing:?}"), &r);
        }
    }
}

/// Asserts each output matches the full device's to rounding (relative L2 1e-6): the
/// slabs add partial sums in another order than the whole launch.
fn assert_rounding(what: &str, [wide, narrow]: &[Vec<Vec<f32>>; 2]) {
    for (i, (w, n)) in wide.iter().zip(narrow).enumerate() {
        assert_close(&format!("{what}: output {i}"), n, w, 1e-6);
    }
}

/// The convolution's gradients in slabs. The input gradient of a 3x3 convolution whose
/// output gradient fits is exact (each input slab sums every output channel in the same
/// order); over output slabs (the 1x1 to 40 channels), and the weight and bias gradients
/// (summed per image, the images added in order), match to rounding.
#[test]
fn convolution_gradients_run_in_slabs() {
    use hrnet_ocr::kernels::tuning::{ConvInputGrad, ConvWeightGrad};
    let mut rng = Rng::new(seed("convolution_gradients_run_in_slabs"));
    let c = X[1];
    let x = rng.normals(numel(&X));
    for (co, k, pad) in [(16, 3, 1), (40, 1, 0)] {
        let y = [2, co, 16, 16];
        let w_shape = [co, c, k, k];
        let (w, gy) = (rng.normals(numel(&w_shape)), rng.normals(numel(&y)));
        let (old_gx, old_gw, old_gb) =
            (rng.normals(numel(&X)), rng.normals(numel(&w_shape)), rng.normals(co));
        let ins: [(&[usize], &[f32]); 3] = [(&X, &x), (&w_shape, &w), (&y, &gy)];
        let spec = Conv2dSpec::square(1, pad, 1);
        for (input_variant, weight_variant) in [
            (ConvInputGrad::Narrow, ConvWeightGrad::Narrow),
            (ConvInputGrad::Wide, ConvWeightGrad::Wide),
            (ConvInputGrad::TiledK8, ConvWeightGrad::TiledK16),
        ] {
            for accumulate in [false, true] {
                let init = |v: &Vec<f32>| if accumulate { Init::Data(v.clone()) } else { Init::Poison };
                let (gx0, gw0, gb0) = (init(&old_gx), init(&old_gw), init(&old_gb));
                let outs: [(&[usize], &Init); 3] = [(&X, &gx0), (&w_shape, &gw0), (&[co], &gb0)];
                let what =
                    format!("conv {k}x{k} to {co} channels, {input_variant:?}, accumulate {accumulate}");
                let r = both(&what, &ins, &outs, &|g, i, o| {
                    let mut d =
                        conv2d::backward_input_with(g, &spec, &i[2], &i[1], &o[0], accumulate, input_variant)
                            .unwrap();
                    d.extend(
                        conv2d::backward_weight_with(
                            g,
                            &spec,
                            &i[0],
                            &i[2],
                            &o[1],
                            accumulate,
                            weight_variant,
                        )
                        .unwrap(),
                    );
                    d.extend(conv2d::backward_bias(g, &i[2], &o[2], accumulate).unwrap());
                    d
                });
                if co == 16 {
                    assert_same_bits(
                        &format!("{what} input gradient"),
                        &[vec![r[0][0].clone()], vec![r[1][0].clone()]],
                    );
                }
                assert_rounding(&what, &r);
            }
        }
    }
}

/// OCR's operators in key- or feature-channel slabs: the feature and value gradients and
/// the attention output per slab, the products summed over channels (the region-map and
/// attention-map gradients, the attention logits) added slab by slab in order.
#[test]
fn the_ocr_operators_run_in_channel_slabs() {
    let mut rng = Rng::new(seed("the_ocr_operators_run_in_channel_slabs"));
    let (k, c) = (8, X[1]);
    let aux_shape = [2, k, 16, 16];
    let kv = [2, c, k, 1];
    let sim = [2, 256, k];
    let (aux, feats, gc) = (rng.normals(numel(&aux_shape)), rng.normals(numel(&X)), rng.normals(numel(&kv)));
    let ins: [(&[usize], &[f32]); 3] = [(&aux_shape, &aux), (&X, &feats), (&kv, &gc)];
    let (poison, old) = (Init::Poison, Init::Data(rng.normals(numel(&X))));
    let outs: [(&[usize], &Init); 4] =
        [(&aux_shape, &poison), (&kv, &poison), (&aux_shape, &poison), (&X, &old)];
    let r = both("spatial gather", &ins, &outs, &|g, i, o| {
        let mut d = ocr::spatial_gather_forward(g, None, &i[0], &i[1], &o[0], &o[1]).unwrap();
        d.extend(
            ocr::spatial_gather_backward(g, None, &i[1], &o[0], &i[2], (&o[2], false), (&o[3], true))
                .unwrap(),
        );
        d
    });
    assert_same_bits(
        "spatial gather context and feature gradient",
        &[vec![r[0][1].clone(), r[0][3].clone()], vec![r[1][1].clone(), r[1][3].clone()]],
    );
    assert_rounding("spatial gather", &r);

    let (query, key, value, go) =
        (rng.normals(numel(&X)), rng.normals(numel(&kv)), rng.normals(numel(&kv)), rng.normals(numel(&X)));
    let ins: [(&[usize], &[f32]); 4] = [(&X, &query), (&kv, &key), (&kv, &value), (&X, &go)];
    let old_q = Init::Data(rng.normals(numel(&X)));
    let outs: [(&[usize], &Init); 5] =
        [(&sim, &poison), (&X, &poison), (&X, &old_q), (&kv, &poison), (&kv, &poison)];
    let r = both("object attention", &ins, &outs, &|g, i, o| {
        let mut d = ocr::object_attention_forward(g, None, &i[0], &i[1], &i[2], &o[0], &o[1]).unwrap();
        let grads = AttentionGrads { query: (&o[2], true), key: (&o[3], false), value: (&o[4], false) };
        d.extend(
            ocr::object_attention_backward(g, None, (&i[0], &i[1], &i[2]), &o[0], &i[3], &grads).unwrap(),
        );
        d
    });
    assert_rounding("object attention forward and backward", &r);
}

/// Cross entropy of every kind (plain, class-weighted, over all pixels, OHEM, weighted OHEM)
/// over logits beyond a binding: the passes over the logits run in class slabs of one image,
/// the per-pixel ones per image; the loss and the gradient (written, then accumulated) are
/// the same bits as unsplit, since each pixel's sums run in class order however the
/// classes are cut and the partial sums never span two images: with either summing of
/// them.
#[test]
fn cross_entropy_runs_in_class_slabs_bit_identically() {
    use hrnet_ocr::kernels::loss::{CrossEntropy, Ohem, Reduction};
    let mut rng = Rng::new(seed("cross_entropy_runs_in_class_slabs"));
    let [n, k, h, w] = X;
    let logits: Vec<f32> = rng.normals(numel(&X)).iter().map(|v| 3.0 * v).collect();
    let labels: Vec<u32> = (0..n * h * w)
        .map(|_| if rng.uniform() < 0.1 { 255 } else { (rng.uniform() * k as f64) as u32 })
        .collect();
    let weights: Vec<f32> = (0..k).map(|_| 0.5 + rng.uniform() as f32).collect();
    let accumulated = rng.normals(numel(&X));
    let ohem = Reduction::Ohem(Ohem { thresh: 0.7, min_kept: 100 });
    let kinds = [
        (Reduction::Mean, false),
        (Reduction::Mean, true),
        (Reduction::AllPixels, true),
        (ohem, false),
        (ohem, true),
    ];
    for ((reduction, weighted), summing) in
        kinds.into_iter().flat_map(|k| summings().into_iter().map(move |s| (k, s)))
    {
        assert!(summing.runs_on(narrow()), "{summing:?} does not run on the narrow device");
        let what = format!("{reduction:?}, weighted {weighted}, {summing:?} sums");
        let run = |gpu: &Gpu| {
            let lt = Tensor::from_slice(gpu, &X, &logits).unwrap();
            let yt = Tensor::from_u32(gpu, &[n, h, w], &labels).unwrap();
            let wt = Tensor::from_slice(gpu, &[k], &weights).unwrap();
            let ce = CrossEntropy { ignore_label: 255, class_weight: weighted.then_some(&wt), reduction };
            let pass = ce.forward_with(gpu, &lt, &yt, summing).unwrap();
            pass.loss.fill(gpu, f32::NAN);
            let (fresh, summed) = (
                Tensor::full(gpu, &X, f32::NAN).unwrap(),
                Tensor::from_slice(gpu, &X, &accumulated).unwrap(),
            );
            let mut d = pass.forward.clone();
            d.extend(ce.backward(gpu, &pass, &lt, &yt, 0.4, (&fresh, false)).unwrap());
            d.extend(ce.backward(gpu, &pass, &lt, &yt, 1.0, (&summed, true)).unwrap());
            gpu.run(&d).unwrap();
            let outputs = [&pass.loss, &fresh, &summed].map(|t| t.to_vec(gpu).unwrap());
            (outputs.to_vec(), d.len())
        };
        let ((wide, whole), (narrow_out, split)) = (run(gpu()), run(narrow()));
        assert!(split > whole, "{what}: {split} dispatches on the narrow device, {whole} unsplit");
        assert!(wide[0][0].is_finite() && wide[0][0] > 0.0, "{what}: loss {}", wide[0][0]);
        assert_same_bits(&what, &[wide, narrow_out]);
    }
}

/// Half-precision inference beyond a binding: f16 tensors (half the bytes, so the slab and
/// chunk cuts and their alignment are worked out in 2-byte elements) cut into flat chunks
/// and channel slabs must give the unsplit launch's bits; a convolution over input slabs
/// keeps its partial sums in its f16 output between slabs, so it differs from the unsplit
/// one by a half's rounding per slab, no more.
#[test]
fn f16_inference_runs_in_slabs_bit_identically() {
    if !gpu().supports_f16() {
        eprintln!("{}: no SHADER_F16, no f16 inference to split", gpu().describe());
        return;
    }
    let mut rng = Rng::new(seed("f16_inference_runs_in_slabs"));
    // 48 KiB at f16 (24 KiB an item): beyond the 16 KiB binding whole and per item.
    let x = [2, 96, 16, 16];
    let (a, b) = (rng.normals(numel(&x)), rng.normals(numel(&x)));
    let (small, cat) = ([2, 48, 8, 8], [2, 96, 16, 16]);
    let s = rng.normals(numel(&small));
    let (w, co) = (rng.normals(40 * 96), 40);
    let y = [2, co, 16, 16];
    let res = rng.normals(numel(&y));
    let poison = Init::Poison;
    let ins: [(&[usize], &[f32]); 4] = [(&x, &a), (&x, &b), (&small, &s), (&y, &res)];
    let outs: [(&[usize], &Init); 4] = [(&x, &poison), (&cat, &poison), (&y, &poison), (&x, &poison)];
    for variant in ConvForward::ALL.iter().copied().filter(|v| v.runs_on(narrow())) {
        let r = both_at(DType::F16, "f16 inference", &ins, &outs, &|g, i, o| {
            let epilogue = Epilogue { residual: Some(&i[3]), relu: true, ..Default::default() };
            let (spec, weight) =
                (Conv2dSpec::square(1, 0, 1), Tensor::from_slice(g, &[co, 96, 1, 1], &w).unwrap());
            [
                elementwise::add_relu_forward(g, &i[0], &i[1], &o[0]).unwrap(),
                concat::copy_channels(g, (&i[0], 0), (&o[1], 0), 48, false).unwrap(),
                resize::forward(g, &i[2], &o[1], 48, false).unwrap(),
                conv2d::forward_with(g, &spec, &i[0], &weight, &epilogue, Precision::F16, variant, &o[2])
                    .unwrap()
                    .into_vec(),
                concat::copy_channels(g, (&i[1], 0), (&o[3], 0), 96, false).unwrap(),
            ]
            .concat()
        });
        let [mut wide, mut narrow] = r;
        let (conv_wide, conv_narrow) = (wide.remove(2), narrow.remove(2));
        assert_same_bits("f16 add-relu, resize into a concat, copies", &[wide, narrow]);
        let what = format!("f16 1x1 conv in input slabs ({})", variant.name());
        assert!(conv_narrow.iter().all(|v| v.is_finite()), "{what}: unwritten or overflowed");
        let err = rel_l2(&conv_narrow, &conv_wide);
        assert!(err < 2e-3, "{what}: {err:.2e} from the unsplit conv, more than a half's rounding");
    }
}

#[test]
fn adaptive_pooling_runs_in_channel_slabs_bit_identically() {
    let mut rng = Rng::new(seed("adaptive_pooling_runs_in_channel_slabs"));
    let cells = [2, 24, 3, 5];
    let (x, gy) = (rng.normals(numel(&X)), rng.normals(numel(&cells)));
    let (poison, old) = (Init::Poison, Init::Data(rng.normals(numel(&X))));
    let ins: [(&[usize], &[f32]); 2] = [(&X, &x), (&cells, &gy)];
    let outs: [(&[usize], &Init); 2] = [(&cells, &poison), (&X, &old)];
    let r = both("adaptive pooling", &ins, &outs, &|g, i, o| {
        [
            resize::adaptive_avg_pool(g, &i[0], &o[0], 0).unwrap(),
            resize::adaptive_avg_pool_backward(g, &i[1], 0, &o[1], true).unwrap(),
        ]
        .concat()
    });
    assert_same_bits("adaptive pooling forward and accumulated backward", &r);
}

#[test]
fn the_learnt_scale_add_runs_in_flat_chunks_bit_identically() {
    let mut rng = Rng::new(seed("the_learnt_scale_add_runs_in_flat_chunks"));
    let (a, b, gy, gamma) =
        (rng.normals(numel(&X)), rng.normals(numel(&X)), rng.normals(numel(&X)), rng.normals(1));
    let ins: [(&[usize], &[f32]); 4] = [(&X, &a), (&X, &b), (&X, &gy), (&[1], &gamma)];
    let (poison, old) = (Init::Poison, Init::Data(rng.normals(1)));
    let outs: [(&[usize], &Init); 4] = [(&X, &poison), (&X, &poison), (&X, &poison), (&[1], &old)];
    let r = both("scaled add", &ins, &outs, &|g, i, o| {
        let mut d = elementwise::scaled_add_forward(g, &i[0], &i[3], &i[1], &o[0]).unwrap();
        let grads = ((&o[1], false), (&o[2], false), (&o[3], true));
        d.extend(
            elementwise::scaled_add_backward(g, (&i[0], &i[3]), &i[2], grads.0, grads.1, grads.2).unwrap(),
        );
        d
    });
    assert_same_bits("scaled add forward and backward (the scalar's gradient too)", &r);
}

#[test]
fn an_attention_whose_value_and_key_widths_differ_is_refused_beyond_a_binding() {
    // DANet's position attention: keys 2 channels, values 24; the values exceed a binding.
    let (q, v) = ([1, 2, 16, 16], [1, 24, 16, 16]);
    let t = |s: &[usize]| Tensor::from_slice(narrow(), s, &vec![0.5; numel(s)]).unwrap();
    let (query, value, out, sim) = (t(&q), t(&v), t(&v), t(&[1, 256, 256]));
    let Err(e) = ocr::attention_forward(narrow(), None, Some(1.0), (&query, &query, &value), &sim, &out)
    else {
        panic!("an attention of mismatched widths beyond a binding was recorded");
    };
    let e = e.to_string();
    for needle in ["24 value channels", "2 key channels", &LIMIT.to_string()] {
        assert!(e.contains(needle), "{needle} missing from: {e}");
    }
}
