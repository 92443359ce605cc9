#!/usr/bin/env python3
"""The context heads of the OCR paper's comparison (Yuan, Chen, Wang, ECCV 2020, section 4),
written in PyTorch from the papers' definitions, parameter for parameter as the engine builds
them (src/model/heads.rs), with the same parameter names.

- PPM (Zhao et al., PSPNet): per bin 1, 2, 3, 6 adaptive average pooling -> conv1x1 -> BN ->
  ReLU, bilinearly upsampled, concatenated after the input; conv3x3 -> BN -> ReLU.
- ASPP (Chen et al., DeepLabv3): conv1x1, three 3x3 convolutions dilated 12, 24, 36, image
  pooling (pool -> conv1x1 -> BN -> ReLU -> upsample), KEY channels each; concat; conv1x1 ->
  BN -> ReLU.
- Self-attention: OCR's object block with every pixel a key and a value.
- DANet (Fu et al.): position attention (query/key MID/8, unscaled softmax over pixels,
  gamma * out + x) and channel attention (softmax(max(E) - E), E = X X^T, gamma * out + x),
  each after its own conv3x3 reduction and before a conv3x3 -> BN -> ReLU; summed.
- Double attention (Chen et al., A2-Net): A, B, V conv1x1; G = A softmax_pixels(B)^T;
  Z = G softmax_channels(V); conv1x1 back to MID; plus the reduction.
- OCR (this paper, as the official HRNet-OCR code): conv3x3 reduction, spatial gather over
  soft object regions, the object block (f_pixel, f_object, f_down, f_up), conv_bn_dropout.
- none: the conv3x3 reduction alone.

Two uses (from the repository root):

  python3 tools/reference/context_heads.py fixtures [--out tests/fixtures] [--seed N]
      forward outputs and every gradient of each head at a small size, computed in float64,
      stored float32 in tests/fixtures/context_heads.safetensors.
  python3 tools/reference/context_heads.py complexity --size small|paper [--table FILE] [--time]
      parameters and FLOPs (torch.utils.flop_counter, forward and backward) of each head on
      meta tensors; with --time, also seconds per forward and forward + backward on the CPU
      (or CUDA where there is one, with its peak memory). The table (one head a line,
      whitespace-separated, `-` where not measured) is what `hrnet-ocr bench --context-heads
      --reference FILE` prints beside its own and checks its counts against.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

HEADS = ["ppm", "aspp", "danet", "self_attention", "double_attention", "ocr", "none"]
PPM_BINS = [1, 2, 3, 6]
ASPP_RATES = [12, 24, 36]
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
# (cin, h, w, mid, key, regions) of the comparison: the paper's, and one lavapipe runs in seconds.
SIZES = {"paper": (2048, 128, 128, 512, 256, 19), "small": (256, 32, 32, 64, 32, 19)}


class Net:
    """Parameters by the engine's names, drawn on first use from `gen`."""

    def __init__(self, gen, dtype, device, align_corners=True, ocr_bias=True, training=True):
        self.params, self.stats = {}, {}
        # Batch statistics (training) or running ones: the comparison runs batch 1, where
        # PyTorch refuses batch statistics of the pooled 1x1 maps.
        self.training = training
        self.gen, self.dtype, self.device = gen, dtype, device
        self.align_corners, self.ocr_bias = align_corners, ocr_bias

    def param(self, name, shape, draw):
        if name not in self.params:
            if self.device == "meta":
                t = torch.empty(shape, dtype=self.dtype, device="meta")
            else:
                t = draw(torch.randn(shape, generator=self.gen, dtype=torch.float32)).to(self.dtype)
            self.params[name] = t.requires_grad_(True)
        return self.params[name]

    def conv(self, name, x, cout, k, bias, pad=0, dil=1):
        cin = x.shape[1]
        w = self.param(f"{name}.weight", (cout, cin, k, k), lambda r: r / math.sqrt(cin * k * k))
        b = self.param(f"{name}.bias", (cout,), lambda r: 0.1 * r) if bias else None
        return F.conv2d(x, w, b, padding=pad, dilation=dil)

    def bn(self, name, x):
        c = x.shape[1]
        g = self.param(f"{name}.weight", (c,), lambda r: 1 + 0.1 * r)
        b = self.param(f"{name}.bias", (c,), lambda r: 0.1 * r)
        if name not in self.stats:
            zeros = torch.zeros(c, dtype=self.dtype, device=self.device)
            self.stats[name] = (zeros, torch.ones(c, dtype=self.dtype, device=self.device))
        mean, var = self.stats[name]
        return F.batch_norm(x, mean, var, g, b, training=self.training, momentum=BN_MOMENTUM, eps=BN_EPS)

    def conv_bn_relu(self, p, x, cout, k, pad=0, dil=1):
        return F.relu(self.bn(f"{p}.bn", self.conv(f"{p}.conv", x, cout, k, False, pad, dil)))

    def resize(self, x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    # --- the heads ---

    def reduce(self, x, p, mid):
        return F.relu(self.bn(f"{p}.1", self.conv(f"{p}.0", x, mid, 3, self.ocr_bias, pad=1)))

    def ocr_unit(self, x, p, i, cout):
        return F.relu(self.bn(f"{p}.{i + 1}.0", self.conv(f"{p}.{i}", x, cout, 1, False)))

    def object_block(self, f, context, ocb, fuse, mid, key):
        q = self.ocr_unit(self.ocr_unit(f, f"{ocb}.f_pixel", 0, key), f"{ocb}.f_pixel", 2, key)
        k = self.ocr_unit(self.ocr_unit(context, f"{ocb}.f_object", 0, key), f"{ocb}.f_object", 2, key)
        v = self.ocr_unit(context, f"{ocb}.f_down", 0, key)
        ctx = attention(q, k, v, key ** -0.5)
        up = self.ocr_unit(ctx, f"{ocb}.f_up", 0, mid)
        return self.ocr_unit(torch.cat([up, f], 1), fuse, 0, mid)

    def ocr(self, x, regions, mid, key):
        f = self.reduce(x, "conv3x3_ocr", mid)
        n, k, h, w = regions.shape
        probs = F.softmax(regions.reshape(n, k, h * w), dim=2)
        feats = f.reshape(n, mid, h * w).permute(0, 2, 1)
        context = torch.matmul(probs, feats).permute(0, 2, 1).unsqueeze(3)  # [n, mid, K, 1]
        ocb, fuse = "ocr_distri_head.object_context_block", "ocr_distri_head.conv_bn_dropout"
        return self.object_block(f, context, ocb, fuse, mid, key)

    def self_attention(self, x, mid, key):
        f = self.reduce(x, "self_attention.conv3x3", mid)
        return self.object_block(f, f, "self_attention.block", "self_attention.fuse", mid, key)

    def ppm(self, x, mid):
        size = x.shape[2:]
        parts = [x]
        for i, bins in enumerate(PPM_BINS):
            pooled = F.adaptive_avg_pool2d(x, bins)
            parts.append(self.resize(self.conv_bn_relu(f"ppm.stages.{i}", pooled, mid, 1), size))
        return self.conv_bn_relu("ppm.bottleneck", torch.cat(parts, 1), mid, 3, pad=1)

    def aspp(self, x, mid, key):
        parts = [self.conv_bn_relu("aspp.conv_1x1", x, key, 1)]
        for i, rate in enumerate(ASPP_RATES):
            parts.append(self.conv_bn_relu(f"aspp.conv_3x3_{i + 1}", x, key, 3, pad=rate, dil=rate))
        pooled = self.conv_bn_relu("aspp.image_pool", F.adaptive_avg_pool2d(x, 1), key, 1)
        parts.append(self.resize(pooled, x.shape[2:]))
        return self.conv_bn_relu("aspp.fuse", torch.cat(parts, 1), mid, 1)

    def danet(self, x, mid):
        n, _, h, w = x.shape
        p = self.conv_bn_relu("danet.conv5a", x, mid, 3, pad=1)
        q = self.conv("danet.pam.query_conv", p, mid // 8, 1, True)
        k = self.conv("danet.pam.key_conv", p, mid // 8, 1, True)
        v = self.conv("danet.pam.value_conv", p, mid, 1, True)
        energy = torch.bmm(q.reshape(n, -1, h * w).permute(0, 2, 1), k.reshape(n, -1, h * w))
        attn = F.softmax(energy, dim=-1)
        out = torch.bmm(v.reshape(n, mid, h * w), attn.permute(0, 2, 1)).reshape(n, mid, h, w)
        pam = self.param("danet.pam.gamma", (1,), lambda r: 0.5 * r) * out + p
        pam = self.conv_bn_relu("danet.conv51", pam, mid, 3, pad=1)

        c = self.conv_bn_relu("danet.conv5c", x, mid, 3, pad=1)
        cf = c.reshape(n, mid, h * w)
        energy = torch.bmm(cf, cf.permute(0, 2, 1))
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attn = F.softmax(energy_new, dim=-1)
        out = torch.bmm(attn, cf).reshape(n, mid, h, w)
        cam = self.param("danet.cam.gamma", (1,), lambda r: 0.5 * r) * out + c
        cam = self.conv_bn_relu("danet.conv52", cam, mid, 3, pad=1)
        return pam + cam

    def double_attention(self, x, mid, key):
        f = self.reduce(x, "double_attention.conv3x3", mid)
        n, _, h, w = f.shape
        a = self.conv("double_attention.convA", f, key, 1, True).reshape(n, key, h * w)
        b = self.conv("double_attention.convB", f, key, 1, True).reshape(n, key, h * w)
        v = self.conv("double_attention.convV", f, key, 1, True).reshape(n, key, h * w)
        descriptors = torch.bmm(a, F.softmax(b, dim=-1).permute(0, 2, 1))  # [n, m, n]
        z = torch.bmm(descriptors, F.softmax(v, dim=1)).reshape(n, key, h, w)
        return self.conv("double_attention.reconstruct", z, mid, 1, True) + f

    def head(self, name, x, regions, mid, key):
        if name == "ocr":
            return self.ocr(x, regions, mid, key)
        if name in ("ppm", "danet"):
            return getattr(self, name)(x, mid)
        if name == "none":
            return self.reduce(x, "conv3x3_ocr", mid)
        return getattr(self, name)(x, mid, key)


def attention(q, k, v, scale):
    """value @ softmax_over_keys(query^T key * scale)^T, keys and values at every position."""
    n, ch, h, w = q.shape
    sim = torch.matmul(q.reshape(n, ch, h * w).permute(0, 2, 1), k.reshape(n, ch, -1))
    sim = F.softmax(scale * sim, dim=-1)
    ctx = torch.matmul(v.reshape(n, v.shape[1], -1), sim.permute(0, 2, 1))
    return ctx.reshape(n, v.shape[1], h, w)


# --- fixtures ---

# (n, cin, h, w, mid, key, regions): odd sizes that no PPM bin divides; ASPP's rates beyond them.
FIXTURE_DIMS = (2, 12, 9, 7, 16, 8, 3)


def fixtures(out_dir, seed):
    from safetensors.torch import save_file

    n, cin, h, w, mid, key, k = FIXTURE_DIMS
    tensors, meta = {}, {}
    for i, name in enumerate(HEADS):
        gen = torch.Generator().manual_seed(seed + i)
        net = Net(gen, torch.float64, "cpu")
        x = torch.randn((n, cin, h, w), generator=gen).double().requires_grad_(True)
        regions = torch.randn((n, k, h, w), generator=gen).double().requires_grad_(True)
        out = net.head(name, x, regions, mid, key)
        grad_out = torch.randn(out.shape, generator=gen).double()
        (out * grad_out).sum().backward()
        f32 = lambda t: t.detach().float().contiguous()
        tensors[f"{name}.x"], tensors[f"{name}.grad_out"], tensors[f"{name}.out"] = f32(x), f32(grad_out), f32(out)
        tensors[f"{name}.grad.x"] = f32(x.grad)
        if name == "ocr":
            tensors[f"{name}.regions"], tensors[f"{name}.grad.regions"] = f32(regions), f32(regions.grad)
        for pname, p in net.params.items():
            tensors[f"{name}.param.{pname}"] = f32(p)
            tensors[f"{name}.grad.{pname}"] = f32(p.grad)
        meta[name] = " ".join(str(v) for v in FIXTURE_DIMS)
        print(f"{name}: out {list(out.shape)}, {len(net.params)} parameters")
    path = f"{out_dir}/context_heads.safetensors"
    save_file(tensors, path, metadata=dict(sorted(meta.items())))
    print(f"wrote {path}")


# --- complexity ---

def count(name, size, device, dtype):
    """Parameters, and FLOPs of the forward and of the backward (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    cin, h, w, mid, key, k = SIZES[size]
    net = Net(torch.Generator().manual_seed(1), dtype, device, training=False)
    x = torch.randn((1, cin, h, w), dtype=dtype, device=device)
    regions = torch.randn((1, k, h, w), dtype=dtype, device=device).requires_grad_(True)
    with FlopCounterMode(display=False) as forward:
        out = net.head(name, x, regions, mid, key)
    with FlopCounterMode(display=False) as backward:
        out.backward(torch.ones_like(out))
    params = sum(p.numel() for p in net.params.values())
    return net, x, regions, params, forward.get_total_flops(), backward.get_total_flops()


def timed(run, device, repeats):
    """Median seconds of `run` after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


COLUMNS = ["head", "size", "params", "flops_forward", "flops_backward", "seconds_forward", "seconds_train",
           "peak_bytes_forward", "peak_bytes_train"]


def complexity(size, table_path, with_time, repeats):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in HEADS:
        _, _, _, params, fwd, bwd = count(name, size, "meta", torch.float32)
        row = {"head": name, "size": size, "params": params, "flops_forward": fwd, "flops_backward": bwd}
        if with_time:
            net, x, regions, *_ = count(name, size, device, torch.float32)
            cin, h, w, mid, key, k = SIZES[size]

            def forward():
                with torch.no_grad():
                    net.head(name, x, regions, mid, key)

            def train():
                net.head(name, x, regions, mid, key).sum().backward()

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row["seconds_forward"] = timed(forward, device, repeats)
            if device == "cuda":
                row["peak_bytes_forward"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            row["seconds_train"] = timed(train, device, repeats)
            if device == "cuda":
                row["peak_bytes_train"] = torch.cuda.max_memory_allocated()
        rows.append(row)
        print(" ".join(str(row.get(c, "-")) for c in COLUMNS), flush=True)
    if table_path:
        where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        with open(table_path, "w") as f:
            f.write(f"# tools/reference/context_heads.py complexity --size {size}: PyTorch {torch.__version__}")
            f.write(f", times on {where}\n" if with_time else ", counts only\n")
            f.write("# " + " ".join(COLUMNS) + "\n")
            for row in rows:
                f.write(" ".join(str(row.get(c, "-")) for c in COLUMNS) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fx = sub.add_parser("fixtures")
    fx.add_argument("--out", default="tests/fixtures")
    fx.add_argument("--seed", type=int, default=20261206)
    cx = sub.add_parser("complexity")
    cx.add_argument("--size", choices=sorted(SIZES), default="small")
    cx.add_argument("--table")
    cx.add_argument("--time", action="store_true")
    cx.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.cmd == "fixtures":
        torch.set_num_threads(1)
        fixtures(args.out, args.seed)
    else:
        complexity(args.size, args.table, args.time, args.repeats)


if __name__ == "__main__":
    main()
