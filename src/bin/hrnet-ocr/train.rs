//! `train`: the official recipe on a folder dataset or the procedural scenes, with atomic
//! checkpoints and exact resume.

use crate::segment::{DataArgs, Set};
use crate::{mib, model, parse_size};
use clap::Args;
use hrnet_ocr::data::augment::Batches;
use hrnet_ocr::data::Dataset;
use hrnet_ocr::dist::{Comm, DataParallel};
use hrnet_ocr::eval::{Evaluation, Scores};
use hrnet_ocr::formats::pth::{is_pytorch_file, read_official_training};
use hrnet_ocr::infer::{OfficialTest, Segmenter, Strategy};
use hrnet_ocr::kernels::tuning::TuningCache;
use hrnet_ocr::model::mmseg;
use hrnet_ocr::model::weights::{self, NamedTensor};
use hrnet_ocr::model::Config;
use hrnet_ocr::train::recipe::{RunSettings, SYNTHETIC_STEPS};
use hrnet_ocr::train::{Checkpoint, TrainOptions, Trainer};
use hrnet_ocr::{Error, Gpu, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct TrainArgs {
    /// A preset or experiment YAML file [default: the bundled model's config]
    #[arg(long, value_name = "C")]
    config: Option<String>,
    #[command(flatten)]
    data: DataArgs,
    /// Output folder: checkpoint.safetensors, final.safetensors, best.safetensors,
    /// train_log.csv and val_log.csv
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Continue the run that wrote this checkpoint, exactly as it would have gone on; or an
    /// official checkpoint.pth.tar (weights, SGD momentum, epoch) with this run's settings
    #[arg(long, value_name = "CKPT")]
    resume: Option<PathBuf>,
    /// Start from these weights (every tensor of the model) instead of a fresh initialisation
    #[arg(long, value_name = "W", conflicts_with_all = ["resume", "pretrained"])]
    weights: Option<PathBuf>,
    /// Start from the official initialisation with the tensors of this checkpoint that the
    /// model has (an ImageNet-pretrained HRNet) [default: MODEL.PRETRAINED]
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pretrained: Option<PathBuf>,
    /// Steps of the run (the poly schedule's max_iter) [default: TRAIN.END_EPOCH epochs of
    /// the training list; 1000 for the procedural scenes]
    #[arg(long)]
    steps: Option<usize>,
    /// Images per step [default: TRAIN.BATCH_SIZE_PER_GPU]
    #[arg(long)]
    batch: Option<usize>,
    /// Training crop, N or HxW [default: TRAIN.IMAGE_SIZE]
    #[arg(long, value_parser = parse_size)]
    crop: Option<[usize; 2]>,
    /// Procedural scenes' size, N or HxW [default: 128]
    #[arg(long, value_parser = parse_size)]
    size: Option<[usize; 2]>,
    /// Seed of the data order, augmentation, dropout and procedural scenes [default: 1]
    #[arg(long)]
    seed: Option<u64>,
    /// Split of a Cityscapes folder, or list file SPLIT.lst / SPLIT.txt [default: train]
    #[arg(long)]
    split: Option<String>,
    /// Learning-rate multiplier of the parameters named by TRAIN.NONBACKBONE_KEYWORDS
    /// [default: TRAIN.NONBACKBONE_MULT]
    #[arg(long)]
    head_lr_mult: Option<f32>,
    /// Write the checkpoint every N steps (and at the end)
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Score the test set every N steps (0: never), logging mIoU and keeping the best weights
    /// [default: every epoch, as the official run, where there is a test set]
    #[arg(long, value_name = "N")]
    eval_every: Option<usize>,
    /// End this invocation after step N (a later --resume goes on from there)
    #[arg(long, value_name = "N")]
    stop_after: Option<usize>,
    /// Print the training step's planned device memory, what its tensors hold, and after
    /// the first step the device's high-water mark
    #[arg(long)]
    report_memory: bool,
    /// What the backward rebuilds instead of keeping it: less device memory, more time, the
    /// same results; bare --recompute means convolutions
    #[arg(long, value_enum, value_name = "WHAT", num_args = 0..=1, default_value = "bn-relu", default_missing_value = "convolutions")]
    recompute: crate::Recompute,
    /// Train data-parallel on these devices (indices of `hrnet-ocr info`'s device list, comma
    /// separated, or `all`): one rank per device, each on its slice of the global batch of
    /// devices x --batch images; a device listed twice runs two ranks on it. Under mpirun,
    /// each rank takes the device at its place among the ranks on its machine [default: the
    /// default adapter; under mpirun, the device numbered by that place]
    #[arg(long, value_name = "LIST")]
    devices: Option<String>,
    /// Normalise with each device's own batch statistics instead of synchronizing batch norm
    /// over the global batch
    #[arg(long)]
    per_device_bn: bool,
}

/// Where this process's ranks come from: one device, threads on several, or MPI.
enum Launch {
    Devices(Vec<usize>),
    #[cfg(feature = "mpi")]
    Mpi(hrnet_ocr::dist::mpi::Mpi, usize),
}

impl Launch {
    fn of(args: &TrainArgs) -> Result<Self> {
        let devices = args.devices.as_deref().map(crate::parse_devices).transpose()?;
        #[cfg(feature = "mpi")]
        if hrnet_ocr::dist::mpi::Mpi::launched() {
            let mpi = hrnet_ocr::dist::mpi::Mpi::init()?;
            let local = hrnet_ocr::dist::mpi::Mpi::local_rank();
            let device = match &devices {
                Some(list) => list[local % list.len()],
                None => local % hrnet_ocr::gpu::device_list().len().max(1),
            };
            return Ok(Launch::Mpi(mpi, device));
        }
        Ok(Launch::Devices(devices.unwrap_or_default()))
    }

    fn ranks(&self) -> usize {
        match self {
            Launch::Devices(d) => d.len().max(1),
            #[cfg(feature = "mpi")]
            Launch::Mpi(mpi, _) => hrnet_ocr::dist::Collective::ranks(&mpi.world()),
        }
    }
}

/// The settings given on the command line (`ranks`: the data-parallel ranks of the
/// launch), as the texts a checkpoint stores them as.
fn given(args: &TrainArgs, ranks: usize) -> Vec<(&'static str, String)> {
    let size = |s: [usize; 2]| format!("{}x{}", s[0], s[1]);
    let data = match &args.data.data {
        Some(dir) => Some(dir.display().to_string()),
        None => args.data.synthetic.then(|| "synthetic".to_string()),
    };
    [
        ("config", args.config.clone()),
        ("data", data),
        ("list", args.data.list.as_ref().map(|l| l.display().to_string())),
        ("split", args.split.clone()),
        ("steps", args.steps.map(|v| v.to_string())),
        ("batch", args.batch.map(|v| v.to_string())),
        ("devices", args.devices.as_ref().map(|_| ranks.to_string())),
        ("sync_batch_norm", args.per_device_bn.then(|| "false".to_string())),
        ("crop", args.crop.map(size)),
        ("size", args.size.map(size)),
        ("seed", args.seed.map(|v| v.to_string())),
        ("head_lr_mult", args.head_lr_mult.map(|v| v.to_string())),
        ("eval_every", args.eval_every.map(|v| v.to_string())),
    ]
    .into_iter()
    .filter_map(|(key, value)| Some((key, value?)))
    .collect()
}

fn load_config(name: &str) -> Result<Config> {
    match name {
        "bundled" => model::bundled_config(),
        c => Config::load(c),
    }
}

/// The run's settings and config: for a new run, the YAML's recipe with the flags over it
/// (steps still 0 where they come from epochs); for a resumed one, the checkpoint's, where
/// a flag that disagrees is an error rather than silently ignored.
fn resolve(args: &TrainArgs, ranks: usize, checkpoint: Option<&Checkpoint>) -> Result<(RunSettings, Config)> {
    let mut given = given(args, ranks);
    if ranks > 1 && !given.iter().any(|(k, _)| *k == "devices") {
        given.push(("devices", ranks.to_string()));
    }
    let Some(c) = checkpoint else {
        let name = args.config.clone().unwrap_or_else(|| "bundled".into());
        let cfg = load_config(&name)?;
        let notes = given.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        return Ok((RunSettings::from_config(&name, &cfg).with_notes(&notes)?, cfg));
    };
    let stored = RunSettings::from_notes(&c.notes)?;
    let stored_text = stored.to_notes();
    for (key, value) in given {
        let kept = stored_text.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str()).unwrap_or_default();
        if value != kept {
            return Err(Error::Invalid(format!(
                "--{} {value} differs from the resumed run's {kept}; a resumed run keeps its settings",
                key.replace('_', "-")
            )));
        }
    }
    let cfg = load_config(&stored.config)?;
    Ok((stored, cfg))
}

