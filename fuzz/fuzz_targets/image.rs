//! PNG and JPEG images decoded as 8-bit RGB. An error is fine; a panic, a hang or a huge
//! allocation is a bug (a decoder panic that `images` catches and returns as an error is
//! not one).
#![no_main]

hrnet_ocr_fuzz::limit_memory!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hrnet_ocr_fuzz::allow_caught_panics();
    let _ = hrnet_ocr::images::decode_rgb(data, "fuzz.png");
});
