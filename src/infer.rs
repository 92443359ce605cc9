//! Inference on images: whole image, sliding windows, and multi-scale with flip, as the
//! official test recipe does it (spec section 6).

use crate::data::augment::resize_nearest;
use crate::data::image::{normalise, Image};
use crate::data::official::{long_side_size, Official, TestPreparation};
use crate::error::{Error, Result};
use crate::eval::Evaluation;
use crate::gpu::{block_on, Gpu};
use crate::graph::{Graph, GraphBuilder, Mode, ValueId};
use crate::kernels::conv2d::Precision;
use crate::kernels::resize;
use crate::kernels::tuning::Tuner;
use crate::model::weights::{self, NamedTensor};
use crate::model::{hrnet, Config};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// How an image is covered.
#[derive(Clone, Debug, PartialEq)]
pub enum Strategy {
    /// One pass over the whole image.
    Whole,
    /// Windows of `crop` (height, width) every `stride`; the last window of each row and
    /// column is shifted back to end at the border; overlaps are averaged.
    Slide { crop: [usize; 2], stride: [usize; 2] },
    /// For each scale, the resized image whole (scale <= 1) or in sliding windows (> 1), with
    /// its horizontal flip averaged in; exp() of the logits, resized back and summed.
    MultiScaleFlip { scales: Vec<f32>, crop: [usize; 2], stride: [usize; 2] },
    /// The official repository's test (`multi_scale_inference` of its dataset classes).
    Official(OfficialTest),
}

/// The official test of a dataset, from an experiment YAML's `TEST` keys. For each scale
/// the image is resized so that its long side is `base_size * scale` (rounded as the
/// official `int(x + 0.5)`; bilinear at pixel centres, as OpenCV's `INTER_LINEAR` on the
/// normalised image), covered as its dataset class covers it, each pass scored as
/// `exp((logits + flipped logits) / 2)` (LIP's left and right channels exchanged in the
/// flipped pass) or `exp(logits)`, overlaps averaged, resized back (align_corners as the
/// model) and summed over scales.
///
/// - Cityscapes: scales up to 1 in one pass; larger ones in windows of `crop` every `crop`,
///   the last of each row and column shifted back to end at the border.
/// - The others: an image no larger than the crop is padded to it (bottom and right, with
///   black) for one pass; a larger one is padded up to the crop where smaller, and covered
///   by windows every two thirds of the crop, the border windows padded to the crop.
#[derive(Clone, Debug, PartialEq)]
pub struct OfficialTest {
    pub dataset: Official,
    /// `TEST.BASE_SIZE`.
    pub base_size: usize,
    /// `TEST.IMAGE_SIZE` as (height, width).
    pub crop: [usize; 2],
    /// `TEST.SCALE_LIST`.
    pub scales: Vec<f32>,
    /// `TEST.FLIP_TEST`.
    pub flip: bool,
    /// How the image is prepared first (by the test list's name).
    pub preparation: TestPreparation,
}

impl OfficialTest {
    /// The test recipe of `config`'s `DATASET.DATASET` and `TEST` keys for the test list
    /// `list` (its `TEST_SET` when not given); none when the config names no dataset.
    pub fn of(config: &Config, list: Option<&str>) -> Result<Option<Self>> {
        let keys = &config.dataset;
        let Some(name) = &keys.name else { return Ok(None) };
        let dataset = Official::parse(name)?;
        let list = list.or(keys.test_set.as_deref()).unwrap_or_default();
        Ok(Some(OfficialTest {
            dataset,
            base_size: keys.test_base_size,
            crop: keys.test_crop,
            scales: keys.test_scales.clone(),
            flip: keys.test_flip,
            preparation: dataset.test_preparation(list),
        }))
    }

    /// The size an `[h, w]` image has after [`TestPreparation::ShortSide`]: its short side
    /// the base size, the long side `int(long * base / short + 0.5)`, each padded up to a
    /// multiple of 8; and the padding.
    pub fn short_side_size(&self, [h, w]: [usize; 2]) -> ([usize; 2], [usize; 2]) {
        let base = self.base_size;
        let long = |l: usize, s: usize| ((l * base) as f64 / s as f64 + 0.5) as usize;
        let resized = if h < w { [base, long(w, h)] } else { [long(h, w), base] };
        let padded = resized.map(|s| s.div_ceil(8) * 8);
        (resized, [padded[0] - resized[0], padded[1] - resized[1]])
    }

