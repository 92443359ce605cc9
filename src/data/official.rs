//! The five datasets of the official repository (`lib/datasets/*.py` of
//! HRNet-Semantic-Segmentation, branch HRNet-OCR), chosen by an experiment YAML's
//! `DATASET.DATASET`: how each reads its list files and turns a label file's values into
//! class labels, and which classes a horizontal flip swaps.
//!
//! The official classes work on 8-bit label arrays (`cv2.imread(..., IMREAD_GRAYSCALE)` for
//! Cityscapes, `PIL.Image.open(...).convert('P')` for the others), so their arithmetic
//! wraps: `reduce_zero_label` turns 0 into 255. The encodings here do the same, on the
//! label file's 8-bit values.

use crate::error::{Error, Result};

/// A dataset of the official repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Official {
    /// `cityscapes`: `labelIds` mapped to the 19 train ids.
    Cityscapes,
    /// `lip`: 20 human-parsing classes, left and right parts swapped by a flip.
    Lip,
    /// `pascal_ctx`: 59 classes (the zero label reduced to ignore) or 60 (as they are).
    PascalContext,
    /// `ade20k`: 150 classes, the zero label reduced to ignore.
    Ade20k,
    /// `cocostuff`: COCO-Stuff's ids mapped to 171 classes, the zero label reduced to ignore.
    CocoStuff,
}

/// Cityscapes label id -> train id for the 19 evaluated classes; the other ids up to 33
/// become the ignore label (`Cityscapes.label_mapping`).
const CITYSCAPES_TRAIN_IDS: [(u32, u32); 19] = [
    (7, 0),
    (8, 1),
    (11, 2),
    (12, 3),
    (13, 4),
    (17, 5),
    (19, 6),
    (20, 7),
    (21, 8),
    (22, 9),
    (23, 10),
    (24, 11),
    (25, 12),
    (26, 13),
    (27, 14),
    (28, 15),
    (31, 16),
    (32, 17),
    (33, 18),
];

/// COCO-Stuff's label values in class order (`COCOStuff.mapping`): the value at index i
/// becomes i, then the zero label is reduced (so value 0 is ignored and value 1 is class 0).
const COCOSTUFF_IDS: [u32; 172] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
    92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113,
    114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130, 131, 132, 133, 134,
    135, 136, 137, 138, 139, 140, 141, 142, 143, 144, 145, 146, 147, 148, 149, 150, 151, 152, 153, 154, 155,
    156, 157, 158, 159, 160, 161, 162, 163, 164, 165, 166, 167, 168, 169, 170, 171, 172, 173, 174, 175, 176,
    177, 178, 179, 180, 181, 182,
];

/// LIP's (left, right) classes: arm, leg, shoe (`LIP.__getitem__`'s flip).
const LIP_LEFT_RIGHT: [(u32, u32); 3] = [(14, 15), (16, 17), (18, 19)];

/// How the official dataset class prepares an image for testing, decided by the test list's
/// name as the official `__getitem__` branches on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestPreparation {
    /// As it is (Cityscapes; the lists of a dataset without a test branch).
    AsIs,
    /// Resized to the test crop (LIP `testval`); the scores are resized to the labels' size.
    ResizeToCrop,
    /// The short side resized to the base size and the image padded bottom and right to a
    /// multiple of 8 with the mean colour (PASCAL-Context, COCO-Stuff and ADE20K `testval`);
    /// the padding is cut from the scores before they are resized to the labels' size,
    /// except for ADE20K, whose `testval` returns no padding to cut.
    ShortSide { cut_padding: bool },
    /// The `val` branch of PASCAL-Context, COCO-Stuff and ADE20K: image and labels resized
    /// and padded as [`TestPreparation::ShortSide`] (labels nearest, padded with the ignore
    /// label). The official code then crops both at random to the test crop; this engine
    /// scores the whole resized image instead, so that a score does not depend on a random
    /// draw (where the resized image is no larger than the crop the two are the same).
    ShortSideWithLabels,
}

/// One line of a list file: the image and, except in image-only test lists, its labels
/// (both relative to the dataset root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub image: String,
    pub label: Option<String>,
}

/// The size an `[h, w]` image has at `scale` under the official `multi_scale_aug`: its long
/// side `int(base * scale + 0.5)`, the other in proportion, rounded the same way (at least 1).
pub fn long_side_size([h, w]: [usize; 2], base: usize, scale: f32) -> [usize; 2] {
    let long = (base as f64 * f64::from(scale) + 0.5) as usize;
    let other = |short: usize, longer: usize| (((short * long) as f64 / longer as f64 + 0.5) as usize).max(1);
    if h > w {
        [long, other(w, h)]
    } else {
        [other(h, w), long]
    }
}

