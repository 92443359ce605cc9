//! Single-channel label PNGs (8 or 16 bit). An error is fine; a panic, a hang or a huge
//! allocation is a bug (a decoder panic that `images` catches and returns as an error is
//! not one).
#![no_main]

hrnet_ocr_fuzz::limit_memory!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hrnet_ocr_fuzz::allow_caught_panics();
    let _ = hrnet_ocr::images::decode_labels(data, "fuzz.png");
});
