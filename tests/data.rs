//! Datasets on disk (Cityscapes and images/masks layouts), image and label files, palettes,
//! and the deterministic training batches.

use hrnet_ocr::data::augment::{Augment, Batches};
use hrnet_ocr::data::folder::Folder;
use hrnet_ocr::data::image::Image;
use hrnet_ocr::data::official::Official;
use hrnet_ocr::data::procedural::Scenes;
use hrnet_ocr::data::{Dataset, SplitMix};
use hrnet_ocr::images::{self, LabelMap, CITYSCAPES_PALETTE};
use std::path::{Path, PathBuf};

fn cityscapes_train_id(id: u32, ignore: u32) -> u32 {
    Official::Cityscapes.encode(id, 19, ignore)
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hrnet-ocr-data-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn seed() -> u64 {
    let s = std::env::var("HRNET_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("HRNET_TEST_SEED={s}");
    s
}

fn random_image(rng: &mut SplitMix, w: usize, h: usize) -> Image {
    Image::new(w, h, (0..3 * w * h).map(|_| rng.below(256) as u8).collect()).unwrap()
}

fn write_map(path: &Path, w: usize, h: usize, labels: Vec<u32>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    images::write_labels(path, &LabelMap { width: w, height: h, labels }).unwrap();
}

#[test]
fn label_pngs_round_trip_at_8_and_16_bits_and_colour_is_refused() {
    let mut rng = SplitMix::new(seed());
    let dir = scratch("labels");
    for max in [255u64, 3000] {
        let (w, h) = (1 + rng.below(40) as usize, 1 + rng.below(40) as usize);
        let labels: Vec<u32> = (0..w * h).map(|_| rng.below(max + 1) as u32).collect();
        let path = dir.join(format!("l{max}.png"));
        write_map(&path, w, h, labels.clone());
        assert_eq!(images::read_labels(&path).unwrap(), LabelMap { width: w, height: h, labels });
    }
    let rgb = dir.join("rgb.png");
    let image = random_image(&mut rng, 7, 5);
    images::write_rgb(&rgb, &image).unwrap();
    assert_eq!(images::read_rgb(&rgb).unwrap(), image);
    let err = images::read_labels(&rgb).unwrap_err().to_string();
    assert!(err.contains("rgb.png") && err.contains("single-channel"), "{err}");
}

#[test]
fn palettes_and_overlay() {
    assert_eq!(images::palette(19), CITYSCAPES_PALETTE.to_vec());
    for k in [2, 5, 21, 150] {
        let p = images::palette(k);
        assert_eq!(p.len(), k);
        assert_eq!(p[0], [0, 0, 0]);
        for (a, b) in p.iter().zip(&p[1..]) {
            assert_ne!(a, b, "neighbouring classes of {k} share a colour");
        }
    }
    let image = Image::new(2, 1, vec![100, 100, 100, 10, 20, 30]).unwrap();
    let palette = [[200, 0, 50], [0, 0, 0]];
    // Label 7 is outside the palette (an ignore label): the pixel is kept.
    let out = images::overlay(&image, &[0, 7], &palette, 0.5).unwrap();
    assert_eq!(out.rgb, vec![150, 50, 75, 10, 20, 30]);
    assert!(images::overlay(&image, &[0], &palette, 0.5).is_err());
}

#[test]
fn cityscapes_layout_maps_label_ids_and_prefers_train_ids() {
    let mut rng = SplitMix::new(seed());
    let root = scratch("cityscapes");
    let (w, h) = (12, 8);
    let ids: Vec<u32> = (0..w * h).map(|_| rng.below(34) as u32).collect();
    for (city, name) in [("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")] {
        let image = root.join(format!("leftImg8bit/train/{city}/{name}_leftImg8bit.png"));
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        images::write_rgb(&image, &random_image(&mut rng, w, h)).unwrap();
        write_map(&root.join(format!("gtFine/train/{city}/{name}_gtFine_labelIds.png")), w, h, ids.clone());
    }
    // bremen also has train ids: those win over mapping its label ids.
    let train_ids: Vec<u32> = (0..w * h).map(|_| rng.below(19) as u32).collect();
    write_map(
        &root.join("gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png"),
        w,
        h,
        train_ids.clone(),
    );
    let set = Folder::open(&root, "train", None, 255).unwrap();
    assert_eq!(set.len(), 2);
    assert!(set.describe(0).contains("aachen"));
    let mapped: Vec<u32> = ids.iter().map(|&id| cityscapes_train_id(id, 255)).collect();
    assert_eq!(set.get(0).unwrap().labels, mapped);
    assert_eq!(set.get(1).unwrap().labels, train_ids);
    // road (7), car (26), bicycle (33); the unlabelled id 0 and the guard rail (14) are ignored.
    assert_eq!([7, 26, 33, 0, 14].map(|id| cityscapes_train_id(id, 255)), [0, 13, 18, 255, 255]);
    let err = Folder::open(&root, "val", None, 255).unwrap_err().to_string();
    assert!(err.contains("leftImg8bit/val"), "{err}");
    std::fs::remove_file(root.join("gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png")).unwrap();
    let err = Folder::open(&root, "train", None, 255).unwrap_err().to_string();
    assert!(err.contains("aachen_000000_000019_gtFine_labelTrainIds.png"), "{err}");
}

#[test]
fn images_and_masks_layout_pairs_by_stem_or_list() {
    let mut rng = SplitMix::new(seed());
    let root = scratch("masks");
    std::fs::create_dir_all(root.join("images")).unwrap();
    for name in ["b", "a"] {
        images::write_rgb(&root.join(format!("images/{name}.png")), &random_image(&mut rng, 4, 3)).unwrap();
        write_map(&root.join(format!("masks/{name}.png")), 4, 3, vec![name.len() as u32; 12]);
    }
    let set = Folder::open(&root, "train", None, 255).unwrap();
    assert_eq!(set.len(), 2);
    assert!(set.describe(0).ends_with("a.png"), "sorted by name");
    std::fs::write(root.join("train.txt"), "images/b.png masks/a.png\n\nimages/a.png masks/b.png\n").unwrap();
    let set = Folder::open(&root, "train", None, 255).unwrap();
    let pairs: Vec<_> = set.files().map(|(i, l)| (i.to_path_buf(), l.map(Path::to_path_buf))).collect();
    assert_eq!(pairs[0], (root.join("images/b.png"), Some(root.join("masks/a.png"))));
    std::fs::write(root.join("bad.lst"), "images/a.png masks/a.png\nimages/b.png\n").unwrap();
    let err = Folder::open(&root, "train", Some(&root.join("bad.lst")), 255).unwrap_err().to_string();
    assert!(err.contains("bad.lst") && err.contains("line 2"), "{err}");
    std::fs::remove_file(root.join("masks/b.png")).unwrap();
    std::fs::remove_file(root.join("train.txt")).unwrap();
    let err = Folder::open(&root, "train", None, 255).unwrap_err().to_string();
    assert!(err.contains("images/b.png") && err.contains("masks/b.png"), "{err}");
    let err = Folder::open(&root.join("nowhere"), "train", None, 255).unwrap_err().to_string();
    assert!(err.contains("nowhere"), "{err}");
}

#[test]
fn batches_depend_on_seed_and_step_only_and_visit_every_image_once_an_epoch() {
    let root = scratch("batches");
    std::fs::create_dir_all(root.join("images")).unwrap();
    let n = 5;
    for i in 0..n {
        // Each image is one flat grey level: the sample's first value tells which it was.
        let image = Image::new(8, 8, vec![(40 * i) as u8; 192]).unwrap();
        images::write_rgb(&root.join(format!("images/{i}.png")), &image).unwrap();
        write_map(&root.join(format!("masks/{i}.png")), 8, 8, vec![1; 64]);
    }
    let set = Folder::open(&root, "train", None, 255).unwrap();
    let recipe = Augment { min_scale: 1.0, scale_steps: 0, ..Augment::official([8, 8], 255) };
    let batches =
        |seed| Batches { dataset: &set, recipe: recipe.clone(), seed, batch: 1, classes: 2, shuffle: true };
    let which = |seed: u64, step: usize| {
        let v = batches(seed).get(step).unwrap()[0].planes[0];
        (0..n).find(|&i| ((40 * i) as f32 / 255.0 - 0.485) / 0.229 == v).unwrap()
    };
    let s = seed();
    for epoch in 0..3 {
        let mut seen: Vec<usize> = (0..n).map(|i| which(s, epoch * n + i)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "epoch {epoch}");
    }
    let first = batches(s).get(3).unwrap();
    let again = batches(s).get(3).unwrap();
    assert_eq!(first[0].planes, again[0].planes);
    let orders: Vec<Vec<usize>> = (0..4).map(|k| (0..n).map(|i| which(s + k, i)).collect()).collect();
    assert!(orders.windows(2).any(|w| w[0] != w[1]), "the seed changes the order: {orders:?}");
    // Labels outside the classes are refused, naming the file.
    let bad = Batches { dataset: &set, recipe, seed: s, batch: 1, classes: 1, shuffle: true };
    let err = bad.get(0).unwrap_err().to_string();
    assert!(err.contains("masks/") && err.contains("label 1"), "{err}");
}

#[test]
fn procedural_scenes_are_a_dataset_in_index_order() {
    let set = Scenes { seed: 4, count: 3, width: 40, height: 30 };
    assert_eq!(set.len(), 3);
    let a = set.get(2).unwrap();
    assert_eq!((a.image.width, a.image.height, a.labels.len()), (40, 30, 1200));
    assert_eq!(a, hrnet_ocr::data::procedural::scene(4, 2, 40, 30));
    assert!(!set.shuffle());
}

#[test]
fn jpeg_images_load_as_rgb() {
    let mut rng = SplitMix::new(seed());
    let dir = scratch("jpeg");
    // A smooth image survives JPEG's loss closely; noise would not.
    let (w, h) = (48, 32);
    let base = [rng.below(200) as u8, rng.below(200) as u8, rng.below(200) as u8];
    let rgb: Vec<u8> = (0..w * h).flat_map(|i| base.map(|b| b + (i % w) as u8)).collect();
    let path = dir.join("photo.jpg");
    image::save_buffer(&path, &rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8).unwrap();
    let got = images::read_rgb(&path).unwrap();
    assert_eq!((got.width, got.height), (w, h));
    let worst = got.rgb.iter().zip(&rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 8, "JPEG round trip differs by {worst}");
    // A JPEG is not a label map: three channels.
    assert!(images::read_labels(&path).unwrap_err().to_string().contains("single-channel"));
}

/// Writes `indices` (each below 2^depth) as a palette PNG of `depth` bits per pixel, its
/// palette's colours unrelated to the indices.
fn write_palette_png(path: &Path, w: usize, h: usize, depth: u8, indices: &[u32]) {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, w as u32, h as u32);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::from_u8(depth).unwrap());
        let colours = 1usize << depth;
        encoder.set_palette((0..colours * 3).map(|i| (i * 37 % 256) as u8).collect::<Vec<u8>>());
        let mut writer = encoder.write_header().unwrap();
        let per_byte = 8 / depth as usize;
        let row_bytes = w.div_ceil(per_byte);
        let mut data = vec![0u8; row_bytes * h];
        for y in 0..h {
            for x in 0..w {
                let shift = 8 - depth as usize * (x % per_byte + 1);
                data[y * row_bytes + x / per_byte] |= (indices[y * w + x] as u8) << shift;
            }
        }
        writer.write_image_data(&data).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

/// A palette label PNG gives its indices (as the official datasets' `convert('P')`), at
/// every bit depth, not its colours.
#[test]
fn palette_label_pngs_read_as_their_indices() {
    let root = scratch("palette");
    let mut rng = SplitMix::new(seed());
    let (w, h) = (13, 5);
    for depth in [1u8, 2, 4, 8] {
        let indices: Vec<u32> = (0..w * h).map(|_| rng.below(1 << depth) as u32).collect();
        let path = root.join(format!("p{depth}.png"));
        write_palette_png(&path, w, h, depth, &indices);
        let map = images::read_labels(&path).unwrap();
        assert_eq!((map.width, map.height), (w, h));
        assert_eq!(map.labels, indices, "{depth}-bit palette");
    }
}

/// LIP's flip exchanges its left and right classes (14-15, 16-17, 18-19) as it mirrors the
/// crop; other classes only move.
#[test]
fn a_lip_flip_swaps_left_and_right_classes() {
    let mut rng = SplitMix::new(seed());
    let (w, h) = (6, 4);
    let image = random_image(&mut rng, w, h);
    let labels: Vec<u32> = (0..w * h).map(|i| [14, 15, 16, 17, 18, 19, 3, 0][i % 8]).collect();
    let recipe = Augment {
        min_scale: 1.0,
        scale_steps: 0,
        swap_on_flip: Official::Lip.flip_swaps(),
        ..Augment::official([h, w], 255)
    };
    let swapped = |l: u32| match l {
        14..=19 if l % 2 == 0 => l + 1,
        14..=19 => l - 1,
        other => other,
    };
    let (mut flipped, mut plain) = (0, 0);
    for _ in 0..40 {
        let s = hrnet_ocr::data::augment::augment(&image, &labels, &recipe, &mut rng);
        let mirrored =
            (0..h).all(|y| (0..w).all(|x| s.labels[y * w + x] == swapped(labels[y * w + w - 1 - x])));
        let unchanged = s.labels == labels;
        assert!(mirrored || unchanged, "neither the labels nor their swapped mirror: {:?}", s.labels);
        flipped += usize::from(mirrored);
        plain += usize::from(unchanged);
    }
    assert!(flipped > 0 && plain > 0, "40 draws: {flipped} flipped, {plain} not");
}

/// An official dataset's training rescale: the long side becomes `int(base * scale + 0.5)`
/// and the other follows; labels follow by OpenCV's nearest rule (`floor(i * in / out)`);
/// LIP first resizes image and labels to the crop.
#[test]
fn official_training_rescales_the_long_side_to_the_base_size() {
    let mut rng = SplitMix::new(seed());
    let (h, w) = (40, 60);
    let image = random_image(&mut rng, w, h);
    let labels: Vec<u32> = (0..h * w).map(|i| i as u32).collect();
    let nearest = |to: [usize; 2], from: [usize; 2], l: &[u32]| -> Vec<u32> {
        (0..to[0])
            .flat_map(|y| (0..to[1]).map(move |x| (y * from[0] / to[0], x * from[1] / to[1])))
            .map(|(sy, sx)| l[sy * from[1] + sx])
            .collect()
    };
    // Long side 60 -> 30 at scale 1: the image becomes 20 x 30, the crop takes all of it.
    let a = Augment {
        min_scale: 1.0,
        scale_steps: 0,
        flip: false,
        long_side: Some(30),
        ..Augment::official([20, 30], 255)
    };
    let s = hrnet_ocr::data::augment::augment(&image, &labels, &a, &mut rng);
    assert_eq!(s.labels, nearest([20, 30], [h, w], &labels));
    // LIP: resized to the 20 x 20 crop first (the aspect changes), then the long side to 20.
    let lip = Augment { resize_first: Some([20, 20]), long_side: Some(20), ..a.clone() };
    let lip = Augment { crop: [20, 20], ..lip };
    let s = hrnet_ocr::data::augment::augment(&image, &labels, &lip, &mut rng);
    assert_eq!(s.labels, nearest([20, 20], [h, w], &labels));
}

/// The official prediction palette is PASCAL VOC's, and Cityscapes saves label ids.
#[test]
fn predictions_are_saved_with_the_official_palette_and_ids() {
    let p = images::official_palette();
    let rgb = |i: usize| [p[3 * i], p[3 * i + 1], p[3 * i + 2]];
    assert_eq!(
        [rgb(0), rgb(1), rgb(2), rgb(3), rgb(4), rgb(15)],
        [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [192, 128, 128]]
    );
    assert_eq!([0, 13, 18].map(|c| Official::Cityscapes.saved_label(c)), [7, 26, 33]);
    assert_eq!(Official::Ade20k.saved_label(5), 5);
    let root = scratch("saved-pred");
    let map = LabelMap { width: 3, height: 2, labels: vec![0, 7, 33, 255, 1, 2] };
    images::write_palette_labels(&root.join("p.png"), &map, &p).unwrap();
    assert_eq!(images::read_labels(&root.join("p.png")).unwrap(), map);
}

/// The official dataset classes' own output (`tools/reference/official_datasets.py` ran
/// `lib/datasets/*.py` of the official repository on these tiny layouts): every label this
/// engine reads from the same files equals theirs, and their prepared test image has the
/// size this engine's test preparation gives.
#[test]
fn labels_and_test_sizes_match_the_official_dataset_classes() {
    use hrnet_ocr::data::official::TestPreparation;
    use hrnet_ocr::infer::OfficialTest;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets");
    // (folder, dataset, list, classes, ignore label (-1 as u32::MAX), base size, crop)
    let cases = [
        ("cityscapes", Official::Cityscapes, "list/cityscapes/val.lst", 19, 255, 40, [24, 40]),
        ("lip", Official::Lip, "list/lip/testvalList.txt", 20, 255, 24, [24, 24]),
        ("pascal_ctx59", Official::PascalContext, "testval.txt", 59, u32::MAX, 24, [24, 24]),
        ("pascal_ctx60", Official::PascalContext, "testval.txt", 60, u32::MAX, 24, [24, 24]),
        ("ade20k", Official::Ade20k, "list/ade20k/testval.lst", 150, 255, 24, [24, 24]),
        ("cocostuff", Official::CocoStuff, "list/cocostuff/testval.lst", 171, 255, 24, [24, 24]),
    ];
    for (folder, dataset, list, classes, ignore, base_size, crop) in cases {
        let root = fixtures.join(folder);
        let bytes = std::fs::read(root.join("official.safetensors")).unwrap();
        let official = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let int32s = |name: &str| -> Vec<i32> {
            let t = official.tensor(name).unwrap_or_else(|e| panic!("{folder} {name}: {e}"));
            t.data().chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        };
        let set = Folder::official(&root, dataset, list, classes, ignore).unwrap();
        let test = OfficialTest {
            dataset,
            base_size,
            crop,
            scales: vec![1.0],
            flip: false,
            preparation: dataset.test_preparation(list),
        };
        for i in 0..set.len() {
            let scene = set.get(i).unwrap();
            let want: Vec<u32> = int32s(&format!("labels.{i}")).into_iter().map(|v| v as u32).collect();
            assert_eq!(scene.labels, want, "{folder} image {i}: labels");
            let size = [scene.image.height, scene.image.width];
            let prepared = match test.preparation {
                TestPreparation::AsIs => size,
                TestPreparation::ResizeToCrop => crop,
                TestPreparation::ShortSide { .. } | TestPreparation::ShortSideWithLabels => {
                    let (resized, pad) = test.short_side_size(size);
                    [resized[0] + pad[0], resized[1] + pad[1]]
                }
            };
            let shape = int32s(&format!("image_shape.{i}"));
            assert_eq!([shape[1] as usize, shape[2] as usize], prepared, "{folder} image {i}: prepared size");
        }
    }
}

/// PASCAL-Context with 59 classes reduces a zero label to 255 (`0 - 1` in 8 bits) under
/// `IGNORE_LABEL: -1`: the official evaluation leaves it out as past the classes, and its
/// training would index past them. Training ignores it (the recipe of a YAML naming the
/// dataset says so); any other label past the classes is still refused, naming the file.
#[test]
fn a_reduced_zero_label_trains_as_ignored() {
    use hrnet_ocr::train::recipe::RunSettings;
    let root = scratch("reduced-zero");
    let mut rng = SplitMix::new(seed());
    let (w, h) = (8, 6);
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("labels")).unwrap();
    let raw: Vec<u32> = (0..w * h).map(|i| if i % 3 == 0 { 0 } else { rng.below(60) as u32 }).collect();
    let image = random_image(&mut rng, w, h);
    images::write_rgb(&root.join("images/0.png"), &image).unwrap();
    let map = LabelMap { width: w, height: h, labels: raw.clone() };
    images::write_palette_labels(&root.join("labels/0.png"), &map, &images::official_palette()).unwrap();
    std::fs::write(root.join("train"), "images/0.png labels/0.png\n").unwrap();
    let mut cfg = hrnet_ocr::model::Config::load("w18-small-v2").unwrap();
    (cfg.num_classes, cfg.ignore_label) = (59, -1);
    cfg.dataset.name = Some("pascal_ctx".into());
    cfg.dataset.train_multi_scale = false;
    cfg.dataset.train_flip = false;
    let settings = RunSettings { crop: [h, w], ..RunSettings::default() };
    let recipe = settings.augment(&cfg).unwrap();
    assert_eq!(recipe.reduced_zero, Some(255));
    let set = Folder::official(&root, Official::PascalContext, "train", 59, u32::MAX).unwrap();
    let batches =
        Batches { dataset: &set, recipe: recipe.clone(), seed: 1, batch: 1, classes: 59, shuffle: true };
    let sample = batches.get(0).unwrap().remove(0);
    let want: Vec<u32> = raw.iter().map(|&l| if l == 0 { u32::MAX } else { l - 1 }).collect();
    assert_eq!(sample.labels, want);
    // Without the reduction the same zero labels are past the classes: refused by file.
    let plain = Batches { recipe: Augment { reduced_zero: None, ..recipe }, ..batches };
    let err = plain.get(0).unwrap_err().to_string();
    assert!(
        err.contains("labels/0.png") && err.contains("label 255") && err.contains("ignore label -1"),
        "{err}"
    );
}