pub fn train(args: &TrainArgs) -> Result<()> {
    // An official checkpoint.pth.tar goes on with this run's settings (it stores none).
    let official =
        args.resume.as_deref().filter(|p| is_pytorch_file(p)).map(read_official_training).transpose()?;
    let mut checkpoint =
        args.resume.as_deref().filter(|p| !is_pytorch_file(p)).map(Checkpoint::load).transpose()?;
    if checkpoint.is_none() && args.data.data.is_none() && !args.data.synthetic {
        return Err(Error::Invalid("no data: give --data DIR or --synthetic".into()));
    }
    let launch = Launch::of(args)?;
    let (mut s, cfg) = resolve(args, launch.ranks(), checkpoint.as_ref())?;
    if s.devices != launch.ranks() {
        return Err(Error::Invalid(format!(
            "the resumed run trained on {} devices (a global batch of {}); resume it on as many \
             (--devices, or mpirun -np {}), not {}",
            s.devices,
            s.global_batch(),
            s.devices,
            launch.ranks()
        )));
    }
    let synthetic = s.data == "synthetic";
    if synthetic && s.steps == 0 {
        s.steps = SYNTHETIC_STEPS;
    }
    if synthetic && cfg.num_classes != hrnet_ocr::data::procedural::CLASSES.len() {
        return Err(Error::Invalid(format!(
            "the procedural scenes have {} classes; the config says DATASET.NUM_CLASSES {}",
            hrnet_ocr::data::procedural::CLASSES.len(),
            cfg.num_classes
        )));
    }
    let data = DataArgs {
        data: (!synthetic).then(|| PathBuf::from(&s.data)),
        synthetic,
        list: (!s.list.is_empty()).then(|| PathBuf::from(&s.list)),
    };
    let (dataset, _) =
        data.open(&cfg, Set::Train, &s.split, s.seed, s.steps.saturating_mul(s.global_batch()), s.size)?;
    if !dataset.labelled() {
        return Err(Error::Invalid("the training list has no labels (a test split's list)".into()));
    }
    let extra = extra_dataset(&cfg, &data, &s)?;
    let s = s.with_epochs(&cfg, dataset.len(), extra.as_ref().map(|d| d.len()))?;
    let recipe_text = s.describe(&cfg);
    // A resumed run re-reads its YAML: one edited since would change the run silently.
    if let Some(saved) = checkpoint.as_ref().and_then(|c| c.notes.get(RECIPE_KEY)) {
        if *saved != recipe_text {
            return Err(Error::Invalid(format!(
                "the run's recipe changed since its checkpoint (was the YAML edited?)\n  then: {saved}\n  now:  {recipe_text}"
            )));
        }
    }
    let per_epoch = (dataset.len() / s.global_batch()).max(1);
    if let Some((state, training)) = official {
        let (epoch, best) = (training.epoch, training.best_mean_iou);
        let mut notes: HashMap<String, String> =
            s.to_notes().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        // The official run's best so far: a later validation must beat it to write best weights.
        if let Some(best) = best {
            notes.insert(BEST_KEY.into(), best.to_string());
        }
        checkpoint = Some(Checkpoint::from_official(state, training, &s.head_keywords, per_epoch, notes)?);
        let best = best.map(|b| format!(", best mIoU {b}")).unwrap_or_default();
        println!("resuming the official checkpoint after epoch {epoch}: step {}{best}", epoch * per_epoch);
    }
    let steps = s.total_steps();
    let options =
        TrainOptions { recompute: args.recompute.into(), ..s.options(&cfg, TuningCache::from_env()) };
    if args.report_memory {
        println!("training step memory: {}", hrnet_ocr::train::planned_memory(&cfg, &options)?);
    }
    let stop = args.stop_after.unwrap_or(steps).min(steps);
    std::fs::create_dir_all(&args.out)
        .map_err(|source| Error::Io { path: args.out.display().to_string(), source })?;
    let run = Run {
        args,
        cfg: &cfg,
        s: &s,
        data: &data,
        dataset: dataset.as_ref(),
        extra: extra.as_deref(),
        checkpoint: checkpoint.as_ref(),
        recipe_text: &recipe_text,
        options,
        stop,
        per_epoch,
    };
    let sync_batch_norm = s.sync_batch_norm;
    let parallel = |rank, ranks| DataParallel::rank(rank, ranks, sync_batch_norm);
    match launch {
        Launch::Devices(devices) if devices.len() > 1 => {
            let ranks = devices.len();
            hrnet_ocr::dist::on_threads(ranks, |rank, comm| {
                run.rank(crate::open_device(Some(devices[rank]))?, parallel(rank, ranks), Some(comm))
            })
            .map(drop)
        }
        Launch::Devices(devices) => {
            run.rank(crate::open_device(devices.first().copied())?, parallel(0, 1), None)
        }
        #[cfg(feature = "mpi")]
        Launch::Mpi(mpi, device) => {
            use hrnet_ocr::dist::Collective;
            let group = mpi.world();
            let p = parallel(group.rank(), group.ranks());
            let result = crate::open_device(Some(device))
                .and_then(|gpu| run.rank(gpu, p, Some(Comm::new(Box::new(group)))));
            if let (Err(e), true) = (&result, p.ranks > 1) {
                eprintln!("error on rank {} of {}: {e}", p.rank, p.ranks);
                mpi.abort_all(1);
            }
            result
        }
    }
}

