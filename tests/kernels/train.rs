//! Training end to end on the procedural dataset: augmentation is valid and deterministic,
//! and a tiny model's loss falls.

use crate::common::*;
use hrnet_ocr::data::augment::{augment, Augment, Sample};
use hrnet_ocr::data::procedural::scene;
use hrnet_ocr::data::SplitMix;
use hrnet_ocr::model::Config;
use hrnet_ocr::train::{TrainOptions, Trainer};

fn recipe(crop: [usize; 2]) -> Augment {
    Augment { crop, min_scale: 0.5, scale_steps: 16, flip: true, ignore_label: 255 }
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
    let cfg =
        Config::load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/model/tiny_ocr.yaml")).unwrap();
    let crop = [64, 64];
    let options = TrainOptions {
        batch: 2,
        crop,
        max_iter: 40,
        dropout: 0.05,
        head_keywords: vec!["cls".into(), "aux".into(), "ocr".into()],
        head_lr_mult: 1.0,
    };
    let mut trainer = Trainer::new(gpu(), cfg, None, options).unwrap();
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
