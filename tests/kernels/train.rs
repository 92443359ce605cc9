//! Training end to end on the procedural dataset: augmentation is valid and deterministic,
//! and a tiny model's loss falls.

use crate::common::*;
use hrnet_ocr::data::augment::{augment, Augment, Sample};
use hrnet_ocr::data::procedural::scene;
use hrnet_ocr::data::SplitMix;
use hrnet_ocr::kernels::tuning::TuningCache;
use hrnet_ocr::model::weights::{self, NamedTensor};
use hrnet_ocr::model::Config;
use hrnet_ocr::train::{Checkpoint, TrainOptions, Trainer};

/// A run's options: official dropout, no extra phase, tuning kept in memory.
fn options(
    batch: usize,
    crop: [usize; 2],
    max_iter: usize,
    head: &[&str],
    head_lr_mult: f32,
) -> TrainOptions {
    TrainOptions {
        batch,
        crop,
        max_iter,
        extra: None,
        dropout: 0.05,
        head_keywords: head.iter().map(|k| k.to_string()).collect(),
        head_lr_mult,
        tuning: TuningCache::Memory,
        recompute: Default::default(),
        parallel: Default::default(),
    }
}

fn recipe(crop: [usize; 2]) -> Augment {
    Augment::official(crop, 255)
}

#[test]
fn augmentation_is_deterministic_and_labels_stay_valid() {
    let s = scene(3, 0, 80, 60);
    let run = |seed| {
        let mut rng = SplitMix::new(seed);
        (0..6).map(|_| augment(&s.image, &s.labels, &recipe([48, 64]), &mut rng)).collect::<Vec<Sample>>()
    };
    let (a, b) = (run(1), run(1));
    let mut padded = 0;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.planes, &x.labels), (&y.planes, &y.labels));
        assert_eq!((x.planes.len(), x.labels.len()), (3 * 48 * 64, 48 * 64));
        assert!(x.labels.iter().all(|&l| l < 5 || l == 255));
        padded += x.labels.iter().filter(|&&l| l == 255).count();
    }
    // Scales below 1 shrink the 80x60 scene under the 64x48 crop: padding appears.
    assert!(padded > 0, "no padded pixel in six samples");
    assert_ne!(run(1)[0].labels, run(2)[0].labels);
}

#[test]
fn a_tiny_model_learns_the_procedural_scenes() {
    let cfg = tiny_config();
    let crop = [64, 64];
    let options = options(2, crop, 40, &["cls", "aux", "ocr"], 1.0);
    let mut trainer = Trainer::new(gpu(), cfg, None, options).unwrap();
    assert_official_fresh_start(&trainer.weights().unwrap(), |_| true);
    let mut rng = SplitMix::new(11);
    let mut losses = Vec::new();
    for step in 0..40u64 {
        let batch: Vec<Sample> = (0..2)
            .map(|i| {
                let s = scene(5, 2 * step + i, 96, 96);
                augment(&s.image, &s.labels, &recipe(crop), &mut rng)
            })
            .collect();
        let stats = trainer.step(&batch, step as u32).unwrap();
        assert!(stats.loss.is_finite(), "step {step}: loss {}", stats.loss);
        losses.push(stats.loss);
    }
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&losses[..5]), mean(&losses[35..]));
    eprintln!("losses {losses:?}");
    assert!(last < 0.7 * first, "loss fell only from {first} to {last}");
    assert_eq!(trainer.weights().unwrap().len(), 192 + 124);
}

