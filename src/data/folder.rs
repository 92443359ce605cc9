//! Datasets on disk, in two layouts:
//!
//! - **Cityscapes**: `ROOT/leftImg8bit/SPLIT/CITY/NAME_leftImg8bit.png` with labels in
//!   `ROOT/gtFine/SPLIT/CITY/NAME_gtFine_labelTrainIds.png`, or, where only the raw
//!   `NAME_gtFine_labelIds.png` exists, those ids mapped to the 19 train ids.
//! - **Images and masks**: `ROOT/images/` and `ROOT/masks/`, paired by a list file (one
//!   `image mask` pair per line, paths relative to ROOT, as the official `.lst` files), or
//!   without one by file stem (`images/a.jpg` with `masks/a.png`). Mask values are labels.
//! - **An official dataset** ([`Folder::official`]): a list file of the official layout,
//!   read and its labels encoded as the official dataset class does ([`Official`]).

use super::official::Official;
use super::{Dataset, Scene};
use crate::error::{Error, Result};
use crate::images::{read_labels, read_rgb};
use std::path::{Path, PathBuf};

/// How a label file's values become train ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelEncoding {
    /// The values are the labels.
    TrainIds,
    /// An official dataset's encoding of 8-bit label files, for a model of this many classes
    /// (Cityscapes `labelIds` found beside missing `labelTrainIds` take the official
    /// Cityscapes mapping to the 19 train ids).
    Official(Official, usize),
}

/// A dataset of image and label files.
#[derive(Clone, Debug)]
pub struct Folder {
    pairs: Vec<(PathBuf, Option<PathBuf>, LabelEncoding)>,
    ignore_label: u32,
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

/// The entries of a directory, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        out.push(entry.map_err(|e| io_error(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

impl Folder {
    /// Opens `root`, finding its layout. `split` picks the Cityscapes split folder
    /// (`train`, `val`, ...) or, in the images-and-masks layout, the list file
    /// `ROOT/SPLIT.lst` or `ROOT/SPLIT.txt` when one exists; `list` names a list file
    /// explicitly. `ignore_label` fills unmapped Cityscapes ids.
    pub fn open(root: &Path, split: &str, list: Option<&Path>, ignore_label: u32) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::Invalid(format!("dataset folder {} does not exist", root.display())));
        }
        let pairs = if let Some(list) = list {
            Self::from_list(root, list)?
        } else if root.join("leftImg8bit").is_dir() {
            Self::cityscapes(root, split)?
        } else if root.join("images").is_dir() {
            match ["lst", "txt"]
                .map(|ext| root.join(format!("{split}.{ext}")))
                .into_iter()
                .find(|p| p.is_file())
            {
                Some(list) => Self::from_list(root, &list)?,
                None => Self::by_stem(root)?,
            }
        } else {
            return Err(Error::Invalid(format!(
                "{} has neither leftImg8bit/ (Cityscapes layout) nor images/ (images and masks layout)",
                root.display()
            )));
        };
        if pairs.is_empty() {
            return Err(Error::Invalid(format!(
                "no labelled images found in {} (split {split:?})",
                root.display()
            )));
        }
        Ok(Folder { pairs, ignore_label })
    }

    fn cityscapes(root: &Path, split: &str) -> Result<Vec<(PathBuf, Option<PathBuf>, LabelEncoding)>> {
        let images = root.join("leftImg8bit").join(split);
        if !images.is_dir() {
            return Err(Error::Invalid(format!(
                "Cityscapes split folder {} does not exist",
                images.display()
            )));
        }
        let mut pairs = Vec::new();
        for city in sorted_entries(&images)?.into_iter().filter(|p| p.is_dir()) {
            for image in sorted_entries(&city)? {
                let Some(name) = image.file_name().and_then(|n| n.to_str()) else { continue };
                let Some(stem) = name.strip_suffix("_leftImg8bit.png") else { continue };
                let labels = root.join("gtFine").join(split).join(city.file_name().unwrap_or_default());
                let train_ids = labels.join(format!("{stem}_gtFine_labelTrainIds.png"));
                let ids = labels.join(format!("{stem}_gtFine_labelIds.png"));
                let pair = if train_ids.is_file() {
                    (image, Some(train_ids), LabelEncoding::TrainIds)
                } else if ids.is_file() {
                    (image, Some(ids), LabelEncoding::Official(Official::Cityscapes, 19))
                } else {
                    return Err(Error::Invalid(format!(
                        "{} has no label file: expected {} or {}",
                        image.display(),
                        train_ids.display(),
                        ids.display()
                    )));
                };
                pairs.push(pair);
            }
        }
        Ok(pairs)
    }

    /// The official dataset `dataset` at `root`, from the list file `list` (a path relative
    /// to `root`, as an experiment YAML's `TRAIN_SET` / `TEST_SET` gives it), its labels
    /// encoded for a model of `num_classes` classes with `ignore_label` (the YAML's).
    pub fn official(
        root: &Path,
        dataset: Official,
        list: &str,
        num_classes: usize,
        ignore_label: u32,
    ) -> Result<Self> {
        let path = root.join(list);
        let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
        let mut pairs = Vec::new();
        for entry in dataset.parse_list(list, &text)? {
            let label = entry.label.map(|l| root.join(l));
            pairs.push((root.join(entry.image), label, LabelEncoding::Official(dataset, num_classes)));
        }
        if pairs.is_empty() {
            return Err(Error::Invalid(format!("{} lists no images", path.display())));
        }
        Ok(Folder { pairs, ignore_label })
    }

    fn from_list(root: &Path, list: &Path) -> Result<Vec<(PathBuf, Option<PathBuf>, LabelEncoding)>> {
        let text = std::fs::read_to_string(list).map_err(|e| io_error(list, e))?;
        let mut pairs = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [] => {}
                [image, mask] => {
                    pairs.push((root.join(image), Some(root.join(mask)), LabelEncoding::TrainIds))
                }
                _ => {
                    return Err(Error::Format {
                        path: list.display().to_string(),
                        what: format!("line {}: expected `image mask`, got {line:?}", n + 1),
                    })
                }
            }
        }
        Ok(pairs)
    }

    fn by_stem(root: &Path) -> Result<Vec<(PathBuf, Option<PathBuf>, LabelEncoding)>> {
        let mut pairs = Vec::new();
        for image in sorted_entries(&root.join("images"))?.into_iter().filter(|p| p.is_file()) {
            let stem = image.file_stem().unwrap_or_default().to_string_lossy().to_string();
            let mask = root.join("masks").join(format!("{stem}.png"));
            if !mask.is_file() {
                return Err(Error::Invalid(format!(
                    "{} has no mask: expected {}",
                    image.display(),
                    mask.display()
                )));
            }
            pairs.push((image, Some(mask), LabelEncoding::TrainIds));
        }
        Ok(pairs)
    }

    /// The (image, label) files, in dataset order (no label in a test split's list).
    pub fn files(&self) -> impl Iterator<Item = (&Path, Option<&Path>)> {
        self.pairs.iter().map(|(i, l, _)| (i.as_path(), l.as_deref()))
    }
}