/// Everything a rank of the run needs.
struct Run<'a> {
    args: &'a TrainArgs,
    cfg: &'a Config,
    s: &'a RunSettings,
    data: &'a DataArgs,
    dataset: &'a dyn Dataset,
    extra: Option<&'a dyn Dataset>,
    checkpoint: Option<&'a Checkpoint>,
    recipe_text: &'a str,
    options: TrainOptions,
    stop: usize,
    per_epoch: usize,
}

impl Run<'_> {
    /// Trains as one rank: rank 0 (the only rank without data parallelism) logs, validates and
    /// writes the checkpoints; every rank steps on its slice of each global batch.
    fn rank(&self, gpu: Gpu, parallel: DataParallel, comm: Option<Comm>) -> Result<()> {
        let Run { args, cfg, s, data, checkpoint, recipe_text, stop, per_epoch, dataset, extra, .. } = *self;
        let options = TrainOptions { batch: s.batch, parallel, ..self.options.clone() };
        let root = parallel.rank == 0;
        let (steps, batch, crop) = (s.total_steps(), s.global_batch(), s.crop);
        let mut trainer = match checkpoint {
            Some(c) => Trainer::resume(&gpu, cfg.clone(), c, options)?,
            None => {
                let initial = args.weights.as_deref().map(initial_weights).transpose()?;
                let mut trainer = Trainer::new(&gpu, cfg.clone(), initial.as_deref(), options)?;
                if let Some(path) = pretrained_path(args, cfg)? {
                    let report =
                        trainer.load_pretrained(&weights::read(&path)?, &path.display().to_string())?;
                    if root {
                        println!("pretrained start from {}: {report}", path.display());
                    }
                }
                trainer
            }
        };
        if let Some(comm) = comm {
            trainer.join(comm)?;
        }
        let recipe = s.augment(cfg)?;
        let shuffle = cfg.train.shuffle;
        let classes = cfg.num_classes;
        let batches = Batches { dataset, recipe, seed: s.seed, batch, classes, shuffle };
        let extra_batches = extra.map(|dataset| Batches { dataset, ..batches.clone() });
        let first = trainer.steps();
        let mut log = root
            .then(|| CsvLog::open(&args.out.join("train_log.csv"), TRAIN_LOG_HEADER, first))
            .transpose()?;
        let mut validation = match root {
            true => Validation::new(cfg, data, s, per_epoch, &args.out, checkpoint, first)?,
            false => None,
        };
        let checkpoint_path = args.out.join("checkpoint.safetensors");
        let progress = if root { progress_bar(steps, first) } else { ProgressBar::hidden() };
        if root {
            println!(
                "training on {} from step {first} to {stop} of {steps}: batch {batch} of {}x{} crops",
                gpu.describe(),
                crop[0],
                crop[1]
            );
            println!("{recipe_text}");
        }
        if parallel.ranks > 1 {
            println!("rank {} of {} on {}", parallel.rank, parallel.ranks, gpu.describe());
        }
        if args.report_memory && root {
            println!("the graph's tensors hold {:.1} MiB", mib(trainer.graph().tensor_bytes()));
            gpu.reset_peak_memory();
        }
        let start = Instant::now();
        let mut communication = 0.0;
        let slice = parallel.slice(batch);
        for step in first..stop {
            let samples = match &extra_batches {
                Some(extra) if step >= s.steps => extra.get_part(step - s.steps, slice.clone())?,
                _ => batches.get_part(step, slice.clone())?,
            };
            let stats = trainer.step(&samples, s.step_seed(step))?;
            communication += trainer.take_comm_stats().seconds;
            if !stats.loss.is_finite() {
                return Err(Error::Invalid(format!(
                    "the loss became {} at step {}; the last checkpoint is kept. Try a lower TRAIN.LR",
                    stats.loss,
                    step + 1
                )));
            }
            let done = step + 1;
            let saving = done % args.save_every.max(1) == 0 || done == stop;
            if !root {
                continue;
            }
            if args.report_memory && step == first {
                let (held, peak) = gpu.tensor_memory();
                println!(
                "after step {done}: tensors {:.1} MiB on the device, high-water mark {:.1} MiB (kernels' scratch included)",
                mib(held),
                mib(peak)
            );
            }
            let rate = ((done - first) * batch) as f64 / start.elapsed().as_secs_f64();
            let (loss, aux, main, lr) = (stats.loss, stats.aux_loss, stats.main_loss, stats.lr);
            if let Some(log) = log.as_mut() {
                log.append(&format!("{done},{loss},{aux},{main},{lr},{rate:.3}"))?;
            }
            let message = format!(
                "loss {:.4} (aux {:.4}, main {:.4})  lr {:.5}  {rate:.2} images/s",
                stats.loss, stats.aux_loss, stats.main_loss, stats.lr
            );
            progress.set_position(done as u64);
            progress.set_message(message.clone());
            if progress.is_hidden() && (done % 10 == 0 || saving) {
                let eta = start.elapsed().as_secs_f64() / (done - first) as f64 * (stop - done) as f64;
                println!("step {done}/{steps}  {message}  ETA {eta:.0} s");
            }
            if let Some(v) = validation.as_mut().filter(|v| done % v.every == 0 || done == steps) {
                let scores = v.run(&gpu, cfg, &trainer)?;
                let line = format!(
                "validation at step {done}: mIoU {:.4} (best {:.4}), pixel accuracy {:.4}, mean accuracy {:.4}",
                scores.mean_iou, v.best, scores.pixel_accuracy, scores.mean_accuracy
            );
                // A hidden bar (no terminal) prints nothing of its own.
                if progress.is_hidden() {
                    println!("{line}");
                } else {
                    progress.println(line);
                }
            }
            if saving {
                let mut notes: HashMap<String, String> =
                    s.to_notes().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                if let Some(v) = &validation {
                    notes.insert(BEST_KEY.into(), v.best.to_string());
                }
                notes.insert(RECIPE_KEY.into(), recipe_text.to_string());
                trainer.checkpoint(notes)?.save(&checkpoint_path)?;
            }
        }
        progress.finish_and_clear();
        let took = start.elapsed().as_secs_f64();
        if parallel.ranks > 1 && stop > first {
            let per_step = communication / (stop - first) as f64;
            println!(
                "rank {}: communication {:.1} ms per step, {:.1}% of the step",
                parallel.rank,
                1e3 * per_step,
                100.0 * communication / took
            );
        }
        if !root {
            return Ok(());
        }
        if trainer.steps() == steps {
            let path = args.out.join("final.safetensors");
            weights::write_safetensors(&path, &trainer.weights()?)?;
            println!("wrote {} after {took:.0} s", path.display());
        } else {
            println!(
                "stopped after step {}; resume with --resume {}",
                trainer.steps(),
                checkpoint_path.display()
            );
        }
        Ok(())
    }
}

