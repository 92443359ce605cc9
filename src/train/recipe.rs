//! A training run's recipe: the settings that define it (typed here, stored in its
//! checkpoints as text so a resumed run goes on exactly as it would have) and the official
//! recipe's fixed pieces built from them: the head's learning-rate keywords, the
//! augmentation and the per-step dropout seed.

use super::TrainOptions;
use crate::data::augment::Augment;
use crate::data::official::Official;
use crate::error::{Error, Result};
use crate::graph::Recompute;
use crate::kernels::tuning::TuningCache;
use crate::model::Config;
use std::collections::HashMap;

/// The head's keywords of the official OCR experiments (`NONBACKBONE_KEYWORDS`): a run
/// stored without keywords (before they were a setting) trains these at its multiplier.
pub const HEAD_KEYWORDS: [&str; 3] = ["cls", "aux", "ocr"];

/// Steps of a run of the procedural scenes without `--steps` (they have no epochs).
pub const SYNTHETIC_STEPS: usize = 1000;

/// The settings that define a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSettings {
    /// `bundled`, a preset, or an experiment YAML file.
    pub config: String,
    /// A dataset folder, or `synthetic` for the procedural scenes.
    pub data: String,
    /// A list file, or empty.
    pub list: String,
    pub split: String,
    /// Steps of the poly schedule (its `max_iter`): `TRAIN.END_EPOCH` epochs of the training
    /// list unless given; 0 until [`RunSettings::with_epochs`] decides them.
    pub steps: usize,
    /// Steps of the `TRAIN.EXTRA_EPOCH` phase on `DATASET.EXTRA_TRAIN_SET` (0: none).
    pub extra_steps: usize,
    /// Images per step on each device (`TRAIN.BATCH_SIZE_PER_GPU`).
    pub batch: usize,
    /// Data-parallel ranks (devices) the global batch of `devices * batch` is split over.
    pub devices: usize,
    /// Whether batch norm's statistics are the global batch's (synchronized) when
    /// `devices > 1`, or each device's own.
    pub sync_batch_norm: bool,
    pub crop: [usize; 2],
    /// The procedural scenes' size.
    pub size: [usize; 2],
    /// Seed of the data order, augmentation, dropout and procedural scenes.
    pub seed: u64,
    /// Parameters whose name holds one of these (`TRAIN.NONBACKBONE_KEYWORDS`) train at
    /// `head_lr_mult` (`TRAIN.NONBACKBONE_MULT`) times the rate.
    pub head_keywords: Vec<String>,
    pub head_lr_mult: f32,
    /// Validate every this many steps (0: never); none: every epoch, as the official run.
    pub eval_every: Option<usize>,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            config: "bundled".into(),
            data: "synthetic".into(),
            list: String::new(),
            split: "train".into(),
            steps: SYNTHETIC_STEPS,
            extra_steps: 0,
            batch: 4,
            devices: 1,
            sync_batch_norm: true,
            crop: [64, 64],
            size: [128, 128],
            seed: 1,
            head_keywords: HEAD_KEYWORDS.map(String::from).to_vec(),
            head_lr_mult: 1.0,
            eval_every: None,
        }
    }
}

fn size_text(s: [usize; 2]) -> String {
    format!("{}x{}", s[0], s[1])
}

impl RunSettings {
    /// Every setting as (key, text), in a fixed order: what a checkpoint stores.
    pub fn to_notes(&self) -> Vec<(&'static str, String)> {
        vec![
            ("config", self.config.clone()),
            ("data", self.data.clone()),
            ("list", self.list.clone()),
            ("split", self.split.clone()),
            ("steps", self.steps.to_string()),
            ("extra_steps", self.extra_steps.to_string()),
            ("batch", self.batch.to_string()),
            ("devices", self.devices.to_string()),
            ("sync_batch_norm", self.sync_batch_norm.to_string()),
            ("crop", size_text(self.crop)),
            ("size", size_text(self.size)),
            ("seed", self.seed.to_string()),
            ("head_keywords", self.head_keywords.join(",")),
            ("head_lr_mult", self.head_lr_mult.to_string()),
            ("eval_every", self.eval_every.map_or("epoch".into(), |n| n.to_string())),
        ]
    }

    /// The settings from their texts, a missing key taking its default; a text that does not
    /// parse is an error naming the key.
    pub fn from_notes(notes: &HashMap<String, String>) -> Result<Self> {
        RunSettings::default().with_notes(notes)
    }