/// The official fresh start (`init_weights`), on the tensors `fresh` selects: batch norm
/// scales 1 (a zero scale before a ReLU would leave that path dead) and shifts 0;
/// convolutions outside cls/aux/ocr N(0, 0.001); inside them, and every convolution bias,
/// PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn assert_official_fresh_start(weights: &[NamedTensor], fresh: impl Fn(&str) -> bool) {
    let fan_in = |prefix: &str| {
        weights
            .iter()
            .find(|w| w.name == format!("{prefix}.weight") && w.shape.len() == 4)
            .map(|w| w.data.len() / w.shape[0])
    };
    let mut checked = 0;
    for t in weights.iter().filter(|t| fresh(&t.name)) {
        let (prefix, kind) = t.name.rsplit_once('.').unwrap();
        let head = ["cls", "aux", "ocr"].iter().any(|k| prefix.contains(k));
        let var = t.data.iter().map(|v| f64::from(v * v)).sum::<f64>() / t.data.len() as f64;
        let big = t.data.len() >= 1000;
        match (t.shape.len(), kind, fan_in(prefix)) {
            (4, _, Some(n)) if head => {
                let bound = 1.0 / (n as f32).sqrt();
                assert!(t.data.iter().all(|v| v.abs() <= bound), "{}: outside +-{bound}", t.name);
                assert!(
                    !big || (var * 3.0 / f64::from(bound * bound) - 1.0).abs() < 0.2,
                    "{}: variance {var}",
                    t.name
                );
            }
            (4, _, _) => {
                assert!(!big || (var / 1e-6 - 1.0).abs() < 0.2, "{}: variance {var}, expected 1e-6", t.name)
            }
            (_, "bias", Some(n)) => {
                let bound = 1.0 / (n as f32).sqrt();
                assert!(t.data.iter().all(|v| v.abs() <= bound) && var > 0.0, "{}: not U(+-{bound})", t.name);
            }
            (_, "weight", _) => assert!(t.data.iter().all(|&v| v == 1.0), "{} not initialised to 1", t.name),
            (_, "running_var", _) => assert!(t.data.iter().all(|&v| v == 1.0), "{} not 1", t.name),
            _ => assert!(t.data.iter().all(|&v| v == 0.0), "{} not initialised to 0", t.name),
        }
        checked += 1;
    }
    assert!(checked > 0, "no fresh tensor checked");
}

/// A pretrained start as the official `MODEL.PRETRAINED` (`init_weights`): from a file built
/// by PyTorch (`tools/reference/make_pretrained_fixture.py`, legacy and zip formats) every
/// backbone tensor lands exactly, `last_layer.0` / `.1` in `aux_head`, the classifier's
/// own tensors are skipped, and the rest of the head keeps the official fresh start. A
/// tensor of the model's name with another shape is refused, naming it.
#[test]
fn a_pretrained_backbone_lands_and_the_head_starts_fresh() {
    let cfg = Config::load(&fixture_path("micro_ocr.yaml")).unwrap();
    let options = options(2, [64, 64], 1, &[], 1.0);
    let mut loaded = Vec::new();
    for file in ["micro_pretrained_legacy.pth", "micro_pretrained_zip.pth"] {
        let path = std::path::PathBuf::from(fixture_path(file));
        let file_tensors = weights::read(&path).unwrap();
        let mut trainer = Trainer::new(gpu(), cfg.clone(), None, options.clone()).unwrap();
        let report = trainer.load_pretrained(&file_tensors, file).unwrap();
        let got = trainer.weights().unwrap();
        let in_file =
            |name: &str| file_tensors.iter().find(|t| t.name.replace("last_layer", "aux_head") == name);
        for t in &got {
            if let Some(want) = in_file(&t.name) {
                assert_eq!(t.data, want.data, "{file}: {}", t.name);
            }
        }
        let backbone =
            got.iter().filter(|t| !["cls", "aux", "ocr"].iter().any(|k| t.name.contains(k))).count();
        assert!(
            got.iter().filter(|t| in_file(&t.name).is_some()).count() == backbone + 6,
            "{file}: {report}"
        );
        assert_eq!(report.loaded, backbone + 6, "{file}: {report}");
        assert_eq!(report.skipped.len(), 5, "{file}: {report}");
        assert!(
            report
                .skipped
                .iter()
                .all(|n| ["incre", "downsamp", "final", "classifier"].iter().any(|p| n.starts_with(p))),
            "{report}"
        );
        assert_eq!(report.fresh.len(), got.len() - report.loaded, "{file}: {report}");
        assert_official_fresh_start(&got, |name| report.fresh.iter().any(|f| f == name));
        loaded.push(got);
    }
    assert_eq!(loaded[0], loaded[1], "the legacy and zip files load alike");
    let mut bad = weights::read(std::path::Path::new(&fixture_path("micro_pretrained_zip.pth"))).unwrap();
    let conv = bad.iter_mut().find(|t| t.name == "conv2.weight").unwrap();
    conv.shape = vec![64, 64, 9, 1];
    let mut trainer = Trainer::new(gpu(), cfg, None, options).unwrap();
    let e = trainer.load_pretrained(&bad, "bad.pth").unwrap_err().to_string();
    assert!(e.contains("bad.pth") && e.contains("conv2.weight") && e.contains("[64, 64, 3, 3]"), "{e}");
}

