//! Bad input comes back as an error that names what was wrong, never a panic.

use crate::common::*;
use hrnet_ocr::kernels::batch_norm::{self, BatchNormParams};
use hrnet_ocr::kernels::conv2d::Conv2dSpec;
use hrnet_ocr::kernels::tuning::ConvForward;
use hrnet_ocr::kernels::{conv2d, elementwise};
use hrnet_ocr::{Error, Tensor};

fn message(e: Error) -> String {
    e.to_string()
}

#[test]
fn shape_errors_name_both_shapes() {
    let gpu = gpu();
    let x = poisoned(&[1, 3, 8, 8]);
    let w = poisoned(&[4, 5, 3, 3]);
    let y = poisoned(&[1, 4, 8, 8]);
    let e = message(conv2d::forward(gpu, &Conv2dSpec::square(1, 1, 1), &x, &w, None, &y).unwrap_err());
    assert!(e.contains("[4, 3, 3, 3]") && e.contains("[4, 5, 3, 3]"), "{e}");
    let w = poisoned(&[4, 3, 3, 3]);
    let wrong_y = poisoned(&[1, 4, 7, 8]);
    let e = message(conv2d::forward(gpu, &Conv2dSpec::square(1, 1, 1), &x, &w, None, &wrong_y).unwrap_err());
    assert!(e.contains("conv2d output") && e.contains("[1, 4, 8, 8]") && e.contains("[1, 4, 7, 8]"), "{e}");
    let e = message(
        elementwise::add_forward(gpu, &x, &poisoned(&[1, 3, 8, 9]), &poisoned(&[1, 3, 8, 8])).unwrap_err(),
    );
    assert!(e.contains("[1, 3, 8, 8]") && e.contains("[1, 3, 8, 9]"), "{e}");
}

#[test]
fn impossible_convolutions_are_refused() {
    let spec = Conv2dSpec::square(0, 0, 1);
    assert!(message(spec.output_size(8, 8, 3, 3).unwrap_err()).contains("stride"));
    let e = message(Conv2dSpec::square(1, 0, 1).output_size(2, 8, 3, 3).unwrap_err());
    assert!(e.contains("3x3") && e.contains("2x8"), "{e}");
}

#[test]
fn in_place_kernels_are_refused() {
    let gpu = gpu();
    let x = poisoned(&[1, 2, 4, 4]);
    let e = message(elementwise::relu_forward(gpu, &x, &x).unwrap_err());
    assert!(e.contains("relu_forward") && e.contains("same tensor"), "{e}");
}

#[test]
fn training_batch_norm_needs_two_values_per_channel() {
    let gpu = gpu();
    let c = 3;
    let params: Vec<Tensor> = (0..4).map(|_| poisoned(&[c])).collect();
    let bn = BatchNormParams {
        gamma: &params[0],
        beta: &params[1],
        running_mean: &params[2],
        running_var: &params[3],
        eps: 1e-5,
        momentum: 0.1,
    };
    let x = poisoned(&[1, c, 1, 1]);
    let saved = poisoned(&batch_norm::saved_shape(c));
    let e = message(batch_norm::forward_train(gpu, &x, &bn, &saved, &poisoned(&[1, c, 1, 1])).unwrap_err());
    assert!(e.contains("more than one value per channel") && e.contains("[1, 3, 1, 1]"), "{e}");
}

#[test]
fn tensors_beyond_the_buffer_limit_are_refused_with_the_limit() {
    let gpu = gpu();
    let limit = gpu.limits().max_buffer_size;
    let elements = (limit / 4 + 1) as usize;
    let e = message(Tensor::empty(gpu, &[elements]).unwrap_err());
    assert!(e.contains(&limit.to_string()) && e.contains(&format!("[{elements}]")), "{e}");
    let e = message(Tensor::from_slice(gpu, &[2, 3], &[1.0; 5]).unwrap_err());
    assert!(e.contains("5 values") && e.contains("[2, 3]"), "{e}");
    assert!(message(Tensor::empty(gpu, &[0, 3]).unwrap_err()).contains("no elements"));
}

