use crate::common::*;
use hrnet_ocr::kernels::{concat, resize};

const TOL: f64 = 1e-5;

/// (forward, backward) on the CPU for x `[n, c, h, w]` resized to `ho x wo`.
fn reference(
    x: &[f32],
    gy: &[f32],
    [n, c, h, w]: [usize; 4],
    [ho, wo]: [usize; 2],
    align: bool,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; n * c * ho * wo];
    let mut gx = vec![0f64; x.len()];
    for p in 0..n * c {
        for oy in 0..ho {
            let (y0, y1, ty) = bilinear_taps(oy, h, ho, align);
            for ox in 0..wo {
                let (x0, x1, tx) = bilinear_taps(ox, w, wo, align);
                let taps = [
                    (y0, x0, (1.0 - ty) * (1.0 - tx)),
                    (y0, x1, (1.0 - ty) * tx),
                    (y1, x0, ty * (1.0 - tx)),
                    (y1, x1, ty * tx),
                ];
                let o = (p * ho + oy) * wo + ox;
                let mut v = 0.0;
                for (iy, ix, wt) in taps {
                    v += wt * f64::from(x[(p * h + iy) * w + ix]);
                    gx[(p * h + iy) * w + ix] += wt * f64::from(gy[o]);
                }
                y[o] = v as f32;
            }
        }
    }
    (y, gx.into_iter().map(|v| v as f32).collect())
}

async fn run(x: &[f32], gy: &[f32], dims: [usize; 4], out: [usize; 2], align: bool) -> (Vec<f32>, Vec<f32>) {
    let gpu = gpu();
    let [n, c, _, _] = dims;
    let oshape = [n, c, out[0], out[1]];
    let (xt, gyt, y, gx) = (upload(&dims, x), upload(&oshape, gy), poisoned(&oshape), poisoned(&dims));
    let ds = [
        resize::forward(gpu, &xt, &y, 0, align).unwrap(),
        resize::backward(gpu, &gyt, 0, &gx, align, false).unwrap(),
    ];
    gpu.run(ds.iter().flatten()).unwrap();
    (fetch(&y).await, fetch(&gx).await)
}

#[test]
fn resize_matches_pytorch_fixtures() {
    wait(resize_matches_pytorch_fixtures_body());
}

/// The body of [`resize_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn resize_matches_pytorch_fixtures_body() {
    let f = Fixture::load("resize.safetensors");
    for (case, p) in f.cases() {
        let [n, c, h, w, ho, wo, align] = p[..] else { panic!("{case}: metadata") };
        let g = |t: &str| f.get(&format!("{case}.{t}"));
        let (y, gx) = run(g("x"), g("grad_out"), [n, c, h, w], [ho, wo], align == 1).await;
        assert_close(&format!("{case} {p:?} out"), &y, g("out"), TOL);
        assert_close(&format!("{case} {p:?} grad_x"), &gx, g("grad_x"), TOL);
    }
}

#[test]
fn resize_matches_cpu_on_random_shapes() {
    let mut rng = Rng::new(seed("resize_matches_cpu_on_random_shapes"));
    for i in 0..60 {
        let dims = [rng.range(1, 2), rng.range(1, 4), rng.range(1, 24), rng.range(1, 24)];
        let out = [rng.range(1, 40), rng.range(1, 40)];
        let align = i % 2 == 0;
        let x = rng.normals(dims.iter().product());
        let gy = rng.normals(dims[0] * dims[1] * out[0] * out[1]);
        let (y, gx) = wait(run(&x, &gy, dims, out, align));
        let (want_y, want_gx) = reference(&x, &gy, dims, out, align);
        assert_close(&format!("{dims:?} -> {out:?} align {align} out"), &y, &want_y, TOL);
        assert_close(&format!("{dims:?} -> {out:?} align {align} grad_x"), &gx, &want_gx, TOL);
    }
}

