//! Configs: every official experiment file loads, presets, and errors that name the key.

use hrnet_ocr::model::config::CITYSCAPES_CLASS_WEIGHTS;
use hrnet_ocr::model::Config;
use std::path::PathBuf;

fn official_configs() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/official");
    let mut files = Vec::new();
    for dataset in std::fs::read_dir(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display())) {
        let dir = dataset.unwrap().path();
        if dir.is_dir() {
            files.extend(std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()));
        }
    }
    files.sort();
    files
}

#[test]
fn every_official_config_loads_as_w48_ocr() {
    let files = official_configs();
    assert_eq!(files.len(), 10, "the ten official HRNet-OCR experiment files");
    let w48 = Config::preset("w48").unwrap();
    for f in &files {
        let c = Config::load(f.to_str().unwrap()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.stages, w48.stages, "{}", f.display());
        assert_eq!((c.mid_channels, c.key_channels, c.align_corners), (512, 256, true), "{}", f.display());
        assert_eq!(c.concat_channels(), 720);
        assert_eq!(c.context_head, hrnet_ocr::model::heads::ContextHead::Ocr, "{}", f.display());
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let classes = match name.as_str() {
            n if n.contains("cls59") => 59,
            n if n.contains("cls60") => 60,
            n if n.contains("473x473") => 20,
            n if n.contains("520x520_ohem") && f.to_string_lossy().contains("ade20k") => 150,
            n if n.contains("520x520_ohem") => 171,
            _ => 19,
        };
        assert_eq!(c.num_classes, classes, "{name}");
        assert_eq!(c.ohem.is_some(), name.contains("ohem"), "{name}");
        assert_eq!(c.balance_weights, [0.4, 1.0], "{name}");
        // Only the Cityscapes dataset class hands class weights to the loss (spec section 4).
        let cityscapes = f.to_string_lossy().contains("cityscapes");
        let want = cityscapes.then(|| CITYSCAPES_CLASS_WEIGHTS.to_vec());
        assert_eq!(c.class_weights, want, "{name}");
        // The run: epochs and batch as the file's name says, an ImageNet start.
        let number_after = |tag: &str| -> usize {
            let rest = &name[name.find(tag).unwrap() + tag.len()..];
            rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap()].parse().unwrap()
        };
        assert_eq!(c.train.end_epoch, number_after("epoch"), "{name}");
        assert!(c.train.pretrained.as_deref().is_some_and(|p| p.ends_with(".pth")), "{name}");
        let keywords = std::fs::read_to_string(f).unwrap().contains("NONBACKBONE_KEYWORDS");
        let want: &[&str] = if keywords { &["cls", "aux", "ocr"] } else { &[] };
        assert_eq!(c.train.nonbackbone_keywords, want, "{name}");
    }
}

#[test]
fn presets_follow_the_spec_table() {
    let small = Config::preset("w18-small-v2").unwrap();
    assert_eq!(small.stages[0].blocks, [2]);
    assert_eq!(small.stages[2].modules, 3);
    assert_eq!(small.concat_channels(), 270);
    assert_eq!(Config::preset("w32").unwrap().concat_channels(), 480);
    let e = Config::load("w64").unwrap_err().to_string();
    assert!(e.contains("w64") && e.contains("w18-small-v2"), "{e}");
}

fn tiny() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/model/tiny_ocr.yaml"))
        .unwrap()
}

#[test]
fn custom_layouts_load() {
    let c = Config::from_yaml(&tiny(), "tiny_ocr.yaml").unwrap();
    assert_eq!((c.num_classes, c.mid_channels, c.key_channels), (5, 32, 16));
    assert_eq!(c.stages[3].channels, [18, 36, 72, 144]);
    assert_eq!(c.stages[0].blocks, [1]);
}

#[test]
fn wrong_types_and_values_name_the_key() {
    for (from, to, key) in [
        ("NUM_CLASSES: 5", "NUM_CLASSES: five", "DATASET.NUM_CLASSES"),
        ("MID_CHANNELS: 32", "MID_CHANNELS: 0", "MODEL.OCR.MID_CHANNELS"),
        ("ALIGN_CORNERS: true", "ALIGN_CORNERS: maybe", "MODEL.ALIGN_CORNERS"),
        (
            "BLOCK: BASIC\n      NUM_BLOCKS: [1, 1]\n",
            "BLOCK: BASIC\n      NUM_BLOCKS: [1]\n",
            "STAGE2.NUM_BLOCKS",
        ),
        ("NUM_BRANCHES: 3", "NUM_BRANCHES: 4", "STAGE3.NUM_BRANCHES"),
        ("BLOCK: BOTTLENECK", "BLOCK: RESNEXT", "STAGE1.BLOCK"),
        ("BALANCE_WEIGHTS: [0.4, 1]", "BALANCE_WEIGHTS: [1]", "LOSS.BALANCE_WEIGHTS"),
        ("NUM_CHANNELS: [18, 36, 72, 144]", "NUM_CHANNELS: [18, 36, 72]", "STAGE4"),
        // Counts a model could never be built from are refused before any size is computed.
        ("NUM_CHANNELS: [18, 36, 72, 144]", "NUM_CHANNELS: [18, 36, 72, 1000000000000000]", "limit of 65536"),
        ("MID_CHANNELS: 32", "MID_CHANNELS: 65537", "MODEL.OCR.MID_CHANNELS"),
    ] {
        let text = tiny();
        assert!(text.contains(from), "{from:?} not in the tiny config");
        let e = Config::from_yaml(&text.replacen(from, to, 1), "edited.yaml").unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("edited.yaml"), "{to:?}: {e}");
    }
}

