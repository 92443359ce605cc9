//! Training with HRNet-OCR's recipe (spec section 5): SGD with momentum and weight decay,
//! the poly schedule, loss `0.4 * CE(aux) + CE(out)` (or OHEM), head LR multiplier.

use crate::data::augment::Sample;
use crate::data::SplitMix;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, GraphBuilder, LossSpec, Mode};
use crate::kernels::loss::Ohem;
use crate::kernels::sgd::SgdConfig;
use crate::model::weights::{self, NamedTensor};
use crate::model::{hrnet, Config};

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
    /// Dropout before cls_head (the official 0.05, or 0).
    pub dropout: f32,
    /// Parameters whose name contains one of these train at `head_lr_mult` times the rate.
    pub head_keywords: Vec<String>,
    pub head_lr_mult: f32,
}

/// One optimizer step's figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub step: usize,
    pub loss: f32,
    pub lr: f32,
}

/// A model being trained: its training graph, optimizer state and step count.
pub struct Trainer<'g> {
    gpu: &'g Gpu,
    graph: Graph,
    config: Config,
    options: TrainOptions,
    step: usize,
}

impl<'g> Trainer<'g> {
    /// A trainer starting from `weights` (official names), or from a fresh initialisation:
    /// convolutions ~ N(0, 2 / fan_in), batch norm weight 1 and bias 0.
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
        let [h, w] = options.crop;
        let mut g = GraphBuilder::new();
        let x = g.input("input", &[options.batch, 3, h, w], false);
        let m = hrnet::build(&mut g, &config, x, options.dropout)?;
        let labels = g.labels("label", &[options.batch, h, w]);
        let ignore = u32::try_from(config.ignore_label).unwrap_or(u32::MAX);
        let ohem = config.ohem.map(|o| Ohem { thresh: o.thresh, min_kept: o.min_kept });
        for (logits, weight) in [(m.aux, config.balance_weights[0]), (m.out, config.balance_weights[1])] {
            let spec = LossSpec { weight, ignore_label: ignore, ohem, align_corners: config.align_corners };
            g.cross_entropy(spec, logits, labels)?;
        }
        for k in &options.head_keywords {
            g.lr_multiplier(k, options.head_lr_mult);
        }
        let graph = g.build(gpu, Mode::Train, &[m.aux, m.out])?;
        match weights {
            Some(w) => weights::load_into(gpu, &graph, w, "the initial weights")?,
            None => initialise(gpu, &graph)?,
        }
        Ok(Trainer { gpu, graph, config, options, step: 0 })
    }

    /// One step on `batch` samples (each `crop`-sized): forward, backward, SGD.
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
        let ignore = u32::try_from(self.config.ignore_label).unwrap_or(u32::MAX);
        crate::kernels::loss::check_labels(&labels, self.config.num_classes, ignore)?;
        let gpu = self.gpu;
        self.graph.set(gpu, "input", &planes)?;
        self.graph.tensor("label")?.write_u32(gpu, &labels)?;
        self.graph.set_seed(gpu, seed)?;
        self.graph.zero_grads(gpu);
        self.graph.forward(gpu)?;
        self.graph.backward(gpu)?;
        let lr = poly_lr(self.config.lr, self.step, self.options.max_iter, 0.9);
        let sgd = SgdConfig {
            momentum: self.config.momentum,
            weight_decay: self.config.weight_decay,
            nesterov: self.config.nesterov,
        };
        self.graph.sgd_step(gpu, &sgd, lr)?;
        let stats = StepStats { step: self.step, loss: self.graph.loss(gpu)?, lr };
        self.step += 1;
        Ok(stats)
    }

    /// The current weights and running statistics, with their official names.
    pub fn weights(&self) -> Result<Vec<NamedTensor>> {
        weights::state_dict(self.gpu, &self.graph)
    }
}

/// A fresh initialisation for training from scratch.
fn initialise(gpu: &Gpu, graph: &Graph) -> Result<()> {
    let params: Vec<(String, Vec<usize>)> =
        graph.parameters().map(|(n, s)| (n.to_string(), s.to_vec())).collect();
    let mut rng = SplitMix::new(0x5EED);
    for (name, shape) in params {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if shape.len() == 4 {
            let std = (2.0 / (n / shape[0]) as f32).sqrt();
            (0..n).map(|_| std * rng.normal()).collect()
        } else if name.ends_with(".weight") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        graph.set(gpu, &name, &data)?;
    }
    for name in graph.buffers().map(str::to_string).collect::<Vec<_>>() {
        graph.tensor(&name)?.fill(gpu, if name.ends_with("running_var") { 1.0 } else { 0.0 });
    }
    Ok(())
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
