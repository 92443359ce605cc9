//! Half-precision inference kernels (the `*_f16` modules): each, on inputs that are exact
//! halves, must give its f32 twin's result rounded to a half. The f32 kernels are checked
//! against CPU references and PyTorch elsewhere; here the f16 storage is what is tested.
//! An adapter without SHADER_F16 runs the f32 twins only, and must refuse f16 tensors.

use crate::common::*;
use hrnet_ocr::gpu::Dispatch;
use hrnet_ocr::kernels::matmul::{self, MatmulKernel, Strided};
use hrnet_ocr::kernels::softmax::{self, Axis};
use hrnet_ocr::kernels::tuning::Tunable;
use hrnet_ocr::kernels::{concat, elementwise, metrics, ocr, resize};
use hrnet_ocr::tensor::DType;
use hrnet_ocr::{Result, Tensor};

/// Random exact halves.
fn halves(rng: &mut Rng, n: usize) -> Vec<f32> {
    rng.normals(n).iter().map(|&v| round_to_half(v)).collect()
}

/// Runs `op` over `inputs` (shape, data) into outputs of `out_shapes`, once with f32 tensors
/// and once with f16 ones; returns each output as (f32, f16) values.
fn both(
    inputs: &[(&[usize], &[f32])],
    out_shapes: &[&[usize]],
    op: impl Fn(&[Tensor], &[Tensor]) -> Result<Vec<Dispatch>>,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let run = |half: bool| {
        let ins: Vec<Tensor> =
            inputs.iter().map(|(s, d)| if half { upload_half(s, d) } else { upload(s, d) }).collect();
        let outs: Vec<Tensor> =
            out_shapes.iter().map(|s| if half { poisoned_half(s) } else { poisoned(s) }).collect();
        gpu().run(&op(&ins, &outs).expect("launch")).expect("run");
        outs.iter().map(download).collect::<Vec<_>>()
    };
    run(false).into_iter().zip(run(true)).collect()
}

fn check(what: &str, outputs: Vec<(Vec<f32>, Vec<f32>)>, slack: f32) {
    for (i, (f32s, f16s)) in outputs.into_iter().enumerate() {
        assert_rounded_to_half(&format!("{what} output {i}"), &f16s, &f32s, slack);
    }
}

fn has_f16() -> bool {
    if gpu().supports_f16() {
        return true;
    }
    let (x, y) = (upload_half(&[4], &[1.0; 4]), poisoned_half(&[4]));
    let err = elementwise::relu_forward(gpu(), &x, &y).map(drop).expect_err("f16 ran without SHADER_F16");
    assert!(err.to_string().contains("SHADER_F16"), "{err}");
    eprintln!("{}: no SHADER_F16, f16 kernels are refused: {err}", gpu().describe());
    false
}

#[test]
fn elementwise_resize_and_concat_store_halves() {
    if !has_f16() {
        return;
    }
    let mut rng = Rng::new(seed("half_elementwise"));
    for _ in 0..4 {
        let shape = [rng.range(1, 3), rng.range(1, 20), rng.range(1, 30), rng.range(1, 30)];
        let n: usize = shape.iter().product();
        let (a, b) = (halves(&mut rng, n), halves(&mut rng, n));
        let pair: [(&[usize], &[f32]); 2] = [(&shape, &a), (&shape, &b)];
        check(
            "relu",
            both(&pair[..1], &[&shape], |i, o| elementwise::relu_forward(gpu(), &i[0], &o[0])),
            0.0,
        );
        check(
            "add",
            both(&pair, &[&shape], |i, o| elementwise::add_forward(gpu(), &i[0], &i[1], &o[0])),
            0.0,
        );
        let add_relu = |i: &[Tensor], o: &[Tensor]| elementwise::add_relu_forward(gpu(), &i[0], &i[1], &o[0]);
        check("add relu", both(&pair, &[&shape], add_relu), 0.0);
        let out = [shape[0], shape[1], rng.range(1, 60), rng.range(1, 60)];
        let align = rng.coin();
        let up = |i: &[Tensor], o: &[Tensor]| resize::forward(gpu(), &i[0], &o[0], 0, align);
        check(&format!("resize {shape:?} to {out:?}"), both(&pair[..1], &[&out], up), 0.0);
        let wide = [shape[0], 2 * shape[1], shape[2], shape[3]];
        let cat = |i: &[Tensor], o: &[Tensor]| concat::concat_forward(gpu(), &[&i[0], &i[1]], &o[0]);
        check("concat", both(&pair, &[&wide], cat), 0.0);
    }
}

