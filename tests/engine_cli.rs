//! The engine's commands end to end: segment with the bundled model, eval on folder
//! datasets, train with checkpoints and exact resume, bench, and the errors a user sees.

use hrnet_ocr::data::official::Official;
use hrnet_ocr::data::procedural::scene;
use hrnet_ocr::images::{self, LabelMap};
use hrnet_ocr::model::weights;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/model/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn asset(name: &str) -> String {
    format!("{}/assets/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch folder for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hrnet-ocr-engine-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the binary; returns (success, stdout + stderr). A run that succeeds must not print a
/// line that reads like a failure (a driver's or a library's stray `error:`).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hrnet-ocr")).args(args).output().expect("run hrnet-ocr");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        let alarm = text.lines().find(|l| l.trim_start().to_lowercase().starts_with("error"));
        assert!(alarm.is_none(), "hrnet-ocr {args:?} succeeded but printed {alarm:?}");
    }
    (out.status.success(), text)
}

/// `train --config CONFIG --data ROOT --out OUT`, then `extra` flags.
fn train_args<'a>(config: &'a Path, root: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    [&["train", "--config", s(config), "--data", s(root), "--out", s(out)][..], extra].concat()
}

/// An images/ + masks/ dataset of `count` procedural scenes of `seed`.
fn write_folder(root: &Path, seed: u64, count: u64, size: usize) {
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    for i in 0..count {
        let sc = scene(seed, i, size, size);
        images::write_rgb(&root.join(format!("images/{i}.png")), &sc.image).unwrap();
        let map = LabelMap { width: size, height: size, labels: sc.labels };
        images::write_labels(&root.join(format!("masks/{i}.png")), &map).unwrap();
    }
}

#[test]
fn every_command_has_help() {
    for cmd in ["info", "segment", "train", "eval", "bench", "tune", "forward", "backward", "convert"] {
        let (ok, text) = run(&[cmd, "--help"]);
        assert!(ok && text.contains("Usage: hrnet-ocr"), "{cmd}: {text}");
    }
    // `info` probes every backend, GL through EGL included: still no stray error lines.
    let (ok, text) = run(&["info"]);
    assert!(ok && text.contains("adapters found:") && text.contains("chosen:"), "{text}");
}

#[test]
fn segment_with_the_bundled_model_matches_the_example_labels() {
    let out = scratch("segment");
    let (ok, text) = run(&["segment", &asset("scene.png"), "--out", s(&out)]);
    assert!(ok, "{text}");
    let labels = images::read_labels(&out.join("scene_labels.png")).unwrap();
    let truth = images::read_labels(Path::new(&asset("scene_labels.png"))).unwrap();
    assert_eq!((labels.width, labels.height), (truth.width, truth.height));
    let right = labels.labels.iter().zip(&truth.labels).filter(|(a, b)| a == b).count();
    let accuracy = right as f64 / truth.labels.len() as f64;
    assert!(accuracy >= 0.9, "pixel accuracy of the bundled model on the example: {accuracy}");
    let overlay = images::read_rgb(&out.join("scene_overlay.png")).unwrap();
    let image = images::read_rgb(Path::new(&asset("scene.png"))).unwrap();
    assert_eq!((overlay.width, overlay.height), (image.width, image.height));
    // Opacity 0.5: every pixel is halfway between the image and its class colour.
    let palette = images::palette(5);
    for (i, (o, p)) in overlay.rgb.chunks_exact(3).zip(image.rgb.chunks_exact(3)).enumerate().step_by(97) {
        let c = palette[labels.labels[i] as usize];
        for k in 0..3 {
            let want = (f32::from(p[k]) + f32::from(c[k])) / 2.0;
            assert!((f32::from(o[k]) - want).abs() <= 1.0, "pixel {i}: {o:?} from {p:?} and {c:?}");
        }
    }
}

#[test]
fn segment_sliding_windows_and_multi_scale_write_outputs() {
    let out = scratch("segment-modes");
    for mode in ["slide", "ms-flip"] {
        let (ok, text) = run(&[
            "segment",
            &asset("scene.png"),
            "--out",
            s(&out),
            "--mode",
            mode,
            "--crop",
            "160",
            "--scales",
            "0.75,1.25",
        ]);
        assert!(ok, "{mode}: {text}");
        let labels = images::read_labels(&out.join("scene_labels.png")).unwrap();
        assert!(labels.labels.iter().all(|&l| l < 5), "{mode}");
    }
}