/// 8-bit subtraction of one, as numpy does on the official uint8 arrays (0 becomes 255).
fn reduce_zero_label(v: u32) -> u32 {
    (v + 255) % 256
}

impl Official {
    pub const ALL: [Official; 5] =
        [Official::Cityscapes, Official::Lip, Official::PascalContext, Official::Ade20k, Official::CocoStuff];

    /// The name `DATASET.DATASET` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Official::Cityscapes => "cityscapes",
            Official::Lip => "lip",
            Official::PascalContext => "pascal_ctx",
            Official::Ade20k => "ade20k",
            Official::CocoStuff => "cocostuff",
        }
    }

    /// The dataset `DATASET.DATASET` names (case as the official code: lower), or an error
    /// naming the known ones.
    pub fn parse(name: &str) -> Result<Self> {
        Official::ALL.into_iter().find(|d| d.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Official::ALL.iter().map(|d| d.name()).collect();
            Error::Invalid(format!(
                "DATASET.DATASET {name:?} is not a dataset this engine knows ({})",
                known.join(", ")
            ))
        })
    }

    /// The class a label file's value `v` (8 bit) stands for, as the official class encodes
    /// it for a model of `num_classes` classes; `ignore` is the YAML's ignore label (what
    /// Cityscapes maps its unlabelled ids to). Values at or above `num_classes` other than
    /// `ignore` are what the official code leaves out of its confusion matrix.
    pub fn encode(self, v: u32, num_classes: usize, ignore: u32) -> u32 {
        match self {
            Official::Cityscapes if v <= 33 => {
                CITYSCAPES_TRAIN_IDS.iter().find(|&&(id, _)| id == v).map_or(ignore, |&(_, train)| train)
            }
            Official::Cityscapes | Official::Lip => v,
            Official::PascalContext if num_classes == 59 => reduce_zero_label(v),
            Official::PascalContext => v,
            Official::Ade20k => reduce_zero_label(v),
            Official::CocoStuff => {
                let index = COCOSTUFF_IDS.iter().position(|&id| id == v).map_or(255, |i| i as u32);
                reduce_zero_label(index)
            }
        }
    }

    /// How a test image is prepared for the list named `list_name`.
    pub fn test_preparation(self, list_name: &str) -> TestPreparation {
        let testval = list_name.contains("testval");
        match self {
            Official::Cityscapes => TestPreparation::AsIs,
            Official::Lip if testval => TestPreparation::ResizeToCrop,
            Official::Lip => TestPreparation::AsIs,
            Official::Ade20k if testval => TestPreparation::ShortSide { cut_padding: false },
            _ if testval => TestPreparation::ShortSide { cut_padding: true },
            _ if list_name.contains("val") => TestPreparation::ShortSideWithLabels,
            _ => TestPreparation::AsIs,
        }
    }

    /// A predicted class as the official `save_pred` writes it: Cityscapes' train ids back
    /// to label ids (the benchmark server's encoding), the others as they are.
    pub fn saved_label(self, class: u32) -> u32 {
        match self {
            Official::Cityscapes => {
                CITYSCAPES_TRAIN_IDS.iter().find(|&&(_, train)| train == class).map_or(class, |&(id, _)| id)
            }
            _ => class,
        }
    }

    /// Whether label files are read as palette indices (`convert('P')`), rather than as
    /// grey levels (Cityscapes' `IMREAD_GRAYSCALE`).
    pub fn reads_palette_indices(self) -> bool {
        self != Official::Cityscapes
    }

    /// The label a zero label becomes where the encoding reduces it (PASCAL-Context with 59
    /// classes, ADE20K, COCO-Stuff): `0 - 1` in 8 bits, 255, which the official evaluation
    /// leaves out as past the classes.
    pub fn reduced_zero(self, num_classes: usize) -> Option<u32> {
        match self {
            Official::PascalContext if num_classes == 59 => Some(reduce_zero_label(0)),
            Official::Ade20k | Official::CocoStuff => Some(reduce_zero_label(0)),
            _ => None,
        }
    }

    /// The classes a horizontal flip swaps (LIP's left and right parts), in training and in
    /// the flipped test pass.
    pub fn flip_swaps(self) -> &'static [(u32, u32)] {
        match self {
            Official::Lip => &LIP_LEFT_RIGHT,
            _ => &[],
        }
    }

    /// The entries of a list file named `list_name` (its path as the YAML gives it: the
    /// official classes branch on whether it contains `test`, `train` or `val`) with `text`,
    /// by the official `read_files`: Cityscapes test lists hold images only, its other lists
    /// `image label`; LIP's train lists `image label edge` (the third field unused), its val
    /// lists `image label`, no other LIP list is read; the other datasets `image label`.
    /// A line of another shape is an error naming the line.
    pub fn parse_list(self, list_name: &str, text: &str) -> Result<Vec<ListEntry>> {
        let fields_wanted = match self {
            Official::Cityscapes if list_name.contains("test") => 1,
            Official::Lip if list_name.contains("train") => 3,
            Official::Lip if list_name.contains("val") => 2,
            Official::Lip => {
                return Err(Error::Invalid(format!(
                    "{list_name}: a LIP list must be a train list (image label edge) or a val list \
                     (image label), as the official LIP class reads; the name says neither"
                )))
            }
            _ => 2,
        };
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            if fields.len() != fields_wanted {
                let shape = ["image", "image label", "image label edge"][fields_wanted - 1];
                return Err(Error::Format {
                    path: list_name.to_string(),
                    what: format!(
                        "line {}: a {} list line is `{shape}`, got {} field(s): {line:?}",
                        n + 1,
                        self.name(),
                        fields.len()
                    ),
                });
            }
            entries.push(ListEntry {
                image: fields[0].to_string(),
                label: (fields_wanted > 1).then(|| fields[1].to_string()),
            });
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_follow_the_official_uint8_arithmetic() {
        let (c, ignore) = (Official::Cityscapes, 255);
        assert_eq!([7, 8, 33, 0, 9, 34, 255].map(|v| c.encode(v, 19, ignore)), [0, 1, 18, 255, 255, 34, 255]);
        assert_eq!([0, 1, 150, 255].map(|v| Official::Ade20k.encode(v, 150, 255)), [255, 0, 149, 254]);
        let ctx = Official::PascalContext;
        assert_eq!([0, 1, 59].map(|v| ctx.encode(v, 59, u32::MAX)), [255, 0, 58]);
        assert_eq!([0, 1, 59].map(|v| ctx.encode(v, 60, u32::MAX)), [0, 1, 59]);
        // COCO-Stuff: value 0 is ignored, 1 is class 0, 13 (after the gap at 12) class 11,
        // 182 the last class (170); a value with no class (12) lands on 254, out of range.
        let coco = Official::CocoStuff;
        assert_eq!([0, 1, 11, 13, 182, 12].map(|v| coco.encode(v, 171, 255)), [255, 0, 10, 11, 170, 254]);
        assert_eq!(COCOSTUFF_IDS.len() - 1, 171);
        assert_eq!(Official::Lip.encode(19, 20, 255), 19);
    }

    #[test]
    fn list_files_are_read_as_the_official_classes_read_them() {
        let c = Official::Cityscapes;
        let pair = c.parse_list("list/cityscapes/val.lst", "a.png b.png\n\n").unwrap();
        assert_eq!(pair, [ListEntry { image: "a.png".into(), label: Some("b.png".into()) }]);
        let test = c.parse_list("list/cityscapes/test.lst", "a.png\n").unwrap();
        assert_eq!(test, [ListEntry { image: "a.png".into(), label: None }]);
        let lip = Official::Lip.parse_list("list/lip/trainList.txt", "i.jpg l.png e.png\n").unwrap();
        assert_eq!(lip[0].label.as_deref(), Some("l.png"));
        assert!(Official::Lip.parse_list("list/lip/valList.txt", "i.jpg l.png\n").is_ok());
        let e = Official::Lip.parse_list("list/lip/testList.txt", "i.jpg\n").unwrap_err().to_string();
        assert!(e.contains("train list") && e.contains("val list"), "{e}");
        let e =
            c.parse_list("list/cityscapes/val.lst", "a.png\nb.png c.png d.png\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("`image label`"), "{e}");
        let e = Official::parse("voc").unwrap_err().to_string();
        assert!(e.contains("voc") && e.contains("pascal_ctx") && e.contains("cocostuff"), "{e}");
        assert_eq!(Official::parse("lip").unwrap().flip_swaps(), &[(14, 15), (16, 17), (18, 19)]);
        // The test preparation follows the list's name, as the official __getitem__ does.
        use TestPreparation::*;
        assert_eq!(Official::Cityscapes.test_preparation("list/cityscapes/val.lst"), AsIs);
        assert_eq!(Official::Lip.test_preparation("list/lip/testvalList.txt"), ResizeToCrop);
        assert_eq!(Official::Lip.test_preparation("list/lip/valList.txt"), AsIs);
        assert_eq!(Official::PascalContext.test_preparation("testval"), ShortSide { cut_padding: true });
        assert_eq!(Official::Ade20k.test_preparation("testval"), ShortSide { cut_padding: false });
        assert_eq!(Official::CocoStuff.test_preparation("list/cocostuff/val.lst"), ShortSideWithLabels);
    }
}
