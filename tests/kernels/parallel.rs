//! Data-parallel training: two ranks in one process (a device each) at one image each give
//! what one device gives at both images: the same losses, gradients, weights and running
//! statistics, with batch norm synchronized across the ranks.

use crate::common::*;
use hrnet_ocr::data::augment::Sample;
use hrnet_ocr::dist::{Comm, DataParallel};
use hrnet_ocr::graph::MeetingPoints;
use hrnet_ocr::kernels::tuning::TuningCache;
use hrnet_ocr::model::weights::NamedTensor;
use hrnet_ocr::train::{TrainOptions, Trainer};
use hrnet_ocr::{Gpu, GpuOptions};

const CROP: [usize; 2] = [48, 64];
const STEPS: usize = 2;

fn options(batch: usize, parallel: DataParallel) -> TrainOptions {
    TrainOptions {
        batch,
        crop: CROP,
        max_iter: 10,
        extra: None,
        // Off: with it the comparison measures the model's conditioning more than the ranks
        // (its masks follow each image to its rank: tests/kernels/training.rs).
        dropout: 0.0,
        head_keywords: vec!["ocr".into(), "cls".into(), "aux".into()],
        head_lr_mult: 1.0,
        tuning: TuningCache::Memory,
        recompute: Default::default(),
        parallel,
    }
}

/// Random images whose labels are all valid: every image then has as many labelled pixels,
/// and the mean of the ranks' losses is the global batch's loss.
fn batches(seed: u64, images: usize) -> Vec<Vec<Sample>> {
    let mut rng = Rng::new(seed);
    let [h, w] = CROP;
    let classes = tiny_config().num_classes;
    (0..STEPS)
        .map(|_| {
            (0..images)
                .map(|_| Sample {
                    planes: rng.normals(3 * h * w),
                    labels: (0..h * w).map(|_| rng.range(0, classes - 1) as u32).collect(),
                })
                .collect()
        })
        .collect()
}

/// What a run ends with: each step's (loss, aux, main), the first step's gradients (by
/// parameter name) and weights and running statistics, and the last step's weights.
struct Outcome {
    points: MeetingPoints,
    losses: Vec<[f32; 3]>,
    grads: Vec<(String, Vec<f32>)>,
    first_weights: Vec<NamedTensor>,
    weights: Vec<NamedTensor>,
}

fn train(gpu: &Gpu, options: TrainOptions, comm: Option<Comm>, batches: &[Vec<Sample>]) -> Outcome {
    let slice = options.parallel.slice(batches[0].len());
    // A small rate: one step of the config's (ten times that on the head) overshoots into
    // weights where a 1e-6 change moves the gradients by 5%.
    let mut cfg = tiny_config();
    cfg.lr = 1e-3;
    let mut trainer = Trainer::new(gpu, cfg, Some(&tiny_weights()), options).unwrap();
    if let Some(comm) = comm {
        trainer.join(comm).unwrap();
    }
    let (mut losses, mut grads, mut first_weights) = (Vec::new(), Vec::new(), Vec::new());
    for (step, batch) in batches.iter().enumerate() {
        let s = trainer.step(&batch[slice.clone()], 7 + step as u32).unwrap();
        losses.push([s.loss, s.aux_loss, s.main_loss]);
        if step == 0 {
            let names: Vec<String> = trainer.graph().parameters().map(|(n, _)| n.to_string()).collect();
            // Read through the trainer's own device (download() reads through the shared one).
            let graph = trainer.graph();
            grads = names
                .into_iter()
                .map(|n| (n.clone(), graph.grad(&n).unwrap().to_vec(gpu).unwrap()))
                .collect();
            first_weights = trainer.weights().unwrap();
        }
    }
    let (points, weights) = (trainer.graph().meeting_points(), trainer.weights().unwrap());
    Outcome { points, losses, grads, first_weights, weights }
}

/// Two ranks on threads, a device each.
fn two_ranks(sync_batch_norm: bool, batches: &[Vec<Sample>]) -> Vec<Outcome> {
    hrnet_ocr::dist::on_threads(2, |rank, comm| {
        let gpu = Gpu::with_options(&GpuOptions::from_env())?;
        // Small buckets: many are reduced while the backward runs on.
        let parallel =
            DataParallel { bucket_bytes: 64 << 10, ..DataParallel::rank(rank, 2, sync_batch_norm) };
        Ok(train(&gpu, options(1, parallel), Some(comm), batches))
    })
    .unwrap()
}

/// Max |a - b| over the largest |b|, with a floor for all-zero tensors.
fn relative_max(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs()))).max(1e-12);
    a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, f64::max) / scale
}

fn concatenated(tensors: impl Iterator<Item = Vec<f32>>) -> Vec<f32> {
    tensors.flatten().collect()
}

