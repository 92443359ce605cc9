//! Training with HRNet-OCR's recipe (spec section 5): SGD with momentum and weight decay,
//! the poly schedule, loss `0.4 * CE(aux) + CE(out)` (or OHEM), head LR multiplier; a
//! run's settings and the recipe's fixed pieces in [`recipe`].

pub mod recipe;

use crate::data::augment::Sample;
use crate::data::SplitMix;
use crate::dist::{Comm, CommStats, DataParallel};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, GraphBuilder, Mode, Recompute, TrainingMemory, ValueId};
use crate::kernels::sgd::SgdConfig;
use crate::kernels::tuning::{Tuner, TuningCache};
use crate::model::weights::{self, NamedTensor};
use crate::model::{hrnet, Config};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The poly learning rate step `step` (0-based) runs with: HRNet-OCR updates the rate after
/// each optimizer step from the index of the step just taken, so steps 0 and 1 both run at
/// `base` and step t >= 1 at `base * (1 - (t - 1) / max_iter)^power`.
pub fn poly_lr(base: f32, step: usize, max_iter: usize, power: f32) -> f32 {
    let it = step.saturating_sub(1) as f64;
    (f64::from(base) * (1.0 - it / max_iter as f64).max(0.0).powf(f64::from(power))) as f32
}

/// What a training run needs beyond the model config.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    pub batch: usize,
    /// Crop (height, width) of every sample.
    pub crop: [usize; 2],
    /// Steps of the poly schedule.
    pub max_iter: usize,
    /// A second phase after `max_iter` steps (`TRAIN.EXTRA_LR`, its steps), its own poly
    /// schedule: as the official loop, its first step still runs at the first phase's rate.
    pub extra: Option<(f32, usize)>,
    /// Dropout before cls_head (the official 0.05, or 0).
    pub dropout: f32,
    /// Parameters whose name contains one of these train at `head_lr_mult` times the rate.
    pub head_keywords: Vec<String>,
    pub head_lr_mult: f32,
    /// Where the kernel-variant choices measured before the first step are kept
    /// ([`TuningCache::from_env`] for `HRNET_OCR_TUNING`).
    pub tuning: TuningCache,
    /// What the backward rebuilds instead of keeping it from the forward
    /// ([`GraphBuilder::recompute_in_backward`]): less memory, the same results.
    pub recompute: Recompute,
    /// This trainer's rank in data-parallel training (`batch` is then its slice of the
    /// global batch), and whether batch norm is synchronized; one rank by default.
    pub parallel: DataParallel,
}

impl TrainOptions {
    /// The rate step `step` runs with: the poly schedule of `base` over `max_iter` steps,
    /// then that of the extra phase.
    pub fn lr(&self, base: f32, step: usize) -> f32 {
        match self.extra {
            Some((extra_lr, iters)) if step > self.max_iter => {
                poly_lr(extra_lr, step - self.max_iter, iters, 0.9)
            }
            _ => poly_lr(base, step, self.max_iter, 0.9),
        }
    }
}

/// One optimizer step's figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The step's 0-based index.
    pub step: usize,
    /// The weighted total that was minimised.
    pub loss: f32,
    /// The aux (soft object regions) and main loss terms, before their weights.
    pub aux_loss: f32,
    pub main_loss: f32,
    pub lr: f32,
}

/// Everything an exact resume needs: weights and running statistics (official names),
/// each parameter's momentum, the number of steps taken, and the caller's own notes (the
/// run's settings). Saved as one safetensors file whose weights any command can load.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub weights: Vec<NamedTensor>,
    pub momentum: Vec<NamedTensor>,
    pub steps: usize,
    pub notes: HashMap<String, String>,
}

const MOMENTUM_PREFIX: &str = "optimizer.momentum.";
const STEPS_KEY: &str = "hrnet_ocr.steps";

impl Checkpoint {
    /// Writes the checkpoint atomically: a crash while saving leaves the previous file whole.
    pub fn save(&self, path: &Path) -> Result<()> {
        let momentum = self
            .momentum
            .iter()
            .map(|m| NamedTensor { name: format!("{MOMENTUM_PREFIX}{}", m.name), ..m.clone() });
        let tensors: Vec<NamedTensor> = self.weights.iter().cloned().chain(momentum).collect();
        let mut meta = self.notes.clone();
        meta.insert(STEPS_KEY.into(), self.steps.to_string());
        weights::write_safetensors_with(path, &tensors, Some(meta))
    }

