//! The kernel suite in a browser: every kernel family forward and backward against the
//! native suite's fixtures and tolerances (the same test bodies, awaited here instead of
//! blocked on), and the bundled model's forward against the native engine's logits, on
//! the browser's WebGPU adapter. Chrome compiles the shaders with its own WGSL compiler
//! (Tint), not naga, and its limits (256 invocations a workgroup, no f16) pick the variant
//! fallbacks. `tools/web/test.sh` runs it (`cargo test --target wasm32-unknown-unknown
//! --test web` under headless Chromium); natively this file is empty.
#![cfg(target_arch = "wasm32")]

use hrnet_ocr::images;
use hrnet_ocr::infer::{Segmenter, Strategy};
use hrnet_ocr::model::{weights, Config};
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

#[path = "kernels/batch_norm.rs"]
#[allow(dead_code, unused_imports)]
mod batch_norm;
/// The native suite's modules whose bodies run here; their other tests are native only.
#[path = "kernels/common.rs"]
#[allow(dead_code, unused_imports)]
mod common;
#[path = "kernels/conv2d.rs"]
#[allow(dead_code, unused_imports)]
mod conv2d;
#[path = "kernels/elementwise.rs"]
#[allow(dead_code, unused_imports)]
mod elementwise;
#[path = "kernels/graph.rs"]
#[allow(dead_code, unused_imports)]
mod graph;
#[path = "kernels/heads.rs"]
#[allow(dead_code, unused_imports)]
mod heads;
#[path = "kernels/loss.rs"]
#[allow(dead_code, unused_imports)]
mod loss;
#[path = "kernels/matmul.rs"]
#[allow(dead_code, unused_imports)]
mod matmul;
#[path = "kernels/ocr.rs"]
#[allow(dead_code, unused_imports)]
mod ocr;
#[path = "kernels/resize.rs"]
#[allow(dead_code, unused_imports)]
mod resize;
#[path = "kernels/softmax.rs"]
#[allow(dead_code, unused_imports)]
mod softmax;
#[path = "kernels/training.rs"]
#[allow(dead_code, unused_imports)]
mod training;

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
    fixtures![
        "batch_norm.safetensors",
        "concat.safetensors",
        "context_heads.safetensors",
        "conv2d.safetensors",
        "dropout.safetensors",
        "elementwise.safetensors",
        "losses.safetensors",
        "matmul.safetensors",
        "metrics.safetensors",
        "object_attention.safetensors",
        "residual_block.safetensors",
        "resize.safetensors",
        "sgd.safetensors",
        "softmax.safetensors",
        "spatial_gather.safetensors",
        "web/scene_logits.safetensors",
    ]
}

/// Test bodies of the native suite (`module::test_body`), each awaited on the page's device
/// as a test of the same name.
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
    batch_norm_matches_pytorch_fixtures => batch_norm::batch_norm_matches_pytorch_fixtures_body,
    conv2d_matches_pytorch_fixtures => conv2d::conv2d_matches_pytorch_fixtures_body,
    elementwise_matches_pytorch_fixtures => elementwise::elementwise_matches_pytorch_fixtures_body,
    residual_block_matches_pytorch_forward_and_every_gradient => graph::residual_block_matches_pytorch_forward_and_every_gradient_body,
    parameter_gradients_accumulate_until_zeroed => graph::parameter_gradients_accumulate_until_zeroed_body,
    eval_graph_uses_running_statistics => graph::eval_graph_uses_running_statistics_body,
    every_context_head_matches_pytorch_forward_and_backward => heads::every_context_head_matches_pytorch_forward_and_backward_body,
    cross_entropy_matches_pytorch_fixtures => loss::cross_entropy_matches_pytorch_fixtures_body,
    ohem_matches_pytorch_fixtures => loss::ohem_matches_pytorch_fixtures_body,
    matmul_matches_pytorch_fixtures => matmul::matmul_matches_pytorch_fixtures_body,
    spatial_gather_matches_pytorch_fixtures => ocr::spatial_gather_matches_pytorch_fixtures_body,
    object_attention_matches_pytorch_fixtures => ocr::object_attention_matches_pytorch_fixtures_body,
    resize_matches_pytorch_fixtures => resize::resize_matches_pytorch_fixtures_body,
    concat_matches_pytorch_fixtures => resize::concat_matches_pytorch_fixtures_body,
    softmax_matches_pytorch_fixtures => softmax::softmax_matches_pytorch_fixtures_body,
    sgd_matches_pytorch_fixtures => training::sgd_matches_pytorch_fixtures_body,
    argmax_and_confusion_match_pytorch_fixtures_exactly => training::argmax_and_confusion_match_pytorch_fixtures_exactly_body,
    dropout_matches_pytorch_fixtures => training::dropout_matches_pytorch_fixtures_body,
}