/// The ranks' run against one device's. The first step's loss agrees within 1e-5, and its
/// weights and running statistics too; later losses and the last weights within 1e-4. This
/// small model at its small crop is ill-conditioned in f32 (batch norms over a few values:
/// the coarsest branch, OCR's object regions): its gradients move with the order of any sum
/// over the batch, by up to 8e-3 (relative L2) for some batches even when one device merely
/// takes the batch's two images in the other order. So the first step's gradients are held
/// to 3e-2: a wrong mean or a missing exchange of the backward sums moves them by 0.1 to 1,
/// a missing exchange of the statistics moves the loss by more than 1e-4 (the per-device
/// test); `tests/kernels/batch_norm.rs` holds the synchronized layer itself to 1e-5.
fn assert_equivalent(what: &str, got: &Outcome, want: &Outcome) {
    for (step, (g, w)) in got.losses.iter().zip(&want.losses).enumerate() {
        let (err, tol) = (relative_max(g, w), if step == 0 { 1e-5 } else { 1e-4 });
        assert!(err <= tol, "{what}: step {step} losses {g:?}, one device {w:?} ({err:.2e})");
    }
    let grads = |o: &Outcome| concatenated(o.grads.iter().map(|(_, g)| g.clone()));
    assert_close(&format!("{what}: the first step's gradients"), &grads(got), &grads(want), 3e-2);
    let all = |w: &[NamedTensor]| concatenated(w.iter().map(|w| w.data.clone()));
    let first = (all(&got.first_weights), all(&want.first_weights));
    assert_close(&format!("{what}: weights and running statistics after step 1"), &first.0, &first.1, 1e-5);
    assert_close(&format!("{what}: the last weights"), &all(&got.weights), &all(&want.weights), 1e-4);
}

#[test]
fn two_ranks_with_synchronized_batch_norm_train_as_one_device_on_both_images() {
    let batches = batches(seed("data-parallel equivalence"), 2);
    let one = train(gpu(), options(2, DataParallel::default()), None, &batches);
    let ranks = two_ranks(true, &batches);
    for (rank, outcome) in ranks.iter().enumerate() {
        assert_equivalent(&format!("rank {rank}"), outcome, &one);
    }
    // Every batch norm met the other rank twice; gradients went in several buckets, at those
    // exchanges but the last, at the end of the backward.
    let p = ranks[0].points;
    assert!(p.forward_exchanges > 20 && p.backward_exchanges == p.forward_exchanges, "{p:?}");
    assert!(p.buckets > 2 && p.buckets_at_exchanges == p.buckets - 1, "{p:?}");
    assert_eq!(one.points, MeetingPoints::default());
    // The ranks end bit-identical: the same all-reduced gradients, the same SGD step.
    for (a, b) in ranks[0].weights.iter().zip(&ranks[1].weights) {
        assert_eq!(a.data, b.data, "{} differs between the ranks", a.name);
    }
}

#[test]
fn per_device_batch_norm_trains_each_rank_on_its_own_statistics() {
    let batches = batches(seed("per-device batch norm"), 2);
    let one = train(gpu(), options(2, DataParallel::default()), None, &batches);
    let ranks = two_ranks(false, &batches);
    // Each rank normalises with its own image's statistics: the loss is no longer the
    // global batch's, but the ranks still agree on the weights.
    let err = relative_max(&ranks[0].losses[0], &one.losses[0]);
    assert!(err > 1e-4, "per-device statistics gave the global batch's loss ({err:.2e})");
    // The first step is the mean of what one device does with each image alone.
    let alone: Vec<Outcome> = (0..2)
        .map(|i| train(gpu(), options(1, DataParallel::default()), None, &[vec![batches[0][i].clone()]]))
        .collect();
    let mean = |f: &dyn Fn(&Outcome) -> Vec<f32>| -> Vec<f32> {
        f(&alone[0]).iter().zip(f(&alone[1])).map(|(a, b)| (a + b) / 2.0).collect()
    };
    let loss = |o: &Outcome| o.losses[0].to_vec();
    let grads = |o: &Outcome| concatenated(o.grads.iter().map(|(_, g)| g.clone()));
    let err = relative_max(&loss(&ranks[0]), &mean(&loss));
    assert!(
        err <= 1e-5,
        "the ranks' first loss {:?} is not the mean of each image's ({err:.2e})",
        ranks[0].losses[0]
    );
    assert_close(
        "the first step's gradients against each image's mean",
        &grads(&ranks[0]),
        &mean(&grads),
        3e-2,
    );
    let p = ranks[0].points;
    assert!(p.forward_exchanges + p.backward_exchanges == 0 && p.buckets > 1, "{p:?}");
    // Their running statistics are their own (a checkpoint holds rank 0's).
    for (a, b) in ranks[0].weights.iter().zip(&ranks[1].weights).filter(|(a, _)| !a.name.contains("running_"))
    {
        assert_eq!(a.data, b.data, "{} differs between the ranks", a.name);
    }
}