    /// Reads a checkpoint [`Checkpoint::save`] wrote.
    pub fn load(path: &Path) -> Result<Self> {
        let (tensors, mut notes) = weights::read_safetensors_raw(path)?;
        let format = |what: String| Error::Format { path: path.display().to_string(), what };
        let steps = notes
            .remove(STEPS_KEY)
            .ok_or_else(|| format(format!("not a training checkpoint: its metadata has no {STEPS_KEY}")))?;
        let steps =
            steps.parse().map_err(|_| format(format!("{STEPS_KEY} is {steps:?}, not a step count")))?;
        let (momentum, weights): (Vec<_>, Vec<_>) =
            tensors.into_iter().partition(|t| t.name.starts_with(MOMENTUM_PREFIX));
        let momentum = momentum
            .into_iter()
            .map(|t| NamedTensor { name: t.name[MOMENTUM_PREFIX.len()..].to_string(), ..t })
            .collect();
        Ok(Checkpoint { weights, momentum, steps, notes })
    }
}

impl Checkpoint {
    /// An official `checkpoint.pth.tar` as a checkpoint of this engine: its weights, its
    /// momentum buffers named by the official parameter order (the state dict's order; with
    /// two groups, those not named by `keywords` (`NONBACKBONE_KEYWORDS`) first, as
    /// `tools/train.py` builds them), and `epoch * steps_per_epoch` steps taken.
    pub fn from_official(
        state: Vec<NamedTensor>,
        training: crate::formats::pth::OfficialTraining,
        keywords: &[String],
        steps_per_epoch: usize,
        notes: HashMap<String, String>,
    ) -> Result<Self> {
        let weights = weights::normalised(state);
        let params: Vec<&NamedTensor> = weights
            .iter()
            .filter(|t| !t.name.ends_with("running_mean") && !t.name.ends_with("running_var"))
            .collect();
        let head = |t: &&NamedTensor| keywords.iter().any(|k| t.name.contains(k.as_str()));
        let order: Vec<&NamedTensor> = match training.groups.len() {
            1 => params.clone(),
            2 if !keywords.is_empty() => {
                params.iter().copied().filter(|t| !head(t)).chain(params.iter().copied().filter(head)).collect()
            }
            n => {
                return Err(Error::Invalid(format!(
                    "the checkpoint's optimizer has {n} parameter groups; with NONBACKBONE_KEYWORDS {keywords:?} \
                     the official run has {}",
                    if keywords.is_empty() { 1 } else { 2 }
                )))
            }
        };
        let sizes: Vec<usize> = training.groups.iter().map(Vec::len).collect();
        let heads = params.iter().filter(|t| head(t)).count();
        let expected = if sizes.len() == 2 { vec![order.len() - heads, heads] } else { vec![order.len()] };
        let consecutive = training.groups.concat() == (0..order.len()).collect::<Vec<_>>();
        if sizes != expected || !consecutive {
            return Err(Error::Invalid(format!(
                "the checkpoint's parameter groups hold {sizes:?} parameters; its state dict and \
                 NONBACKBONE_KEYWORDS {keywords:?} give {expected:?}"
            )));
        }
        let momentum = training
            .momentum
            .into_iter()
            .map(|(index, buffer)| {
                let param = order.get(index).ok_or_else(|| {
                    Error::Invalid(format!("momentum buffer {index} of {} parameters", order.len()))
                })?;
                if buffer.shape != param.shape {
                    return Err(Error::Shape {
                        what: format!("momentum buffer {index} ({})", param.name),
                        expected: format!("{:?}", param.shape),
                        actual: format!("{:?}", buffer.shape),
                    });
                }
                Ok(NamedTensor { name: param.name.clone(), ..buffer })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Checkpoint { weights, momentum, steps: training.epoch * steps_per_epoch, notes })
    }
}

/// The training step's graph of `config` under `options`: the model, its losses and the
/// parameter groups; and its outputs `[aux, out]`.
fn training_graph(config: &Config, options: &TrainOptions) -> Result<(GraphBuilder, [ValueId; 2])> {
    let [h, w] = options.crop;
    let mut g = GraphBuilder::new();
    g.recompute_in_backward(options.recompute);
    g.data_parallel(options.parallel)?;
    let x = g.input("input", &[options.batch, 3, h, w], false);
    let m = hrnet::build(&mut g, config, x, options.dropout)?;
    let labels = g.labels("label", &[options.batch, h, w]);
    hrnet::add_losses(&mut g, config, [m.aux, m.out], labels)?;
    for k in &options.head_keywords {
        g.lr_multiplier(k, options.head_lr_mult);
    }
    Ok((g, [m.aux, m.out]))
}

/// The device memory a training step of `config` under `options` plans, from the shapes
/// alone ([`GraphBuilder::plan_training_memory`]; nothing is allocated).
pub fn planned_memory(config: &Config, options: &TrainOptions) -> Result<TrainingMemory> {
    let (g, outputs) = training_graph(config, options)?;
    Ok(g.plan_training_memory(&outputs))
}

/// A model being trained: its training graph, optimizer state and step count.
pub struct Trainer<'g> {
    gpu: &'g Gpu,
    graph: Graph,
    config: Config,
    options: TrainOptions,
    step: usize,
    /// The other ranks, in data-parallel training.
    comm: Option<Comm>,
}