#[test]
fn segment_reports_bad_files_by_name() {
    let dir = scratch("segment-errors");
    let missing = dir.join("missing.png");
    let (ok, text) = run(&["segment", s(&missing), "--out", s(&dir)]);
    assert!(!ok && text.contains("missing.png"), "{text}");
    let not_image = dir.join("notes.png");
    std::fs::write(&not_image, "these are words, not pixels").unwrap();
    let (ok, text) = run(&["segment", s(&not_image), "--out", s(&dir)]);
    assert!(!ok && text.contains("notes.png") && text.contains("not an image"), "{text}");
    // The tiny test model's weights under the bundled model's config: another OCR width.
    let (ok, text) = run(&[
        "segment",
        &asset("scene.png"),
        "--out",
        s(&dir),
        "--config",
        &format!("{}/models/procedural.yaml", env!("CARGO_MANIFEST_DIR")),
        "--weights",
        &fixture("tiny_weights.safetensors"),
    ]);
    assert!(!ok && text.contains("ocr_distri_head") && text.contains("expected"), "{text}");
    let (ok, text) =
        run(&["segment", &asset("scene.png"), "--weights", &fixture("tiny_weights.safetensors")]);
    assert!(!ok && text.contains("needs --config"), "{text}");
    assert!(!dir.join("scene_labels.png").exists(), "nothing is written for a failed command");
}

#[test]
fn eval_on_an_images_and_masks_folder() {
    let root = scratch("eval-folder");
    write_folder(&root, 9, 2, 96);
    let (ok, text) = run(&["eval", "--data", s(&root)]);
    assert!(ok, "{text}");
    for want in ["mIoU", "pixel accuracy", "ms per image", "ring"] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // A list file picks and pairs the files.
    std::fs::write(root.join("val.lst"), "images/1.png masks/1.png\n").unwrap();
    let (ok, text) = run(&["eval", "--data", s(&root)]);
    assert!(ok && text.contains("1 images"), "{text}");
    // A mask of the wrong size is named, with both sizes.
    let small = LabelMap { width: 10, height: 12, labels: vec![0; 120] };
    images::write_labels(&root.join("masks/1.png"), &small).unwrap();
    let (ok, text) = run(&["eval", "--data", s(&root)]);
    assert!(
        !ok && text.contains("masks/1.png") && text.contains("96x96") && text.contains("got 10x12"),
        "{text}"
    );
}

fn log_losses(dir: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(dir.join("train_log.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,loss,aux_loss,main_loss,lr,images_per_second"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[1..5].join(","))
        })
        .collect()
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_losses_exactly() {
    let (whole, parts) = (scratch("train-whole"), scratch("train-parts"));
    let yaml = whole.join("tiny.yaml");
    let tiny = std::fs::read_to_string(fixture("tiny_ocr.yaml")).unwrap();
    std::fs::write(&yaml, &tiny).unwrap();
    let common = ["train", "--config", s(&yaml), "--synthetic", "--steps", "4", "--batch", "2"];
    let small = ["--size", "48", "--crop", "32", "--save-every", "1"];
    let mut args = common.to_vec();
    args.extend(small);
    args.extend(["--out", s(&whole)]);
    let (ok, text) = run(&args);
    assert!(ok, "{text}");
    let mut args = common.to_vec();
    args.extend(small);
    args.extend(["--out", s(&parts), "--stop-after", "2"]);
    let (ok, text) = run(&args);
    assert!(ok && text.contains("stopped after step 2"), "{text}");
    assert!(!parts.join("final.safetensors").exists());
    let checkpoint = parts.join("checkpoint.safetensors");
    // Changing a setting of the run is refused, not silently applied.
    let (ok, text) = run(&["train", "--resume", s(&checkpoint), "--out", s(&parts), "--batch", "3"]);
    assert!(!ok && text.contains("--batch 3") && text.contains("resumed run"), "{text}");
    // So is a YAML edited since the checkpoint (the recipe it printed is stored).
    std::fs::write(&yaml, tiny.replace("TRAIN:\n", "TRAIN:\n  LR: 0.02\n")).unwrap();
    let (ok, text) = run(&["train", "--resume", s(&checkpoint), "--out", s(&parts)]);
    assert!(!ok && text.contains("recipe changed") && text.contains("LR 0.02"), "{text}");
    std::fs::write(&yaml, &tiny).unwrap();
    let (ok, text) = run(&["train", "--resume", s(&checkpoint), "--out", s(&parts)]);
    assert!(ok, "{text}");
    let (a, b) = (log_losses(&whole), log_losses(&parts));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "losses, aux and main terms and LR of every step");
    let read = |d: &Path| std::fs::read(d.join("final.safetensors")).unwrap();
    assert!(read(&whole) == read(&parts), "the final weights are identical");
}

