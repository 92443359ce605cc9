//! `segment` and `eval`: inference on image files and on labelled sets.

use crate::{model, parse_size, Mode, ModelArgs};
use clap::{Args, ValueEnum};
use hrnet_ocr::data::folder::Folder;
use hrnet_ocr::data::image::check_labels;
use hrnet_ocr::data::official::Official;
use hrnet_ocr::data::procedural::Scenes;
use hrnet_ocr::data::Dataset;
use hrnet_ocr::eval::{Evaluation, Scores};
use hrnet_ocr::images::{self, LabelMap};
use hrnet_ocr::infer::{OfficialTest, Segmenter, Strategy};
use hrnet_ocr::kernels::conv2d::Precision;
use hrnet_ocr::model::weights::NamedTensor;
use hrnet_ocr::model::Config;
use hrnet_ocr::{Error, Gpu, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How images are covered.
#[derive(Args, Clone, Debug)]
pub struct InferArgs {
    /// Inference mode [default: official when the config names its DATASET.DATASET, else whole]
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Sliding-window size, N or HxW (slide, ms-flip)
    #[arg(long, value_parser = parse_size, default_value = "512x1024")]
    crop: [usize; 2],
    /// Window stride, N or HxW [default: two thirds of --crop, as the official test]
    #[arg(long, value_parser = parse_size)]
    stride: Option<[usize; 2]>,
    /// Scales of ms-flip, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.75,1,1.25,1.5,1.75")]
    scales: Vec<f32>,
    /// Run layer by layer and stop at the first NaN or infinity, naming the input, weight or layer (slow)
    #[arg(long)]
    check_numerics: bool,
    /// Inference at f32, or f16: activations and convolution weights stored at half, sums f32
    /// (needs the adapter's SHADER_F16; falls back to f32)
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
}

/// The precision of inference: f16 stores activations and convolution weights at half
/// (sums stay f32) where the adapter has SHADER_F16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    F32,
    F16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::F16 => Precision::F16,
        }
    }
}

impl InferArgs {
    /// A segmenter with these options, saying so when f16 falls back to f32. One that will
    /// be `reused` (many images, windows or scales) measures the convolution variants first.
    fn segmenter<'g>(
        &self,
        gpu: &'g Gpu,
        cfg: Config,
        weights: Vec<NamedTensor>,
        reused: bool,
    ) -> Segmenter<'g> {
        let mut segmenter = Segmenter::new(gpu, cfg, weights);
        segmenter.check_numerics(self.check_numerics);
        segmenter.tune(reused || self.mode != Some(Mode::Whole));
        let asked = Precision::from(self.precision);
        if segmenter.set_precision(asked) != asked {
            eprintln!("note: {} lacks SHADER_F16; running f32 weights", gpu.describe());
        }
        segmenter
    }

    /// The strategy `--mode` asks for; without one, `cfg`'s official test (of the test list
    /// `list`, else its TEST_SET) when it names a dataset, else the whole image.
    fn strategy(&self, cfg: &Config, list: Option<&str>) -> Result<Strategy> {
        let stride = self.stride.unwrap_or(self.crop.map(|c| (c * 2 / 3).max(1)));
        if let Some(s) = self.scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::Invalid(format!("--scales: {s} is not a positive scale")));
        }
        let official = || {
            OfficialTest::of(cfg, list)?.map(Strategy::Official).ok_or_else(|| {
                Error::Invalid("--mode official needs a config naming its DATASET.DATASET".into())
            })
        };
        Ok(match self.mode {
            None => official().unwrap_or(Strategy::Whole),
            Some(Mode::Official) => official()?,
            Some(Mode::Whole) => Strategy::Whole,
            Some(Mode::Slide) => Strategy::Slide { crop: self.crop, stride },
            Some(Mode::MsFlip) => {
                Strategy::MultiScaleFlip { scales: self.scales.clone(), crop: self.crop, stride }
            }
        })
    }
}

#[derive(Args)]
pub struct SegmentArgs {
    /// Images to segment (PNG or JPEG)
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Folder for the outputs: NAME_labels.png (class indices) and NAME_overlay.png
    #[arg(long, default_value = "segmented")]
    out: PathBuf,
    #[command(flatten)]
    infer: InferArgs,
    /// Opacity of the class colours over the image, 0 to 1
    #[arg(long, default_value_t = 0.5)]
    opacity: f32,
}