    /// The size an `[h, w]` image is resized to at `scale`: its long side
    /// `int(base_size * scale + 0.5)`, the other in proportion, rounded the same way.
    pub fn scaled_size(&self, size: [usize; 2], scale: f32) -> [usize; 2] {
        long_side_size(size, self.base_size, scale)
    }
}

/// A segmentation: per-pixel classes and the scores they are the argmax of.
pub struct Segmentation {
    pub width: usize,
    pub height: usize,
    /// `height * width` class indices.
    pub classes: Vec<u32>,
    /// `[K, H, W]`: logits (whole, slide) or summed exp-logits (multi-scale), when asked
    /// for ([`Segmenter::keep_scores`]).
    pub scores: Option<Vec<f32>>,
}

/// What [`Segmenter::evaluate_kept`] counted: `height * width` predicted classes and the
/// labels they were counted against.
pub struct Scored {
    pub width: usize,
    pub height: usize,
    pub classes: Vec<u32>,
    pub labels: Vec<u32>,
}

/// Outputs of a segmenter's graph.
const FULL_LOGITS: usize = 0;
const LABELS: usize = 1;

/// A model ready to segment images; graphs are built once per input size and kept.
///
/// Segmenting takes `&mut self` (the graphs hold the activations). For several threads,
/// give each its own `Segmenter` over one shared [`Gpu`]: they share its pipeline cache and
/// buffer pool, and their results are bit-identical to one segmenter's (tested).
pub struct Segmenter<'g> {
    gpu: &'g Gpu,
    config: Config,
    weights: Vec<NamedTensor>,
    graphs: HashMap<[usize; 2], Graph>,
    check_numerics: bool,
    precision: Precision,
    tune: bool,
    tuner: Arc<Tuner>,
    keep_scores: bool,
}

impl<'g> Segmenter<'g> {
    pub fn new(gpu: &'g Gpu, config: Config, weights: Vec<NamedTensor>) -> Self {
        Segmenter {
            gpu,
            config,
            weights,
            graphs: HashMap::new(),
            check_numerics: false,
            precision: Precision::F32,
            tune: false,
            tuner: Arc::new(Tuner::from_env(gpu)),
            keep_scores: false,
        }
    }

    /// With `on`, the kernel variants are measured for each input size before its graph
    /// is built ([`GraphBuilder::tune`]): seconds of timing on a first run, worth it when
    /// the segmenter serves many images or windows. Off (the default), a graph takes the
    /// choices measured earlier, or the adapter's defaults, and compiles nothing else.
    pub fn tune(&mut self, on: bool) {
        self.tune = on;
    }

    /// Takes its variant choices from `tuner` (by default, one of its own on the cache
    /// `HRNET_OCR_TUNING` names): segmenters sharing a tuner measure each class once.
    pub fn set_tuner(&mut self, tuner: Arc<Tuner>) {
        self.tuner = tuner;
        self.graphs.clear();
    }

    /// Runs inference at `precision` (see [`Precision`]) and returns the
    /// precision that runs: `F16` falls back to `F32` on an adapter without `SHADER_F16`.
    pub fn set_precision(&mut self, precision: Precision) -> Precision {
        let runs = precision.on(self.gpu);
        if runs != self.precision {
            self.graphs.clear();
            self.precision = runs;
        }
        runs
    }

