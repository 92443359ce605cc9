//! Model and training configuration: presets, and the official experiment YAML files read
//! as they are. Keys the engine does not use are ignored (the official files carry many,
//! and a misspelt `NUM_RANCHES`); a key it uses with a wrong type or value is an error
//! naming the key.

use super::heads::ContextHead;
use super::yaml::{self, Yaml};
use crate::error::{Error, Result};
use std::path::Path;

/// The largest channel, block, module or class count a config may give: far above any
/// real model (W48 has 384 channels), and small enough that no size computed from the
/// counts can overflow.
pub const MAX_COUNT: usize = 1 << 16;

/// A residual block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    Basic,
    Bottleneck,
}

impl Block {
    /// Output channels per `planes`.
    pub fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// One HRNet stage: `modules` HighResolutionModules of `blocks[b]` blocks per branch b.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub modules: usize,
    pub block: Block,
    pub blocks: Vec<usize>,
    pub channels: Vec<usize>,
}

impl Stage {
    pub fn branches(&self) -> usize {
        self.channels.len()
    }

    /// Each branch's output channels (`channels * expansion`).
    pub fn out_channels(&self) -> Vec<usize> {
        self.channels.iter().map(|c| c * self.block.expansion()).collect()
    }
}

/// OHEM settings (`LOSS.OHEMTHRES`, `LOSS.OHEMKEEP`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OhemConfig {
    pub thresh: f32,
    pub min_kept: usize,
}

/// Everything the engine reads from a config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub stages: [Stage; 4],
    pub num_classes: usize,
    pub mid_channels: usize,
    pub key_channels: usize,
    /// `MODEL.CONTEXT_HEAD` (this engine's key; the official files have none, which is OCR).
    pub context_head: ContextHead,
    /// `MODEL.ALIGN_CORNERS` of every bilinear resize (always false under
    /// [`Convention::Mmsegmentation`]).
    pub align_corners: bool,
    /// Whose implementation the model reproduces where the official code and
    /// mmsegmentation differ: set by the weights ([`crate::model::mmseg`]), official otherwise.
    pub convention: Convention,
    pub ignore_label: i64,
    pub ohem: Option<OhemConfig>,
    /// Loss weights of [aux, main].
    pub balance_weights: [f32; 2],
    pub lr: f32,
    pub weight_decay: f32,
    pub momentum: f32,
    pub nesterov: bool,
    /// Per-class loss weights: the official Cityscapes weights when the dataset is Cityscapes.
    pub class_weights: Option<Vec<f32>>,
    /// The data: `DATASET.DATASET` (lower case), `DATASET.TRAIN_SET` and
    /// `DATASET.TEST_SET` (list files relative to the dataset root), where the YAML has them.
    pub dataset: DatasetKeys,
    /// The training run's keys (`TRAIN.*`, `MODEL.PRETRAINED`), official defaults where absent.
    pub train: TrainKeys,
}

/// The two implementations of HRNet-OCR whose checkpoints the engine loads. They share every
/// layer and differ in these details, which decide the logits:
///
/// | | official (`seg_hrnet_ocr.py`) | mmsegmentation (`OCRNet`) |
/// |---|---|---|
/// | bilinear resizes | `MODEL.ALIGN_CORNERS` (true in the official files) | `align_corners=False` |
/// | fuse-layer upsampling | straight to the branch's size | by `2^(j-i)` (`Upsample`), then to the branch's size when that differs |
/// | `conv3x3_ocr.0`, `aux_head.0` | with bias | without (a `ConvModule` before a norm) |
/// | dropout before the classifier | `Dropout2d(0.05)` | none (`dropout_ratio=-1`) |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    Official,
    Mmsegmentation,
}

