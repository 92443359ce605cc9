//! Evaluation: the confusion matrix over a whole set (ignore label and labels past the
//! classes excluded), per-class IoU = tp / max(1, gt + pred - tp), mIoU over all classes,
//! pixel accuracy and mean accuracy, as the official `testval` computes them.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::metrics;
use crate::tensor::Tensor;

/// Counts `confusion[ground truth][prediction]` over many images on the device.
pub struct Evaluation {
    classes: usize,
    ignore_label: u32,
    confusion: Tensor,
}

/// The figures a set's confusion matrix gives.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub iou: Vec<f64>,
    pub mean_iou: f64,
    pub pixel_accuracy: f64,
    /// The mean over classes of each class's pixel accuracy, tp / max(1, ground truth).
    pub mean_accuracy: f64,
    /// `classes x classes`, rows ground truth.
    pub confusion: Vec<u64>,
}

impl Evaluation {
    pub fn new(gpu: &Gpu, classes: usize, ignore_label: u32) -> Result<Self> {
        let confusion = Tensor::from_u32(gpu, &[classes, classes], &vec![0; classes * classes])?;
        Ok(Evaluation { classes, ignore_label, confusion })
    }

    /// The label left out of the counts.
    pub fn ignore_label(&self) -> u32 {
        self.ignore_label
    }

    /// Adds one image's predicted classes against its labels (both `height * width`).
    pub fn add(&mut self, gpu: &Gpu, prediction: &[u32], labels: &[u32]) -> Result<()> {
        if prediction.len() != labels.len() {
            return Err(Error::Invalid(format!(
                "{} predicted pixels against {} labels",
                prediction.len(),
                labels.len()
            )));
        }
        let n = prediction.len();
        let p = Tensor::from_u32(gpu, &[1, 1, n], prediction)?;
        let l = Tensor::from_u32(gpu, &[1, 1, n], labels)?;
        gpu.run([&metrics::confusion(gpu, &p, &l, self.classes, self.ignore_label, &self.confusion)?])
    }

    /// Adds one image's predicted classes, still on the device (a u32 map such as a
    /// segmenter graph's argmax), against its labels: nothing comes back to the host.
    pub fn add_predicted(&mut self, gpu: &Gpu, prediction: &Tensor, labels: &[u32]) -> Result<()> {
        if prediction.numel() != labels.len() {
            return Err(Error::Invalid(format!(
                "{} predicted pixels against {} labels",
                prediction.numel(),
                labels.len()
            )));
        }
        let l = Tensor::from_u32(gpu, prediction.shape(), labels)?;
        gpu.run([&metrics::confusion(gpu, prediction, &l, self.classes, self.ignore_label, &self.confusion)?])
    }

    /// The scores so far.
    pub fn scores(&self, gpu: &Gpu) -> Result<Scores> {
        let k = self.classes;
        let confusion: Vec<u64> = self.confusion.to_vec_u32(gpu)?.into_iter().map(u64::from).collect();
        let tp = |c: usize| confusion[c * k + c];
        let gt = |c: usize| (0..k).map(|p| confusion[c * k + p]).sum::<u64>();
        let pred = |c: usize| (0..k).map(|g| confusion[g * k + c]).sum::<u64>();
        let iou: Vec<f64> = (0..k).map(|c| tp(c) as f64 / (gt(c) + pred(c) - tp(c)).max(1) as f64).collect();
        let total: u64 = confusion.iter().sum();
        Ok(Scores {
            mean_iou: iou.iter().sum::<f64>() / k as f64,
            pixel_accuracy: (0..k).map(tp).sum::<u64>() as f64 / total.max(1) as f64,
            mean_accuracy: (0..k).map(|c| tp(c) as f64 / gt(c).max(1) as f64).sum::<f64>() / k as f64,
            iou,
            confusion,
        })
    }
}