    /// With `on`, every pass runs node by node and stops at the first NaN or infinity,
    /// naming the input, weight or layer output that holds it ([`Graph::forward_checked`]).
    pub fn check_numerics(&mut self, on: bool) {
        self.check_numerics = on;
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Replaces the weights (a training run's, between validations): the graphs already
    /// built keep their buffers and take the new values, checked as [`weights::load_into`].
    pub fn set_weights(&mut self, weights: Vec<NamedTensor>) -> Result<()> {
        for graph in self.graphs.values() {
            weights::load_into(self.gpu, graph, &weights, "the segmenter's new weights")?;
        }
        self.weights = weights;
        Ok(())
    }

    /// With `on`, segmentations carry their scores (`[K, H, W]`). Off (the default), a
    /// whole-image segmentation reads back only the class map, argmaxed on the device.
    pub fn keep_scores(&mut self, on: bool) {
        self.keep_scores = on;
    }

    /// Segments `image`. In a browser, which cannot block, use [`Segmenter::segment_async`].
    pub fn segment(&mut self, image: &Image, strategy: &Strategy) -> Result<Segmentation> {
        block_on(self.segment_async(image, strategy), "Segmenter::segment_async")
    }

    /// [`Segmenter::segment`] as a future: every readback of every strategy is awaited.
    pub async fn segment_async(&mut self, image: &Image, strategy: &Strategy) -> Result<Segmentation> {
        let size = [image.height, image.width];
        let planes = image.normalised();
        if *strategy == Strategy::Whole && self.run(&planes, size)? {
            let (gpu, graph) = (self.gpu, &self.graphs[&size]);
            let scores = match self.keep_scores {
                true => Some(graph.output(FULL_LOGITS).read(gpu).await?),
                false => None,
            };
            let classes = graph.output(LABELS).read_u32(gpu).await?;
            return Ok(Segmentation { width: image.width, height: image.height, classes, scores });
        }
        let scores = self.scores(&planes, size, strategy).await?;
        Ok(Segmentation {
            width: image.width,
            height: image.height,
            classes: argmax(&scores, self.config.num_classes, image.width * image.height),
            scores: self.keep_scores.then_some(scores),
        })
    }

    /// Segments `image` and counts its pixels against `labels` (`height * width`) in
    /// `evaluation`. A whole image's predictions stay on the device: nothing is read back.
    pub fn evaluate(
        &mut self,
        image: &Image,
        strategy: &Strategy,
        labels: &[u32],
        evaluation: &mut Evaluation,
    ) -> Result<()> {
        block_on(self.score(image, strategy, labels, evaluation, false), "Segmenter::segment_async").map(drop)
    }

    /// As [`Segmenter::evaluate`], and returns what was counted: the predicted classes and
    /// the labels at the size they were scored at (the image's, or for the official `val`
    /// preparation the resized and padded one).
    pub fn evaluate_kept(
        &mut self,
        image: &Image,
        strategy: &Strategy,
        labels: &[u32],
        evaluation: &mut Evaluation,
    ) -> Result<Scored> {
        block_on(self.score(image, strategy, labels, evaluation, true), "Segmenter::segment_async")
    }

    /// Counts `image` against `labels`; returns what was counted when `keep` (else empty).
    async fn score(
        &mut self,
        image: &Image,
        strategy: &Strategy,
        labels: &[u32],
        evaluation: &mut Evaluation,
        keep: bool,
    ) -> Result<Scored> {
        let size = [image.height, image.width];
        let kept = |size: [usize; 2], classes: Vec<u32>, labels: &[u32]| Scored {
            width: size[1],
            height: size[0],
            classes: if keep { classes } else { Vec::new() },
            labels: if keep { labels.to_vec() } else { Vec::new() },
        };
        if *strategy == Strategy::Whole && self.run(&image.normalised(), size)? {
            let prediction = self.graphs[&size].output(LABELS);
            evaluation.add_predicted(self.gpu, prediction, labels)?;
            let classes = if keep { prediction.read_u32(self.gpu).await? } else { Vec::new() };
            return Ok(kept(size, classes, labels));
        }
        if let Strategy::Official(test) = strategy {
            if test.preparation == TestPreparation::ShortSideWithLabels {
                // Image and labels resized and padded together, scored at that size.
                let (resized, pad) = test.short_side_size(size);
                let padded = [resized[0] + pad[0], resized[1] + pad[1]];
                let scaled = self.resize_planes(&image.normalised(), 3, size, resized, false).await?;
                let planes = pad_planes_with(&scaled, resized, padded, |_| 0.0);
                let scores = self.official_scales(&planes, padded, test).await?;
                let classes = argmax(&scores, self.config.num_classes, padded[0] * padded[1]);
                let ignore = evaluation.ignore_label();
                let labels = pad_labels(&resize_nearest(labels, size, resized), resized, padded, ignore);
                evaluation.add(self.gpu, &classes, &labels)?;
                return Ok(kept(padded, classes, &labels));
            }
        }
        let segmentation = self.segment_async(image, strategy).await?;
        evaluation.add(self.gpu, &segmentation.classes, labels)?;
        Ok(kept(size, segmentation.classes, labels))
    }

    /// The scores `[K, H, W]` of normalised planes `[3, H, W]` under `strategy`.
    pub fn logits_with(&mut self, planes: &[f32], size: [usize; 2], strategy: &Strategy) -> Result<Vec<f32>> {
        block_on(self.scores(planes, size, strategy), "Segmenter::segment_async")
    }

    /// [`Segmenter::logits_with`] as a future.
    async fn scores(&mut self, planes: &[f32], size: [usize; 2], strategy: &Strategy) -> Result<Vec<f32>> {
        if planes.len() != 3 * size[0] * size[1] {
            return Err(Error::Invalid(format!("{} values for 3 planes of {size:?}", planes.len())));
        }
        match strategy {
            Strategy::Whole => self.whole_or_windows(planes, size).await,
            Strategy::Slide { crop, stride } => self.slide(planes, size, *crop, *stride).await,
            Strategy::MultiScaleFlip { scales, crop, stride } => {
                self.multi_scale_flip(planes, size, scales, *crop, *stride).await
            }
            Strategy::Official(test) => self.official(planes, size, test).await,
        }
    }

    /// [`Strategy::Official`]: the summed scores `[K, H, W]`.
    async fn official(
        &mut self,
        planes: &[f32],
        [h, w]: [usize; 2],
        test: &OfficialTest,
    ) -> Result<Vec<f32>> {
        let k = self.config.num_classes;
        if test.crop.contains(&0) || test.scales.is_empty() {
            return Err(Error::Invalid(format!("an official test needs a crop and scales, got {test:?}")));
        }
        // The image as its dataset class prepares it; the scores come back to the input size.
        let (prepared, size, keep) = match test.preparation {
            TestPreparation::AsIs | TestPreparation::ShortSideWithLabels => {
                return self.official_scales(planes, [h, w], test).await
            }
            TestPreparation::ResizeToCrop => {
                (self.resize_planes(planes, 3, [h, w], test.crop, false).await?, test.crop, test.crop)
            }
            TestPreparation::ShortSide { cut_padding } => {
                let (resized, pad) = test.short_side_size([h, w]);
                let size = [resized[0] + pad[0], resized[1] + pad[1]];
                let scaled = self.resize_planes(planes, 3, [h, w], resized, false).await?;
                // Padded with the mean colour, which normalises to zero.
                let padded = pad_planes_with(&scaled, resized, size, |_| 0.0);
                (padded, size, if cut_padding { resized } else { size })
            }
        };
        let scores = self.official_scales(&prepared, size, test).await?;
        let kept = crop_planes(&scores, k, size, [0, 0], keep);
        self.resize_planes(&kept, k, keep, [h, w], self.config.align_corners).await
    }

    /// The official multi-scale inference over planes already prepared: the summed scores.
    async fn official_scales(
        &mut self,
        planes: &[f32],
        [h, w]: [usize; 2],
        test: &OfficialTest,
    ) -> Result<Vec<f32>> {
        let k = self.config.num_classes;
        let mut total = vec![0.0f32; k * h * w];
        for &scale in &test.scales {
            let size = test.scaled_size([h, w], scale);
            let scaled = self.resize_planes(planes, 3, [h, w], size, false).await?;
            let scores = match test.dataset {
                Official::Cityscapes => self.official_cityscapes(&scaled, size, scale, test).await?,
                _ => self.official_padded(&scaled, size, test).await?,
            };
            let back = self.resize_planes(&scores, k, size, [h, w], self.config.align_corners).await?;
            total.iter_mut().zip(back).for_each(|(t, v)| *t += v);
        }
        Ok(total)
    }

    /// `exp` of a pass's logits at the size of `planes`, averaged with its horizontal flip's
    /// (the dataset's left and right classes exchanged) when the test flips. The pass must
    /// fit the device: the official test never splits it further.
    async fn official_pass(
        &mut self,
        planes: &[f32],
        size: [usize; 2],
        test: &OfficialTest,
    ) -> Result<Vec<f32>> {
        let mut logits = self.whole_logits(planes, size).await?;
        if test.flip {
            let k = self.config.num_classes;
            let mirrored = self.whole_logits(&flip(planes, 3, size), size).await?;
            let mut mirrored = flip(&mirrored, k, size);
            swap_classes(&mut mirrored, k, size[0] * size[1], test.dataset.flip_swaps())?;
            logits.iter_mut().zip(&mirrored).for_each(|(a, b)| *a = (*a + b) * 0.5);
        }
        Ok(logits.into_iter().map(f32::exp).collect())
    }

    /// The model's logits of one whole pass, or an error when it does not fit the device.
    async fn whole_logits(&mut self, planes: &[f32], size: [usize; 2]) -> Result<Vec<f32>> {
        if !self.run(planes, size)? {
            return Err(Error::Invalid(format!(
                "a {}x{} pass of this model needs a tensor larger than the device's largest buffer ({} bytes)",
                size[0],
                size[1],
                self.gpu.limits().max_buffer_size
            )));
        }
        self.graphs[&size].output(FULL_LOGITS).read(self.gpu).await
    }

    /// Cityscapes' `multi_scale_inference`: one pass up to scale 1, else windows of the crop
    /// every crop, shifted back at the border, overlaps averaged.
    async fn official_cityscapes(
        &mut self,
        planes: &[f32],
        [h, w]: [usize; 2],
        scale: f32,
        test: &OfficialTest,
    ) -> Result<Vec<f32>> {
        if scale <= 1.0 {
            return self.official_pass(planes, [h, w], test).await;
        }
        let [ch, cw] = test.crop;
        let rows = (h.saturating_sub(ch)).div_ceil(ch) + 1;
        let cols = (w.saturating_sub(cw)).div_ceil(cw) + 1;
        let mut windows = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                let (h1, w1) = ((r * ch + ch).min(h), (c * cw + cw).min(w));
                windows.push(([h1.saturating_sub(ch), w1.saturating_sub(cw)], [h1, w1]));
            }
        }
        self.averaged_windows(planes, [h, w], &windows, None, test).await
    }