    /// These settings with the keys `notes` holds replaced (flags over a YAML's recipe).
    pub fn with_notes(self, notes: &HashMap<String, String>) -> Result<Self> {
        let text = |key: &str, default: String| notes.get(key).cloned().unwrap_or(default);
        let keywords = match notes.get("head_keywords") {
            None => self.head_keywords,
            Some(k) => k.split(',').filter(|k| !k.is_empty()).map(str::to_string).collect(),
        };
        Ok(RunSettings {
            config: text("config", self.config),
            data: text("data", self.data),
            list: text("list", self.list),
            split: text("split", self.split),
            steps: parse(notes, "steps", self.steps)?,
            extra_steps: parse(notes, "extra_steps", self.extra_steps)?,
            batch: parse(notes, "batch", self.batch)?,
            devices: parse(notes, "devices", self.devices)?,
            sync_batch_norm: parse(notes, "sync_batch_norm", self.sync_batch_norm)?,
            crop: parse_size(notes, "crop", self.crop)?,
            size: parse_size(notes, "size", self.size)?,
            seed: parse(notes, "seed", self.seed)?,
            head_keywords: keywords,
            head_lr_mult: parse(notes, "head_lr_mult", self.head_lr_mult)?,
            eval_every: match notes.get("eval_every").map(String::as_str) {
                None => self.eval_every,
                Some("epoch") => None,
                Some(n) => Some(n.parse().map_err(|_| invalid("eval_every", n))?),
            },
        })
    }

    /// A new run's recipe from an experiment's keys (the official defaults where the YAML
    /// has none): batch `TRAIN.BATCH_SIZE_PER_GPU` on one device, crop `TRAIN.IMAGE_SIZE`,
    /// the head's keywords and multiplier; the steps are left to [`RunSettings::with_epochs`].
    pub fn from_config(config: &str, cfg: &Config) -> Self {
        RunSettings {
            config: config.to_string(),
            steps: 0,
            batch: cfg.train.batch_size_per_gpu,
            crop: cfg.dataset.train_crop,
            head_keywords: cfg.train.nonbackbone_keywords.clone(),
            head_lr_mult: cfg.train.nonbackbone_mult,
            ..RunSettings::default()
        }
    }

    /// Steps not given are `TRAIN.END_EPOCH` epochs of `images` training images (and
    /// `TRAIN.EXTRA_EPOCH` of `extra_images`), an epoch `images / batch` iterations, the last
    /// partial batch dropped as the official loader does. An epoch without an iteration is
    /// an error naming the counts.
    pub fn with_epochs(mut self, cfg: &Config, images: usize, extra_images: Option<usize>) -> Result<Self> {
        let global = self.global_batch();
        let iterations = |images: usize, what: &str| {
            let per_epoch = images / global;
            if per_epoch == 0 {
                return Err(Error::Invalid(format!(
                    "the {what} has {images} images, fewer than a batch of {global}: an epoch would have no iteration"
                )));
            }
            Ok(per_epoch)
        };
        if self.steps == 0 {
            self.steps = cfg.train.end_epoch * iterations(images, "training list")?;
        }
        if let (Some(extra), 0, true) = (extra_images, self.extra_steps, cfg.train.extra_epoch > 0) {
            self.extra_steps = cfg.train.extra_epoch * iterations(extra, "extra training list")?;
        }
        Ok(self)
    }

    /// The trainer's options: the config's head dropout, these sizes, keywords and schedule.
    pub fn options(&self, cfg: &Config, tuning: TuningCache) -> TrainOptions {
        TrainOptions {
            batch: self.batch,
            crop: self.crop,
            max_iter: self.steps,
            extra: (self.extra_steps > 0).then_some((cfg.train.extra_lr, self.extra_steps)),
            dropout: cfg.head_dropout(),
            head_keywords: self.head_keywords.clone(),
            head_lr_mult: self.head_lr_mult,
            tuning,
            recompute: Recompute::default(),
            parallel: Default::default(),
        }
    }

    /// Images per step over all devices.
    pub fn global_batch(&self) -> usize {
        self.batch * self.devices
    }

    /// Every step of the run, both phases.
    pub fn total_steps(&self) -> usize {
        self.steps + self.extra_steps
    }

