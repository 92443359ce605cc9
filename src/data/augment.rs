//! Training augmentation as HRNet-OCR's `gen_sample`: random rescale by a factor from a set
//! of tenths, pad bottom/right to the crop size (black image, ignore label), random crop,
//! random horizontal flip (exchanging left and right classes where the dataset has them),
//! then mean/std normalisation in RGB order.

use super::{Dataset, SplitMix};
use crate::data::image::{check_labels, normalise, Image};
use crate::error::{Error, Result};

/// A sample ready for the network: planes `[3, h, w]` and labels `[h, w]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub planes: Vec<f32>,
    pub labels: Vec<u32>,
}

/// What [`augment`] does.
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Crop (height, width).
    pub crop: [usize; 2],
    /// Scale factors drawn uniformly: `min + k / 10` for k in 0..=steps (official: 0.5, 16).
    pub min_scale: f32,
    pub scale_steps: u32,
    pub flip: bool,
    /// Classes a flip exchanges (LIP's left and right parts: [`super::official::Official::flip_swaps`]).
    pub swap_on_flip: &'static [(u32, u32)],
    pub ignore_label: u32,
    /// A label trained as ignored besides `ignore_label`: an official dataset's reduced
    /// zero ([`super::official::Official::reduced_zero`]) where `IGNORE_LABEL` is another
    /// (PASCAL-Context's -1). The official training would index past its classes with it.
    pub reduced_zero: Option<u32>,
    /// The long side at scale 1 (an official dataset's `TRAIN.BASE_SIZE`: the long side
    /// becomes `int(base * scale + 0.5)`, the other in proportion); none: the image's own.
    pub long_side: Option<usize>,
    /// A size (height, width) image and labels are resized to first (LIP's `resize_image`
    /// to the crop, which changes the aspect).
    pub resize_first: Option<[usize; 2]>,
}

impl Augment {
    /// The official recipe at `crop`: scales 0.5 to 2.0 in steps of 0.1 of the image's own
    /// size, random crop, horizontal flip.
    pub fn official(crop: [usize; 2], ignore_label: u32) -> Self {
        Augment {
            crop,
            min_scale: 0.5,
            scale_steps: 16,
            flip: true,
            swap_on_flip: &[],
            ignore_label,
            reduced_zero: None,
            long_side: None,
            resize_first: None,
        }
    }

    /// The size an `[h, w]` image has at `scale`.
    fn scaled([h, w]: [usize; 2], scale: f32, long_side: Option<usize>) -> [usize; 2] {
        match long_side {
            None => [h, w].map(|s| ((s as f32 * scale).round() as usize).max(1)),
            Some(base) => super::official::long_side_size([h, w], base, scale),
        }
    }
}

/// One augmented sample of `image` with `labels` (`height * width`).
pub fn augment(image: &Image, labels: &[u32], a: &Augment, rng: &mut SplitMix) -> Sample {
    let resized;
    let (image, labels) = match a.resize_first {
        Some([h, w]) => {
            let rgb = resize_bilinear(image, w, h);
            resized = (
                Image { width: w, height: h, rgb },
                resize_nearest(labels, [image.height, image.width], [h, w]),
            );
            (&resized.0, resized.1.as_slice())
        }
        None => (image, labels),
    };
    let s = a.min_scale + rng.below(u64::from(a.scale_steps) + 1) as f32 / 10.0;
    let [h, w] = Augment::scaled([image.height, image.width], s, a.long_side);
    let (rgb, lbl) =
        (resize_bilinear(image, w, h), resize_nearest(labels, [image.height, image.width], [h, w]));
    let [ch, cw] = a.crop;
    let y0 = rng.below(h.saturating_sub(ch) as u64 + 1) as usize;
    let x0 = rng.below(w.saturating_sub(cw) as u64 + 1) as usize;
    let flip = a.flip && rng.below(2) == 1;
    let mut planes = vec![0.0; 3 * ch * cw];
    let mut out = vec![a.ignore_label; ch * cw];
    for y in 0..ch {
        for x in 0..cw {
            let (sy, sx) = (y0 + y, x0 + if flip { cw - 1 - x } else { x });
            // Outside the rescaled image is padding: black, and the ignore label.
            let inside = sy < h && sx < w;
            for c in 0..3 {
                let v = if inside { rgb[(sy * w + sx) * 3 + c] } else { 0 };
                planes[(c * ch + y) * cw + x] = normalise(c, v);
            }
            if inside {
                let label = lbl[sy * w + sx];
                out[y * cw + x] = match a.swap_on_flip.iter().find(|p| flip && (p.0 == label || p.1 == label))
                {
                    Some(&(left, right)) => left + right - label,
                    None => label,
                };
            }
        }
    }
    Sample { planes, labels: out }
}