const TRAIN_LOG_HEADER: &str = "step,loss,aux_loss,main_loss,lr,images_per_second";
/// The checkpoint note holding the best validation mIoU so far (resumed with the run).
const BEST_KEY: &str = "best_mean_iou";
/// The checkpoint note holding the effective recipe as `train` printed it.
const RECIPE_KEY: &str = "recipe";

/// Validation during training, as the official run after each epoch: the test set scored
/// with the YAML's test recipe, each result a line of `val_log.csv`, the weights written
/// to `best.safetensors` whenever the mIoU beats the best so far.
struct Validation<'g> {
    set: Box<dyn Dataset>,
    strategy: Strategy,
    segmenter: Option<Segmenter<'g>>,
    every: usize,
    best: f64,
    log: CsvLog,
    out: PathBuf,
}

impl<'g> Validation<'g> {
    /// None when the run does not validate: `--eval-every 0`, or by default where there is
    /// no test set (the procedural scenes, a folder without a val split). An asked-for
    /// validation without a test set is an error.
    fn new(
        cfg: &Config,
        data: &DataArgs,
        s: &RunSettings,
        per_epoch: usize,
        out: &Path,
        checkpoint: Option<&Checkpoint>,
        first: usize,
    ) -> Result<Option<Self>> {
        let every = match s.eval_every {
            Some(0) => return Ok(None),
            Some(n) => n,
            None if data.synthetic => return Ok(None),
            None => per_epoch,
        };
        let test = DataArgs { list: None, ..data.clone() };
        let set = match test.open(cfg, Set::Test, "val", 2, 20, s.size) {
            Ok((set, _)) if set.labelled() && !set.is_empty() => set,
            Ok(_) | Err(_) if s.eval_every.is_none() => return Ok(None),
            Ok(_) => return Err(Error::Invalid("--eval-every: the test set has no labelled image".into())),
            Err(e) => return Err(Error::Invalid(format!("--eval-every: no test set to score ({e})"))),
        };
        let strategy = OfficialTest::of(cfg, None)?.map_or(Strategy::Whole, Strategy::Official);
        let best = checkpoint.and_then(|c| c.notes.get(BEST_KEY)).and_then(|b| b.parse().ok()).unwrap_or(0.0);
        let log =
            CsvLog::open(&out.join("val_log.csv"), "step,mean_iou,pixel_accuracy,mean_accuracy", first)?;
        Ok(Some(Validation { set, strategy, segmenter: None, every, best, log, out: out.to_path_buf() }))
    }