    /// The effective recipe in one paragraph, as `train` prints it at the start.
    pub fn describe(&self, cfg: &Config) -> String {
        let loss = match cfg.ohem {
            Some(o) => format!("OHEM (OHEMTHRES {}, OHEMKEEP {}) on the main output", o.thresh, o.min_kept),
            None => "cross entropy".to_string(),
        };
        let head = if self.head_keywords.is_empty() {
            "one rate for every parameter".to_string()
        } else {
            format!("x{} for parameters named {}", self.head_lr_mult, self.head_keywords.join(", "))
        };
        let extra = if self.extra_steps > 0 {
            format!(", then {} steps from EXTRA_LR {}", self.extra_steps, cfg.train.extra_lr)
        } else {
            String::new()
        };
        let batch = match self.devices {
            1 => self.batch.to_string(),
            d => format!(
                "{} ({} on each of {d} devices, batch norm {})",
                self.global_batch(),
                self.batch,
                if self.sync_batch_norm { "synchronized" } else { "per device" }
            ),
        };
        format!(
            "recipe: {} steps of batch {batch} at {}x{}, SGD LR {} (poly 0.9){extra}, momentum {}, WD {}, \
             nesterov {}; {head}; loss {:.1} x aux + {:.1} x main, {loss}; seed {}",
            self.steps,
            self.crop[0],
            self.crop[1],
            cfg.lr,
            cfg.momentum,
            cfg.weight_decay,
            cfg.nesterov,
            cfg.balance_weights[0],
            cfg.balance_weights[1],
            self.seed
        )
    }

    /// The official augmentation at this crop, for `config`'s dataset: without one (custom
    /// data), scales 0.5 to 2.0 in steps of 0.1 of the image's own size, random crop and
    /// flip; with one, its dataset class's recipe from the YAML's `TRAIN` keys: the long side
    /// at scale 1 is `TRAIN.BASE_SIZE`, scales 0.5 + k / 10 for k up to
    /// `TRAIN.SCALE_FACTOR` (none without `TRAIN.MULTI_SCALE`), flip as `TRAIN.FLIP`, LIP's
    /// images resized to the crop first and its left and right classes exchanged by a flip,
    /// a reduced zero label ignored.
    pub fn augment(&self, config: &Config) -> Result<Augment> {
        let mut a = Augment::official(self.crop, config.ignore_index());
        let Some(name) = &config.dataset.name else { return Ok(a) };
        let dataset = Official::parse(name)?;
        let keys = &config.dataset;
        a.flip = keys.train_flip;
        a.swap_on_flip = dataset.flip_swaps();
        a.reduced_zero = dataset.reduced_zero(config.num_classes);
        if keys.train_multi_scale {
            a.scale_steps = keys.train_scale_factor;
            a.long_side = Some(keys.train_base_size);
        } else {
            (a.min_scale, a.scale_steps) = (1.0, 0);
        }
        if dataset == Official::Lip {
            a.resize_first = Some(self.crop);
        }
        Ok(a)
    }

    /// The dropout seed of step `step`: distinct per step, and the same when a run resumes.
    pub fn step_seed(&self, step: usize) -> u32 {
        (self.seed as u32) ^ (step as u32).wrapping_mul(0x9E37_79B1)
    }
}

fn parse<T: std::str::FromStr>(notes: &HashMap<String, String>, key: &str, default: T) -> Result<T> {
    match notes.get(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| invalid(key, v)),
    }
}

fn parse_size(notes: &HashMap<String, String>, key: &str, default: [usize; 2]) -> Result<[usize; 2]> {
    let Some(v) = notes.get(key) else { return Ok(default) };
    let side = |s: &str| s.parse::<usize>().ok().filter(|&n| n > 0);
    match v.split_once('x') {
        Some((h, w)) => side(h).zip(side(w)).map(|(h, w)| [h, w]),
        None => side(v).map(|n| [n, n]),
    }
    .ok_or_else(|| invalid(key, v))
}

fn invalid(key: &str, value: &str) -> Error {
    Error::Invalid(format!("training setting {key} = {value:?} is not valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_their_notes_and_bad_text_is_named() {
        let s = RunSettings {
            crop: [48, 96],
            seed: 7,
            head_lr_mult: 10.0,
            eval_every: Some(5),
            ..RunSettings::default()
        };
        let notes: HashMap<String, String> = s.to_notes().into_iter().map(|(k, v)| (k.into(), v)).collect();
        assert_eq!(RunSettings::from_notes(&notes).unwrap(), s);
        assert_eq!(RunSettings::from_notes(&HashMap::new()).unwrap(), RunSettings::default());
        let bad: HashMap<String, String> = [("crop".to_string(), "64y".to_string())].into();
        let e = RunSettings::from_notes(&bad).unwrap_err().to_string();
        assert!(e.contains("crop") && e.contains("64y"), "{e}");
        assert_ne!(s.step_seed(1), s.step_seed(2));
    }
}