impl<'g> Trainer<'g> {
    /// A trainer starting from `weights` (official names), or from the official fresh
    /// initialisation ([`initialise`]).
    pub fn new(
        gpu: &'g Gpu,
        config: Config,
        weights: Option<&[NamedTensor]>,
        options: TrainOptions,
    ) -> Result<Self> {
        if options.batch == 0 || options.crop.contains(&0) || options.max_iter == 0 {
            return Err(Error::Invalid(format!(
                "training needs a positive batch, crop and max_iter, got {options:?}"
            )));
        }
        let (mut g, outputs) = training_graph(&config, &options)?;
        // A training run reuses its graph for every step: measure the variants first.
        g.tune(gpu, &Arc::new(Tuner::new(gpu, options.tuning.clone())), Mode::Train, &outputs)?;
        let graph = g.build(gpu, Mode::Train, &outputs)?;
        match weights {
            Some(w) => weights::load_into(gpu, &graph, w, "the initial weights")?,
            None => initialise(gpu, &graph)?,
        }
        Ok(Trainer { gpu, graph, config, options, step: 0, comm: None })
    }

    /// Loads a pretrained checkpoint over the fresh start ([`weights::load_pretrained`]:
    /// the official `MODEL.PRETRAINED` rule), before the first step.
    pub fn load_pretrained(
        &mut self,
        tensors: &[NamedTensor],
        source: &str,
    ) -> Result<weights::PretrainedReport> {
        if self.step > 0 {
            return Err(Error::Invalid(format!("{source}: a pretrained start after {} steps", self.step)));
        }
        weights::load_pretrained(self.gpu, &self.graph, tensors, source)
    }

    /// Joins the data-parallel group of `options.parallel` through `comm` (its rank and
    /// size must match): each later step meets the other ranks.
    pub fn join(&mut self, comm: Comm) -> Result<()> {
        let p = self.options.parallel;
        if (comm.rank(), comm.ranks()) != (p.rank, p.ranks) {
            return Err(Error::Invalid(format!(
                "the trainer is rank {} of {}; the collective is rank {} of {}",
                p.rank,
                p.ranks,
                comm.rank(),
                comm.ranks()
            )));
        }
        self.comm = Some(comm);
        Ok(())
    }

    /// The communication figures since the last call (none on one rank).
    pub fn take_comm_stats(&mut self) -> CommStats {
        self.comm.as_mut().map(Comm::take_stats).unwrap_or_default()
    }