    fn run(&mut self, gpu: &'g Gpu, cfg: &Config, trainer: &Trainer) -> Result<Scores> {
        let weights = trainer.weights()?;
        let segmenter = match &mut self.segmenter {
            Some(segmenter) => {
                segmenter.set_weights(weights.clone())?;
                segmenter
            }
            None => self.segmenter.insert(Segmenter::new(gpu, cfg.clone(), weights.clone())),
        };
        let mut evaluation = Evaluation::new(gpu, cfg.num_classes, cfg.ignore_index())?;
        for i in 0..self.set.len() {
            let scene = self.set.get(i)?;
            segmenter.evaluate(&scene.image, &self.strategy, &scene.labels, &mut evaluation)?;
        }
        let scores = evaluation.scores(gpu)?;
        let step = trainer.steps();
        let (miou, pixel, mean) = (scores.mean_iou, scores.pixel_accuracy, scores.mean_accuracy);
        self.log.append(&format!("{step},{miou},{pixel},{mean}"))?;
        if miou > self.best {
            self.best = miou;
            weights::write_safetensors(&self.out.join("best.safetensors"), &weights)?;
        }
        Ok(scores)
    }
}

/// The pretrained checkpoint of a new run without `--weights`: `--pretrained`, else the
/// YAML's `MODEL.PRETRAINED` (relative to the working folder, as the official scripts run
/// from the repository's root), which must exist as the official code requires.
fn pretrained_path(args: &TrainArgs, cfg: &Config) -> Result<Option<PathBuf>> {
    if args.weights.is_some() {
        return Ok(None);
    }
    let Some(path) = args.pretrained.clone().or_else(|| cfg.train.pretrained.as_ref().map(PathBuf::from))
    else {
        return Ok(None);
    };
    if !path.is_file() {
        let from = if args.pretrained.is_some() { "--pretrained" } else { "MODEL.PRETRAINED" };
        return Err(Error::Invalid(format!(
            "{from}: no such file {} (the ImageNet-pretrained HRNet the run starts from; give \
             --pretrained FILE, or --weights W to start from a whole model)",
            path.display()
        )));
    }
    Ok(Some(path))
}

