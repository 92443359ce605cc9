use crate::common::*;
use hrnet_ocr::graph::{Graph, GraphBuilder, Mode};
use hrnet_ocr::kernels::conv2d::Conv2dSpec;

/// conv -> BN -> ReLU -> conv -> BN -> add residual -> ReLU, as in HRNet's BasicBlock.
fn residual_block(shape: [usize; 4], mode: Mode) -> Graph {
    let c = shape[1];
    let same = Conv2dSpec::square(1, 1, 1);
    let mut g = GraphBuilder::new();
    let x = g.input("x", &shape, true);
    let h = g.conv2d("conv1", x, [3, 3], c, false, same).unwrap();
    let h = g.batch_norm("bn1", h).unwrap();
    let h = g.relu(h);
    let h = g.conv2d("conv2", h, [3, 3], c, false, same).unwrap();
    let h = g.batch_norm("bn2", h).unwrap();
    let out = g.add_relu(h, x).unwrap();
    g.build(gpu(), mode, &[out]).unwrap()
}

const STATE: [&str; 9] = [
    "x",
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "conv2.weight",
    "bn2.weight",
    "bn2.bias",
];
const BN2_STATS: [&str; 2] = ["bn2.running_mean", "bn2.running_var"];

fn load(graph: &Graph, f: &Fixture) {
    for name in STATE.iter().chain(&BN2_STATS) {
        graph.set(gpu(), name, f.get(name)).unwrap();
    }
}

/// A chain of six kernels: within the per-kernel tolerance, since every intermediate is f32.
const TOL: f64 = 1e-5;

#[test]
fn residual_block_matches_pytorch_forward_and_every_gradient() {
    wait(residual_block_matches_pytorch_forward_and_every_gradient_body());
}

/// The body of [`residual_block_matches_pytorch_forward_and_every_gradient`], also awaited by the browser suite (tests/web.rs).
pub async fn residual_block_matches_pytorch_forward_and_every_gradient_body() {
    let gpu = gpu();
    let f = Fixture::load("residual_block.safetensors");
    let shape: [usize; 4] = f.shape("x").try_into().unwrap();
    let graph = residual_block(shape, Mode::Train);
    load(&graph, &f);
    graph.output(0).fill(gpu, f32::NAN);
    graph.forward(gpu).unwrap();
    graph.output_grad(0).unwrap().write(gpu, f.get("grad_out")).unwrap();
    graph.backward(gpu).unwrap();
    assert_close("out", &fetch(graph.output(0)).await, f.get("out"), TOL);
    for name in ["x", "conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"] {
        assert_close(
            &format!("grad {name}"),
            &fetch(graph.grad(name).unwrap()).await,
            f.get(&format!("grad.{name}")),
            TOL,
        );
    }
    for name in ["bn1.running_mean", "bn1.running_var"].iter().chain(&BN2_STATS) {
        assert_close(name, &fetch(graph.tensor(name).unwrap()).await, f.get(&format!("new.{name}")), TOL);
    }
    let mut params: Vec<&str> = graph.parameters().map(|(name, _)| name).collect();
    params.sort_unstable();
    assert_eq!(params, ["bn1.bias", "bn1.weight", "bn2.bias", "bn2.weight", "conv1.weight", "conv2.weight"]);
}

#[test]
fn parameter_gradients_accumulate_until_zeroed() {
    wait(parameter_gradients_accumulate_until_zeroed_body());
}

/// The body of [`parameter_gradients_accumulate_until_zeroed`], also awaited by the browser suite (tests/web.rs).
pub async fn parameter_gradients_accumulate_until_zeroed_body() {
    let gpu = gpu();
    let f = Fixture::load("residual_block.safetensors");
    let graph = residual_block(f.shape("x").try_into().unwrap(), Mode::Train);
    load(&graph, &f);
    graph.forward(gpu).unwrap();
    graph.output_grad(0).unwrap().write(gpu, f.get("grad_out")).unwrap();
    graph.backward(gpu).unwrap();
    // The backward freed what the forward kept: a second one needs its own forward.
    let e = graph.backward(gpu).unwrap_err().to_string();
    assert!(e.contains("no forward pass since the last backward"), "{e}");
    graph.forward(gpu).unwrap();
    graph.output_grad(0).unwrap().write(gpu, f.get("grad_out")).unwrap();
    graph.backward(gpu).unwrap();
    let twice = |name: &str| f.get(&format!("grad.{name}")).iter().map(|v| 2.0 * v).collect::<Vec<f32>>();
    for name in ["conv1.weight", "bn2.bias"] {
        assert_close(
            &format!("twice grad {name}"),
            &fetch(graph.grad(name).unwrap()).await,
            &twice(name),
            TOL,
        );
    }
    // The input's gradient is not a parameter's: each pass overwrites it.
    assert_close("grad x", &fetch(graph.grad("x").unwrap()).await, f.get("grad.x"), TOL);
    graph.zero_grads(gpu).unwrap();
    graph.forward(gpu).unwrap();
    graph.output_grad(0).unwrap().write(gpu, f.get("grad_out")).unwrap();
    graph.backward(gpu).unwrap();
    assert_close(
        "grad after zeroing",
        &fetch(graph.grad("conv1.weight").unwrap()).await,
        f.get("grad.conv1.weight"),
        TOL,
    );
}

#[test]
fn eval_graph_uses_running_statistics() {
    wait(eval_graph_uses_running_statistics_body());
}

/// The body of [`eval_graph_uses_running_statistics`], also awaited by the browser suite (tests/web.rs).
pub async fn eval_graph_uses_running_statistics_body() {
    let gpu = gpu();
    let f = Fixture::load("residual_block.safetensors");
    let shape: [usize; 4] = f.shape("x").try_into().unwrap();
    let graph = residual_block(shape, Mode::Eval);
    load(&graph, &f);
    graph.forward(gpu).unwrap();
    // The same block computed kernel by kernel on the CPU, with eval-mode batch norm.
    let conv = ConvDims {
        n: shape[0],
        ci: shape[1],
        h: shape[2],
        w: shape[3],
        co: shape[1],
        kh: 3,
        kw: 3,
        spec: Conv2dSpec::square(1, 1, 1),
    };
    let bn = |x: &[f32], p: &str| {
        let g = |t: &str| f.get(&format!("{p}.{t}"));
        bn_eval(x, shape, g("weight"), g("bias"), g("running_mean"), g("running_var"))
    };
    let h = bn(&conv.forward(f.get("x"), f.get("conv1.weight"), None), "bn1");
    let h: Vec<f32> = h.iter().map(|v| v.max(0.0)).collect();
    let h = bn(&conv.forward(&h, f.get("conv2.weight"), None), "bn2");
    let want: Vec<f32> = h.iter().zip(f.get("x")).map(|(a, b)| (a + b).max(0.0)).collect();
    assert_close("eval out", &fetch(graph.output(0)).await, &want, TOL);
    assert!(graph.grad("conv1.weight").is_err(), "an eval graph has no gradients");
}
