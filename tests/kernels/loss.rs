use crate::common::*;
use hrnet_ocr::data::image::check_labels;
use hrnet_ocr::kernels::loss::{CrossEntropy, Ohem, Reduction};
use hrnet_ocr::kernels::sums::Summing;
use hrnet_ocr::Tensor;

const TOL: f64 = 1e-5;
const IGNORE: u32 = 255;

/// (loss, grad_logits) on the device, the pixel chunks summed by `summing`; the gradient
/// is scaled by `grad_scale`.
async fn run(
    dims: [usize; 4],
    logits: &[f32],
    labels: &[u32],
    weight: Option<&[f32]>,
    (reduction, summing): (Reduction, Summing),
    grad_scale: f32,
) -> (f32, Vec<f32>) {
    let gpu = gpu();
    assert!(summing.runs_on(gpu), "{summing:?} does not run on the test adapter");
    let [n, k, h, w] = dims;
    let lt = upload(&dims, logits);
    let yt = Tensor::from_u32(gpu, &[n, h, w], labels).unwrap();
    let wt = weight.map(|w| upload(&[k], w));
    let ce = CrossEntropy { ignore_label: IGNORE, class_weight: wt.as_ref(), reduction };
    let pass = ce.forward_with(gpu, &lt, &yt, summing).unwrap();
    pass.loss.fill(gpu, f32::NAN);
    let grad = poisoned(&dims);
    let backward = ce.backward(gpu, &pass, &lt, &yt, grad_scale, (&grad, false)).unwrap();
    gpu.run(pass.forward.iter().chain(&backward)).unwrap();
    (fetch(&pass.loss).await[0], fetch(&grad).await)
}

/// The CPU reference: (loss, grad) for each reduction of the cross entropy, in f64.
fn reference(
    dims: [usize; 4],
    logits: &[f32],
    labels: &[u32],
    weight: Option<&[f32]>,
    reduction: Reduction,
    grad_scale: f64,
) -> (f32, Vec<f32>) {
    let [n, k, h, w] = dims;
    let hw = h * w;
    let at = |px: usize, c: usize| f64::from(logits[((px / hw) * k + c) * hw + px % hw]);
    let softmax = |px: usize| {
        let m = (0..k).map(|c| at(px, c)).fold(f64::MIN, f64::max);
        let s: f64 = (0..k).map(|c| (at(px, c) - m).exp()).sum();
        (0..k).map(|c| (at(px, c) - m).exp() / s).collect::<Vec<f64>>()
    };
    let valid: Vec<usize> = (0..n * hw).filter(|&px| labels[px] != IGNORE).collect();
    let wt = |px: usize| weight.map_or(1.0, |w| f64::from(w[labels[px] as usize]));
    // (pixel, coefficient) pairs and the denominator.
    let (terms, denom): (Vec<(usize, f64)>, f64) = match reduction {
        Reduction::Mean => {
            (valid.iter().map(|&px| (px, wt(px))).collect(), valid.iter().map(|&px| wt(px)).sum())
        }
        Reduction::AllPixels => (valid.iter().map(|&px| (px, wt(px))).collect(), (n * hw) as f64),
        Reduction::Ohem(o) => {
            let prob = |px: usize| softmax(px)[labels[px] as usize] as f32;
            let mut sorted: Vec<f32> = valid.iter().map(|&px| prob(px)).collect();
            sorted.sort_by(f32::total_cmp);
            let kept: Vec<(usize, f64)> = if sorted.is_empty() {
                Vec::new()
            } else {
                let threshold = sorted[o.min_kept.min(sorted.len() - 1)].max(o.thresh);
                valid.iter().filter(|&&px| prob(px) < threshold).map(|&px| (px, wt(px))).collect()
            };
            let count = kept.len() as f64;
            (kept, count)
        }
    };
    let mut grad = vec![0f32; logits.len()];
    if denom == 0.0 {
        return (0.0, grad);
    }
    let mut total = 0.0;
    for &(px, coef) in &terms {
        let p = softmax(px);
        let y = labels[px] as usize;
        total += coef * -p[y].ln();
        for (c, pc) in p.iter().enumerate() {
            let onehot = if c == y { 1.0 } else { 0.0 };
            grad[((px / hw) * k + c) * hw + px % hw] = (grad_scale * coef / denom * (pc - onehot)) as f32;
        }
    }
    ((total / denom) as f32, grad)
}

fn check(what: &str, got: (f32, Vec<f32>), want: (f32, &[f32])) {
    assert_close(&format!("{what} loss"), &[got.0], &[want.0], TOL);
    assert_close(&format!("{what} grad"), &got.1, want.1, TOL);
}

#[test]
fn cross_entropy_matches_pytorch_fixtures() {
    wait(cross_entropy_matches_pytorch_fixtures_body());
}