    /// The other datasets' `multi_scale_inference`: padded to the crop where smaller, one
    /// pass when the image fits the crop, else windows every two thirds of the crop, the
    /// border windows padded to the crop, overlaps averaged; cut back to the image.
    async fn official_padded(
        &mut self,
        planes: &[f32],
        [h, w]: [usize; 2],
        test: &OfficialTest,
    ) -> Result<Vec<f32>> {
        let [ch, cw] = test.crop;
        let k = self.config.num_classes;
        if h.max(w) <= ch.min(cw) {
            let padded = pad_planes(planes, [h, w], test.crop);
            let scores = self.official_pass(&padded, test.crop, test).await?;
            return Ok(crop_planes(&scores, k, test.crop, [0, 0], [h, w]));
        }
        let full = [h.max(ch), w.max(cw)];
        let padded = pad_planes(planes, [h, w], full);
        let stride = [ch * 2 / 3, cw * 2 / 3].map(|s| s.max(1));
        let rows = (full[0] - ch).div_ceil(stride[0]) + 1;
        let cols = (full[1] - cw).div_ceil(stride[1]) + 1;
        let mut windows = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                let (h0, w0) = (r * stride[0], c * stride[1]);
                windows.push(([h0, w0], [(h0 + ch).min(full[0]), (w0 + cw).min(full[1])]));
            }
        }
        let scores = self.averaged_windows(&padded, full, &windows, Some(test.crop), test).await?;
        Ok(crop_planes(&scores, k, full, [0, 0], [h, w]))
    }

    /// Scores of `planes` (`[3, h, w]`) from passes over `windows` (`[h0, w0]` to
    /// `[h1, w1]`), each padded to `pad_to` if given, overlaps averaged.
    async fn averaged_windows(
        &mut self,
        planes: &[f32],
        [h, w]: [usize; 2],
        windows: &[([usize; 2], [usize; 2])],
        pad_to: Option<[usize; 2]>,
        test: &OfficialTest,
    ) -> Result<Vec<f32>> {
        let k = self.config.num_classes;
        let mut sum = vec![0.0f32; k * h * w];
        let mut count = vec![0u32; h * w];
        for &([h0, w0], [h1, w1]) in windows {
            let window = crop_planes(planes, 3, [h, w], [h0, w0], [h1 - h0, w1 - w0]);
            let size = pad_to.unwrap_or([h1 - h0, w1 - w0]);
            let scores =
                self.official_pass(&pad_planes(&window, [h1 - h0, w1 - w0], size), size, test).await?;
            for c in 0..k {
                for y in h0..h1 {
                    for x in w0..w1 {
                        sum[(c * h + y) * w + x] += scores[(c * size[0] + y - h0) * size[1] + x - w0];
                    }
                }
            }
            for y in h0..h1 {
                for x in w0..w1 {
                    count[y * w + x] += 1;
                }
            }
        }
        for (i, v) in sum.iter_mut().enumerate() {
            *v /= count[i % (h * w)] as f32;
        }
        Ok(sum)
    }

    /// The main logits `[K, H, W]` of normalised planes `[3, H, W]`, at the input size.
    /// Tensors larger than a storage binding are fine (kernels bind them in slabs); an image
    /// whose tensors would exceed the device's largest buffer is covered by the largest
    /// sliding windows that fit (stride two thirds of a window) instead, with a warning
    /// saying so (the official test refuses such a pass instead).
    pub fn logits(&mut self, planes: &[f32], size: [usize; 2]) -> Result<Vec<f32>> {
        block_on(self.whole_or_windows(planes, size), "Segmenter::segment_async")
    }

    /// [`Segmenter::logits`] as a future.
    async fn whole_or_windows(&mut self, planes: &[f32], [h, w]: [usize; 2]) -> Result<Vec<f32>> {
        if self.run(planes, [h, w])? {
            return self.graphs[&[h, w]].output(FULL_LOGITS).read(self.gpu).await;
        }
        let crop = self.fitting_window([h, w])?;
        log::warn!(
            "a whole {h}x{w} pass needs a tensor larger than the device's largest buffer; covering it with {}x{} windows",
            crop[0],
            crop[1]
        );
        self.slide(planes, [h, w], crop, crop.map(|c| (c * 2 / 3).max(1))).await
    }

    /// Runs the whole-image graph of `size` on `planes` (building it first if needed),
    /// unless its tensors would exceed the device's largest buffer: false then.
    fn run(&mut self, planes: &[f32], size: [usize; 2]) -> Result<bool> {
        if planes.len() != 3 * size[0] * size[1] {
            return Err(Error::Invalid(format!("{} values for 3 planes of {size:?}", planes.len())));
        }
        if !self.graphs.contains_key(&size) {
            let (g, outputs) = self.describe(size)?;
            if !self.fits(&g, &outputs) {
                return Ok(false);
            }
            self.build_graph(size, g, &outputs)?;
        }
        let graph = &self.graphs[&size];
        graph.set(self.gpu, "input", planes)?;
        if self.check_numerics {
            graph.forward_checked(self.gpu)?;
        } else {
            graph.forward(self.gpu)?;
        }
        Ok(true)
    }

    /// The model on one image of `size`, ending with its main logits resized to the input
    /// size (align_corners as the model) and their argmax: the graph's two outputs.
    fn describe(&self, [h, w]: [usize; 2]) -> Result<(GraphBuilder, [ValueId; 2])> {
        let mut g = GraphBuilder::new();
        let x = g.input("input", &[1, 3, h, w], false);
        let m = hrnet::build(&mut g, &self.config, x, 0.0)?;
        let full = g.resize(m.out, [h, w], self.config.align_corners)?;
        let labels = g.argmax(full)?;
        Ok((g, [full, labels]))
    }

    /// Whether every tensor of a whole pass of `g` fits the device's largest buffer.
    fn fits(&self, g: &GraphBuilder, outputs: &[ValueId]) -> bool {
        g.plan_memory(outputs).largest.1 <= self.gpu.limits().max_buffer_size
    }

    /// The largest window, halving the longer side, whose pass fits the device.
    fn fitting_window(&self, mut crop: [usize; 2]) -> Result<[usize; 2]> {
        while !self.fits_at(crop)? {
            let longer = usize::from(crop[1] > crop[0]);
            if crop[longer] <= 32 {
                return Err(Error::Invalid(format!(
                    "even a {}x{} window of this model needs a tensor larger than the device's largest buffer ({} bytes)",
                    crop[0],
                    crop[1],
                    self.gpu.limits().max_buffer_size
                )));
            }
            crop[longer] = crop[longer].div_ceil(2);
        }
        Ok(crop)
    }

    /// [`Segmenter::fits`] for a size not described yet.
    fn fits_at(&self, size: [usize; 2]) -> Result<bool> {
        let (g, outputs) = self.describe(size)?;
        Ok(self.fits(&g, &outputs))
    }

    /// Builds (tuning first if asked) and keeps the eval graph of `g` for `size`.
    fn build_graph(&mut self, size: [usize; 2], mut g: GraphBuilder, outputs: &[ValueId]) -> Result<()> {
        g.set_precision(self.precision);
        if self.tune {
            g.tune(self.gpu, &self.tuner, Mode::Eval, outputs)?;
        } else {
            g.use_tuner(Arc::clone(&self.tuner));
        }
        let graph = g.build(self.gpu, Mode::Eval, outputs)?;
        weights::load_into(self.gpu, &graph, &self.weights, "the segmenter's weights")?;
        self.graphs.insert(size, graph);
        Ok(())
    }

    async fn slide(
        &mut self,
        planes: &[f32],
        [h, w]: [usize; 2],
        crop: [usize; 2],
        stride: [usize; 2],
    ) -> Result<Vec<f32>> {
        if crop.contains(&0) || stride.contains(&0) {
            return Err(Error::Invalid(format!(
                "sliding windows need a positive crop and stride, got {crop:?} / {stride:?}"
            )));
        }
        let k = self.config.num_classes;
        let mut sum = vec![0.0f32; k * h * w];
        let mut count = vec![0u32; h * w];
        for y0 in window_starts(h, crop[0], stride[0]) {
            for x0 in window_starts(w, crop[1], stride[1]) {
                let (ch, cw) = (crop[0].min(h), crop[1].min(w));
                let window = crop_planes(planes, 3, [h, w], [y0, x0], [ch, cw]);
                // Boxed: a window too large for the device is itself covered by windows.
                let logits = Box::pin(self.whole_or_windows(&window, [ch, cw])).await?;
                for c in 0..k {
                    for y in 0..ch {
                        for x in 0..cw {
                            sum[(c * h + y0 + y) * w + x0 + x] += logits[(c * ch + y) * cw + x];
                        }
                    }
                }
                for y in 0..ch {
                    for x in 0..cw {
                        count[(y0 + y) * w + x0 + x] += 1;
                    }
                }
            }
        }
        for (i, v) in sum.iter_mut().enumerate() {
            *v /= count[i % (h * w)] as f32;
        }
        Ok(sum)
    }

    async fn multi_scale_flip(
        &mut self,
        planes: &[f32],
        [h, w]: [usize; 2],
        scales: &[f32],
        crop: [usize; 2],
        stride: [usize; 2],
    ) -> Result<Vec<f32>> {
        if scales.is_empty() || scales.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            return Err(Error::Invalid(format!("scales must be positive, got {scales:?}")));
        }
        let k = self.config.num_classes;
        let mut total = vec![0.0f32; k * h * w];
        for &s in scales {
            let size = [((h as f32 * s).round() as usize).max(1), ((w as f32 * s).round() as usize).max(1)];
            let scaled = self.resize_planes(planes, 3, [h, w], size, self.config.align_corners).await?;
            let mut views = Vec::with_capacity(2);
            for view in [scaled.clone(), flip(&scaled, 3, size)] {
                views.push(match s <= 1.0 {
                    true => self.whole_or_windows(&view, size).await?,
                    false => self.slide(&view, size, crop, stride).await?,
                });
            }
            let flipped = flip(&views[1], k, size);
            let plain = &views[0];
            let averaged: Vec<f32> = plain.iter().zip(&flipped).map(|(a, b)| ((a + b) / 2.0).exp()).collect();
            let back = self.resize_planes(&averaged, k, size, [h, w], self.config.align_corners).await?;
            total.iter_mut().zip(back).for_each(|(t, v)| *t += v);
        }
        Ok(total)
    }

    /// Bilinear resize of `c` planes on the device.
    async fn resize_planes(
        &self,
        planes: &[f32],
        c: usize,
        from: [usize; 2],
        to: [usize; 2],
        align_corners: bool,
    ) -> Result<Vec<f32>> {
        if from == to {
            return Ok(planes.to_vec());
        }
        let gpu = self.gpu;
        let src = Tensor::from_slice(gpu, &[1, c, from[0], from[1]], planes)?;
        let dst = Tensor::empty(gpu, &[1, c, to[0], to[1]])?;
        gpu.run(&resize::forward(gpu, &src, &dst, 0, align_corners)?)?;
        dst.read(gpu).await
    }
}