    /// One step on `batch` samples (each `crop`-sized): forward, backward, SGD. In
    /// data-parallel training `batch` is this rank's slice of the global batch, and the
    /// figures returned are the means over the ranks (the global batch's loss where every
    /// rank's images have as many labelled pixels).
    pub fn step(&mut self, batch: &[Sample], seed: u32) -> Result<StepStats> {
        let [h, w] = self.options.crop;
        if batch.len() != self.options.batch
            || batch.iter().any(|s| s.planes.len() != 3 * h * w || s.labels.len() != h * w)
        {
            return Err(Error::Invalid(format!(
                "a training batch must hold {} samples of {h}x{w}; got {} samples",
                self.options.batch,
                batch.len()
            )));
        }
        let planes: Vec<f32> = batch.iter().flat_map(|s| s.planes.iter().copied()).collect();
        let labels: Vec<u32> = batch.iter().flat_map(|s| s.labels.iter().copied()).collect();
        crate::data::image::check_labels(&labels, self.config.num_classes, self.config.ignore_index())?;
        let gpu = self.gpu;
        self.graph.set(gpu, "input", &planes)?;
        self.graph.tensor("label")?.write_u32(gpu, &labels)?;
        self.graph.set_seed(gpu, seed)?;
        let lr = self.lr(self.step);
        let sgd = SgdConfig {
            momentum: self.config.momentum,
            weight_decay: self.config.weight_decay,
            nesterov: self.config.nesterov,
        };
        let terms = match (&mut self.comm, self.options.parallel.ranks) {
            (_, 1) => {
                self.graph.train_step(gpu, &sgd, lr)?;
                self.graph.loss_terms(gpu)?
            }
            (Some(comm), _) => {
                comm.check_agreement(&format!("step {} of batch {} at {h}x{w}", self.step, batch.len()))?;
                self.graph.train_step_across(gpu, &sgd, lr, comm)?;
                let mut terms = self.graph.loss_terms(gpu)?;
                let mut values: Vec<f32> = terms.0.iter().map(|t| t.value).collect();
                comm.mean_f32(&mut values)?;
                terms.0.iter_mut().zip(values).for_each(|(t, v)| t.value = v);
                terms
            }
            (None, ranks) => {
                return Err(Error::Invalid(format!(
                    "the trainer is rank {} of {ranks} but has joined no group (Trainer::join)",
                    self.options.parallel.rank
                )))
            }
        };
        let stats = StepStats {
            step: self.step,
            loss: terms.total(),
            aux_loss: terms.value("aux")?,
            main_loss: terms.value("main")?,
            lr,
        };
        self.step += 1;
        Ok(stats)
    }

    /// The rate step `step` runs with ([`TrainOptions::lr`] from `TRAIN.LR`).
    pub fn lr(&self, step: usize) -> f32 {
        self.options.lr(self.config.lr, step)
    }

    /// The training graph (for profiling its dispatches).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// How many steps have been taken (including those before a resume).
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The state to resume from, with `notes` stored alongside.
    pub fn checkpoint(&self, notes: HashMap<String, String>) -> Result<Checkpoint> {
        let momentum = self
            .graph
            .momentum()?
            .into_iter()
            .map(|(name, t)| {
                Ok(NamedTensor {
                    name: name.to_string(),
                    shape: t.shape().to_vec(),
                    data: t.to_vec(self.gpu)?,
                })
            })
            .collect::<Result<_>>()?;
        let weights = self.weights()?;
        // A step that overflowed leaves inf or NaN weights: refuse to save them over a good
        // checkpoint.
        for t in weights.iter().chain(&momentum) {
            if let Some(v) = t.data.iter().find(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!(
                    "after step {}, {} holds {v}: training diverged (try a lower TRAIN.LR); \
                     the checkpoint is not written",
                    self.step, t.name
                )));
            }
        }
        Ok(Checkpoint { weights, momentum, steps: self.step, notes })
    }

    /// A trainer that continues from `checkpoint` exactly as the run that saved it would
    /// have gone on (same weights, momentum and schedule position). A checkpoint of another
    /// model configuration is refused with every mismatched key named.
    pub fn resume(
        gpu: &'g Gpu,
        config: Config,
        checkpoint: &Checkpoint,
        options: TrainOptions,
    ) -> Result<Self> {
        let total = options.max_iter + options.extra.map_or(0, |(_, steps)| steps);
        if checkpoint.steps > total {
            return Err(Error::Invalid(format!(
                "the checkpoint has taken {} steps, more than the run's {total}",
                checkpoint.steps
            )));
        }
        let mut trainer = Trainer::new(gpu, config, Some(&checkpoint.weights), options)?;
        let momentum = trainer.graph.momentum()?;
        if momentum.len() != checkpoint.momentum.len() {
            return Err(Error::Invalid(format!(
                "the checkpoint holds momentum for {} parameters; the model has {}",
                checkpoint.momentum.len(),
                momentum.len()
            )));
        }
        for (name, t) in momentum {
            let saved = checkpoint.momentum.iter().find(|m| m.name == name).ok_or_else(|| {
                Error::Invalid(format!("the checkpoint has no momentum for parameter {name}"))
            })?;
            if saved.shape != t.shape() {
                return Err(Error::Shape {
                    what: format!("momentum of {name} in the checkpoint"),
                    expected: format!("{:?}", t.shape()),
                    actual: format!("{:?}", saved.shape),
                });
            }
            t.write(gpu, &saved.data)?;
        }
        trainer.step = checkpoint.steps;
        Ok(trainer)
    }

    /// The current weights and running statistics, with their official names.
    pub fn weights(&self) -> Result<Vec<NamedTensor>> {
        weights::state_dict(self.gpu, &self.graph)
    }
}