/// The `DATASET.EXTRA_TRAIN_SET` list of a run with `TRAIN.EXTRA_EPOCH`s.
fn extra_dataset(cfg: &Config, data: &DataArgs, s: &RunSettings) -> Result<Option<Box<dyn Dataset>>> {
    if cfg.train.extra_epoch == 0 {
        return Ok(None);
    }
    let list = cfg.train.extra_train_set.as_ref().ok_or_else(|| {
        Error::Invalid("TRAIN.EXTRA_EPOCH needs DATASET.EXTRA_TRAIN_SET, the list of its images".into())
    })?;
    let extra = DataArgs { list: Some(PathBuf::from(list)), ..data.clone() };
    let (dataset, _) = extra.open(cfg, Set::Train, &s.split, s.seed, 0, s.size)?;
    Ok(Some(dataset))
}

fn progress_bar(steps: usize, first: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64).with_position(first as u64);
    let style = ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg}  ETA {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// A CSV log with one line per step it records (`train_log.csv`, `val_log.csv`). A resumed
/// run keeps the lines up to its checkpoint.
struct CsvLog {
    file: std::fs::File,
    path: PathBuf,
}

impl CsvLog {
    fn open(path: &Path, header: &str, resumed_at: usize) -> Result<Self> {
        let io = |source| Error::Io { path: path.display().to_string(), source };
        let kept: Vec<String> = match std::fs::read_to_string(path) {
            Ok(text) if resumed_at > 0 => text
                .lines()
                .skip(1)
                .filter(|l| {
                    l.split(',').next().and_then(|s| s.parse::<usize>().ok()).is_some_and(|s| s <= resumed_at)
                })
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut text = format!("{header}\n");
        for line in kept {
            text += &line;
            text.push('\n');
        }
        hrnet_ocr::fs::write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok(CsvLog { file, path: path.to_path_buf() })
    }

    fn append(&mut self, line: &str) -> Result<()> {
        writeln!(self.file, "{line}")
            .map_err(|source| Error::Io { path: self.path.display().to_string(), source })
    }
}

/// The weights `--weights` starts from. mmsegmentation's are refused: the trainer follows the
/// official conventions, and `--pretrained` loads them by name into that model.
fn initial_weights(path: &Path) -> Result<Vec<NamedTensor>> {
    let tensors = weights::read(path)?;
    if mmseg::is_mmsegmentation(&tensors) {
        return Err(Error::Invalid(format!(
            "--weights {}: an mmsegmentation checkpoint; training follows the official conventions, so \
             start from it with --pretrained (its tensors load by name, the head's conv biases fresh)",
            path.display()
        )));
    }
    Ok(tensors)
}