/// Window starts along an axis: every `stride`, the last shifted back to end at the border.
pub fn window_starts(len: usize, crop: usize, stride: usize) -> Vec<usize> {
    if len <= crop {
        return vec![0];
    }
    let mut starts: Vec<usize> = (0..).map(|i| i * stride).take_while(|&s| s + crop < len).collect();
    starts.push(len - crop);
    starts.dedup();
    starts
}

fn crop_planes(
    planes: &[f32],
    c: usize,
    [h, w]: [usize; 2],
    [y0, x0]: [usize; 2],
    [ch, cw]: [usize; 2],
) -> Vec<f32> {
    let mut out = Vec::with_capacity(c * ch * cw);
    for p in 0..c {
        for y in 0..ch {
            let row = (p * h + y0 + y) * w + x0;
            out.extend_from_slice(&planes[row..row + cw]);
        }
    }
    out
}

/// Labels `[h, w]` padded at the bottom and right to `to` with `ignore`.
fn pad_labels(labels: &[u32], [h, w]: [usize; 2], to: [usize; 2], ignore: u32) -> Vec<u32> {
    (0..to[0])
        .flat_map(|y| (0..to[1]).map(move |x| if y < h && x < w { labels[y * w + x] } else { ignore }))
        .collect()
}

/// Exchanges the score planes (`plane` values each, `classes` of them) of each pair of
/// classes: a flipped pass's left and right parts (LIP).
fn swap_classes(scores: &mut [f32], classes: usize, plane: usize, pairs: &[(u32, u32)]) -> Result<()> {
    for &(left, right) in pairs {
        let (l, r) = (left as usize, right as usize);
        if l.max(r) >= classes {
            return Err(Error::Invalid(format!(
                "the flipped test exchanges classes {l} and {r}; this model has {classes} classes"
            )));
        }
        for i in 0..plane {
            scores.swap(l * plane + i, r * plane + i);
        }
    }
    Ok(())
}

