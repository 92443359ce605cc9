//! Reductions use no atomics: the same inputs give bit-identical outputs run after run.

use crate::common::*;
use hrnet_ocr::graph::{GraphBuilder, Mode};
use hrnet_ocr::kernels::conv2d::Conv2dSpec;

#[test]
fn training_step_is_bit_reproducible() {
    let gpu = gpu();
    let mut rng = Rng::new(seed("training_step_is_bit_reproducible"));
    // Large enough that the weight-gradient and batch-norm reductions are split in chunks.
    let shape = [2, 8, 96, 80];
    let mut g = GraphBuilder::new();
    let x = g.input("x", &shape, true);
    let h = g.conv2d("conv", x, [3, 3], 8, true, Conv2dSpec::square(1, 1, 1)).unwrap();
    let h = g.batch_norm("bn", h).unwrap();
    let out = g.add_relu(h, x).unwrap();
    let graph = g.build(gpu, Mode::Train, &[out]).unwrap();
    let inputs: Vec<(&str, Vec<f32>)> = [
        ("x", 2 * 8 * 96 * 80),
        ("conv.weight", 8 * 8 * 9),
        ("conv.bias", 8),
        ("bn.weight", 8),
        ("bn.bias", 8),
    ]
    .into_iter()
    .map(|(name, len)| (name, rng.normals(len)))
    .collect();
    let grad_out = rng.normals(shape.iter().product());
    let results = [0, 1].map(|_| {
        for (name, data) in &inputs {
            graph.set(gpu, name, data).unwrap();
        }
        graph.set(gpu, "bn.running_mean", &[0.0; 8]).unwrap();
        graph.set(gpu, "bn.running_var", &[1.0; 8]).unwrap();
        graph.zero_grads(gpu).unwrap();
        graph.forward(gpu).unwrap();
        graph.output_grad(0).unwrap().write(gpu, &grad_out).unwrap();
        graph.backward(gpu).unwrap();
        ["x", "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_var"]
            .map(|name| {
                let t = if name.starts_with("bn.running") { graph.tensor(name) } else { graph.grad(name) };
                download(t.unwrap()).iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            })
            .into_iter()
            .chain([download(graph.output(0)).iter().map(|v| v.to_bits()).collect()])
            .collect::<Vec<_>>()
    });
    for (i, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
        assert!(a.iter().all(|&v| f32::from_bits(v).is_finite()), "result {i} has non-finite values");
        assert_eq!(a, b, "result {i} differs between two identical runs");
    }
}