#[test]
fn softmax_and_products_store_halves() {
    if !has_f16() {
        return;
    }
    let mut rng = Rng::new(seed("half_softmax_products"));
    for i in 0..6 {
        // Short rows (one invocation each) and long ones (the chunked passes).
        let axis = if i % 2 == 0 {
            Axis { outer: rng.range(1, 20), len: rng.range(1, 40), inner: rng.range(1, 4) }
        } else {
            Axis { outer: rng.range(1, 3), len: rng.range(300, 5000), inner: 1 }
        };
        let shape = [axis.outer, axis.len, axis.inner];
        let x = halves(&mut rng, shape.iter().product());
        let soft = |i: &[Tensor], o: &[Tensor]| softmax::forward(gpu(), &i[0], axis, 0.7, &o[0]);
        check(&format!("softmax {axis:?}"), both(&[(&shape, &x)], &[&shape], soft), 0.0);
        let (batch, m, k, n) = (rng.range(1, 3), rng.range(1, 50), rng.range(1, 80), rng.range(1, 50));
        let (a, b) = (halves(&mut rng, batch * m * k), halves(&mut rng, batch * k * n));
        for kernel in MatmulKernel::ALL.iter().copied().filter(|k| k.runs_on(gpu())) {
            let product = |i: &[Tensor], o: &[Tensor]| {
                let (av, bv) = (Strided::row_major(m, k), Strided::row_major(n, k).t());
                matmul::product_with(gpu(), kernel, batch, (&i[0], av), (&i[1], bv), &o[0], false)
            };
            let inputs: [(&[usize], &[f32]); 2] = [(&[batch, m, k], &a), (&[batch, n, k], &b)];
            check(
                &format!("matmul {kernel:?} {batch}x{m}x{k}x{n}"),
                both(&inputs, &[&[batch, m, n]], product),
                1e-5,
            );
        }
    }
}

/// OCR's two context steps at f16: the region probabilities and the attention map are
/// softmax outputs, the f32 ones rounded to halves; the contexts sum products of those
/// rounded values, so they differ from f32 by a half's rounding carried through a sum.
#[test]
fn ocr_context_stores_halves() {
    if !has_f16() {
        return;
    }
    let mut rng = Rng::new(seed("half_ocr"));
    let (n, c, k, h, w) =
        (rng.range(1, 3), rng.range(4, 40), rng.range(2, 8), rng.range(2, 20), rng.range(2, 20));
    let (aux, feats) = (halves(&mut rng, n * k * h * w), halves(&mut rng, n * c * h * w));
    let gather =
        |i: &[Tensor], o: &[Tensor]| ocr::spatial_gather_forward(gpu(), None, &i[0], &i[1], &o[0], &o[1]);
    let inputs: [(&[usize], &[f32]); 2] = [(&[n, k, h, w], &aux), (&[n, c, h, w], &feats)];
    let [probs, context] =
        <[_; 2]>::try_from(both(&inputs, &[&[n, k, h, w], &[n, c, k, 1]], gather)).unwrap();
    assert_rounded_to_half("region probabilities", &probs.1, &probs.0, 0.0);
    assert_half_rounding_carried("region context", &context.1, &context.0);
    let (query, key, value) =
        (halves(&mut rng, n * c * h * w), halves(&mut rng, n * c * k), halves(&mut rng, n * c * k));
    let qt = upload(&[n, c, h, w], &query);
    let (kt, vt) = (upload(&[n, c, k, 1], &key), upload(&[n, c, k, 1], &value));
    let sim = ocr::attention_map_shape(&qt, &kt, &vt).unwrap();
    let attend = |i: &[Tensor], o: &[Tensor]| {
        ocr::object_attention_forward(gpu(), None, &i[0], &i[1], &i[2], &o[0], &o[1])
    };
    let inputs: [(&[usize], &[f32]); 3] =
        [(&[n, c, h, w], &query), (&[n, c, k, 1], &key), (&[n, c, k, 1], &value)];
    let [map, out] = <[_; 2]>::try_from(both(&inputs, &[&sim, &[n, c, h, w]], attend)).unwrap();
    // The map's logits are f16 too, rounded before the softmax: a half's rounding of them.
    assert_half_rounding_carried("attention map", &map.1, &map.0);
    assert_half_rounding_carried("attention output", &out.1, &out.0);
}

/// f16 results of several roundings against f32: finite, and within a few halves' rounding
/// (2^-11 relative) in L2.
fn assert_half_rounding_carried(what: &str, got: &[f32], want: &[f32]) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let err = rel_l2(got, want);
    assert!(err < 4e-3, "{what}: {err:.2e} from f32, more than a half's rounding carried");
}

/// Argmax of f16 scores picks what argmax of the same values at f32 picks; the f16 model
/// refuses tensors of the wrong type by name.
#[test]
fn argmax_reads_halves_and_mixed_types_are_refused() {
    if !has_f16() {
        return;
    }
    let mut rng = Rng::new(seed("half_argmax"));
    let shape = [2, rng.range(2, 12), rng.range(1, 40), rng.range(1, 40)];
    let scores = halves(&mut rng, shape.iter().product());
    let pick = |t: &Tensor| {
        let prediction = Tensor::empty_of(gpu(), &[2, shape[2], shape[3]], DType::U32).unwrap();
        gpu().run(&metrics::argmax(gpu(), t, &prediction).unwrap()).unwrap();
        prediction.to_vec_u32(gpu()).unwrap()
    };
    assert_eq!(pick(&upload_half(&shape, &scores)), pick(&upload(&shape, &scores)), "argmax of f16 scores");
    let (a, b, y) = (upload_half(&shape, &scores), upload(&shape, &scores), poisoned_half(&shape));
    let err = elementwise::add_forward(gpu(), &a, &b, &y)
        .map(drop)
        .expect_err("an f32 input to an f16 add")
        .to_string();
    assert!(err.contains("F16") && err.contains("F32"), "{err}");
}
