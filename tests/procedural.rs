//! The procedural scene dataset: deterministic, every class present, labels in range.

use hrnet_ocr::data::procedural::{scene, CLASSES};

#[test]
fn scenes_are_deterministic_and_differ_by_seed_and_index() {
    let a = scene(7, 3, 96, 64);
    let b = scene(7, 3, 96, 64);
    assert_eq!((a.image.rgb.clone(), a.labels.clone()), (b.image.rgb, b.labels));
    assert_ne!(a.labels, scene(8, 3, 96, 64).labels);
    assert_ne!(a.labels, scene(7, 4, 96, 64).labels);
    assert_eq!(
        (a.image.width, a.image.height, a.image.rgb.len(), a.labels.len()),
        (96, 64, 3 * 96 * 64, 96 * 64)
    );
}

#[test]
fn every_class_appears_and_labels_are_in_range() {
    let mut counts = vec![0usize; CLASSES.len()];
    for i in 0..20 {
        for &l in &scene(1, i, 64, 48).labels {
            counts[l as usize] += 1;
        }
    }
    assert!(counts.iter().all(|&c| c > 0), "class pixel counts {counts:?}");
    // Objects cover a real share of the pixels, but not all of them.
    let total: usize = counts.iter().sum();
    assert!(counts[0] * 10 > total && counts[0] * 10 < 9 * total, "background share {counts:?}");
}
