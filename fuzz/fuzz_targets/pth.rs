//! PyTorch checkpoints (`.pth`: legacy pickle stream or zip archive). An error is fine; a
//! panic, a hang or a huge allocation is a bug.
#![no_main]

hrnet_ocr_fuzz::limit_memory!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hrnet_ocr::formats::pth::parse_pth(data, "fuzz.pth");
});