/// An experiment YAML's training-run keys, as the official `tools/train.py` reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainKeys {
    /// `TRAIN.BATCH_SIZE_PER_GPU` (official default 32): the batch is this times the devices.
    pub batch_size_per_gpu: usize,
    /// `TRAIN.END_EPOCH` (484): the run is this many epochs of `len(train list) / batch`
    /// iterations (the official loader drops the last partial batch).
    pub end_epoch: usize,
    /// `TRAIN.EXTRA_EPOCH` (0), `TRAIN.EXTRA_LR` (0.001) and `DATASET.EXTRA_TRAIN_SET`: a
    /// second phase of epochs on another list, its own poly schedule from `EXTRA_LR`.
    pub extra_epoch: usize,
    pub extra_lr: f32,
    pub extra_train_set: Option<String>,
    /// `TRAIN.NONBACKBONE_KEYWORDS` (none) and `TRAIN.NONBACKBONE_MULT` (10): parameters whose
    /// name holds a keyword train at the multiplied rate.
    pub nonbackbone_keywords: Vec<String>,
    pub nonbackbone_mult: f32,
    /// `TRAIN.SHUFFLE` (true): a new random order of the list each epoch.
    pub shuffle: bool,
    /// `MODEL.PRETRAINED` (none): an ImageNet classification checkpoint to start from.
    pub pretrained: Option<String>,
}

impl Default for TrainKeys {
    /// The official defaults (`lib/config/default.py`).
    fn default() -> Self {
        TrainKeys {
            batch_size_per_gpu: 32,
            end_epoch: 484,
            extra_epoch: 0,
            extra_lr: 0.001,
            extra_train_set: None,
            nonbackbone_keywords: Vec::new(),
            nonbackbone_mult: 10.0,
            shuffle: true,
            pretrained: None,
        }
    }
}

/// An experiment YAML's dataset keys.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetKeys {
    pub name: Option<String>,
    pub train_set: Option<String>,
    pub test_set: Option<String>,
    /// `TEST.BASE_SIZE`: the long side an image is resized to at scale 1 (official
    /// default 2048).
    pub test_base_size: usize,
    /// `TEST.IMAGE_SIZE` as (height, width): the test crop (the YAML writes width first;
    /// official default 2048 x 1024).
    pub test_crop: [usize; 2],
    /// `TEST.SCALE_LIST` (official default `[1]`).
    pub test_scales: Vec<f32>,
    /// `TEST.FLIP_TEST`.
    pub test_flip: bool,
    /// `TRAIN.BASE_SIZE`: the long side of a training image at scale 1 (official default 2048).
    pub train_base_size: usize,
    /// `TRAIN.SCALE_FACTOR`: scales drawn from 0.5 + k / 10, k in 0..=this (default 16).
    pub train_scale_factor: u32,
    /// `TRAIN.IMAGE_SIZE` as (height, width): the training crop (default 512 x 1024).
    pub train_crop: [usize; 2],
    /// `TRAIN.FLIP` and `TRAIN.MULTI_SCALE` (both default true).
    pub train_flip: bool,
    pub train_multi_scale: bool,
}

impl Default for DatasetKeys {
    /// No dataset or lists; the official defaults of the test keys.
    fn default() -> Self {
        DatasetKeys {
            name: None,
            train_set: None,
            test_set: None,
            test_base_size: 2048,
            test_crop: [1024, 2048],
            test_scales: vec![1.0],
            test_flip: false,
            train_base_size: 2048,
            train_scale_factor: 16,
            train_crop: [512, 1024],
            train_flip: true,
            train_multi_scale: true,
        }
    }
}

/// The class weights the official Cityscapes dataset class hands to the loss (spec section 4).
pub const CITYSCAPES_CLASS_WEIGHTS: [f32; 19] = [
    0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539, 0.9843, 1.1116,
    0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507,
];

fn stage(modules: usize, block: Block, blocks: &[usize], channels: &[usize]) -> Stage {
    Stage { modules, block, blocks: blocks.to_vec(), channels: channels.to_vec() }
}

