//! Writes a procedural scene and its label map as PNGs: a labelled image to try `segment`
//! and `eval` on, and an example of the data and image API.
//!
//! `cargo run --release --example procedural_scene -- OUT_DIR [SEED] [INDEX] [SIZE]`

use hrnet_ocr::data::procedural::scene;
use hrnet_ocr::images::{self, LabelMap};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        return Err("usage: procedural_scene OUT_DIR [SEED] [INDEX] [SIZE]".into());
    };
    let number = |i: usize, default: u64| args.get(i).map_or(Ok(default), |s| s.parse::<u64>());
    let (seed, index, size) = (number(1, 3)?, number(2, 0)?, number(3, 256)? as usize);
    std::fs::create_dir_all(&out)?;
    let s = scene(seed, index, size, size);
    let name = format!("scene_{seed}_{index}");
    images::write_rgb(&out.join(format!("{name}.png")), &s.image)?;
    let labels = LabelMap { width: size, height: size, labels: s.labels };
    images::write_labels(&out.join(format!("{name}_labels.png")), &labels)?;
    println!("wrote {}/{name}.png and {name}_labels.png", out.display());
    Ok(())
}