/// The training batches of a run over a dataset. Batch `step` is a function of (seed,
/// step) alone, so a resumed run sees exactly the batches an uninterrupted run would have.
/// An epoch is `len / batch` batches, the images left over dropped (the official loader's
/// `drop_last`), in a new order each epoch where the dataset and `shuffle` allow.
#[derive(Clone)]
pub struct Batches<'d> {
    pub dataset: &'d dyn Dataset,
    pub recipe: Augment,
    pub seed: u64,
    pub batch: usize,
    /// Labels must be below this or the recipe's ignore label; others are refused by file.
    pub classes: usize,
    /// `TRAIN.SHUFFLE`.
    pub shuffle: bool,
}

impl Batches<'_> {
    /// The augmented samples of step `step`: the next `batch` images of the epoch's order.
    pub fn get(&self, step: usize) -> Result<Vec<Sample>> {
        self.get_part(step, 0..self.batch)
    }

    /// The samples `images` of step `step`'s batch (a data-parallel rank's slice), each as
    /// [`Batches::get`] makes it.
    pub fn get_part(&self, step: usize, images: std::ops::Range<usize>) -> Result<Vec<Sample>> {
        let n = self.dataset.len().max(1);
        let order = |epoch: usize| -> Vec<usize> {
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng = SplitMix::new(self.seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
            for i in (1..n).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            order
        };
        let mut epoch_order: Option<(usize, Vec<usize>)> = None;
        let per_epoch = (n / self.batch).max(1);
        images
            .map(|i| {
                let at = step * self.batch + i;
                let (epoch, pos) = (step / per_epoch, ((step % per_epoch) * self.batch + i) % n);
                let index = if self.shuffle && self.dataset.shuffle() {
                    if epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                        epoch_order = Some((epoch, order(epoch)));
                    }
                    epoch_order.as_ref().map_or(pos, |(_, o)| o[pos])
                } else {
                    pos
                };
                let mut scene = self.dataset.get(index)?;
                if let Some(zero) = self.recipe.reduced_zero {
                    let ignore = self.recipe.ignore_label;
                    scene.labels.iter_mut().filter(|l| **l == zero).for_each(|l| *l = ignore);
                }
                check_labels(&scene.labels, self.classes, self.recipe.ignore_label)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", self.dataset.describe(index))))?;
                let mut rng = SplitMix::new(self.seed ^ (at as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                Ok(augment(&scene.image, &scene.labels, &self.recipe, &mut rng))
            })
            .collect()
    }
}

/// Bilinear resize of an RGB image (pixel centres aligned, as OpenCV's INTER_LINEAR).
fn resize_bilinear(image: &Image, w: usize, h: usize) -> Vec<u8> {
    let (iw, ih) = (image.width, image.height);
    let tap = |o: usize, n_in: usize, n_out: usize| {
        let src = ((o as f32 + 0.5) * n_in as f32 / n_out as f32 - 0.5).max(0.0);
        let i0 = (src as usize).min(n_in - 1);
        (i0, (i0 + 1).min(n_in - 1), src - i0 as f32)
    };
    let mut out = vec![0u8; 3 * w * h];
    for y in 0..h {
        let (y0, y1, ty) = tap(y, ih, h);
        for x in 0..w {
            let (x0, x1, tx) = tap(x, iw, w);
            for c in 0..3 {
                let at = |yy: usize, xx: usize| f32::from(image.rgb[(yy * iw + xx) * 3 + c]);
                let top = at(y0, x0) * (1.0 - tx) + at(y0, x1) * tx;
                let bottom = at(y1, x0) * (1.0 - tx) + at(y1, x1) * tx;
                out[(y * w + x) * 3 + c] = (top * (1.0 - ty) + bottom * ty).round() as u8;
            }
        }
    }
    out
}

/// Labels `[ih, iw]` resized to `[h, w]` by nearest neighbour as OpenCV's `INTER_NEAREST`
/// (the official code's): output pixel i takes input pixel `floor(i * in / out)`.
pub(crate) fn resize_nearest(labels: &[u32], [ih, iw]: [usize; 2], [h, w]: [usize; 2]) -> Vec<u32> {
    let source =
        |i: usize, len: usize, out: usize| ((i as f64 * len as f64 / out as f64) as usize).min(len - 1);
    (0..h).flat_map(|y| (0..w).map(move |x| labels[source(y, ih, h) * iw + source(x, iw, w)])).collect()
}