impl Config {
    /// The names [`Config::preset`] knows.
    pub const PRESETS: [&'static str; 4] = ["w18-small-v2", "w18", "w32", "w48"];

    /// A preset (spec table 2.6) with the official OCR head (MID 512, KEY 256), 19 classes.
    pub fn preset(name: &str) -> Result<Self> {
        // (stage-1 blocks, (modules, blocks per branch) of stages 2 to 4, base width)
        type Layout = (usize, [(usize, usize); 3], usize);
        let (s1_blocks, [s2, s3, s4], widths): Layout = match name {
            "w18-small-v2" => (2, [(1, 2), (3, 2), (2, 2)], 18),
            "w18" => (4, [(1, 4), (4, 4), (3, 4)], 18),
            "w32" => (4, [(1, 4), (4, 4), (3, 4)], 32),
            "w48" => (4, [(1, 4), (4, 4), (3, 4)], 48),
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown preset {name:?}; presets: {}",
                    Self::PRESETS.join(", ")
                )))
            }
        };
        let c: Vec<usize> = (0..4).map(|b| widths << b).collect();
        Ok(Config {
            stages: [
                stage(1, Block::Bottleneck, &[s1_blocks], &[64]),
                stage(s2.0, Block::Basic, &[s2.1; 2], &c[..2]),
                stage(s3.0, Block::Basic, &[s3.1; 3], &c[..3]),
                stage(s4.0, Block::Basic, &[s4.1; 4], &c[..4]),
            ],
            num_classes: 19,
            mid_channels: 512,
            key_channels: 256,
            context_head: ContextHead::Ocr,
            align_corners: true,
            convention: Convention::Official,
            ignore_label: 255,
            ohem: None,
            balance_weights: [0.4, 1.0],
            lr: 0.01,
            weight_decay: 5e-4,
            momentum: 0.9,
            nesterov: false,
            class_weights: Some(CITYSCAPES_CLASS_WEIGHTS.to_vec()),
            dataset: DatasetKeys::default(),
            train: TrainKeys::default(),
        })
    }

    /// A preset name, or the path of an official-style experiment YAML file.
    pub fn load(name_or_path: &str) -> Result<Self> {
        if Self::PRESETS.contains(&name_or_path) {
            return Self::preset(name_or_path);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "{name_or_path:?} is neither a preset ({}) nor an existing YAML file",
                Self::PRESETS.join(", ")
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { path: name_or_path.to_string(), source })?;
        Self::from_yaml(&text, name_or_path)
    }

    /// Reads an experiment file's text; `source` names it in errors.
    pub fn from_yaml(text: &str, source: &str) -> Result<Self> {
        let doc = yaml::parse(text, source)?;
        let r = Reader { doc: &doc, source };
        let stages = [1, 2, 3, 4].map(|s| r.stage(s));
        let [s1, s2, s3, s4] = stages;
        let stages = [s1?, s2?, s3?, s4?];
        for (i, s) in stages.iter().enumerate() {
            let want = if i == 0 { 1 } else { stages[i - 1].branches() + 1 };
            if s.branches() != want {
                return Err(r.error(
                    &format!("MODEL.EXTRA.STAGE{}.NUM_CHANNELS", i + 1),
                    &format!("stage {} must have {want} branches, has {}", i + 1, s.branches()),
                ));
            }
        }
        let use_ohem = r.opt_bool("LOSS.USE_OHEM")?.unwrap_or(false);
        let ohem = if use_ohem {
            Some(OhemConfig {
                thresh: r.opt_f32("LOSS.OHEMTHRES")?.unwrap_or(0.9),
                min_kept: r.opt_usize("LOSS.OHEMKEEP")?.unwrap_or(100_000),
            })
        } else {
            None
        };
        let balance = match r.opt_f32_list("LOSS.BALANCE_WEIGHTS")? {
            None => [0.4, 1.0],
            Some(w) if w.len() == 2 => [w[0], w[1]],
            Some(w) => {
                return Err(r.error("LOSS.BALANCE_WEIGHTS", &format!("expected 2 weights, got {}", w.len())))
            }
        };
        let ignore_label = r.opt_i64("TRAIN.IGNORE_LABEL")?.unwrap_or(255);
        if ignore_label != -1 && u32::try_from(ignore_label).is_err() {
            return Err(
                r.error("TRAIN.IGNORE_LABEL", &format!("{ignore_label} is neither -1 nor a label value"))
            );
        }
        let num_classes = r.positive("DATASET.NUM_CLASSES", None)?;
        let dataset = r.scalar("DATASET.DATASET")?.unwrap_or("").to_ascii_lowercase();
        let class_weights = (dataset == "cityscapes" && num_classes == CITYSCAPES_CLASS_WEIGHTS.len())
            .then(|| CITYSCAPES_CLASS_WEIGHTS.to_vec());
        Ok(Config {
            stages,
            num_classes,
            mid_channels: r.positive("MODEL.OCR.MID_CHANNELS", Some(512))?,
            key_channels: r.positive("MODEL.OCR.KEY_CHANNELS", Some(256))?,
            context_head: match r.scalar("MODEL.CONTEXT_HEAD")? {
                None => ContextHead::Ocr,
                Some(name) => {
                    ContextHead::parse(name).map_err(|e| r.error("MODEL.CONTEXT_HEAD", &e.to_string()))?
                }
            },
            align_corners: r.opt_bool("MODEL.ALIGN_CORNERS")?.unwrap_or(true),
            convention: Convention::Official,
            ignore_label,
            ohem,
            balance_weights: balance,
            lr: r.opt_f32("TRAIN.LR")?.unwrap_or(0.01),
            weight_decay: r.opt_f32("TRAIN.WD")?.unwrap_or(1e-4),
            momentum: r.opt_f32("TRAIN.MOMENTUM")?.unwrap_or(0.9),
            nesterov: r.opt_bool("TRAIN.NESTEROV")?.unwrap_or(false),
            class_weights,
            dataset: DatasetKeys {
                name: (!dataset.is_empty()).then_some(dataset),
                train_set: r.scalar("DATASET.TRAIN_SET")?.map(str::to_string),
                test_set: r.scalar("DATASET.TEST_SET")?.map(str::to_string),
                test_base_size: r.positive("TEST.BASE_SIZE", Some(2048))?,
                test_crop: r.size_pair("TEST.IMAGE_SIZE", [1024, 2048])?,
                test_scales: match r.opt_f32_list("TEST.SCALE_LIST")? {
                    Some(s) if s.is_empty() || s.iter().any(|v| !(v.is_finite() && *v > 0.0)) => {
                        return Err(
                            r.error("TEST.SCALE_LIST", &format!("expected positive scales, got {s:?}"))
                        )
                    }
                    Some(s) => s,
                    None => vec![1.0],
                },
                test_flip: r.opt_bool("TEST.FLIP_TEST")?.unwrap_or(false),
                train_base_size: r.positive("TRAIN.BASE_SIZE", Some(2048))?,
                train_scale_factor: u32::try_from(r.opt_usize("TRAIN.SCALE_FACTOR")?.unwrap_or(16))
                    .map_err(|_| r.error("TRAIN.SCALE_FACTOR", "is too large"))?,
                train_crop: r.size_pair("TRAIN.IMAGE_SIZE", [512, 1024])?,
                train_flip: r.opt_bool("TRAIN.FLIP")?.unwrap_or(true),
                train_multi_scale: r.opt_bool("TRAIN.MULTI_SCALE")?.unwrap_or(true),
            },
            train: r.train_keys()?,
        })
    }

    /// The ignore label as the u32 label maps hold it (-1 is `u32::MAX`: never a pixel value).
    pub fn ignore_index(&self) -> u32 {
        u32::try_from(self.ignore_label).unwrap_or(u32::MAX)
    }

    /// Follows `convention` from here on (mmsegmentation's resizes all have
    /// `align_corners=False`).
    pub fn follow(&mut self, convention: Convention) {
        self.convention = convention;
        if convention == Convention::Mmsegmentation {
            self.align_corners = false;
        }
    }

    /// The dropout rate before the classifier in training (`OCR_DROPOUT` officially).
    pub fn head_dropout(&self) -> f32 {
        match self.convention {
            Convention::Official => crate::model::hrnet::OCR_DROPOUT,
            Convention::Mmsegmentation => 0.0,
        }
    }

    /// Whether the head's first convolutions (`conv3x3_ocr.0`, `aux_head.0`) have a bias.
    pub fn head_conv_bias(&self) -> bool {
        self.convention == Convention::Official
    }

    /// The backbone's output channels: the sum of stage 4's branch widths.
    pub fn concat_channels(&self) -> usize {
        self.stages[3].out_channels().iter().sum()
    }
}

