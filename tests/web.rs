//! The kernel suite in a browser: every kernel family forward and backward against the
//! native suite's fixtures and tolerances (the same test bodies, awaited here), and the
//! bundled model's forward against its native logits, on the browser's WebGPU adapter.
//! Chrome compiles the shaders with its own WGSL compiler (Tint), not naga. Run by
//! `tools/web/test.sh` (`cargo test --target wasm32-unknown-unknown --test web` under
//! headless Chromium); natively this file is empty.
#![cfg(target_arch = "wasm32")]

use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

#[path = "kernels/common.rs"]
#[allow(dead_code)]
mod common;
#[path = "kernels/softmax.rs"]
#[allow(dead_code)]
mod softmax;

/// The fixture files, built into the test module (a page has no file system).
fn embedded_fixture(file: &str) -> &'static [u8] {
    macro_rules! fixtures {
        ($($name:literal),* $(,)?) => {
            match file {
                $($name => include_bytes!(concat!("fixtures/", $name)),)*
                other => panic!("{other} is not built into the browser suite (tests/web.rs)"),
            }
        };
    }
    fixtures!["softmax.safetensors"]
}

/// A test body of the native suite, awaited on the page's device.
macro_rules! in_browser {
    ($($test:ident => $body:path),* $(,)?) => {
        $(
            #[wasm_bindgen_test]
            async fn $test() {
                common::open_gpu().await;
                $body().await;
            }
        )*
    };
}

in_browser! {
    softmax_matches_pytorch_fixtures => softmax::fixture_cases,
}
