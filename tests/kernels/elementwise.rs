use crate::common::*;
use hrnet_ocr::kernels::elementwise;

const TOL: f64 = 1e-5;

/// Forward and backward of relu, add and add_relu; grad_b of add_relu and add accumulate
/// into `old` so both the overwrite and the accumulate paths run.
async fn check(shape: &[usize], a: &[f32], b: &[f32], gy: &[f32], old: &[f32]) -> [Vec<f32>; 8] {
    let gpu = gpu();
    let (at, bt, gyt) = (upload(shape, a), upload(shape, b), upload(shape, gy));
    let out: Vec<_> = (0..5).map(|_| poisoned(shape)).collect();
    let (relu_y, add_y, add_relu_y, relu_ga, add_relu_ga) = (&out[0], &out[1], &out[2], &out[3], &out[4]);
    let add_relu_gb = upload(shape, old);
    let (add_ga, add_gb) = (poisoned(shape), upload(shape, old));
    let ds = [
        elementwise::relu_forward(gpu, &at, relu_y).unwrap(),
        elementwise::add_forward(gpu, &at, &bt, add_y).unwrap(),
        elementwise::add_relu_forward(gpu, &at, &bt, add_relu_y).unwrap(),
        elementwise::relu_backward(gpu, relu_y, &gyt, relu_ga, false).unwrap(),
        elementwise::add_relu_backward(gpu, add_relu_y, &gyt, (add_relu_ga, false), (&add_relu_gb, true))
            .unwrap(),
        elementwise::add_backward(gpu, &gyt, (&add_ga, false), (&add_gb, true)).unwrap(),
    ];
    gpu.run(ds.iter().flatten()).unwrap();
    let mut got = Vec::with_capacity(8);
    for t in [relu_y, add_y, add_relu_y, relu_ga, add_relu_ga, &add_relu_gb, &add_ga, &add_gb] {
        got.push(fetch(t).await);
    }
    got.try_into().expect("eight outputs")
}

fn expected(a: &[f32], b: &[f32], gy: &[f32], old: &[f32]) -> [Vec<f32>; 8] {
    let sum: Vec<f32> = a.iter().zip(b).map(|(a, b)| a + b).collect();
    let masked =
        |x: &[f32]| x.iter().zip(gy).map(|(&x, &g)| if x > 0.0 { g } else { 0.0 }).collect::<Vec<f32>>();
    let plus = |x: &[f32]| x.iter().zip(old).map(|(x, o)| x + o).collect::<Vec<f32>>();
    [
        a.iter().map(|v| v.max(0.0)).collect(),
        sum.clone(),
        sum.iter().map(|v| v.max(0.0)).collect(),
        masked(a),
        masked(&sum),
        plus(&masked(&sum)),
        gy.to_vec(),
        plus(gy),
    ]
}

const NAMES: [&str; 8] = [
    "relu out",
    "add out",
    "add_relu out",
    "relu grad",
    "add_relu grad_a",
    "add_relu grad_b (accumulated)",
    "add grad_a",
    "add grad_b (accumulated)",
];

#[test]
fn elementwise_matches_pytorch_fixtures() {
    wait(elementwise_matches_pytorch_fixtures_body());
}

/// The body of [`elementwise_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn elementwise_matches_pytorch_fixtures_body() {
    let f = Fixture::load("elementwise.safetensors");
    for (case, dims) in f.cases() {
        let g = |t: &str| f.get(&format!("{case}.{t}"));
        let zeros = vec![0.0; g("a").len()];
        let got = check(&dims, g("a"), g("b"), g("grad_out"), &zeros).await;
        let want: [&[f32]; 8] = [
            g("relu_out"),
            g("add_out"),
            g("add_relu_out"),
            g("relu_grad_a"),
            g("add_relu_grad"),
            g("add_relu_grad"),
            g("grad_out"),
            g("grad_out"),
        ];
        for ((name, got), want) in NAMES.iter().zip(&got).zip(want) {
            assert_close(&format!("{case} {name}"), got, want, TOL);
        }
    }
}

#[test]
fn elementwise_matches_cpu_on_random_shapes() {
    let mut rng = Rng::new(seed("elementwise_matches_cpu_on_random_shapes"));
    for _ in 0..50 {
        let shape = [rng.range(1, 3), rng.range(1, 9), rng.range(1, 33), rng.range(1, 33)];
        let len = shape.iter().product();
        let (a, b, gy, old) = (rng.normals(len), rng.normals(len), rng.normals(len), rng.normals(len));
        let got = wait(check(&shape, &a, &b, &gy, &old));
        for ((name, got), want) in NAMES.iter().zip(&got).zip(expected(&a, &b, &gy, &old)) {
            assert_close(&format!("{shape:?} {name}"), got, &want, TOL);
        }
    }
}