impl Dataset for Folder {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn get(&self, index: usize) -> Result<Scene> {
        let (image_path, label_path, encoding) = &self.pairs[index];
        let image = read_rgb(image_path)?;
        let Some(label_path) = label_path else {
            return Ok(Scene { image, labels: Vec::new() });
        };
        let map = read_labels(label_path)?;
        if (map.width, map.height) != (image.width, image.height) {
            return Err(Error::Shape {
                what: format!("label map {}", label_path.display()),
                expected: format!(
                    "{}x{} (width x height) like its image {}",
                    image.width,
                    image.height,
                    image_path.display()
                ),
                actual: format!("{}x{}", map.width, map.height),
            });
        }
        let labels = match encoding {
            LabelEncoding::TrainIds => map.labels,
            LabelEncoding::Official(dataset, classes) => {
                if let Some(v) = map.labels.iter().find(|&&v| v > 255) {
                    return Err(Error::Format {
                        path: label_path.display().to_string(),
                        what: format!(
                            "holds label value {v}; the official {} class reads 8-bit label maps",
                            dataset.name()
                        ),
                    });
                }
                map.labels.into_iter().map(|v| dataset.encode(v, *classes, self.ignore_label)).collect()
            }
        };
        Ok(Scene { image, labels })
    }

    /// The label file where there is one (what a label error is about), else the image.
    fn describe(&self, index: usize) -> String {
        let (image, label, _) = &self.pairs[index];
        label.as_deref().unwrap_or(image).display().to_string()
    }

    fn name(&self, index: usize) -> String {
        let (image, label, _) = &self.pairs[index];
        let file = label.as_deref().unwrap_or(image);
        file.file_stem().unwrap_or_default().to_string_lossy().into_owned()
    }

    fn labelled(&self) -> bool {
        self.pairs.iter().all(|p| p.1.is_some())
    }
}
