//! mmsegmentation's OCRNet checkpoints for HRNet backbones (`ocrnet_hr18s`, `ocrnet_hr18`,
//! `ocrnet_hr48` of its model zoo): a `CascadeEncoderDecoder` whose `backbone` is the same
//! HRNet, `decode_head.0` an `FCNHead` giving the soft object regions (the official
//! `aux_head`) and `decode_head.1` an `OCRHead` (the official `conv3x3_ocr`,
//! `ocr_distri_head` and `cls_head`). [`KEY_MAP`] renames their tensors to the official
//! names, and the model then follows [`Convention::Mmsegmentation`] for the few places where
//! the two implementations compute differently.

use super::config::{Config, Convention};
use super::weights::NamedTensor;
use crate::error::{Error, Result};

/// mmsegmentation name prefix -> official prefix; the rest of a name (`weight`, `bias`,
/// `running_mean`, `running_var`) is kept. mmsegmentation's `ConvModule` names its parts
/// `conv` and `bn`, where the official head numbers a `Sequential` (`BNReLU` nesting the norm
/// one level deeper). The backbone's names are the official ones under `backbone.`.
pub const KEY_MAP: [(&str, &str); 20] = [
    ("decode_head.0.convs.0.conv.", "aux_head.0."),
    ("decode_head.0.convs.0.bn.", "aux_head.1."),
    ("decode_head.0.conv_seg.", "aux_head.3."),
    ("decode_head.1.bottleneck.conv.", "conv3x3_ocr.0."),
    ("decode_head.1.bottleneck.bn.", "conv3x3_ocr.1."),
    ("decode_head.1.conv_seg.", "cls_head."),
    (
        "decode_head.1.object_context_block.query_project.0.conv.",
        "ocr_distri_head.object_context_block.f_pixel.0.",
    ),
    (
        "decode_head.1.object_context_block.query_project.0.bn.",
        "ocr_distri_head.object_context_block.f_pixel.1.0.",
    ),
    (
        "decode_head.1.object_context_block.query_project.1.conv.",
        "ocr_distri_head.object_context_block.f_pixel.2.",
    ),
    (
        "decode_head.1.object_context_block.query_project.1.bn.",
        "ocr_distri_head.object_context_block.f_pixel.3.0.",
    ),
    (
        "decode_head.1.object_context_block.key_project.0.conv.",
        "ocr_distri_head.object_context_block.f_object.0.",
    ),
    (
        "decode_head.1.object_context_block.key_project.0.bn.",
        "ocr_distri_head.object_context_block.f_object.1.0.",
    ),
    (
        "decode_head.1.object_context_block.key_project.1.conv.",
        "ocr_distri_head.object_context_block.f_object.2.",
    ),
    (
        "decode_head.1.object_context_block.key_project.1.bn.",
        "ocr_distri_head.object_context_block.f_object.3.0.",
    ),
    (
        "decode_head.1.object_context_block.value_project.conv.",
        "ocr_distri_head.object_context_block.f_down.0.",
    ),
    (
        "decode_head.1.object_context_block.value_project.bn.",
        "ocr_distri_head.object_context_block.f_down.1.0.",
    ),
    ("decode_head.1.object_context_block.out_project.conv.", "ocr_distri_head.object_context_block.f_up.0."),
    ("decode_head.1.object_context_block.out_project.bn.", "ocr_distri_head.object_context_block.f_up.1.0."),
    ("decode_head.1.object_context_block.bottleneck.conv.", "ocr_distri_head.conv_bn_dropout.0."),
    ("decode_head.1.object_context_block.bottleneck.bn.", "ocr_distri_head.conv_bn_dropout.1.0."),
];

/// The prefix of every backbone tensor in an mmsegmentation checkpoint.
const BACKBONE: &str = "backbone.";

/// Whether `tensors` are named as an mmsegmentation model's (`backbone.*`, `decode_head.*`).
pub fn is_mmsegmentation(tensors: &[NamedTensor]) -> bool {
    tensors.iter().any(|t| t.name.starts_with(BACKBONE) || t.name.starts_with("decode_head."))
}

/// The official name of an mmsegmentation tensor, if [`KEY_MAP`] has one.
pub fn official_name(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix(BACKBONE) {
        return Some(rest.to_string());
    }
    KEY_MAP.iter().find_map(|(mm, official)| name.strip_prefix(mm).map(|rest| format!("{official}{rest}")))
}

/// `tensors` under their official names, in the same order. A name outside the map (an
/// `auxiliary_head`, another head's tensors) is an error naming each.
pub fn to_official(tensors: Vec<NamedTensor>, source: &str) -> Result<Vec<NamedTensor>> {
    let (mut renamed, mut unmapped) = (Vec::with_capacity(tensors.len()), Vec::new());
    for t in tensors {
        match official_name(&t.name) {
            Some(name) => renamed.push(NamedTensor { name, ..t }),
            None => unmapped.push(t.name),
        }
    }
    if !unmapped.is_empty() {
        return Err(Error::Format {
            path: source.to_string(),
            what: format!(
                "an mmsegmentation checkpoint, but {} tensor(s) are not of an OCRNet with an HRNet backbone \
                 (backbone.*, decode_head.0 FCNHead, decode_head.1 OCRHead): {}",
                unmapped.len(),
                unmapped[..unmapped.len().min(8)].join(", ")
            ),
        });
    }
    Ok(renamed)
}

/// Prepares checkpoint tensors for a model of `config`: an mmsegmentation checkpoint's are
/// renamed ([`to_official`]) and `config` then follows [`Convention::Mmsegmentation`];
/// official tensors pass unchanged and leave `config` as it is.
pub fn adopt(config: &mut Config, tensors: Vec<NamedTensor>, source: &str) -> Result<Vec<NamedTensor>> {
    if !is_mmsegmentation(&tensors) {
        return Ok(tensors);
    }
    let renamed = to_official(tensors, source)?;
    config.follow(Convention::Mmsegmentation);
    Ok(renamed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_map_is_one_to_one_between_whole_module_prefixes() {
        for (mm, official) in KEY_MAP {
            assert!(mm.starts_with("decode_head.") && mm.ends_with('.') && official.ends_with('.'), "{mm}");
            // No prefix may shadow a later one (the first match wins).
            assert_eq!(
                KEY_MAP.iter().filter(|(m, _)| m.starts_with(mm) || mm.starts_with(m)).count(),
                1,
                "{mm}"
            );
        }
        let officials: std::collections::HashSet<_> = KEY_MAP.iter().map(|(_, o)| o).collect();
        assert_eq!(officials.len(), KEY_MAP.len(), "two prefixes map to one official name");
    }

    #[test]
    fn names_map_with_their_suffix_and_unknown_ones_are_named_in_the_error() {
        let t = |name: &str| NamedTensor { name: name.into(), shape: vec![1], data: vec![0.0] };
        let mapped = to_official(
            vec![
                t("backbone.stage2.0.fuse_layers.0.1.1.running_var"),
                t("decode_head.1.object_context_block.key_project.1.bn.weight"),
            ],
            "x.pth",
        )
        .unwrap();
        let names: Vec<_> = mapped.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "stage2.0.fuse_layers.0.1.1.running_var",
                "ocr_distri_head.object_context_block.f_object.3.0.weight"
            ]
        );
        let err = to_official(vec![t("backbone.conv1.weight"), t("auxiliary_head.conv_seg.weight")], "x.pth")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.pth") && err.contains("auxiliary_head.conv_seg.weight"), "{err}");
    }
}