/// The body of [`cross_entropy_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn cross_entropy_matches_pytorch_fixtures_body() {
    let f = Fixture::load("losses.safetensors");
    for (case, p) in f.cases_with("ce") {
        let dims = [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize];
        let g = |t: &str| format!("{case}.{t}");
        let weight = (p[4] == 1.0).then(|| f.get(&g("weight")));
        for summing in summings() {
            let (logits, labels) = (f.get(&g("logits")), f.labels(&g("label")));
            let got = run(dims, logits, labels, weight, (Reduction::Mean, summing), 1.0).await;
            check(
                &format!("{case} {dims:?} {summing:?}"),
                got,
                (f.get(&g("loss"))[0], f.get(&g("grad_logits"))),
            );
        }
    }
}

#[test]
fn ohem_matches_pytorch_fixtures() {
    wait(ohem_matches_pytorch_fixtures_body());
}

/// The body of [`ohem_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn ohem_matches_pytorch_fixtures_body() {
    let f = Fixture::load("losses.safetensors");
    for (case, p) in f.cases_with("ohem") {
        let dims = [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize];
        let ohem = Ohem { thresh: p[4] as f32, min_kept: p[5] as usize };
        let g = |t: &str| format!("{case}.{t}");
        let weight = (p[6] == 1.0).then(|| f.get(&g("weight")));
        let labels = f.labels(&g("label"));
        for summing in summings() {
            let (l, grad) =
                run(dims, f.get(&g("logits")), labels, weight, (Reduction::Ohem(ohem), summing), 1.0).await;
            // The kept set is exactly PyTorch's: the gradient is non-zero at kept pixels only.
            let [_, k, h, w] = dims;
            for (px, &kept) in f.get(&g("kept")).iter().enumerate() {
                let base = (px / (h * w)) * k * h * w + px % (h * w);
                let touched = (0..k).any(|c| grad[base + c * h * w] != 0.0);
                assert_eq!(
                    touched,
                    kept == 1.0,
                    "{case}: pixel {px} kept {kept} but gradient touched {touched}"
                );
            }
            check(
                &format!("{case} {dims:?} {ohem:?} {summing:?}"),
                (l, grad),
                (f.get(&g("loss"))[0], f.get(&g("grad_logits"))),
            );
        }
    }
}

#[test]
fn losses_match_cpu_on_random_shapes() {
    let mut rng = Rng::new(seed("losses_match_cpu_on_random_shapes"));
    let (mut compared_ohem, mut skipped) = (0, 0);
    for i in 0..40 {
        let dims = [rng.range(1, 2), rng.range(2, 20), rng.range(1, 30), rng.range(1, 30)];
        let [n, k, h, w] = dims;
        let logits: Vec<f32> = rng.normals(n * k * h * w).iter().map(|v| 3.0 * v).collect();
        let ignored = rng.uniform();
        let labels: Vec<u32> = (0..n * h * w)
            .map(|_| if rng.uniform() < ignored * 0.5 { IGNORE } else { rng.range(0, k - 1) as u32 })
            .collect();
        check_labels(&labels, k, IGNORE).unwrap();
        let weight: Option<Vec<f32>> =
            (i % 2 == 0).then(|| (0..k).map(|_| 0.5 + rng.uniform() as f32).collect());
        let ohem = Ohem { thresh: rng.uniform() as f32, min_kept: rng.range(0, n * h * w) };
        let reduction = [Reduction::Mean, Reduction::AllPixels, Reduction::Ohem(ohem)][i % 3];
        // Which pixels OHEM keeps is a comparison with a threshold probability; where
        // another pixel's probability lies within f32 rounding of it, the kept set is not
        // defined by the f32 computation, so such draws are not compared (the PyTorch
        // fixtures check exact ties).
        let is_ohem = matches!(reduction, Reduction::Ohem(_));
        if is_ohem && !ohem_boundary_is_clear(dims, &logits, &labels, ohem) {
            skipped += 1;
            continue;
        }
        compared_ohem += usize::from(is_ohem);
        // Each summing in turn, with each reduction (i / 3 alternates them).
        let summing = summings()[(i / 3) % summings().len()];
        check_random(dims, (&logits, &labels), weight.as_deref(), (reduction, summing), [1.0, 0.4][i % 2]);
    }
    assert!(
        skipped <= compared_ohem,
        "{skipped} OHEM draws with an unclear boundary, {compared_ohem} compared"
    );
    // Images long enough that the tree sums each in several chunks (the last one shorter).
    // OHEM's threshold above every probability keeps every valid pixel, a clear boundary.
    let all_kept = Reduction::Ohem(Ohem { thresh: 1.5, min_kept: 0 });
    for reduction in [Reduction::Mean, Reduction::AllPixels, all_kept] {
        for summing in summings() {
            let (dims, logits, labels, weight) = several_tree_chunks(&mut rng);
            check_random(dims, (&logits, &labels), Some(&weight), (reduction, summing), 0.7);
        }
    }
}