#[test]
fn train_on_a_folder_then_bench() {
    let root = scratch("train-folder");
    write_folder(&root, 5, 3, 64);
    let out = root.join("run");
    let config = fixture("tiny_ocr.yaml");
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--config", &config, "--data", s(&root), "--out", s(&out)];
        args.extend(["--steps", "2", "--batch", "2", "--crop", "32"]);
        args.extend(extra);
        run(&args)
    };
    let (ok, text) = train(&[]);
    assert!(ok, "{text}");
    assert_eq!(log_losses(&out).len(), 2);
    // A label outside the classes is refused before any step, naming the file.
    let bad = LabelMap { width: 64, height: 64, labels: vec![7; 64 * 64] };
    for i in 0..3 {
        images::write_labels(&root.join(format!("masks/{i}.png")), &bad).unwrap();
    }
    let (ok, text) = train(&["--seed", "3"]);
    assert!(!ok && text.contains("label 7") && text.contains("masks/"), "{text}");
    let (ok, text) = run(&[
        "bench",
        "--config",
        &fixture("tiny_ocr.yaml"),
        "--size",
        "64",
        "--batch",
        "2",
        "--iters",
        "1",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("forward") && text.contains("training step") && text.contains("images/s"),
        "{text}"
    );
    // Every adapter found (lavapipe on Vulkan at least) gets a column of one table.
    let args =
        ["bench", "--config", &config, "--size", "64", "--batch", "2", "--iters", "1", "--all-adapters"];
    let (ok, text) = run(&args);
    assert!(ok, "{text}");
    let rows: Vec<&str> =
        text.lines().filter(|l| l.starts_with("forward") || l.starts_with("training step")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(text.contains("/ Vulkan |") || text.contains("/ Vulkan\n"), "{text}");
    assert!(
        rows.iter().all(|r| r.split('|').count() == text.lines().nth(1).unwrap().split('|').count()),
        "{text}"
    );
}

/// The value of a numeric field in a JSON line (the bench writes flat objects).
fn json_number(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(&format!("\"{key}\":"))? + key.len() + 3..];
    rest[..rest.find([',', '}'])?].parse().ok()
}

#[test]
fn bench_kernels_reports_throughput_against_a_measured_roofline() {
    let (ok, text) = run(&["bench", "--kernels", "--filter", "relu", "--json", "--budget-ms", "20"]);
    assert!(ok, "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    // relu and add_relu at four shapes, forward and backward.
    assert_eq!(lines.len(), 16, "{text}");
    for line in &lines {
        assert!(line.ends_with('}') && line.contains("relu\",\"pass\":"), "{line}");
        for key in ["ms", "best_ms", "gbps", "roofline_fraction", "roofline_gbps", "roofline_gflops"] {
            let v = json_number(line, key).unwrap_or_else(|| panic!("{key} in {line}"));
            assert!(v > 0.0 && v.is_finite(), "{key} = {v} in {line}");
        }
        // The fraction is the binding bound's time over the time taken, so it is at least
        // the bandwidth's share of the roofline's.
        let share = json_number(line, "gbps").unwrap() / json_number(line, "roofline_gbps").unwrap();
        let fraction = json_number(line, "roofline_fraction").unwrap();
        assert!(fraction >= share * (1.0 - 1e-4), "{fraction} < {share}: {line}");
    }

    // A shape file: every line two cases, named as every peer names them.
    let dir = scratch("bench-shapes");
    let shapes = dir.join("shapes.txt");
    std::fs::write(&shapes, "# a comment\nconv 8 16 12 20 3 2 1\nmatmul 32 16 8\n").unwrap();
    let (ok, text) = run(&["bench", "--shapes", s(&shapes), "--budget-ms", "10"]);
    assert!(ok, "{text}");
    for case in ["conv 8->16 3x3 s2 12x20", "matmul 32x16x8"] {
        for pass in ["forward ", "forward+backward "] {
            assert!(text.lines().any(|l| l.contains(case) && l.contains(pass)), "{case} {pass}: {text}");
        }
    }
    std::fs::write(&shapes, "conv 8 16 12 20 3 2 1\nconv 8 16 12\n").unwrap();
    let (ok, text) = run(&["bench", "--shapes", s(&shapes)]);
    assert!(!ok && text.contains("shapes.txt") && text.contains("line 2"), "{text}");
}

#[test]
fn bench_end_to_end_profiles_the_kernels_of_a_step() {
    let config = fixture("tiny_ocr.yaml");
    let args = ["bench", "--config", &config, "--size", "64", "--batch", "1", "--iters", "1", "--json"];
    let (ok, text) = run(&args);
    assert!(ok, "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, pass) in lines.iter().zip(["forward", "training step"]) {
        assert!(line.contains(&format!("\"pass\":\"{pass}\"")), "{line}");
        let dispatches = json_number(line, "dispatches").unwrap();
        assert!(dispatches > 10.0, "{line}");
        if line.contains("\"backend\":\"Vulkan\"") {
            assert!(line.contains("\"profile\":{"), "lavapipe has timestamp queries: {line}");
        }
        if let Some(at) = line.find("\"profile\":{") {
            let profile = &line[at..];
            // Each kernel's dispatches add up to the pass's, its shares to one.
            let sum = |key: &str| -> f64 {
                profile
                    .match_indices(&format!("\"{key}\":"))
                    .filter_map(|(i, _)| json_number(&profile[i..], key))
                    .sum()
            };
            assert_eq!(sum("dispatches"), dispatches, "{line}");
            assert!((sum("share") - 1.0).abs() < 1e-3, "{line}");
        }
    }
}

/// A run whose loss or weights stop being finite stops with a message, and the checkpoint
/// on disk is the last one with finite weights.
#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("diverge");
    let config = dir.join("huge_lr.yaml");
    let tiny = std::fs::read_to_string(fixture("tiny_ocr.yaml")).unwrap();
    assert!(tiny.contains("TRAIN:\n"));
    std::fs::write(&config, tiny.replacen("TRAIN:\n", "TRAIN:\n  LR: 1.0e+30\n", 1)).unwrap();
    let out = dir.join("run");
    let args = ["train", "--config", s(&config), "--synthetic", "--out", s(&out)];
    let (ok, text) =
        run(&[&args[..], &["--steps", "6", "--batch", "2", "--crop", "64", "--save-every", "1"]].concat());
    assert!(!ok, "{text}");
    assert!(text.contains("diverged") || text.contains("the loss became"), "{text}");
    let checkpoint = out.join("checkpoint.safetensors");
    if checkpoint.exists() {
        let c = hrnet_ocr::train::Checkpoint::load(&checkpoint).unwrap();
        assert!(c.steps < 6, "the run should have stopped early: {text}");
        for t in c.weights.iter().chain(&c.momentum) {
            assert!(t.data.iter().all(|v| v.is_finite()), "{} in the kept checkpoint is not finite", t.name);
        }
    }
}