/// An mmsegmentation OCRNet checkpoint as a pretrained start: its tensors land by the key
/// map's names in the official model (which keeps its conventions), every one of them
/// exactly, and only the two head conv biases mmsegmentation has no place for stay fresh.
#[test]
fn an_mmsegmentation_checkpoint_is_a_pretrained_start_through_the_key_map() {
    let cfg = Config::load(&fixture_path("micro_ocr.yaml")).unwrap();
    let path = fixture_path("mmseg_micro_ocrnet.pth");
    let file = weights::read(std::path::Path::new(&path)).unwrap();
    let mut trainer = Trainer::new(gpu(), cfg, None, options(2, [64, 64], 1, &[], 1.0)).unwrap();
    let report = trainer.load_pretrained(&file, &path).unwrap();
    assert_eq!((report.loaded, report.skipped.len()), (file.len(), 0), "{report}");
    assert_eq!(report.fresh, ["conv3x3_ocr.0.bias", "aux_head.0.bias"], "{report}");
    let got = trainer.weights().unwrap();
    for t in &file {
        let name = hrnet_ocr::model::mmseg::official_name(&t.name).unwrap();
        let mine = got.iter().find(|g| g.name == name).unwrap_or_else(|| panic!("{name} not in the model"));
        assert_eq!(mine.data, t.data, "{} as {name}", t.name);
    }
}

#[test]
fn evaluation_scores_follow_the_official_formulas() {
    use hrnet_ocr::eval::Evaluation;
    let mut rng = Rng::new(seed("evaluation_scores"));
    let k = 4;
    let mut eval = Evaluation::new(gpu(), k, 255).unwrap();
    let mut confusion = vec![0u64; k * k];
    for _ in 0..3 {
        let n = rng.range(10, 300);
        let labels: Vec<u32> =
            (0..n).map(|_| if rng.range(0, 9) == 0 { 255 } else { rng.range(0, k - 1) as u32 }).collect();
        let pred: Vec<u32> = (0..n).map(|_| rng.range(0, k - 1) as u32).collect();
        for (&l, &p) in labels.iter().zip(&pred) {
            if l != 255 {
                confusion[l as usize * k + p as usize] += 1;
            }
        }
        eval.add(gpu(), &pred, &labels).unwrap();
    }
    let s = eval.scores(gpu()).unwrap();
    assert_eq!(s.confusion, confusion);
    for c in 0..k {
        let tp = confusion[c * k + c] as f64;
        let gt: u64 = (0..k).map(|p| confusion[c * k + p]).sum();
        let pr: u64 = (0..k).map(|g| confusion[g * k + c]).sum();
        assert!((s.iou[c] - tp / (gt + pr - tp as u64).max(1) as f64).abs() < 1e-12);
    }
    assert!((s.mean_iou - s.iou.iter().sum::<f64>() / k as f64).abs() < 1e-12);
    // Mean accuracy as the official testval: mean over classes of tp / max(1, gt).
    let accuracy: f64 = (0..k)
        .map(|c| {
            confusion[c * k + c] as f64 / (0..k).map(|p| confusion[c * k + p]).sum::<u64>().max(1) as f64
        })
        .sum();
    assert!((s.mean_accuracy - accuracy / k as f64).abs() < 1e-12);
    assert!(eval.add(gpu(), &[0, 1], &[0]).is_err());
}

