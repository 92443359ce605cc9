//! Replays the committed libFuzzer inputs through the parser each cargo-fuzz target calls
//! (`fuzz/fuzz_targets/<target>.rs`): the seed corpus `fuzz/corpus/<target>/` and the
//! crash inputs kept as regressions, `fuzz/regressions/<target>/`. Each input must give a
//! value or an error; a panic, or one allocation above [`MAX_ALLOCATION`] (these inputs are
//! small; a tiny file whose header claims a huge image was one such bug), fails the test,
//! naming the file. A target without a corpus (directory missing or empty) fails too. No
//! GPU, no fuzzer: plain `cargo test`.

use hrnet_ocr::formats::pth::parse_pth;
use hrnet_ocr::images;
use hrnet_ocr::model::{weights, Config};
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The largest single allocation one committed input may cause: the inputs are all under
/// 64 KiB, so more is a small file making the parser reserve memory it cannot fill (the fuzz
/// targets abort at 1 GiB; this is tighter, to catch such a bug well before that).
const MAX_ALLOCATION: usize = 256 << 20;

/// [`System`], remembering the largest allocation since [`PEAK`] was last reset.
struct PeakAlloc;

static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Replays one input at a time, so [`PEAK`] belongs to it.
static REPLAY: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        PEAK.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

type Parser = fn(&[u8]);

/// The fuzz targets and what each one calls, as in `fuzz/fuzz_targets/`.
const TARGETS: [(&str, Parser); 5] = [
    ("pth", |b| drop(parse_pth(b, "fuzz.pth"))),
    ("safetensors", |b| drop(weights::from_safetensors_bytes(b, "fuzz.safetensors"))),
    ("config_yaml", |b| drop(Config::from_yaml(&String::from_utf8_lossy(b), "fuzz.yaml"))),
    ("image", |b| drop(images::decode_rgb(b, "fuzz.png"))),
    ("labels", |b| drop(images::decode_labels(b, "fuzz.png"))),
];

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; an unreadable directory is an error.
fn files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Runs `parse` on every file; returns the files it panicked on (with the message) or
/// allocated too much for.
fn replay(parse: Parser, files: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for file in files {
        let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let _one_at_a_time = REPLAY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        PEAK.store(0, Ordering::Relaxed);
        let result = catch_unwind(AssertUnwindSafe(|| parse(&bytes)));
        let peak = PEAK.load(Ordering::Relaxed);
        if peak > MAX_ALLOCATION {
            failures.push(format!(
                "{} ({} bytes) made an allocation of {peak} bytes, more than {MAX_ALLOCATION}",
                file.display(),
                bytes.len()
            ));
        }
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{} panicked: {message}", file.display()));
        }
    }
    failures
}

#[test]
fn seed_corpus_parses_without_panics() {
    let mut problems = Vec::new();
    for (target, parse) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        match files(&dir) {
            Err(e) => problems.push(format!("corpus of fuzz target {target} missing: {e}")),
            Ok(files) if files.is_empty() => {
                problems.push(format!("corpus of fuzz target {target} is empty: {}", dir.display()))
            }
            Ok(files) => problems.extend(replay(parse, &files)),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn fixed_crashes_stay_fixed() {
    let root = fuzz_dir().join("regressions");
    let mut problems = Vec::new();
    let mut replayed = 0;
    // Every directory there must be named after a target, so no regression is skipped.
    for dir in std::fs::read_dir(&root).into_iter().flatten() {
        let dir = dir.expect("fuzz/regressions entry").path();
        let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
        match TARGETS.iter().find(|(target, _)| *target == name) {
            Some((_, parse)) => match files(&dir) {
                Ok(files) => {
                    replayed += files.len();
                    problems.extend(replay(*parse, &files));
                }
                Err(e) => problems.push(e),
            },
            None => problems.push(format!("{} is not named after a fuzz target", dir.display())),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!("replayed {replayed} regression input(s)");
}
