//! Safetensors weights and training checkpoints. An error is fine; a panic, a hang or a
//! huge allocation is a bug.
#![no_main]

hrnet_ocr_fuzz::limit_memory!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hrnet_ocr::model::weights::from_safetensors_bytes(data, "fuzz.safetensors");
});
