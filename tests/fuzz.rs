//! Every parser of outside data on corrupted copies of valid files: the `.pth` reader
//! (legacy, zip, zip64), safetensors weights and training checkpoints, the YAML config
//! reader, and PNG/JPEG image and label decoding. Each mutation must give a value or an
//! error: a panic (or an abort from a huge allocation) fails the test. Fresh seed each run
//! (printed; HRNET_TEST_SEED replays it). No GPU.

use hrnet_ocr::data::procedural::scene;
use hrnet_ocr::data::SplitMix;
use hrnet_ocr::formats::pth::parse_pth;
use hrnet_ocr::images::{self, LabelMap};
use hrnet_ocr::model::{weights, Config};
use std::path::PathBuf;

fn seed(target: &str) -> u64 {
    let s = std::env::var("HRNET_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("{target}: HRNET_TEST_SEED={s}");
    s
}

fn fixture(path: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A corrupted copy of `original`: truncated, bit-flipped, bytes overwritten, a run
/// duplicated or removed, or (for text) a line dropped or repeated.
fn mutate(original: &[u8], rng: &mut SplitMix) -> Vec<u8> {
    let mut bytes = original.to_vec();
    let n = bytes.len().max(1);
    match rng.below(6) {
        0 => bytes.truncate(rng.below(n as u64) as usize),
        1 => {
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(n as u64) as usize;
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
        2 => {
            for _ in 0..1 + rng.below(6) {
                let at = rng.below(n as u64) as usize;
                if let Some(b) = bytes.get_mut(at) {
                    *b = [0, 0xff, 0x7f, 0x80, b'9', b'-'][rng.below(6) as usize];
                }
            }
        }
        3 => {
            let at = rng.below(n as u64) as usize;
            let len = (1 + rng.below(64) as usize).min(bytes.len() - at.min(bytes.len()));
            let run: Vec<u8> = bytes[at..at + len].to_vec();
            bytes.splice(at..at, run);
        }
        4 => {
            let at = rng.below(n as u64) as usize;
            let len = (1 + rng.below(64) as usize).min(bytes.len() - at.min(bytes.len()));
            bytes.drain(at..at + len);
        }
        _ => {
            let text = String::from_utf8_lossy(&bytes).to_string();
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let at = rng.below(lines.len() as u64) as usize;
                if rng.below(2) == 0 {
                    lines.remove(at);
                } else {
                    lines.insert(at, lines[at]);
                }
            }
            bytes = lines.join("\n").into_bytes();
        }
    }
    bytes
}

/// Runs `parse` on `rounds` corruptions of each original; returns how many were refused.
fn fuzz(target: &str, originals: &[Vec<u8>], rounds: usize, parse: impl Fn(&[u8]) -> bool) -> usize {
    let mut rng = SplitMix::new(seed(target));
    let mut refused = 0;
    for original in originals {
        assert!(parse(original), "{target}: the uncorrupted file must parse");
        for _ in 0..rounds {
            refused += usize::from(!parse(&mutate(original, &mut rng)));
        }
    }
    assert!(refused > 0, "{target}: no corruption was detected at all");
    refused
}

#[test]
fn pth_reader_survives_corruption() {
    let files = ["legacy.pth", "zip.pth", "zip64.pth", "checkpoint_legacy.pth", "checkpoint_zip.pth"];
    let originals: Vec<Vec<u8>> = files.iter().map(|f| fixture(&format!("pth/{f}"))).collect();
    fuzz("pth", &originals, 500, |b| parse_pth(b, "fuzz.pth").is_ok());
}

#[test]
fn safetensors_weights_and_checkpoints_survive_corruption() {
    let originals = vec![fixture("model/tiny_weights.safetensors"), fixture("model/tiny_eval.safetensors")];
    fuzz("safetensors", &originals, 400, |b| weights::from_safetensors_bytes(b, "fuzz.safetensors").is_ok());
}

#[test]
fn yaml_configs_survive_corruption() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut originals = vec![std::fs::read(root.join("models/procedural.yaml")).unwrap()];
    let official = root.join("configs/official/cityscapes");
    for entry in std::fs::read_dir(&official).unwrap() {
        originals.push(std::fs::read(entry.unwrap().path()).unwrap());
    }
    fuzz("yaml", &originals, 1500, |b| Config::from_yaml(&String::from_utf8_lossy(b), "fuzz.yaml").is_ok());
}

#[test]
fn image_and_label_decoding_survive_corruption() {
    let dir = std::env::temp_dir().join(format!("hrnet-ocr-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s = scene(7, 0, 40, 24);
    images::write_rgb(&dir.join("rgb.png"), &s.image).unwrap();
    images::write_labels(&dir.join("labels.png"), &LabelMap { width: 40, height: 24, labels: s.labels })
        .unwrap();
    image::save_buffer(dir.join("rgb.jpg"), &s.image.rgb, 40, 24, image::ExtendedColorType::Rgb8).unwrap();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    fuzz("png and jpeg", &[read("rgb.png"), read("rgb.jpg")], 400, |b| images::decode_rgb(b, "fuzz").is_ok());
    fuzz("label png", &[read("labels.png")], 400, |b| images::decode_labels(b, "fuzz").is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiny_files_claiming_huge_sizes_are_refused_without_allocating() {
    // A PNG claiming 60000 x 60000 RGBA16 (28 GB decoded) in 60-odd bytes.
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend(crc32(&c[4..]).to_be_bytes());
        c
    };
    let mut header = 60000u32.to_be_bytes().repeat(2);
    header.extend([16, 6, 0, 0, 0]);
    let mut png = vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    png.extend(chunk(b"IHDR", &header));
    png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    png.extend(chunk(b"IEND", &[]));
    let err = images::decode_rgb(&png, "huge.png").unwrap_err().to_string();
    assert!(err.contains("huge.png") && err.contains("limit"), "{err}");
    // A safetensors header claiming a tensor of 2^40 floats in 40-odd bytes.
    let header = br#"{"w":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,4398046511104]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(header);
    let err = weights::from_safetensors_bytes(&st, "huge.safetensors").unwrap_err().to_string();
    assert!(err.contains("huge.safetensors"), "{err}");
}

/// The PNG chunk checksum (CRC-32, polynomial 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}
