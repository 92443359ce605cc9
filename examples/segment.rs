//! The library in a few lines: load a model (an official experiment YAML with its released
//! `.pth`, or as here the bundled model), segment an image, write the label map.
//!
//! `cargo run --release --example segment -- [IMAGE] [CONFIG] [WEIGHTS]`

use hrnet_ocr::infer::{Segmenter, Strategy};
use hrnet_ocr::model::{weights, Config};
use hrnet_ocr::{images, Gpu};
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &'static str| args.get(i).map_or(default, String::as_str);
    let image = images::read_rgb(Path::new(arg(0, "assets/scene.png")))?;
    let config = Config::load(arg(1, "models/procedural.yaml"))?;
    let weights = weights::read(Path::new(arg(2, "models/procedural.safetensors")))?;

    let gpu = Gpu::new()?;
    let mut segmenter = Segmenter::new(&gpu, config, weights);
    let segmentation = segmenter.segment(&image, &Strategy::Whole)?;

    let labels = images::LabelMap {
        width: segmentation.width,
        height: segmentation.height,
        labels: segmentation.classes,
    };
    images::write_labels(Path::new("labels.png"), &labels)?;
    println!("{}x{} labels -> labels.png on {}", labels.width, labels.height, gpu.describe());
    Ok(())
}