/// Each training key of an experiment YAML changes what it should in the run's recipe (the
/// library's `RunSettings`, `TrainOptions`, the augmentation and the loss), from the tiny
/// config with the key added under its section; without it, the official default holds.
#[test]
fn every_training_key_of_the_yaml_changes_the_recipe() {
    use hrnet_ocr::kernels::tuning::TuningCache;
    use hrnet_ocr::train::recipe::RunSettings;
    // The tiny config with `lines` in `section`, replacing the tiny config's own of a key.
    let with = |section: &str, lines: &str| {
        let mut text = tiny();
        for line in lines.lines() {
            let key = line.split(':').next().unwrap();
            if let Some(at) = text.find(&format!("\n{key}:")) {
                let end = text[at + 1..].find('\n').map_or(text.len(), |e| at + 1 + e);
                text.replace_range(at..end, "");
            }
        }
        let text = text.replacen(&format!("{section}:\n"), &format!("{section}:\n{lines}"), 1);
        Config::from_yaml(&text, "keys.yaml").unwrap_or_else(|e| panic!("{lines}: {e}"))
    };
    let recipe = |cfg: &Config, images: usize| {
        RunSettings::from_config("keys.yaml", cfg).with_epochs(cfg, images, Some(images)).unwrap()
    };
    let base = with("TRAIN", "");
    let d = recipe(&base, 320);
    // The official defaults: batch 32, 484 epochs, crop 512 x 1024, one rate for all.
    assert_eq!((d.batch, d.steps, d.crop, d.extra_steps), (32, 484 * 10, [512, 1024], 0));
    assert!(d.head_keywords.is_empty());
    assert_eq!((base.lr, base.weight_decay, base.momentum, base.nesterov), (0.01, 1e-4, 0.9, false));
    let a = d.augment(&base).unwrap();
    type Check = Box<dyn Fn(&Config, &RunSettings)>;
    let cases: Vec<(&str, &str, Check)> = vec![
        ("TRAIN", "  IMAGE_SIZE: [48, 32]\n", Box::new(|_, s| assert_eq!(s.crop, [32, 48]))),
        (
            "TRAIN",
            "  BATCH_SIZE_PER_GPU: 8\n",
            Box::new(|_, s| assert_eq!((s.batch, s.steps), (8, 484 * 40))),
        ),
        ("TRAIN", "  END_EPOCH: 3\n", Box::new(|_, s| assert_eq!(s.steps, 30))),
        (
            "TRAIN",
            "  EXTRA_EPOCH: 2\n  EXTRA_LR: 0.005\n",
            Box::new(|c, s| {
                assert_eq!(s.extra_steps, 20);
                let o = s.options(c, TuningCache::default());
                assert_eq!(o.extra, Some((0.005, 20)));
                // The extra phase's first step still runs at the first phase's last rate.
                assert_eq!(o.lr(c.lr, s.steps), hrnet_ocr::train::poly_lr(c.lr, s.steps, s.steps, 0.9));
                assert_eq!(o.lr(c.lr, s.steps + 1), 0.005);
            }),
        ),
        (
            "DATASET",
            "  EXTRA_TRAIN_SET: 'extra.lst'\n",
            Box::new(|c, _| assert_eq!(c.train.extra_train_set.as_deref(), Some("extra.lst"))),
        ),
        (
            "TRAIN",
            "  NONBACKBONE_KEYWORDS: ['cls', 'aux', 'ocr']\n  NONBACKBONE_MULT: 5\n",
            Box::new(|c, s| {
                let o = s.options(c, TuningCache::default());
                assert_eq!((o.head_keywords.join(","), o.head_lr_mult), ("cls,aux,ocr".to_string(), 5.0));
            }),
        ),
        (
            "TRAIN",
            "  LR: 0.02\n",
            Box::new(|c, s| assert_eq!(s.options(c, TuningCache::default()).lr(c.lr, 0), 0.02)),
        ),
        ("TRAIN", "  WD: 0.0005\n", Box::new(|c, _| assert_eq!(c.weight_decay, 5e-4))),
        ("TRAIN", "  MOMENTUM: 0.5\n", Box::new(|c, _| assert_eq!(c.momentum, 0.5))),
        ("TRAIN", "  NESTEROV: true\n", Box::new(|c, _| assert!(c.nesterov))),
        ("TRAIN", "  SHUFFLE: false\n", Box::new(|c, _| assert!(!c.train.shuffle))),
        ("TRAIN", "  IGNORE_LABEL: 7\n", Box::new(|c, s| assert_eq!(s.augment(c).unwrap().ignore_label, 7))),
        (
            "TRAIN",
            "  BASE_SIZE: 640\n",
            Box::new(|c, s| {
                // The long side's base applies to an official dataset's augmentation.
                let c = Config {
                    dataset: hrnet_ocr::model::config::DatasetKeys {
                        name: Some("ade20k".into()),
                        ..c.dataset.clone()
                    },
                    ..c.clone()
                };
                assert_eq!(s.augment(&c).unwrap().long_side, Some(640));
            }),
        ),
        ("TRAIN", "  SCALE_FACTOR: 11\n", Box::new(|c, _| assert_eq!(c.dataset.train_scale_factor, 11))),
        ("TRAIN", "  FLIP: false\n", Box::new(|c, _| assert!(!c.dataset.train_flip))),
        ("TRAIN", "  MULTI_SCALE: false\n", Box::new(|c, _| assert!(!c.dataset.train_multi_scale))),
        (
            "MODEL",
            "  PRETRAINED: 'pretrained_models/hrnetv2_w48_imagenet_pretrained.pth'\n",
            Box::new(|c, _| {
                assert_eq!(
                    c.train.pretrained.as_deref(),
                    Some("pretrained_models/hrnetv2_w48_imagenet_pretrained.pth")
                )
            }),
        ),
        (
            "LOSS",
            "  USE_OHEM: true\n",
            Box::new(|c, _| assert_eq!(c.ohem.map(|o| (o.thresh, o.min_kept)), Some((0.9, 100_000)))),
        ),
        (
            "LOSS",
            "  USE_OHEM: true\n  OHEMTHRES: 0.7\n  OHEMKEEP: 131072\n",
            Box::new(|c, _| assert_eq!(c.ohem.map(|o| (o.thresh, o.min_kept)), Some((0.7, 131_072)))),
        ),
        ("LOSS", "  BALANCE_WEIGHTS: [1, 1]\n", Box::new(|c, _| assert_eq!(c.balance_weights, [1.0, 1.0]))),
    ];
    for (section, lines, check) in cases {
        let cfg = with(section, lines);
        let s = recipe(&cfg, 320);
        check(&cfg, &s);
        // The key changed something the base recipe does not have.
        assert!(cfg != base || s != d, "{lines} changed nothing");
    }
    // The augmentation of the base follows the official defaults.
    assert_eq!((a.flip, a.scale_steps, a.min_scale), (true, 16, 0.5));
    // A key the engine cannot honour is refused, naming it.
    for (lines, key) in
        [("  DOWNSAMPLERATE: 2\n", "TRAIN.DOWNSAMPLERATE"), ("  OPTIMIZER: adam\n", "TRAIN.OPTIMIZER")]
    {
        let text = tiny().replacen("TRAIN:\n", &format!("TRAIN:\n{lines}"), 1);
        let e = Config::from_yaml(&text, "keys.yaml").unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
    // An epoch needs a batch's worth of images.
    let e =
        RunSettings::from_config("keys.yaml", &base).with_epochs(&base, 31, None).unwrap_err().to_string();
    assert!(e.contains("31 images") && e.contains("batch of 32"), "{e}");
}

/// The reduced experiment of the README (`configs/procedural_cityscapes_w18_small.yaml`) is
/// the official Cityscapes one with the W18-small-v2 backbone and lavapipe-sized data.
#[test]
fn the_reduced_cityscapes_experiment_is_the_official_one_at_w18_small() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/procedural_cityscapes_w18_small.yaml");
    let c = Config::load(path).unwrap();
    assert_eq!(c.stages, Config::preset("w18-small-v2").unwrap().stages);
    assert_eq!((c.mid_channels, c.key_channels, c.num_classes), (512, 256, 19));
    assert_eq!(c.dataset.name.as_deref(), Some("cityscapes"));
    assert_eq!((c.train.batch_size_per_gpu, c.train.end_epoch, c.dataset.train_crop), (4, 6, [64, 128]));
    assert_eq!((c.lr, c.weight_decay, c.class_weights.is_some()), (0.01, 5e-4, true));
}

#[test]
fn model_context_head_selects_the_head_and_defaults_to_ocr() {
    use hrnet_ocr::model::heads::ContextHead;
    let text = tiny();
    assert_eq!(Config::from_yaml(&text, "tiny_ocr.yaml").unwrap().context_head, ContextHead::Ocr);
    for head in ContextHead::ALL {
        let with = text.replacen(
            "MODEL:\n",
            &format!("MODEL:\n  CONTEXT_HEAD: {}\n", head.name().to_uppercase()),
            1,
        );
        assert_eq!(Config::from_yaml(&with, "head.yaml").unwrap().context_head, head, "{with}");
    }
    let bad = text.replacen("MODEL:\n", "MODEL:\n  CONTEXT_HEAD: transformer\n", 1);
    let e = Config::from_yaml(&bad, "head.yaml").unwrap_err().to_string();
    for needle in ["head.yaml", "MODEL.CONTEXT_HEAD", "transformer", "ppm", "aspp", "double_attention"] {
        assert!(e.contains(needle), "{needle} missing from: {e}");
    }
}