/// The modules the official `init_weights` leaves at PyTorch's default initialisation: its
/// `cls`, `aux` and `ocr` modules, and the other context heads (`model::heads`), which take
/// OCR's place and so its initialisation.
pub const DEFAULT_INIT_KEYWORDS: [&str; 8] =
    ["cls", "aux", "ocr", "ppm", "aspp", "self_attention", "danet", "double_attention"];

/// The official fresh start (`init_weights` of `seg_hrnet_ocr.py`; also what benchmarks run
/// on): outside the modules of [`DEFAULT_INIT_KEYWORDS`], convolution weights ~ N(0, 0.001);
/// those modules keep PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Convolution
/// biases everywhere keep that default too; batch norm weights are 1, biases 0, running
/// means 0 and variances 1; DANet's learnt scales 0 (as its paper starts them).
pub fn initialise(gpu: &Gpu, graph: &Graph) -> Result<()> {
    let params: Vec<(String, Vec<usize>)> =
        graph.parameters().map(|(n, s)| (n.to_string(), s.to_vec())).collect();
    let conv_fan_in = |prefix: &str| {
        params
            .iter()
            .find(|(n, s)| n == &format!("{prefix}.weight") && s.len() == 4)
            .map(|(_, s)| s[1] * s[2] * s[3])
    };
    let mut rng = SplitMix::new(0x5EED);
    for (name, shape) in &params {
        let n: usize = shape.iter().product();
        let (prefix, kind) = name.rsplit_once('.').unwrap_or((name, ""));
        let head = DEFAULT_INIT_KEYWORDS.iter().any(|k| prefix.contains(k));
        let data: Vec<f32> = match (shape.len(), kind, conv_fan_in(prefix)) {
            (4, _, Some(fan_in)) if head => uniform(&mut rng, n, fan_in),
            (4, _, _) => (0..n).map(|_| 0.001 * rng.normal()).collect(),
            (_, "bias", Some(fan_in)) => uniform(&mut rng, n, fan_in),
            (_, "weight", _) => vec![1.0; n],
            _ => vec![0.0; n],
        };
        graph.set(gpu, name, &data)?;
    }
    for name in graph.buffers().map(str::to_string).collect::<Vec<_>>() {
        graph.tensor(&name)?.fill(gpu, if name.ends_with("running_var") { 1.0 } else { 0.0 });
    }
    Ok(())
}

/// PyTorch's default draw for a convolution's weight and bias: U(-b, b), b = 1/sqrt(fan_in).
fn uniform(rng: &mut SplitMix, n: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    (0..n).map(|_| rng.range(-bound, bound)).collect()
}

#[cfg(test)]
mod tests {
    use super::poly_lr;

    #[test]
    fn poly_schedule_starts_flat_then_decays_to_zero() {
        assert_eq!(poly_lr(0.01, 0, 10, 0.9), 0.01);
        assert_eq!(poly_lr(0.01, 1, 10, 0.9), 0.01);
        assert!((poly_lr(0.01, 2, 10, 0.9) - 0.01 * 0.9f32.powf(0.9)).abs() < 1e-9);
        assert_eq!(poly_lr(0.01, 11, 10, 0.9), 0.0);
        assert_eq!(poly_lr(0.01, 50, 10, 0.9), 0.0);
    }
}