#[test]
fn tune_measures_the_bundled_model_and_caches_the_choices() {
    let dir = scratch("tune");
    let cache = dir.join("tuning.tsv");
    let out = Command::new(env!("CARGO_BIN_EXE_hrnet-ocr"))
        .args(["tune", "--size", "64"])
        .env("HRNET_OCR_TUNING", &cache)
        .output()
        .expect("run hrnet-ocr");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    // The forward's families: the convolutions and the OCR head's products.
    let count = |family: &str| text.lines().filter(|l| l.trim_start().starts_with(family)).count();
    let (convolutions, products) = (count("conv2d_forward "), count("matmul "));
    let cached =
        std::fs::read_to_string(&cache).unwrap_or_else(|e| panic!("{}: {e}\n{text}", cache.display()));
    assert!(
        convolutions > 0 && products > 0 && cached.lines().count() == convolutions + products,
        "{convolutions} + {products} classes listed, cache:\n{cached}\n{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An official layout trains and evaluates from its experiment YAML alone: LIP's lists
/// (`image label edge` for train, `image label` for val, relative to the root) and palette
/// labels of its 20 classes, chosen by `DATASET.DATASET: lip`, with no flag: lists, run and
/// test all from the YAML.
#[test]
fn an_official_lip_layout_trains_and_evaluates_from_its_yaml() {
    let root = scratch("lip");
    let size = 40;
    let (mut train, mut val) = (String::new(), String::new());
    for i in 0..4u64 {
        let sc = scene(9, i, size, size);
        let image = format!("images/{i}.png");
        let label = format!("labels/{i}.png");
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::create_dir_all(root.join("labels")).unwrap();
        images::write_rgb(&root.join(&image), &sc.image).unwrap();
        // Every LIP class, left and right parts included.
        let labels: Vec<u32> = sc.labels.iter().enumerate().map(|(p, &l)| (l * 4 + p as u32) % 20).collect();
        // A palette PNG (as LIP ships its labels) whose colours are not the indices.
        let palette: Vec<u8> = (0..768).map(|i| (i * 91 % 256) as u8).collect();
        let map = LabelMap { width: size, height: size, labels };
        images::write_palette_labels(&root.join(&label), &map, &palette).unwrap();
        let line = if i < 3 { &mut train } else { &mut val };
        if i < 3 {
            line.push_str(&format!("{image} {label} edges/{i}.png\n"));
        } else {
            line.push_str(&format!("{image} {label}\n"));
        }
    }
    std::fs::create_dir_all(root.join("list/lip")).unwrap();
    std::fs::write(root.join("list/lip/trainList.txt"), train).unwrap();
    std::fs::write(root.join("list/lip/valList.txt"), val).unwrap();
    let tiny = std::fs::read_to_string(fixture("tiny_ocr.yaml")).unwrap();
    let dataset = "DATASET:\n  DATASET: lip\n  ROOT: 'data/'\n  TEST_SET: 'list/lip/valList.txt'\n  \
                   TRAIN_SET: 'list/lip/trainList.txt'\n  NUM_CLASSES: 20\n";
    // The official test at the images' size, flipped (LIP's channel exchange on 20 classes).
    let test = "TEST:\n  IMAGE_SIZE:\n  - 40\n  - 40\n  BASE_SIZE: 40\n  FLIP_TEST: true\n";
    // The run from TRAIN: two epochs of one batch of 2 (the third image dropped) at 32x32.
    let train_keys = "TRAIN:\n  IMAGE_SIZE: [32, 32]\n  BATCH_SIZE_PER_GPU: 2\n  END_EPOCH: 2\n";
    let config = root.join("lip.yaml");
    let yaml = tiny.replace("DATASET:\n  NUM_CLASSES: 5\n", dataset).replace("TRAIN:\n", train_keys);
    std::fs::write(&config, format!("{yaml}{test}")).unwrap();
    let out = root.join("run");
    let (ok, text) = run(&train_args(&config, &root, &out, &[]));
    assert!(ok && text.contains("validation at step 2"), "{text}");
    assert_eq!(log_losses(&out).len(), 2);
    let weights = out.join("final.safetensors");
    let (ok, text) = run(&["eval", "--config", s(&config), "--weights", s(&weights), "--data", s(&root)]);
    assert!(
        ok && text.contains("mIoU") && text.contains("mean accuracy") && text.contains("1 images"),
        "{text}"
    );
    // --json: one object on stdout, its confusion matrix 20 x 20 and counting every pixel of
    // the 40 x 40 val image (LIP's labels here are all classes).
    let out = Command::new(env!("CARGO_BIN_EXE_hrnet-ocr"))
        .args(["eval", "--config", s(&config), "--weights", s(&weights), "--data", s(&root), "--json"])
        .output()
        .unwrap();
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success() && json.lines().count() == 1, "{json}");
    let rows = json.split("\"confusion\":[").nth(1).unwrap();
    let counts: Vec<u64> = rows
        .split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!((counts.len(), counts.iter().sum::<u64>()), (400, 1600), "{json}");
    assert!(json.contains("\"mean_accuracy\":") && json.contains("\"classes\":20"), "{json}");
    // A dataset the engine does not know is refused, naming the known ones.
    std::fs::write(&config, tiny.replace("DATASET:\n  NUM_CLASSES: 5\n", &dataset.replace("lip", "voc")))
        .unwrap();
    let (ok, text) = run(&["eval", "--config", s(&config), "--weights", s(&weights), "--data", s(&root)]);
    assert!(!ok && text.contains("\"voc\"") && text.contains("cityscapes, lip, pascal_ctx"), "{text}");
}

/// Cityscapes' official layout: lists of `image labelIds` pairs and an image-only test
/// list, relative to the root. Training and eval read the labelIds as train ids; `eval
/// --save-pred` writes the predictions as the official `save_pred` does (palette PNGs of
/// label ids, named by the label file, or by the image in a test list, which is scored not
/// at all and refused without --save-pred).
#[test]
fn cityscapes_lists_train_evaluate_and_save_official_predictions() {
    const LABEL_IDS: [u32; 19] = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33];
    let root = scratch("cityscapes-lists");
    let size = 40;
    let mut lists = [String::new(), String::new(), String::new()];
    for i in 0..4u64 {
        let sc = scene(11, i, size, size);
        let image = format!("leftImg8bit/x/c_{i}_leftImg8bit.png");
        let label = format!("gtFine/x/c_{i}_gtFine_labelIds.png");
        std::fs::create_dir_all(root.join("leftImg8bit/x")).unwrap();
        images::write_rgb(&root.join(&image), &sc.image).unwrap();
        // Label ids of the 19 classes, and 0 (unlabelled, ignored) now and then.
        let ids: Vec<u32> = sc
            .labels
            .iter()
            .enumerate()
            .map(|(p, &l)| if p % 7 == 0 { 0 } else { LABEL_IDS[(l as usize * 3 + p) % 19] })
            .collect();
        let map = LabelMap { width: size, height: size, labels: ids };
        std::fs::create_dir_all(root.join("gtFine/x")).unwrap();
        images::write_labels(&root.join(&label), &map).unwrap();
        let which = if i < 2 { 0 } else { 1 };
        lists[which].push_str(&format!("{image} {label}\n"));
        lists[2].push_str(&format!("{image}\n"));
    }
    std::fs::create_dir_all(root.join("list/cityscapes")).unwrap();
    for (name, text) in ["train.lst", "val.lst", "test.lst"].iter().zip(&lists) {
        std::fs::write(root.join("list/cityscapes").join(name), text).unwrap();
    }
    let tiny = std::fs::read_to_string(fixture("tiny_ocr.yaml")).unwrap();
    let dataset =
        "DATASET:\n  DATASET: cityscapes\n  ROOT: 'data/'\n  TEST_SET: 'list/cityscapes/val.lst'\n  \
                   TRAIN_SET: 'list/cityscapes/train.lst'\n  NUM_CLASSES: 19\n";
    let test = "TEST:\n  IMAGE_SIZE:\n  - 40\n  - 40\n  BASE_SIZE: 40\n";
    let train_keys = "TRAIN:\n  IMAGE_SIZE: [32, 32]\n  BATCH_SIZE_PER_GPU: 2\n  END_EPOCH: 1\n";
    let config = root.join("cityscapes.yaml");
    let yaml = tiny.replace("DATASET:\n  NUM_CLASSES: 5\n", dataset).replace("TRAIN:\n", train_keys);
    std::fs::write(&config, format!("{yaml}{test}")).unwrap();
    let out = root.join("run");
    let (ok, text) = run(&train_args(&config, &root, &out, &[]));
    assert!(ok, "{text}");
    // Validation as the official run, after each epoch (here one step of the two train
    // images): the val list scored, logged, and a first score above 0 kept as the best weights.
    assert!(text.contains("validation at step 1: mIoU"), "{text}");
    let val_log = std::fs::read_to_string(out.join("val_log.csv")).unwrap();
    assert_eq!(val_log.lines().count(), 2, "{val_log}");
    assert!(val_log.lines().nth(1).unwrap().starts_with("1,"), "{val_log}");
    // As official, a score must beat the best so far, which starts at 0.
    let miou: f64 = val_log.lines().nth(1).unwrap().split(',').nth(1).unwrap().parse().unwrap();
    if miou > 0.0 {
        let best = weights::read(&out.join("best.safetensors")).unwrap();
        assert_eq!(best, weights::read(&out.join("final.safetensors")).unwrap());
    } else {
        assert!(!out.join("best.safetensors").exists());
    }
    let quiet = root.join("quiet");
    let quiet_flags = ["--steps", "1", "--batch", "2", "--crop", "32", "--eval-every", "0"];
    let (ok, text) = run(&train_args(&config, &root, &quiet, &quiet_flags));
    assert!(ok && !text.contains("validation") && !quiet.join("best.safetensors").exists(), "{text}");
    let weights = out.join("final.safetensors");
    let preds = root.join("preds");
    let eval = ["eval", "--config", s(&config), "--weights", s(&weights), "--data", s(&root)];
    let (ok, text) = run(&[&eval[..], &["--save-pred", s(&preds)]].concat());
    assert!(ok && text.contains("mIoU") && text.contains("2 images, "), "{text}");
    for i in [2, 3] {
        let saved = images::read_labels(&preds.join(format!("c_{i}_gtFine_labelIds.png"))).unwrap();
        assert_eq!((saved.width, saved.height), (size, size));
        assert!(
            saved.labels.iter().all(|l| LABEL_IDS.contains(l)),
            "not label ids: {:?}",
            &saved.labels[..8]
        );
    }
    // The test split: no labels, so predictions only, named by the image.
    let test_list = ["--list", "list/cityscapes/test.lst"];
    let (ok, text) = run(&[&eval[..], &test_list[..]].concat());
    assert!(!ok && text.contains("--save-pred"), "{text}");
    let (ok, text) = run(&[&eval[..], &test_list[..], &["--save-pred", s(&preds)]].concat());
    assert!(ok && text.contains("4 predictions written"), "{text}");
    assert!(preds.join("c_0_leftImg8bit.png").is_file());
}

