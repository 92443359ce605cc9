//! The page's engine: the bundled model on the browser's WebGPU adapter, reached from
//! JavaScript (`web/main.js`) through wasm-bindgen. Everything that waits is awaited:
//! a page cannot block.

use hrnet_ocr::data::image::Image;
use hrnet_ocr::data::procedural::CLASSES;
use hrnet_ocr::infer::{Segmenter, Strategy};
use hrnet_ocr::model::{weights, Config};
use hrnet_ocr::{images, Gpu, GpuOptions};
use std::cell::RefCell;
use wasm_bindgen::prelude::*;

static CONFIG: &str = include_str!("../../models/procedural.yaml");
static WEIGHTS: &[u8] = include_bytes!("../../models/procedural.safetensors");

/// Opacity of the class colours over the picture, as `hrnet-ocr segment` draws them.
const OVERLAY_OPACITY: f32 = 0.5;

/// Windows of the slide and ms-flip modes: twice the bundled model's training crop (64),
/// every two thirds of a window, as the official test steps.
const WINDOW: [usize; 2] = [128, 128];
const STRIDE: [usize; 2] = [85, 85];
/// Scales of the ms-flip mode, each with its mirror image.
const SCALES: [f32; 3] = [0.75, 1.0, 1.25];

thread_local! {
    /// The page's segmenter, opened once by [`open`]; out of its slot while it works.
    static SEGMENTER: RefCell<Option<Segmenter<'static>>> = const { RefCell::new(None) };
}

/// Opens the browser's WebGPU adapter and loads the bundled model; returns the adapter's
/// description. Fails, saying why, where the browser has no WebGPU.
#[wasm_bindgen]
pub async fn open() -> Result<String, JsError> {
    let gpu = Gpu::open(&GpuOptions::default()).await.map_err(|e| JsError::new(&e.to_string()))?;
    // One device for the page's lifetime.
    let gpu: &'static Gpu = Box::leak(Box::new(gpu));
    let config = Config::from_yaml(CONFIG, "models/procedural.yaml").map_err(js)?;
    let weights = weights::from_safetensors_bytes(WEIGHTS, "models/procedural.safetensors").map_err(js)?;
    let segmenter = Segmenter::new(gpu, config, weights::normalised(weights));
    SEGMENTER.with(|s| *s.borrow_mut() = Some(segmenter));
    Ok(gpu.describe())
}

/// The bundled model's class names, in class order.
#[wasm_bindgen]
pub fn classes() -> Vec<String> {
    CLASSES.iter().map(|c| c.to_string()).collect()
}

/// The class colours (RGB, three bytes a class), as the overlay draws them.
#[wasm_bindgen]
pub fn palette() -> Vec<u8> {
    images::palette(CLASSES.len()).concat()
}

/// A segmented picture: its class per pixel and the overlay to show.
#[wasm_bindgen(getter_with_clone)]
pub struct Segmented {
    pub width: usize,
    pub height: usize,
    /// `height * width` class indices.
    pub classes: Vec<u32>,
    /// The class colours over the picture, RGBA for a canvas.
    pub overlay: Vec<u8>,
}

/// Segments an RGBA picture (a canvas's pixels; alpha is ignored) with `mode`: `whole`,
/// `slide` or `ms-flip`.
#[wasm_bindgen]
pub async fn segment(rgba: Vec<u8>, width: usize, height: usize, mode: String) -> Result<Segmented, JsError> {
    let strategy = match mode.as_str() {
        "whole" => Strategy::Whole,
        "slide" => Strategy::Slide { crop: WINDOW, stride: STRIDE },
        "ms-flip" => Strategy::MultiScaleFlip { scales: SCALES.to_vec(), crop: WINDOW, stride: STRIDE },
        other => return Err(JsError::new(&format!("unknown mode {other:?}: whole, slide or ms-flip"))),
    };
    if rgba.len() != 4 * width * height {
        return Err(JsError::new(&format!("{} bytes for a {width}x{height} RGBA picture", rgba.len())));
    }
    let rgb: Vec<u8> = rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
    let image = Image::new(width, height, rgb).map_err(js)?;
    let mut segmenter = SEGMENTER
        .with(|s| s.borrow_mut().take())
        .ok_or_else(|| JsError::new("the engine is not open, or is segmenting another picture"))?;
    let segmentation = segmenter.segment_async(&image, &strategy).await;
    SEGMENTER.with(|s| *s.borrow_mut() = Some(segmenter));
    let segmentation = segmentation.map_err(js)?;
    let overlay =
        images::overlay(&image, &segmentation.classes, &images::palette(CLASSES.len()), OVERLAY_OPACITY)
            .map_err(js)?;
    Ok(Segmented {
        width,
        height,
        classes: segmentation.classes,
        overlay: overlay.rgb.chunks_exact(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect(),
    })
}

fn js(e: hrnet_ocr::Error) -> JsError {
    JsError::new(&e.to_string())
}