#[test]
fn checkpoints_round_trip_and_resume_exactly() {
    let cfg = tiny_config();
    let options = options(2, [32, 32], 3, &["cls"], 10.0);
    let mut rng = Rng::new(seed("checkpoints_round_trip_and_resume_exactly"));
    let batches: Vec<Vec<Sample>> = (0..3)
        .map(|_| {
            (0..2)
                .map(|_| Sample {
                    planes: rng.normals(3 * 32 * 32),
                    labels: (0..32 * 32).map(|_| rng.range(0, 4) as u32).collect(),
                })
                .collect()
        })
        .collect();
    let mut whole = Trainer::new(gpu(), cfg.clone(), None, options.clone()).unwrap();
    let want: Vec<f32> = (0..3).map(|s| whole.step(&batches[s], s as u32).unwrap().loss).collect();

    let mut first = Trainer::new(gpu(), cfg.clone(), None, options.clone()).unwrap();
    assert_eq!(first.step(&batches[0], 0).unwrap().loss, want[0]);
    let notes = [("run".to_string(), "test".to_string())].into_iter().collect();
    let path = std::env::temp_dir().join(format!("hrnet-ocr-ckpt-{}.safetensors", std::process::id()));
    first.checkpoint(notes).unwrap().save(&path).unwrap();
    let loaded = Checkpoint::load(&path).unwrap();
    let by_name = |mut v: Vec<NamedTensor>| {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    };
    let saved = first.checkpoint(loaded.notes.clone()).unwrap();
    assert!(by_name(loaded.weights.clone()) == by_name(saved.weights), "weights differ after the round trip");
    assert!(
        by_name(loaded.momentum.clone()) == by_name(saved.momentum),
        "momentum differs after the round trip"
    );
    assert_eq!((loaded.steps, loaded.notes["run"].as_str()), (1, "test"));
    assert!(loaded.momentum.iter().any(|m| m.data.iter().any(|&v| v != 0.0)), "momentum was saved");
    // As plain weights the checkpoint is the model's state dict, optimizer state dropped.
    let plain = weights::read(&path).unwrap();
    assert!(plain == loaded.weights, "the checkpoint read as weights");

    let mut resumed = Trainer::resume(gpu(), cfg.clone(), &loaded, options.clone()).unwrap();
    assert_eq!(resumed.steps(), 1);
    let got: Vec<f32> = (1..3).map(|s| resumed.step(&batches[s], s as u32).unwrap().loss).collect();
    assert_eq!(got, want[1..], "the resumed run repeats the uninterrupted losses bit for bit");
    assert!(resumed.weights().unwrap() == whole.weights().unwrap(), "the final weights differ");

    // A checkpoint of another configuration is refused, naming what differs.
    let other = Config { mid_channels: 16, ..cfg };
    let err = Trainer::resume(gpu(), other, &loaded, options).err().expect("another config").to_string();
    assert!(err.contains("ocr_distri_head") && err.contains("expected"), "{err}");
    std::fs::remove_file(&path).unwrap();
}

/// A training step (forward, backward and SGD) is one command buffer; an eval forward too.
#[test]
fn a_training_step_is_one_command_buffer() {
    // A device of its own: other tests submit to the shared one concurrently.
    let gpu = hrnet_ocr::Gpu::new().unwrap();
    let cfg = tiny_config();
    let options = options(1, [32, 48], 10, &[], 1.0);
    let mut trainer = Trainer::new(&gpu, cfg, None, options).unwrap();
    let mut rng = Rng::new(seed("a_training_step_is_one_command_buffer"));
    let sample = Sample { planes: rng.normals(3 * 32 * 48), labels: (0..32 * 48).map(|i| i % 5).collect() };
    for step in 0..3 {
        let (before, read_before) = (gpu.submissions(), gpu.readbacks());
        let stats = trainer.step(std::slice::from_ref(&sample), step).unwrap();
        assert!(stats.loss.is_finite());
        // The step (gradients cleared inside it) and one readback of both loss terms.
        assert_eq!(gpu.readbacks() - read_before, 1, "readbacks in training step {step}");
        assert_eq!(gpu.submissions() - before, 2, "command buffers in training step {step}");
    }
    let graph = trainer.graph();
    let before = gpu.submissions();
    graph.forward(&gpu).unwrap();
    assert_eq!(gpu.submissions() - before, 1);
}