/// Typed access to the parsed document, with errors naming the key.
struct Reader<'a> {
    doc: &'a Yaml,
    source: &'a str,
}

impl Reader<'_> {
    fn error(&self, key: &str, what: &str) -> Error {
        Error::Format { path: self.source.to_string(), what: format!("{key}: {what}") }
    }

    fn scalar(&self, key: &str) -> Result<Option<&str>> {
        match self.doc.get(key) {
            None => Ok(None),
            Some(Yaml::Scalar(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(self.error(key, "expected a single value")),
        }
    }

    fn parsed<T: std::str::FromStr>(&self, key: &str, kind: &str) -> Result<Option<T>> {
        self.scalar(key)?
            .map(|s| s.parse().map_err(|_| self.error(key, &format!("expected {kind}, got {s:?}"))))
            .transpose()
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.parsed(key, "a number")
    }

    fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        self.parsed(key, "an integer")
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.parsed(key, "a non-negative integer")
    }

    /// A positive count of at most [`MAX_COUNT`].
    fn positive(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match (self.opt_usize(key)?, default) {
            (Some(0), _) => Err(self.error(key, "must be positive")),
            (Some(v), _) if v > MAX_COUNT => {
                Err(self.error(key, &format!("{v} is above the limit of {MAX_COUNT}")))
            }
            (Some(v), _) | (None, Some(v)) => Ok(v),
            (None, None) => Err(self.error(key, "missing")),
        }
    }

    /// A `[width, height]` list as (height, width), or `default` (height, width) without one.
    fn size_pair(&self, key: &str, default: [usize; 2]) -> Result<[usize; 2]> {
        match self.list::<usize>(key, "sizes")?.as_deref() {
            None => Ok(default),
            Some(&[w, h]) if w > 0 && h > 0 => Ok([h, w]),
            Some(other) => Err(self.error(key, &format!("expected [width, height], got {other:?}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.scalar(key)?
            .map(|s| match s.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" => Ok(true),
                "false" | "no" | "off" => Ok(false),
                _ => Err(self.error(key, &format!("expected true or false, got {s:?}"))),
            })
            .transpose()
    }

    fn list<T: std::str::FromStr>(&self, key: &str, kind: &str) -> Result<Option<Vec<T>>> {
        match self.doc.get(key) {
            None => Ok(None),
            Some(Yaml::List(items)) => items
                .iter()
                .map(|item| match item {
                    Yaml::Scalar(s) => s
                        .parse()
                        .map_err(|_| self.error(key, &format!("expected a list of {kind}, found {s:?}"))),
                    _ => Err(self.error(key, &format!("expected a list of {kind}"))),
                })
                .collect::<Result<Vec<T>>>()
                .map(Some),
            Some(_) => Err(self.error(key, &format!("expected a list of {kind}"))),
        }
    }

    fn opt_f32_list(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.list(key, "numbers")
    }

    /// A non-empty text, or none (the official code treats `''` as unset).
    fn opt_text(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .scalar(key)?
            .map(|s| s.trim_matches(['\'', '"']))
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }

    fn train_keys(&self) -> Result<TrainKeys> {
        let d = TrainKeys::default();
        // Labels downsampled after the crop: every official experiment uses 1, and the
        // engine's loss reads labels at the crop's size.
        match self.opt_usize("TRAIN.DOWNSAMPLERATE")? {
            None | Some(1) => {}
            Some(r) => {
                return Err(self.error("TRAIN.DOWNSAMPLERATE", &format!("{r} is not supported (only 1)")))
            }
        }
        match self.scalar("TRAIN.OPTIMIZER")? {
            None | Some("sgd") => {}
            Some(o) => {
                return Err(
                    self.error("TRAIN.OPTIMIZER", &format!("{o:?}: the official code supports only sgd"))
                )
            }
        }
        let keywords = match self.doc.get("TRAIN.NONBACKBONE_KEYWORDS") {
            None => d.nonbackbone_keywords,
            Some(_) => self.list::<String>("TRAIN.NONBACKBONE_KEYWORDS", "names")?.unwrap_or_default(),
        };
        Ok(TrainKeys {
            batch_size_per_gpu: self.positive("TRAIN.BATCH_SIZE_PER_GPU", Some(d.batch_size_per_gpu))?,
            end_epoch: self.positive("TRAIN.END_EPOCH", Some(d.end_epoch))?,
            extra_epoch: self.opt_usize("TRAIN.EXTRA_EPOCH")?.unwrap_or(d.extra_epoch),
            extra_lr: self.opt_f32("TRAIN.EXTRA_LR")?.unwrap_or(d.extra_lr),
            extra_train_set: self.opt_text("DATASET.EXTRA_TRAIN_SET")?,
            nonbackbone_keywords: keywords
                .into_iter()
                .map(|k| k.trim_matches(['\'', '"']).to_string())
                .collect(),
            nonbackbone_mult: self.opt_f32("TRAIN.NONBACKBONE_MULT")?.unwrap_or(d.nonbackbone_mult),
            shuffle: self.opt_bool("TRAIN.SHUFFLE")?.unwrap_or(d.shuffle),
            pretrained: self.opt_text("MODEL.PRETRAINED")?,
        })
    }

    fn stage(&self, s: usize) -> Result<Stage> {
        let key = |k: &str| format!("MODEL.EXTRA.STAGE{s}.{k}");
        let modules = self.positive(&key("NUM_MODULES"), None)?;
        let block = match self.scalar(&key("BLOCK"))? {
            Some("BASIC") => Block::Basic,
            Some("BOTTLENECK") => Block::Bottleneck,
            Some(other) => {
                return Err(self.error(&key("BLOCK"), &format!("expected BASIC or BOTTLENECK, got {other:?}")))
            }
            None => return Err(self.error(&key("BLOCK"), "missing")),
        };
        let blocks: Vec<usize> = self
            .list(&key("NUM_BLOCKS"), "block counts")?
            .ok_or_else(|| self.error(&key("NUM_BLOCKS"), "missing"))?;
        let channels: Vec<usize> = self
            .list(&key("NUM_CHANNELS"), "channel counts")?
            .ok_or_else(|| self.error(&key("NUM_CHANNELS"), "missing"))?;
        if blocks.len() != channels.len() || channels.is_empty() {
            return Err(self.error(
                &key("NUM_BLOCKS"),
                &format!("{} block counts for {} branches", blocks.len(), channels.len()),
            ));
        }
        if blocks.contains(&0) || channels.contains(&0) {
            return Err(self.error(&key("NUM_CHANNELS"), "block and channel counts must be positive"));
        }
        for (k, list) in [("NUM_BLOCKS", &blocks), ("NUM_CHANNELS", &channels)] {
            if let Some(v) = list.iter().find(|&&v| v > MAX_COUNT) {
                return Err(self.error(&key(k), &format!("{v} is above the limit of {MAX_COUNT}")));
            }
        }
        // NUM_BRANCHES is implied by the lists; when given (STAGE1 of the official files
        // misspells it NUM_RANCHES, which is ignored) it must agree.
        if let Some(n) = self.opt_usize(&key("NUM_BRANCHES"))? {
            if n != channels.len() {
                return Err(self.error(
                    &key("NUM_BRANCHES"),
                    &format!("{n}, but NUM_CHANNELS lists {}", channels.len()),
                ));
            }
        }
        Ok(Stage { modules, block, blocks, channels })
    }
}