/// The profiler times each dispatch on the device, or says why it cannot.
#[test]
fn profiler_times_every_dispatch_or_explains() {
    let gpu = gpu();
    let x = upload(&[1, 8, 32, 32], &vec![0.5; 8 * 32 * 32]);
    let w = upload(&[8, 8, 3, 3], &vec![0.1; 8 * 8 * 9]);
    let y = poisoned(&[1, 8, 32, 32]);
    let spec = Conv2dSpec::square(1, 1, 1);
    let mut d = conv2d::forward(gpu, &spec, &x, &w, None, &y).unwrap().into_vec();
    d.extend(elementwise::relu_forward(gpu, &y, &x).unwrap());
    match gpu.profile(&d.iter().collect::<Vec<_>>()) {
        Ok(t) => {
            let labels: Vec<_> = t.iter().map(|k| k.label).collect();
            // The forward is whichever variant the adapter defaults to for so small a shape.
            let forward = ConvForward::default_for(gpu).entry(false);
            assert_eq!(labels, ["conv2d_pack_weight", forward, "relu_forward"]);
            assert!(t.iter().all(|k| k.nanoseconds.is_finite() && k.nanoseconds >= 0.0), "{t:?}");
            assert!(t[1].nanoseconds > 0.0, "a 8x8x3x3 convolution took no time: {t:?}");
        }
        Err(e) => {
            assert!(!gpu.has_timestamps());
            assert!(e.to_string().contains("TIMESTAMP_QUERY"), "{e}");
        }
    }
    assert!(download(&y).iter().all(|v| v.is_finite()), "the profiled run computed the convolution");
}

#[test]
fn adapter_errors_name_the_cause() {
    use hrnet_ocr::GpuOptions;
    let missing = GpuOptions { adapter_name: Some("no-such-adapter-xyz".into()), ..GpuOptions::default() };
    let e = message(hrnet_ocr::Gpu::with_options(&missing).err().expect("no adapter has that name"));
    assert!(e.contains("no-such-adapter-xyz") && e.contains(&gpu().info().name), "{e}");
    if cfg!(target_os = "linux") {
        // Linux has no Metal adapter: the error says how to get a driver.
        let none = GpuOptions { backends: Some(wgpu::Backends::METAL), ..GpuOptions::default() };
        let e = message(hrnet_ocr::Gpu::with_options(&none).err().expect("no Metal on Linux"));
        assert!(e.contains("mesa-vulkan-drivers"), "{e}");
    }
}

/// A lost device (destroyed here; a driver reset or a removed GPU look the same to wgpu)
/// makes every later call an error that says so, never a panic.
#[test]
fn a_lost_device_gives_errors_not_panics() {
    let gpu = hrnet_ocr::Gpu::new().unwrap();
    let x = Tensor::from_slice(&gpu, &[4, 8], &[1.0; 32]).unwrap();
    let y = Tensor::empty(&gpu, &[4, 8]).unwrap();
    let relu = elementwise::relu_forward(&gpu, &x, &y).unwrap();
    gpu.run(&relu).unwrap();
    gpu.device().destroy();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let run = gpu.run(&relu).and_then(|_| y.to_vec(&gpu));
        let fresh = Tensor::from_slice(&gpu, &[4, 8], &[2.0; 32]).and_then(|t| t.to_vec(&gpu));
        (run.map(|_| ()), fresh.map(|_| ()))
    }));
    let (run, fresh) = outcome.expect("no panic after the device is lost");
    for (what, r) in [("running a kernel", run), ("a new tensor", fresh)] {
        let e = message(r.expect_err(what));
        assert!(e.to_lowercase().contains("lost"), "{what}: {e}");
    }
}