/// The bundled model's whole-image forward on the page's WebGPU adapter: its logits of
/// `assets/scene.png` within the model suite's 1e-4 of the native engine's
/// (`examples/record_native_logits.rs`), and every pixel's class the same.
#[wasm_bindgen_test]
async fn bundled_model_matches_native_logits() {
    common::open_gpu().await;
    let config =
        Config::from_yaml(include_str!("../models/procedural.yaml"), "models/procedural.yaml").unwrap();
    let weights = weights::from_safetensors_bytes(
        include_bytes!("../models/procedural.safetensors"),
        "models/procedural.safetensors",
    )
    .unwrap();
    let image = images::decode_rgb(include_bytes!("../assets/scene.png"), "assets/scene.png").unwrap();
    let classes = config.num_classes;
    let mut segmenter = Segmenter::new(common::gpu(), config, weights::normalised(weights));
    segmenter.keep_scores(true);
    let segmentation = segmenter.segment_async(&image, &Strategy::Whole).await.unwrap();
    let logits = segmentation.scores.expect("kept scores");
    let native = common::Fixture::load("web/scene_logits.safetensors");
    let want = native.get("logits");
    common::assert_close("scene logits", &logits, want, 1e-4);
    let pixels = image.width * image.height;
    let argmax =
        |l: &[f32], p: usize| (0..classes).max_by(|&a, &b| l[a * pixels + p].total_cmp(&l[b * pixels + p]));
    let differing =
        (0..pixels).filter(|&p| argmax(want, p) != Some(segmentation.classes[p] as usize)).count();
    assert_eq!(differing, 0, "{differing} of {pixels} pixels classed unlike the native engine");
}

/// Every registered shader the adapter can run (the f16 variants need `shader-f16`, which
/// the browser may lack), compiled by the browser's own WGSL compiler, and a pipeline of
/// every entry point: each error names the shader, the entry point and the compiler's
/// message with its line.
#[wasm_bindgen_test]
async fn every_shader_compiles_in_the_browser() {
    common::open_gpu().await;
    let gpu = common::gpu();
    let device = gpu.device();
    let (mut errors, mut compiled, mut pipelines, mut skipped) = (Vec::new(), 0, 0, Vec::new());
    for shader in hrnet_ocr::gpu::Shader::ALL {
        if (shader.needs_f16() && !gpu.supports_f16())
            || (shader.needs_subgroups() && !gpu.supports_subgroups())
        {
            skipped.push(shader.name());
            continue;
        }
        let source = shader.source().unwrap();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader.name()),
            source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
        });
        let info = module.get_compilation_info().await;
        for message in info.messages.iter().filter(|m| m.message_type == wgpu::CompilationMessageType::Error)
        {
            let line = message.location.map_or(0, |l| l.line_number);
            errors.push(format!("{} line {line}: {}", shader.name(), message.message));
        }
        if let Some(e) = scope.pop().await {
            errors.push(format!("{}: {e}", shader.name()));
            continue;
        }
        compiled += 1;
        let entries =
            naga::front::wgsl::parse_str(&source).expect("naga parses what the native suite validates");
        for entry in &entries.entry_points {
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let _pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&entry.name),
                layout: None,
                module: &module,
                entry_point: Some(&entry.name),
                compilation_options: Default::default(),
                cache: None,
            });
            match scope.pop().await {
                Some(e) => errors.push(format!("{}:{}: {e}", shader.name(), entry.name)),
                None => pipelines += 1,
            }
        }
    }
    wasm_bindgen_test::console_log!(
        "{compiled} shaders, {pipelines} pipelines compiled by the browser; features {:?}; not run here: {skipped:?}",
        gpu.features()
    );
    assert!(errors.is_empty(), "the browser's WGSL compiler rejected:\n{}", errors.join("\n"));
    assert!(compiled >= hrnet_ocr::gpu::Shader::ALL.len() / 2, "only {compiled} shaders ran");
}
