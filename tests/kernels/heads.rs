//! The context heads (src/model/heads.rs) against their PyTorch reference
//! (tools/reference/context_heads.py): in training mode, each head's output within 1e-4 and
//! every gradient (input, OCR's region logits, each parameter) within 1e-3 (relative L2, as
//! the whole model's test); and their parameters and FLOPs equal to the reference's counts.

use crate::common::*;
use hrnet_ocr::graph::{Graph, GraphBuilder, Mode, ValueId};
use hrnet_ocr::model::heads::{self, ComparisonSize, ContextHead, HeadDims};

const OUT_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-3;

/// `head` on an input `x` `[n, cin, h, w]` (and OCR's regions `[n, k, h, w]`), both asking
/// for gradients; the head's output.
fn build_head(g: &mut GraphBuilder, head: ContextHead, [n, cin, h, w, mid, key, k]: [usize; 7]) -> ValueId {
    let x = g.input("x", &[n, cin, h, w], true);
    let regions = |g: &mut GraphBuilder| Ok(g.input("regions", &[n, k, h, w], true));
    let dims = HeadDims { mid, key, align_corners: true, ocr_bias: true };
    heads::build(g, head, x, regions, dims).unwrap().out
}

fn l2(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

async fn check_grad(graph: &Graph, f: &Fixture, head: &str, name: &str) {
    let got = fetch(graph.grad(name).unwrap()).await;
    let want = f.get(&format!("{head}.grad.{name}"));
    // A bias whose gradient is zero in exact arithmetic (DANet's key bias: a softmax over
    // keys ignores what every key adds alike) is held to its weight's gradient's scale.
    if l2(want) < 1e-12 {
        let weight = name.strip_suffix(".bias").map(|p| format!("{head}.grad.{p}.weight"));
        let scale = l2(f.get(&weight.unwrap_or_else(|| panic!("{head} grad {name} is zero"))));
        eprintln!(
            "{head} grad {name}: zero in exact arithmetic, |got| {:.2e} (weight's {scale:.2e})",
            l2(&got)
        );
        assert!(
            l2(&got) <= GRAD_TOL * scale,
            "{head} grad {name}: |got| {:.2e} > 1e-3 x {scale:.2e}",
            l2(&got)
        );
        return;
    }
    eprintln!("{head} grad {name}: relative L2 error {:.2e}", rel_l2(&got, want));
    assert_close(&format!("{head} grad {name}"), &got, want, GRAD_TOL);
}

#[test]
fn every_context_head_matches_pytorch_forward_and_backward() {
    wait(every_context_head_matches_pytorch_forward_and_backward_body());
}

/// The body of [`every_context_head_matches_pytorch_forward_and_backward`], also awaited by the browser suite (tests/web.rs).
pub async fn every_context_head_matches_pytorch_forward_and_backward_body() {
    let f = Fixture::load("context_heads.safetensors");
    for head in ContextHead::ALL {
        let name = head.name();
        let dims: Vec<usize> = f.metadata[name].split_whitespace().map(|s| s.parse().unwrap()).collect();
        let dims: [usize; 7] = dims.try_into().unwrap();
        let mut g = GraphBuilder::new();
        let out = build_head(&mut g, head, dims);
        let graph = g.build(gpu(), Mode::Train, &[out]).unwrap();
        let prefix = format!("{name}.param.");
        let in_fixture = f.names().iter().filter(|n| n.starts_with(&prefix)).count();
        let params: Vec<String> = graph.parameters().map(|(p, _)| p.to_string()).collect();
        assert_eq!(params.len(), in_fixture, "{name}: the engine's parameters {params:?}");
        for p in &params {
            graph.set(gpu(), p, f.get(&format!("{prefix}{p}"))).unwrap();
        }
        for b in graph.buffers().map(str::to_string).collect::<Vec<_>>() {
            graph.tensor(&b).unwrap().fill(gpu(), if b.ends_with("running_var") { 1.0 } else { 0.0 });
        }
        graph.set(gpu(), "x", f.get(&format!("{name}.x"))).unwrap();
        if head.reads_regions() {
            graph.set(gpu(), "regions", f.get(&format!("{name}.regions"))).unwrap();
        }
        graph.output(0).fill(gpu(), f32::NAN);
        graph.forward(gpu()).unwrap();
        let got = fetch(graph.output(0)).await;
        let want = f.get(&format!("{name}.out"));
        eprintln!("{name} out: relative L2 error {:.2e}", rel_l2(&got, want));
        assert_close(&format!("{name} out"), &got, want, OUT_TOL);

        graph.output_grad(0).unwrap().write(gpu(), f.get(&format!("{name}.grad_out"))).unwrap();
        graph.backward(gpu()).unwrap();
        check_grad(&graph, &f, name, "x").await;
        if head.reads_regions() {
            check_grad(&graph, &f, name, "regions").await;
        }
        for p in &params {
            check_grad(&graph, &f, name, p).await;
        }
    }
}

/// The reference's counts (`complexity` at both sizes, on meta tensors): per head and size,
/// parameters and the FLOPs of the forward and of the backward.
fn reference_counts() -> Vec<(String, String, [u64; 3])> {
    let path = format!("{}/tests/fixtures/context_heads_counts.txt", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| cols[i].parse::<u64>().unwrap_or_else(|_| panic!("{path}: {l}"));
            (cols[0].to_string(), cols[1].to_string(), [n(2), n(3), n(4)])
        })
        .collect()
}

#[test]
fn parameters_and_flops_equal_the_reference_counts_at_both_sizes() {
    let counts = reference_counts();
    assert_eq!(counts.len(), 2 * ContextHead::ALL.len(), "one line per head and size");
    for (head, size, want) in counts {
        let size = match size.as_str() {
            "paper" => ComparisonSize::Paper,
            "small" => ComparisonSize::Small,
            other => panic!("size {other}"),
        };
        let head = ContextHead::parse(&head).unwrap();
        let (g, out) = heads::comparison_graph(head, size).unwrap();
        let flops = g.flops(&[out]);
        let got = [g.parameter_count(), flops.forward, flops.backward];
        assert_eq!(got, want, "{head:?} at {size:?}: [params, forward FLOPs, backward FLOPs]");
    }
}
