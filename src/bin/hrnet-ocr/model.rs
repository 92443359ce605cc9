//! The model a command runs: the bundled one, or a config with its weights.

use crate::ModelArgs;
use hrnet_ocr::data::procedural;
use hrnet_ocr::model::config::Convention;
use hrnet_ocr::model::weights::{self, NamedTensor};
use hrnet_ocr::model::{mmseg, Config};
use hrnet_ocr::{Error, Result};
use std::path::Path;

/// The bundled model: a small HRNet-OCR trained on the procedural scenes (README says how).
const BUNDLED_CONFIG: &str = include_str!("../../../models/procedural.yaml");
const BUNDLED_WEIGHTS: &[u8] = include_bytes!("../../../models/procedural.safetensors");
pub const BUNDLED_NAME: &str = "the bundled model (models/procedural.yaml)";

/// The official Cityscapes class names, in train-id order.
const CITYSCAPES_CLASSES: [&str; 19] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

/// The bundled model's config.
pub fn bundled_config() -> Result<Config> {
    Config::from_yaml(BUNDLED_CONFIG, "models/procedural.yaml")
}

/// The config and weights `args` name, or the bundled model when it names neither.
pub fn load(args: &ModelArgs) -> Result<(Config, Vec<NamedTensor>, bool)> {
    match (&args.config, &args.weights) {
        (None, None) => {
            let weights = weights::from_safetensors_bytes(BUNDLED_WEIGHTS, BUNDLED_NAME)?;
            Ok((bundled_config()?, weights, true))
        }
        (Some(config), Some(path)) => {
            let (config, weights) = config_and_weights(config, path)?;
            Ok((config, weights, false))
        }
        (None, Some(path)) => Err(Error::Invalid(format!(
            "--weights {} needs --config: the model those weights are for (a preset or YAML file)",
            path.display()
        ))),
        (Some(config), None) => Err(Error::Invalid(format!(
            "--config {config} needs --weights (only the bundled model has built-in weights)"
        ))),
    }
}

/// A config and weights for it. An mmsegmentation checkpoint is renamed to the official names
/// and the config follows mmsegmentation's conventions, which this says.
pub fn config_and_weights(config: &str, path: &Path) -> Result<(Config, Vec<NamedTensor>)> {
    let mut config = Config::load(config)?;
    let weights = mmseg::adopt(&mut config, weights::read(path)?, &path.display().to_string())?;
    if config.convention == Convention::Mmsegmentation {
        println!(
            "{}: an mmsegmentation OCRNet checkpoint; {} tensors renamed to the official names, and the \
             model follows mmsegmentation (align_corners=False, fuse upsampling by Upsample, no head conv bias)",
            path.display(),
            weights.len()
        );
    }
    Ok((config, weights))
}

/// Display names of `classes` classes: the procedural scenes' for the bundled model,
/// Cityscapes' for 19 classes, numbers otherwise.
pub fn class_names(classes: usize, procedural_scenes: bool) -> Vec<String> {
    if procedural_scenes && classes == procedural::CLASSES.len() {
        procedural::CLASSES.iter().map(|s| s.to_string()).collect()
    } else if classes == CITYSCAPES_CLASSES.len() {
        CITYSCAPES_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        (0..classes).map(|c| format!("class {c}")).collect()
    }
}