/// An official `checkpoint.pth.tar` resumes: its weights, and its SGD momentum buffers
/// named by the official parameter order (the optimizer's two groups, backbone then the
/// `NONBACKBONE_KEYWORDS` parameters); every buffer lands on its parameter (each one's sum
/// and sum of squares, written by PyTorch by name, match), and the run goes on from
/// `epoch` epochs of steps.
#[test]
fn an_official_training_checkpoint_resumes_with_its_momentum() {
    let path = std::path::PathBuf::from(fixture_path("micro_checkpoint.pth.tar"));
    let (state, training) = hrnet_ocr::formats::pth::read_official_training(&path).unwrap();
    assert_eq!((training.epoch, training.groups.len(), training.momentum.len()), (3, 2, 192));
    assert_eq!(training.best_mean_iou, Some(0.4123), "best_mIoU, a numpy float64");
    let keywords: Vec<String> = ["cls", "aux", "ocr"].map(String::from).to_vec();
    let checkpoint =
        Checkpoint::from_official(state.clone(), training.clone(), &keywords, 5, Default::default()).unwrap();
    assert_eq!(checkpoint.steps, 15);
    let prints =
        weights::read(std::path::Path::new(&fixture_path("micro_checkpoint_momentum.safetensors"))).unwrap();
    assert_eq!(prints.len(), checkpoint.momentum.len());
    for m in &checkpoint.momentum {
        let want = &prints.iter().find(|p| p.name == m.name).unwrap_or_else(|| panic!("{}", m.name)).data;
        let sum: f64 = m.data.iter().map(|&v| f64::from(v)).sum();
        let squares: f64 = m.data.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let close = |a: f64, b: f32| (a - f64::from(b)).abs() <= 1e-5 * (a.abs() + 1e-6);
        assert!(
            close(sum, want[0]) && close(squares, want[1]),
            "{}: ({sum}, {squares}) against {want:?}",
            m.name
        );
    }
    let cfg = Config::load(&fixture_path("micro_ocr.yaml")).unwrap();
    let options = options(2, [64, 64], 20, &["cls", "aux", "ocr"], 10.0);
    let trainer = Trainer::resume(gpu(), cfg, &checkpoint, options).unwrap();
    assert_eq!(trainer.steps(), 15);
    // Without the keywords the two groups cannot be told apart: refused, not guessed.
    let e = Checkpoint::from_official(state, training, &[], 5, Default::default()).unwrap_err().to_string();
    assert!(e.contains("2 parameter groups"), "{e}");
}

/// Every context head (`MODEL.CONTEXT_HEAD`) in the tiny model: training steps on one batch
/// bring its loss down, the trained weights carry the head's parameters by name, and a
/// segmenter built from them segments a scene with the head.
#[test]
fn every_context_head_trains_and_segments_in_the_model() {
    use hrnet_ocr::infer::{Segmenter, Strategy};
    use hrnet_ocr::model::heads::ContextHead;
    let crop = [64, 64];
    let mut rng = SplitMix::new(21);
    let batch: Vec<Sample> = (0..2)
        .map(|i| {
            let s = scene(9, i, 96, 96);
            augment(&s.image, &s.labels, &recipe(crop), &mut rng)
        })
        .collect();
    for head in ContextHead::ALL {
        let mut cfg = tiny_config();
        cfg.context_head = head;
        let mut trainer = Trainer::new(gpu(), cfg.clone(), None, options(2, crop, 12, &[], 1.0)).unwrap();
        let losses: Vec<f32> = (0..12u32).map(|step| trainer.step(&batch, step).unwrap().loss).collect();
        assert!(losses.iter().all(|l| l.is_finite()), "{head:?}: {losses:?}");
        assert!(
            losses[11] < 0.8 * losses[0],
            "{head:?}: the loss fell only from {} to {}",
            losses[0],
            losses[11]
        );
        let weights = trainer.weights().unwrap();
        let prefix = match head {
            ContextHead::Ocr => "ocr_distri_head.",
            ContextHead::None => "conv3x3_ocr.",
            other => other.name(),
        };
        assert!(weights.iter().any(|t| t.name.starts_with(prefix)), "{head:?}: no {prefix} tensor");
        let s = scene(9, 7, 80, 72);
        let mut segmenter = Segmenter::new(gpu(), cfg, weights);
        let seg = segmenter.segment(&s.image, &Strategy::Whole).unwrap();
        assert_eq!(seg.classes.len(), 80 * 72, "{head:?}");
        assert!(seg.classes.iter().all(|&c| c < 5), "{head:?}");
    }
}
