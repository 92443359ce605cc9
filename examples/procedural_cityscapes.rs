//! Writes procedural scenes in the official Cityscapes layout, to train and evaluate an
//! official-style experiment on data any machine can make: `leftImg8bit/{train,val}/` images,
//! `gtFine/{train,val}/` label-id PNGs (each scene class as a Cityscapes class: background
//! road, then sidewalk, building, wall, fence) and the official list files
//! `list/cityscapes/{train,val}.lst`. The experiment in `configs/procedural_cityscapes_w18_small.yaml`
//! reads it.
//!
//! `cargo run --release --example procedural_cityscapes -- OUT_DIR [TRAIN] [VAL] [HEIGHT]`
//! (scenes twice as wide as high, as Cityscapes' frames).

use hrnet_ocr::data::official::Official;
use hrnet_ocr::data::procedural::scene;
use hrnet_ocr::images::{self, LabelMap};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        return Err("usage: procedural_cityscapes OUT_DIR [TRAIN] [VAL] [HEIGHT]".into());
    };
    let number = |i: usize, default: u64| args.get(i).map_or(Ok(default), |s| s.parse::<u64>());
    let (train, val, height) = (number(1, 200)?, number(2, 20)?, number(3, 128)? as usize);
    let width = 2 * height;
    std::fs::create_dir_all(out.join("list/cityscapes"))?;
    // The training scenes use seed 1, the held-out ones seed 2, as `eval --synthetic` does.
    for (split, seed, count) in [("train", 1, train), ("val", 2, val)] {
        let mut list = String::new();
        for (dir, what) in [("leftImg8bit", "images"), ("gtFine", "labels")] {
            std::fs::create_dir_all(out.join(format!("{dir}/{split}/scenes")))
                .map_err(|e| format!("{what}: {e}"))?;
        }
        for i in 0..count {
            let s = scene(seed, i, width, height);
            let image = format!("leftImg8bit/{split}/scenes/scenes_{i:06}_leftImg8bit.png");
            let label = format!("gtFine/{split}/scenes/scenes_{i:06}_gtFine_labelIds.png");
            images::write_rgb(&out.join(&image), &s.image)?;
            let ids = s.labels.iter().map(|&c| Official::Cityscapes.saved_label(c)).collect();
            images::write_labels(&out.join(&label), &LabelMap { width, height, labels: ids })?;
            list.push_str(&format!("{image} {label}\n"));
        }
        std::fs::write(out.join(format!("list/cityscapes/{split}.lst")), list)?;
    }
    println!("wrote {train} training and {val} validation scenes of {width}x{height} to {}", out.display());
    Ok(())
}