/// Normalised RGB planes `[3, h, w]` padded at the bottom and right to `to` with black
/// (the official pad value `-mean / std`).
fn pad_planes(planes: &[f32], size: [usize; 2], to: [usize; 2]) -> Vec<f32> {
    pad_planes_with(planes, size, to, |c| normalise(c, 0))
}

/// Planes `[3, h, w]` padded at the bottom and right to `to` with `value(channel)`.
fn pad_planes_with(
    planes: &[f32],
    [h, w]: [usize; 2],
    to: [usize; 2],
    value: impl Fn(usize) -> f32,
) -> Vec<f32> {
    if [h, w] == to {
        return planes.to_vec();
    }
    let mut out = Vec::with_capacity(3 * to[0] * to[1]);
    for c in 0..3 {
        let fill = value(c);
        for y in 0..to[0] {
            for x in 0..to[1] {
                out.push(if y < h && x < w { planes[(c * h + y) * w + x] } else { fill });
            }
        }
    }
    out
}

/// Mirrors `c` planes of `[h, w]` left to right.
fn flip(planes: &[f32], c: usize, [h, w]: [usize; 2]) -> Vec<f32> {
    let mut out = planes.to_vec();
    for row in out.chunks_exact_mut(w).take(c * h) {
        row.reverse();
    }
    out
}

