//! Datasets and training augmentation.

pub mod augment;
pub mod folder;
pub mod image;
pub mod official;
pub mod procedural;

use self::image::Image;
use crate::error::Result;

/// One labelled image: the image and its per-pixel class labels (`height * width`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scene {
    pub image: Image,
    pub labels: Vec<u32>,
}

/// A finite, indexable set of labelled images.
/// (`Sync`: the ranks of data-parallel training read one set from their threads.)
pub trait Dataset: Sync {
    /// How many images it holds.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `index` with its labels (train ids; the ignore label where unlabelled).
    fn get(&self, index: usize) -> Result<Scene>;

    /// What image `index` is, for messages (a file name, or a seed and index).
    fn describe(&self, index: usize) -> String;

    /// The name its prediction is saved under (the official: the label file's stem, or the
    /// image's in a test list).
    fn name(&self, index: usize) -> String {
        format!("{index}")
    }

    /// Whether its images have labels (a test split's list has none: [`Scene::labels`] is
    /// then empty).
    fn labelled(&self) -> bool {
        true
    }

    /// Whether training should visit it in a fresh random order every epoch (files sorted
    /// by name), or in index order (images that are already independent random draws).
    fn shuffle(&self) -> bool {
        true
    }
}

/// SplitMix64: a small, fast generator for deterministic data, augmentation and
/// initialisation (not for anything that needs unpredictability).
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }

    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let mut unit = || (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (u1, u2) = (unit().max(1e-300), unit());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}
