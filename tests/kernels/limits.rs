//! Shapes that cross the device's dispatch limits: more workgroups than one grid
//! dimension takes (65535) are folded into two dimensions, and every element is still
//! computed exactly once.

use crate::common::*;
use hrnet_ocr::kernels::conv2d::{self, Conv2dSpec, Precision};
use hrnet_ocr::kernels::elementwise;
use hrnet_ocr::kernels::tuning::ConvForward;

#[test]
fn grids_beyond_one_dimension_are_folded() {
    let gpu = gpu();
    let max = gpu.limits().max_compute_workgroups_per_dimension as usize;
    let wg = gpu.workgroup_size() as usize;
    let mut rng = Rng::new(seed("grids_beyond_one_dimension_are_folded"));

    // ReLU over more elements than max x workgroup-size invocations.
    let len = (max + 1000) * wg + 7;
    let x = rng.normals(len);
    let (xt, y) = (upload(&[len], &x), poisoned(&[len]));
    let [d] = <[_; 1]>::try_from(elementwise::relu_forward(gpu, &xt, &y).unwrap()).unwrap();
    assert!(d.workgroups().0[1] > 1, "{:?} should be folded", d.workgroups());
    gpu.run([&d]).unwrap();
    let got = download(&y);
    let wrong = got.iter().zip(&x).position(|(g, v)| *g != v.max(0.0));
    assert_eq!(wrong, None, "relu over {len} elements in {:?}", d.workgroups());

    // A 1x1 convolution whose pixel blocks (4 x workgroup size pixels each, the 4-pixel
    // register tiles) outnumber a grid dimension.
    let (h, w) = (4 * wg, max + 500);
    let x = rng.normals(h * w);
    let (weight, bias) = ([rng.normal()], [rng.normal()]);
    let (xt, wt, bt) = (upload(&[1, 1, h, w], &x), upload(&[1, 1, 1, 1], &weight), upload(&[1], &bias));
    let y = poisoned(&[1, 1, h, w]);
    let epilogue = conv2d::Epilogue { bias: Some(&bt), ..Default::default() };
    let spec = Conv2dSpec::square(1, 0, 1);
    let ds =
        conv2d::forward_with(gpu, &spec, &xt, &wt, &epilogue, Precision::F32, ConvForward::Registers, &y)
            .unwrap();
    assert!(ds.pairs[0].1.workgroups().0[1] > 1, "{ds:?} should be folded");
    gpu.run(&ds.into_vec()).unwrap();
    let got = download(&y);
    let want: Vec<f32> = x.iter().map(|v| weight[0] * v + bias[0]).collect();
    assert_close(&format!("1x1 conv over {h}x{w}"), &got, &want, 1e-6);

    // The wide tiles' channel groups (16 output channels each) outnumbering it: a 1x1 map
    // keeps the output small.
    let co = 16 * (max + 500);
    let (x, weight) = ([rng.normal()], rng.normals(co));
    let (xt, wt) = (upload(&[1, 1, 1, 1], &x), upload(&[co, 1, 1, 1], &weight));
    let y = poisoned(&[1, co, 1, 1]);
    let wide = ConvForward::RegistersWide;
    let ds =
        conv2d::forward_with(gpu, &spec, &xt, &wt, &Default::default(), Precision::F32, wide, &y).unwrap();
    assert!(ds.pairs[0].1.workgroups().0[1] > 1, "{ds:?} should be folded");
    gpu.run(&ds.into_vec()).unwrap();
    let want: Vec<f32> = weight.iter().map(|w| w * x[0]).collect();
    assert_close(&format!("1x1 conv to {co} channels"), &download(&y), &want, 1e-6);
}