/// The first class with the highest score at each pixel.
fn argmax(scores: &[f32], k: usize, pixels: usize) -> Vec<u32> {
    (0..pixels)
        .map(|i| {
            (0..k)
                .fold(0, |best, c| if scores[c * pixels + i] > scores[best * pixels + i] { c } else { best })
                as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::window_starts;

    /// LIP's flipped test pass exchanges each left and right class's scores, nothing else.
    #[test]
    fn a_flipped_lip_pass_exchanges_left_and_right_scores() {
        let (classes, plane) = (20, 3);
        let mut scores: Vec<f32> = (0..classes * plane).map(|i| i as f32).collect();
        super::swap_classes(&mut scores, classes, plane, crate::data::official::Official::Lip.flip_swaps())
            .unwrap();
        for c in 0..classes {
            let from = match c {
                14..=19 if c % 2 == 0 => c + 1,
                14..=19 => c - 1,
                other => other,
            };
            assert_eq!(
                scores[c * plane..(c + 1) * plane],
                [0, 1, 2].map(|i| (from * plane + i) as f32),
                "class {c}"
            );
        }
    }

    #[test]
    fn windows_cover_the_axis_and_end_at_the_border() {
        assert_eq!(window_starts(100, 100, 100), [0]);
        assert_eq!(window_starts(80, 100, 50), [0]);
        assert_eq!(window_starts(250, 100, 100), [0, 100, 150]);
        assert_eq!(window_starts(200, 100, 100), [0, 100]);
        assert_eq!(window_starts(130, 100, 20), [0, 20, 30]);
    }
}