/// The loss and gradient of random logits and labels against the CPU reference.
fn check_random(
    dims: [usize; 4],
    (logits, labels): (&[f32], &[u32]),
    weight: Option<&[f32]>,
    (reduction, summing): (Reduction, Summing),
    scale: f32,
) {
    let got = wait(run(dims, logits, labels, weight, (reduction, summing), scale));
    let want = reference(dims, logits, labels, weight, reduction, f64::from(scale));
    let what = format!("{dims:?} {reduction:?} {summing:?} weighted {}", weight.is_some());
    check(&what, got, (want.0, &want.1));
}

/// Whether no valid pixel's target probability lies within 1e-4 (relative) of the OHEM
/// threshold, other than the pixel whose probability is the threshold.
fn ohem_boundary_is_clear(dims: [usize; 4], logits: &[f32], labels: &[u32], o: Ohem) -> bool {
    let [n, k, h, w] = dims;
    let hw = h * w;
    let prob = |px: usize| {
        let at = |c: usize| f64::from(logits[((px / hw) * k + c) * hw + px % hw]);
        let m = (0..k).map(at).fold(f64::MIN, f64::max);
        (at(labels[px] as usize) - m).exp() / (0..k).map(|c| (at(c) - m).exp()).sum::<f64>()
    };
    let mut probs: Vec<f64> = (0..n * hw).filter(|&px| labels[px] != IGNORE).map(prob).collect();
    if probs.is_empty() {
        return true;
    }
    probs.sort_by(f64::total_cmp);
    let kth = probs[o.min_kept.min(probs.len() - 1)];
    let threshold = kth.max(f64::from(o.thresh));
    let near = probs.iter().filter(|&&p| (p - threshold).abs() <= 1e-4 * threshold).count();
    near <= usize::from(kth >= f64::from(o.thresh))
}

/// Every pixel ignored: loss 0 and gradient 0, never NaN, for every reduction.
#[test]
fn all_ignored_gives_zero_loss_and_gradient() {
    let mut rng = Rng::new(seed("all_ignored"));
    let dims = [2, 5, 7, 3];
    let logits = rng.normals(dims.iter().product());
    let labels = vec![IGNORE; 2 * 7 * 3];
    for reduction in
        [Reduction::Mean, Reduction::AllPixels, Reduction::Ohem(Ohem { thresh: 0.7, min_kept: 10 })]
    {
        for summing in summings() {
            let (l, grad) = wait(run(dims, &logits, &labels, None, (reduction, summing), 1.0));
            assert_eq!(l, 0.0, "{reduction:?} {summing:?}");
            assert!(grad.iter().all(|&g| g == 0.0), "{reduction:?} {summing:?}: non-zero gradient");
        }
    }
}

#[test]
fn out_of_range_labels_are_refused_on_the_host() {
    let e = check_labels(&[0, 3, 19, 255], 19, IGNORE).unwrap_err().to_string();
    assert!(e.contains("label 19") && e.contains("pixel 2"), "{e}");
}

/// Where the adapter has SUBGROUP, the subgroup summing gives the tree's bits: the loss
/// and its gradient, plain and weighted, over images the tree sums in several chunks.
#[test]
fn subgroup_summing_gives_the_trees_bits() {
    if !has_subgroup_summing() {
        return;
    }
    let (dims, logits, labels, weight) = several_tree_chunks(&mut Rng::new(seed("loss_subgroup_bits")));
    for (reduction, weight) in [(Reduction::Mean, None), (Reduction::AllPixels, Some(&weight[..]))] {
        let tree = wait(run(dims, &logits, &labels, weight, (reduction, Summing::Tree), 0.7));
        let subgroup = wait(run(dims, &logits, &labels, weight, (reduction, Summing::Subgroup), 0.7));
        assert_eq!(
            tree.0.to_bits(),
            subgroup.0.to_bits(),
            "{reduction:?}: the subgroup loss differs from the tree's"
        );
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert!(bits(&tree.1) == bits(&subgroup.1), "{reduction:?}: the subgroup gradient differs");
    }
}

/// Random logits, labels (a fifth ignored) and class weights of images the tree sums in
/// several chunks: an odd width, so no image is a whole number of chunks.
fn several_tree_chunks(rng: &mut Rng) -> ([usize; 4], Vec<f32>, Vec<u32>, Vec<f32>) {
    let dims = [2, rng.range(2, 5), rng.range(90, 110), 2 * rng.range(60, 70) + 1];
    let [n, k, h, w] = dims;
    let logits: Vec<f32> = rng.normals(n * k * h * w).iter().map(|v| 3.0 * v).collect();
    let labels: Vec<u32> = (0..n * h * w)
        .map(|_| if rng.uniform() < 0.2 { IGNORE } else { rng.range(0, k - 1) as u32 })
        .collect();
    let weight: Vec<f32> = (0..k).map(|_| 0.5 + rng.uniform() as f32).collect();
    (dims, logits, labels, weight)
}