pub fn segment(args: &SegmentArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.opacity) {
        return Err(Error::Invalid(format!("--opacity {} is outside 0 to 1", args.opacity)));
    }
    // Read every image first: a bad file fails the command before any work.
    let inputs = args.images.iter().map(|p| images::read_rgb(p)).collect::<Result<Vec<_>>>()?;
    let (cfg, weights, bundled) = model::load(&args.model)?;
    let strategy = args.infer.strategy(&cfg, None)?;
    let gpu = Gpu::new()?;
    std::fs::create_dir_all(&args.out)
        .map_err(|source| Error::Io { path: args.out.display().to_string(), source })?;
    let names = model::class_names(cfg.num_classes, bundled);
    let palette = images::palette(cfg.num_classes);
    let mut segmenter = args.infer.segmenter(&gpu, cfg, weights, inputs.len() > 1);
    for (path, image) in args.images.iter().zip(&inputs) {
        let start = Instant::now();
        let seg = segmenter.segment(image, &strategy)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let labels_path = args.out.join(format!("{stem}_labels.png"));
        let overlay_path = args.out.join(format!("{stem}_overlay.png"));
        let map = LabelMap { width: seg.width, height: seg.height, labels: seg.classes };
        images::write_labels(&labels_path, &map)?;
        images::write_rgb(&overlay_path, &images::overlay(image, &map.labels, &palette, args.opacity)?)?;
        println!(
            "{}: {}x{} in {ms:.0} ms -> {}, {}",
            path.display(),
            seg.width,
            seg.height,
            labels_path.display(),
            overlay_path.display()
        );
        println!("  {}", class_shares(&map.labels, &names));
    }
    println!("on {}", gpu.describe());
    Ok(())
}

/// "class 61.0%, ..." for the classes present, largest first.
fn class_shares(labels: &[u32], names: &[String]) -> String {
    let mut counts = vec![0usize; names.len()];
    for &l in labels {
        counts[l as usize] += 1;
    }
    let mut present: Vec<(usize, usize)> = counts.into_iter().enumerate().filter(|&(_, n)| n > 0).collect();
    present.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    let share = |n: usize| 100.0 * n as f64 / labels.len().max(1) as f64;
    present.iter().map(|&(c, n)| format!("{} {:.1}%", names[c], share(n))).collect::<Vec<_>>().join(", ")
}

/// The labelled images a command reads: a folder dataset or procedural scenes.
#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// A dataset root: an official dataset's (DATASET.DATASET of the YAML, its TRAIN_SET /
    /// TEST_SET lists relative to it), Cityscapes layout (leftImg8bit/, gtFine/) or
    /// images/ + masks/
    #[arg(long, value_name = "DIR", conflicts_with = "synthetic")]
    pub data: Option<PathBuf>,
    /// The built-in procedural scenes instead of files
    #[arg(long)]
    pub synthetic: bool,
    /// A list file relative to --data (`image mask` lines, or an official dataset's list)
    #[arg(long, value_name = "FILE", requires = "data")]
    pub list: Option<PathBuf>,
}

/// Which of an experiment's list files a command reads.
#[derive(Clone, Copy)]
pub enum Set {
    Train,
    Test,
}

impl DataArgs {
    /// The dataset, and the official one it is if the config names one: with a config
    /// naming `DATASET.DATASET`, its list (`--list`, or the YAML's `TRAIN_SET` / `TEST_SET`
    /// where that file exists under the root) read as the official class reads it; else
    /// `split` of the folder's layout; or `count` scenes of `seed` at `size`.
    pub fn open(
        &self,
        cfg: &Config,
        set: Set,
        split: &str,
        seed: u64,
        count: usize,
        size: [usize; 2],
    ) -> Result<(Box<dyn Dataset>, Option<Official>)> {
        let Some(dir) = &self.data else {
            if self.synthetic {
                return Ok((Box::new(Scenes { seed, count, width: size[1], height: size[0] }), None));
            }
            return Err(Error::Invalid("no data: give --data DIR or --synthetic".into()));
        };
        let ignore = cfg.ignore_index();
        let official = cfg.dataset.name.as_deref().map(Official::parse).transpose()?;
        if let Some(kind) = official {
            let yaml_list = match set {
                Set::Train => cfg.dataset.train_set.as_deref(),
                Set::Test => cfg.dataset.test_set.as_deref(),
            };
            let list = match &self.list {
                Some(l) => Some(l.display().to_string()),
                None => yaml_list.filter(|l| dir.join(l).is_file()).map(str::to_string),
            };
            if let Some(list) = list {
                let folder = Folder::official(dir, kind, &list, cfg.num_classes, ignore)?;
                return Ok((Box::new(folder), Some(kind)));
            }
        }
        Ok((Box::new(Folder::open(dir, split, self.list.as_deref(), ignore)?), official))
    }
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Split of a Cityscapes folder, or list file SPLIT.lst / SPLIT.txt of an images/ + masks/ folder
    #[arg(long, default_value = "val")]
    split: String,
    /// Procedural scenes: the held-out seed (training uses seed 1)
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// Procedural scenes: how many
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Procedural scenes: size, N or HxW
    #[arg(long, value_parser = parse_size, default_value = "128")]
    size: [usize; 2],
    #[command(flatten)]
    infer: InferArgs,
    /// Print the metrics and the confusion matrix (rows: ground truth, columns: prediction)
    /// as one JSON object on stdout
    #[arg(long)]
    json: bool,
    /// Write each prediction to DIR/NAME.png as the official code saves them: a palette PNG
    /// of the classes (Cityscapes: of its label ids, for the benchmark server), NAME the
    /// label file's stem (the image's in a test list, which has no labels to score)
    #[arg(long, value_name = "DIR")]
    save_pred: Option<PathBuf>,
}

