//! Records the bundled model's logits of `assets/scene.png`, computed by the native engine,
//! for the browser suite (tests/web.rs) to compare its WebGPU forward with:
//! `cargo run --release --example record_native_logits -- tests/fixtures/web/scene_logits.safetensors`

use hrnet_ocr::infer::{Segmenter, Strategy};
use hrnet_ocr::model::weights::{self, NamedTensor};
use hrnet_ocr::model::Config;
use hrnet_ocr::{images, Gpu};
use std::collections::HashMap;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).ok_or("usage: record_native_logits OUT.safetensors")?;
    let image = images::read_rgb(Path::new("assets/scene.png"))?;
    let config = Config::load("models/procedural.yaml")?;
    let classes = config.num_classes;
    let gpu = Gpu::new()?;
    let mut segmenter =
        Segmenter::new(&gpu, config, weights::read(Path::new("models/procedural.safetensors"))?);
    segmenter.keep_scores(true);
    let segmentation = segmenter.segment(&image, &Strategy::Whole)?;
    let logits = segmentation.scores.ok_or("the segmenter kept no scores")?;
    let shape = vec![classes, image.height, image.width];
    let metadata = HashMap::from([
        ("adapter".to_string(), gpu.describe()),
        ("input".to_string(), "assets/scene.png, models/procedural.*, whole image".to_string()),
    ]);
    weights::write_safetensors_with(
        Path::new(&out),
        &[NamedTensor { name: "logits".into(), shape, data: logits }],
        Some(metadata),
    )?;
    println!("{out}: logits of assets/scene.png on {}", gpu.describe());
    Ok(())
}