/// HRNet's final representation: x0 copied and x1..x3 resized straight into channel slices
/// of one tensor; the backward splits the gradient back (accumulating into x0's).
#[test]
fn concat_with_resized_slices_and_split_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(seed("concat_with_resized_slices"));
    for _ in 0..10 {
        let n = rng.range(1, 2);
        let (h, w) = (rng.range(4, 20), rng.range(4, 20));
        let widths = [rng.range(1, 5), rng.range(1, 5), rng.range(1, 5), rng.range(1, 5)];
        let total: usize = widths.iter().sum();
        let sizes: Vec<[usize; 2]> = (0..4).map(|b| [h.div_ceil(1 << b), w.div_ceil(1 << b)]).collect();
        let xs: Vec<Vec<f32>> =
            (0..4).map(|b| rng.normals(n * widths[b] * sizes[b][0] * sizes[b][1])).collect();
        let shape = |b: usize| [n, widths[b], sizes[b][0], sizes[b][1]];
        let xt: Vec<_> = (0..4).map(|b| upload(&shape(b), &xs[b])).collect();
        let out = poisoned(&[n, total, h, w]);
        let gy = rng.normals(n * total * h * w);
        let gyt = upload(&[n, total, h, w], &gy);
        let old0 = rng.normals(xs[0].len());
        let grads: Vec<_> =
            (0..4).map(|b| if b == 0 { upload(&shape(0), &old0) } else { poisoned(&shape(b)) }).collect();
        let mut ds = concat::copy_channels(gpu, (&xt[0], 0), (&out, 0), widths[0], false).unwrap();
        ds.extend(concat::copy_channels(gpu, (&gyt, 0), (&grads[0], 0), widths[0], true).unwrap());
        let mut offset = widths[0];
        for b in 1..4 {
            ds.extend(resize::forward(gpu, &xt[b], &out, offset, true).unwrap());
            ds.extend(resize::backward(gpu, &gyt, offset, &grads[b], true, false).unwrap());
            offset += widths[b];
        }
        gpu.run(&ds).unwrap();
        // Expected: per-branch maps (resized on the CPU), stacked along channels.
        let got = download(&out);
        let mut offset = 0;
        for b in 0..4 {
            let slice = |v: &[f32]| -> Vec<f32> {
                (0..n)
                    .flat_map(|i| {
                        v[(i * total + offset) * h * w..(i * total + offset + widths[b]) * h * w].to_vec()
                    })
                    .collect()
            };
            let gy_b = slice(&gy);
            let (want_y, want_gx) = reference(&xs[b], &gy_b, shape(b), [h, w], true);
            assert_close(&format!("branch {b} slice of the concat"), &slice(&got), &want_y, TOL);
            let want_gx = if b == 0 { old0.iter().zip(&gy_b).map(|(a, g)| a + g).collect() } else { want_gx };
            assert_close(&format!("branch {b} gradient"), &download(&grads[b]), &want_gx, TOL);
            offset += widths[b];
        }
    }
}

#[test]
fn concat_and_split_round_trip() {
    let gpu = gpu();
    let mut rng = Rng::new(seed("concat_and_split_round_trip"));
    for _ in 0..20 {
        let (n, h, w) = (rng.range(1, 3), rng.range(1, 9), rng.range(1, 9));
        let widths: Vec<usize> = (0..rng.range(1, 4)).map(|_| rng.range(1, 6)).collect();
        let total = widths.iter().sum();
        let data: Vec<Vec<f32>> = widths.iter().map(|&c| rng.normals(n * c * h * w)).collect();
        let ins: Vec<_> = widths.iter().zip(&data).map(|(&c, d)| upload(&[n, c, h, w], d)).collect();
        let y = poisoned(&[n, total, h, w]);
        let outs: Vec<_> = widths.iter().map(|&c| poisoned(&[n, c, h, w])).collect();
        let refs: Vec<_> = ins.iter().collect();
        let mut ds = concat::concat_forward(gpu, &refs, &y).unwrap();
        let grads: Vec<_> = outs.iter().map(|t| (t, false)).collect();
        ds.extend(concat::concat_backward(gpu, &y, &grads).unwrap());
        gpu.run(&ds).unwrap();
        let yv = download(&y);
        let mut offset = 0;
        for (i, &c) in widths.iter().enumerate() {
            assert_close("split of concat", &download(&outs[i]), &data[i], 0.0);
            for s in 0..n {
                let got = &yv[(s * total + offset) * h * w..(s * total + offset + c) * h * w];
                assert_close("concat slice", got, &data[i][s * c * h * w..(s + 1) * c * h * w], 0.0);
            }
            offset += c;
        }
    }
}

#[test]
fn concat_matches_pytorch_fixtures() {
    wait(concat_matches_pytorch_fixtures_body());
}

/// The body of [`concat_matches_pytorch_fixtures`], also awaited by the browser suite (tests/web.rs).
pub async fn concat_matches_pytorch_fixtures_body() {
    let gpu = gpu();
    let f = Fixture::load("concat.safetensors");
    for (case, p) in f.cases() {
        let (n, h, w, widths) = (p[0], p[1], p[2], &p[3..]);
        let g = |t: String| f.get(&format!("{case}.{t}")).to_vec();
        let ins: Vec<_> =
            widths.iter().enumerate().map(|(i, &c)| upload(&[n, c, h, w], &g(format!("in{i}")))).collect();
        let total: usize = widths.iter().sum();
        let (y, gy) = (poisoned(&[n, total, h, w]), upload(&[n, total, h, w], &g("grad_out".into())));
        let grads: Vec<_> = widths.iter().map(|&c| poisoned(&[n, c, h, w])).collect();
        let mut ds = concat::concat_forward(gpu, &ins.iter().collect::<Vec<_>>(), &y).unwrap();
        ds.extend(
            concat::concat_backward(gpu, &gy, &grads.iter().map(|t| (t, false)).collect::<Vec<_>>()).unwrap(),
        );
        gpu.run(&ds).unwrap();
        assert_close(&format!("{case} out"), &fetch(&y).await, &g("out".into()), 0.0);
        for (i, grad) in grads.iter().enumerate() {
            assert_close(&format!("{case} grad_in{i}"), &fetch(grad).await, &g(format!("grad_in{i}")), 0.0);
        }
    }
}
