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
