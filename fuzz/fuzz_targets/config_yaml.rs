//! Official-style experiment YAML files (the config reader and its YAML subset). Bytes that
//! are not UTF-8 are read lossily, as `tests/fuzz.rs` does. An error is fine; a panic, a
//! hang or a huge allocation is a bug.
#![no_main]

hrnet_ocr_fuzz::limit_memory!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hrnet_ocr::model::Config::from_yaml(&String::from_utf8_lossy(data), "fuzz.yaml");
});