/// PASCAL-Context (59 classes, `IGNORE_LABEL: -1`), ADE20K and COCO-Stuff train and evaluate
/// from their official layouts and YAML keys alone: the lists where the official YAMLs name
/// them (PASCAL-Context's bare `train` and `val` files in the root), palette labels with the
/// encoding corners of `tests/fixtures/datasets` (zero labels, which train as ignored;
/// its ids that encode past the classes, 255 and COCO-Stuff's unused ids, become zeros:
/// the official training fails on such labels and the engine refuses them), the
/// training crop, base size, batch and epochs from `TRAIN`, and the official `val` test (short side to the
/// base size, padded to a multiple of 8, labels with it) from `TEST`.
#[test]
fn pascal_context_ade20k_and_coco_stuff_train_and_evaluate_from_their_yaml() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets");
    let tiny = std::fs::read_to_string(fixture("tiny_ocr.yaml")).unwrap();
    let cases = [
        ("pascal_ctx59", Official::PascalContext, 59, "-1", "train", "val"),
        ("ade20k", Official::Ade20k, 150, "255", "list/ade20k/train.lst", "list/ade20k/val.lst"),
        ("cocostuff", Official::CocoStuff, 171, "255", "list/cocostuff/train.lst", "list/cocostuff/val.lst"),
    ];
    let palette = images::official_palette();
    for (folder, dataset, classes, ignore, train_set, test_set) in cases {
        let name = dataset.name();
        let trainable = |raw: u32| {
            let l = dataset.encode(raw, classes, u32::MAX);
            (l as usize) < classes || Some(l) == dataset.reduced_zero(classes)
        };
        let root = scratch(folder);
        let mut lines = String::new();
        for i in 0..3 {
            let (image, label) = (format!("images/{i}.png"), format!("labels/{i}_label.png"));
            std::fs::create_dir_all(root.join("images")).unwrap();
            std::fs::create_dir_all(root.join("labels")).unwrap();
            std::fs::copy(fixtures.join(folder).join(&image), root.join(&image)).unwrap();
            let mut map = images::read_labels(&fixtures.join(folder).join(&label)).unwrap();
            map.labels.iter_mut().filter(|l| !trainable(**l)).for_each(|l| *l = 0);
            images::write_palette_labels(&root.join(&label), &map, &palette).unwrap();
            lines.push_str(&format!("{image} {label}\n"));
        }
        for list in [train_set, test_set] {
            std::fs::create_dir_all(root.join(list).parent().unwrap()).unwrap();
            std::fs::write(root.join(list), &lines).unwrap();
        }
        let dataset = format!(
            "DATASET:\n  DATASET: {name}\n  ROOT: 'data/'\n  TEST_SET: '{test_set}'\n  TRAIN_SET: '{train_set}'\n  \
             NUM_CLASSES: {classes}\n"
        );
        let keys = "TEST:\n  IMAGE_SIZE:\n  - 32\n  - 32\n  BASE_SIZE: 24\n  FLIP_TEST: true\n";
        let yaml = tiny.replace("DATASET:\n  NUM_CLASSES: 5\n", &dataset).replace(
            "TRAIN:\n  IGNORE_LABEL: 255\n",
            &format!(
                "TRAIN:\n  IGNORE_LABEL: {ignore}\n  IMAGE_SIZE:\n  - 24\n  - 24\n  BASE_SIZE: 24\n  \
                 BATCH_SIZE_PER_GPU: 2\n  END_EPOCH: 2\n"
            ),
        );
        let config = root.join(format!("{folder}.yaml"));
        std::fs::write(&config, format!("{yaml}{keys}")).unwrap();
        let out = root.join("run");
        // Two epochs of one batch of 2 (the third image dropped, as the official loader does).
        let (ok, text) = run(&train_args(&config, &root, &out, &[]));
        assert!(ok && text.contains("of 2: batch 2 of 24x24 crops"), "{folder}: {text}");
        assert_eq!(log_losses(&out).len(), 2, "{folder}");
        let weights = out.join("final.safetensors");
        let (ok, text) = run(&["eval", "--config", s(&config), "--weights", s(&weights), "--data", s(&root)]);
        assert!(
            ok && text.contains("mIoU") && text.contains("3 images, ") && text.contains("official"),
            "{folder}: {text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.split_whitespace().nth(1) == Some("class")).count(),
            classes,
            "{folder}: {text}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}

/// A run starts from an ImageNet-pretrained file as the official `MODEL.PRETRAINED` does,
/// or from `--pretrained FILE`, and says what loaded; a missing file is an error naming the
/// key and the path (the official code raises too).
#[test]
fn a_run_starts_from_its_pretrained_file() {
    let root = scratch("pretrained");
    write_folder(&root, 5, 2, 48);
    let tiny = std::fs::read_to_string(fixture("tiny_ocr.yaml")).unwrap();
    let config = root.join("pretrained.yaml");
    let with_pretrained = |path: &str| {
        let yaml = tiny
            .replace("  NAME: seg_hrnet_ocr\n", &format!("  NAME: seg_hrnet_ocr\n  PRETRAINED: '{path}'\n"));
        std::fs::write(&config, yaml).unwrap();
    };
    let out = root.join("run");
    let args = train_args(&config, &root, &out, &["--steps", "1", "--batch", "2", "--crop", "32"]);
    let missing = root.join("pretrained_models/hrnetv2_w48_imagenet_pretrained.pth");
    with_pretrained(s(&missing));
    let (ok, text) = run(&args);
    assert!(
        !ok && text.contains("MODEL.PRETRAINED") && text.contains("hrnetv2_w48_imagenet_pretrained.pth"),
        "{text}"
    );
    // The tiny model's own weights as the pretrained file: every tensor lands.
    with_pretrained(&fixture("tiny_zip.pth"));
    let (ok, text) = run(&args);
    assert!(ok && text.contains("316 tensors loaded, 0 in the file skipped"), "{text}");
    // --pretrained names another file over the YAML's.
    with_pretrained(s(&missing));
    let (ok, text) = run(&[&args[..], &["--pretrained", &fixture("tiny_legacy.pth")]].concat());
    assert!(ok && text.contains("tiny_legacy.pth: 316 tensors loaded"), "{text}");
}

/// `--resume` of an official `checkpoint.pth.tar` (written by PyTorch: weights, SGD momentum
/// in two parameter groups, epoch 3, a numpy `best_mIoU`) goes on from its epoch and best
/// mIoU with this run's settings: here 4 images in batches of 2, so from step 6. An mmsegmentation
/// checkpoint starts a run through `--pretrained`, not `--weights`.
#[test]
fn an_official_checkpoint_resumes_from_its_epoch() {
    let root = scratch("official-resume");
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    for i in 0..4 {
        let sc = scene(13, i, 40, 40);
        images::write_rgb(&root.join(format!("images/{i}.png")), &sc.image).unwrap();
        let map = LabelMap { width: 40, height: 40, labels: sc.labels.iter().map(|l| l % 3).collect() };
        images::write_labels(&root.join(format!("masks/{i}.png")), &map).unwrap();
    }
    let micro = fixture("micro_ocr.yaml");
    let keywords = "TRAIN:\n  NONBACKBONE_KEYWORDS: ['cls', 'aux', 'ocr']\n";
    let config = root.join("micro.yaml");
    let yaml = std::fs::read_to_string(&micro).unwrap().replace("TRAIN:\n", keywords);
    std::fs::write(&config, yaml).unwrap();
    let out = root.join("run");
    let checkpoint = fixture("micro_checkpoint.pth.tar");
    let args = train_args(&config, &root, &out, &["--resume", &checkpoint]);
    let (ok, text) =
        run(&[&args[..], &["--steps", "7", "--batch", "2", "--crop", "32", "--eval-every", "0"]].concat());
    assert!(ok && text.contains("after epoch 3: step 6, best mIoU 0.4123"), "{text}");
    assert!(text.contains("from step 6 to 7"), "{text}");
    assert_eq!(log_losses(&out).iter().map(|(step, _)| *step).collect::<Vec<_>>(), [7]);
    // The official run's two groups need its keywords to be told apart.
    std::fs::write(&config, std::fs::read_to_string(&micro).unwrap()).unwrap();
    let (ok, text) = run(&[&args[..], &["--steps", "7", "--batch", "2", "--crop", "32"]].concat());
    assert!(!ok && text.contains("2 parameter groups"), "{text}");
    // An mmsegmentation checkpoint starts a run as a pretrained start only: the trainer
    // follows the official conventions.
    let mmseg = fixture("mmseg_micro_ocrnet.pth");
    let short = ["--steps", "1", "--batch", "2", "--crop", "32", "--eval-every", "0"];
    let out = root.join("from-mmseg");
    let (ok, text) = run(&[&train_args(&config, &root, &out, &["--weights", &mmseg])[..], &short].concat());
    assert!(!ok && text.contains("mmseg_micro_ocrnet.pth") && text.contains("--pretrained"), "{text}");
    let pretrained = train_args(&config, &root, &out, &["--pretrained", &mmseg, "--report-memory"]);
    let (ok, text) = run(&[&pretrained[..], &short].concat());
    assert!(ok && text.contains("0 in the file skipped") && text.contains("2 of the model fresh"), "{text}");
    assert!(text.contains("training step memory:") && text.contains("high-water mark"), "{text}");
}
