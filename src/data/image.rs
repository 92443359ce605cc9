//! Images as the network sees them: 8-bit RGB in, normalised planes out, and the label
//! maps that go with them.

use crate::error::{Error, Result};

/// The ImageNet normalisation the official models were trained with (RGB order).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// An 8-bit RGB image, row-major, `3 * width * height` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    pub fn new(width: usize, height: usize, rgb: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || rgb.len() != 3 * width * height {
            return Err(Error::Invalid(format!(
                "an RGB image of {width}x{height} needs {} bytes, got {}",
                3 * width * height,
                rgb.len()
            )));
        }
        Ok(Image { width, height, rgb })
    }

    /// The normalised planes `[3, H, W]` the network reads.
    pub fn normalised(&self) -> Vec<f32> {
        let hw = self.width * self.height;
        let mut out = vec![0.0; 3 * hw];
        for (i, px) in self.rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * hw + i] = normalise(c, px[c]);
            }
        }
        out
    }
}

/// Channel `c` of an 8-bit pixel value, normalised as the network reads it.
pub fn normalise(c: usize, value: u8) -> f32 {
    (f32::from(value) / 255.0 - MEAN[c]) / STD[c]
}

/// Checks labels on the host: each must be below `classes` or be the ignore label.
pub fn check_labels(labels: &[u32], classes: usize, ignore_label: u32) -> Result<()> {
    match labels.iter().position(|&l| l != ignore_label && l as usize >= classes) {
        None => Ok(()),
        Some(i) => {
            // IGNORE_LABEL -1 is held as u32::MAX: shown as the YAML writes it.
            let ignore = if ignore_label == u32::MAX { "-1".to_string() } else { ignore_label.to_string() };
            Err(Error::Invalid(format!(
                "label {} at pixel {i} is neither a class (0..{classes}) nor the ignore label {ignore}",
                labels[i]
            )))
        }
    }
}