/// The scores as one JSON object: per-class IoU, mIoU, pixel and mean accuracy, and the
/// confusion matrix as rows of ground truth.
fn scores_json(scores: &Scores, images: usize) -> String {
    let list = |v: &[f64]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(",");
    let k = scores.iou.len();
    let rows: Vec<String> = scores
        .confusion
        .chunks(k.max(1))
        .map(|r| format!("[{}]", r.iter().map(u64::to_string).collect::<Vec<_>>().join(",")))
        .collect();
    format!(
        "{{\"images\":{images},\"classes\":{k},\"iou\":[{}],\"mean_iou\":{},\"pixel_accuracy\":{},\"mean_accuracy\":{},\"confusion\":[{}]}}",
        list(&scores.iou),
        scores.mean_iou,
        scores.pixel_accuracy,
        scores.mean_accuracy,
        rows.join(",")
    )
}

pub fn eval(args: &EvalArgs) -> Result<()> {
    let (cfg, weights, bundled) = model::load(&args.model)?;
    let list = args.data.list.as_ref().map(|l| l.display().to_string());
    let strategy = args.infer.strategy(&cfg, list.as_deref())?;
    let ignore = cfg.ignore_index();
    let (dataset, official) =
        args.data.open(&cfg, Set::Test, &args.split, args.seed, args.count, args.size)?;
    let gpu = Gpu::new()?;
    let (classes, names) =
        (cfg.num_classes, model::class_names(cfg.num_classes, bundled || args.data.synthetic));
    let mut segmenter = args.infer.segmenter(&gpu, cfg, weights, true);
    let mut evaluation = Evaluation::new(&gpu, classes, ignore)?;
    let labelled = dataset.labelled();
    if !labelled && args.save_pred.is_none() {
        return Err(Error::Invalid(
            "the list has no labels to score (a test split): give --save-pred DIR to write its predictions"
                .into(),
        ));
    }
    if let Some(dir) = &args.save_pred {
        std::fs::create_dir_all(dir)
            .map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
    }
    let palette = images::official_palette();
    let mut seconds = 0.0;
    let save = |dir: &Path, i: usize, width: usize, height: usize, classes: &[u32]| {
        let labels = classes.iter().map(|&c| official.map_or(c, |d| d.saved_label(c))).collect();
        let map = LabelMap { width, height, labels };
        images::write_palette_labels(&dir.join(format!("{}.png", dataset.name(i))), &map, &palette)
    };
    for i in 0..dataset.len() {
        let scene = dataset.get(i)?;
        let start = Instant::now();
        if !labelled {
            // A test list: predictions only (`--save-pred` is required above).
            let seg = segmenter.segment(&scene.image, &strategy)?;
            seconds += start.elapsed().as_secs_f64();
            if let Some(dir) = &args.save_pred {
                save(dir, i, seg.width, seg.height, &seg.classes)?;
            }
            continue;
        }
        // An official dataset's encodings can give labels past the classes (COCO-Stuff's
        // unused ids, a reduced zero under IGNORE_LABEL -1): its confusion matrix leaves
        // them out, as the official one does. Other labels must be classes or the ignore.
        if official.is_none() {
            check_labels(&scene.labels, classes, ignore)
                .map_err(|e| Error::Invalid(format!("{}: {e}", dataset.describe(i))))?;
        }
        if let Some(dir) = &args.save_pred {
            let scored = segmenter.evaluate_kept(&scene.image, &strategy, &scene.labels, &mut evaluation)?;
            seconds += start.elapsed().as_secs_f64();
            save(dir, i, scored.width, scored.height, &scored.classes)?;
        } else {
            segmenter.evaluate(&scene.image, &strategy, &scene.labels, &mut evaluation)?;
            seconds += start.elapsed().as_secs_f64();
        }
    }
    if !labelled {
        let dir = args.save_pred.as_deref().unwrap_or(Path::new("."));
        println!("{} predictions written to {}", dataset.len(), dir.display());
        return Ok(());
    }
    let scores = evaluation.scores(&gpu)?;
    let timing = format!(
        "{} images, {:.1} ms per image ({} test) on {}",
        dataset.len(),
        1e3 * seconds / dataset.len().max(1) as f64,
        match &strategy {
            Strategy::Whole => "whole-image",
            Strategy::Slide { .. } => "sliding-window",
            Strategy::MultiScaleFlip { .. } => "multi-scale + flip",
            Strategy::Official(_) => "official",
        },
        gpu.describe()
    );
    if args.json {
        println!("{}", scores_json(&scores, dataset.len()));
        eprintln!("{timing}");
        return Ok(());
    }
    println!("{:>5}  {:<16} {:>7}", "class", "name", "IoU");
    for (c, iou) in scores.iou.iter().enumerate() {
        println!("{c:>5}  {:<16} {iou:>7.4}", names[c]);
    }
    println!("mIoU {:.4}", scores.mean_iou);
    println!("pixel accuracy {:.4}", scores.pixel_accuracy);
    println!("mean accuracy {:.4}", scores.mean_accuracy);
    println!("{timing}");
    Ok(())
}
