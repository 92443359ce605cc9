#!/usr/bin/env python3
"""Generate PyTorch reference fixtures for the hrnet-ocr kernel tests.

Every fixture file is a safetensors archive holding the inputs and the
expected outputs/gradients of one family of operations. Inputs are drawn as
float32, then promoted to float64 for *all* arithmetic (forward and autograd
backward), and the results are rounded back to float32 for storage. That way
the stored reference is the correctly rounded answer for exactly the float32
inputs the Rust side reads, and test tolerances only have to absorb the
error of the GPU kernels, not of the reference.

Usage (from the repository root):

    python3 tools/reference/make_fixtures.py [--out tests/fixtures] [--seed N]
"""

import argparse
import json
import os
import struct

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

DEFAULT_SEED = 20261124
BN_MOMENTUM = 0.1
BN_EPS = 1e-5

# conv2d cases: n ci h w co kh kw stride pad dil bias
CONV_CASES = [
    (1, 4, 8, 8, 6, 1, 1, 1, 0, 1, 1),       # 1x1 conv (pointwise)
    (1, 3, 10, 12, 5, 3, 3, 1, 1, 1, 0),     # 3x3 stride 1 pad 1, no bias
    (1, 3, 70, 98, 4, 3, 3, 2, 1, 1, 1),     # 3x3 stride 2 pad 1, odd-ish 70x98 -> 35x49
    (1, 4, 12, 10, 4, 3, 3, 1, 2, 2, 0),     # 3x3 dilation 2 pad 2
    (1, 3, 32, 24, 8, 7, 7, 2, 3, 1, 0),     # 7x7 stride 2 pad 3 (stem-like)
    (2, 5, 9, 11, 7, 3, 3, 1, 1, 1, 1),      # batch 2
    (1, 6, 13, 9, 6, 3, 3, 1, 1, 1, 1),      # non-square odd 13x9
    (1, 4, 11, 7, 5, 3, 1, 1, 0, 1, 1),      # 3x1 kernel
    (2, 3, 7, 13, 4, 1, 5, 1, 2, 1, 0),      # 1x5 kernel (pad 2 on both axes)
    (1, 8, 15, 17, 16, 3, 3, 2, 0, 1, 1),    # pad 0 stride 2
    (2, 16, 16, 16, 16, 3, 3, 1, 1, 1, 0),   # widest channels, batch 2
]

# batch_norm / elementwise cases: n c h w
BN_CASES = [
    (1, 3, 7, 5),
    (2, 4, 9, 13),
    (2, 16, 32, 32),
    (1, 8, 35, 49),
    (4, 6, 1, 1),   # one spatial element per sample: stats come from N only
]

ELEMENTWISE_CASES = [
    (1, 3, 7, 5),
    (2, 4, 9, 13),
    (1, 8, 35, 49),
    (3, 5, 1, 11),
]

RESIDUAL_SHAPE = (2, 6, 11, 9)


# ---------------------------------------------------------------- helpers

class Sampler:
    """Draws float32 tensors from a private generator (deterministic per seed)."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float32)

    def uniform(self, lo, hi, *shape):
        return torch.rand(*shape, generator=self.gen, dtype=torch.float32) * (hi - lo) + lo


def f64(t, grad=False):
    """float32 input -> float64 leaf (exact promotion) for the reference maths."""
    return t.detach().to(torch.float64).requires_grad_(grad)


def f32(t):
    """Reference result -> contiguous float32 for storage."""
    return t.detach().to(torch.float32).contiguous()


def bn_params(s, c):
    """Random affine params and initial running stats of a batch-norm layer."""
    return {
        "weight": s.uniform(0.5, 1.5, c) * torch.sign(s.randn(c)),  # nonzero, mixed sign
        "bias": s.randn(c),
        "running_mean": s.randn(c),
        "running_var": s.uniform(0.5, 2.0, c),  # must be positive
    }


def bn_input(s, n, c, h, w):
    """randn*2 plus a per-channel offset in [-3, 3] so batch means are not ~0."""
    offset = s.uniform(-3.0, 3.0, c).view(1, c, 1, 1)
    return s.randn(n, c, h, w) * 2.0 + offset


def bn_train(x, p, weight, bias):
    """Training-mode batch norm in float64; returns (out, new_mean, new_var).

    F.batch_norm updates the running buffers in place (running_var with the
    unbiased batch variance), so it is handed float64 copies of the initial
    values, which are returned as the updated stats.
    """
    rm = f64(p["running_mean"])
    rv = f64(p["running_var"])
    out = F.batch_norm(x, rm, rv, weight, bias, training=True,
                       momentum=BN_MOMENTUM, eps=BN_EPS)
    return out, rm, rv


def conv_out_size(size, k, stride, pad, dil):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def canonicalize_header(path):
    """Rewrite the JSON header with the metadata keys in a fixed order.

    safetensors keeps metadata in a hash map, so its key order (and thus the
    file bytes) changes from run to run. Reordering the keys keeps the header
    length, so the data section is untouched and regenerated fixtures are
    byte-identical (no spurious diffs in git).
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        meta = header.pop("__metadata__", None)
        if meta is not None:
            order = sorted(meta, key=lambda k: (len(k), k))  # case2 < case10
            header = {"__metadata__": {k: meta[k] for k in order}, **header}
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= length, path
        f.seek(8)
        f.write(text.ljust(length, b" "))  # safetensors pads with spaces too


def save(tensors, metadata, out_dir, name):
    path = os.path.join(out_dir, name)
    for key, t in tensors.items():
        assert t.dtype == torch.float32 and t.is_contiguous(), key
    save_file(tensors, path, metadata=metadata)
    canonicalize_header(path)
    print(f"  wrote {path}: {len(tensors)} tensors, {os.path.getsize(path)} bytes")
    return os.path.getsize(path)


def ints(values):
    return " ".join(str(v) for v in values)


# ---------------------------------------------------------------- fixtures

def make_conv2d(s):
    tensors, meta = {}, {}
    for i, case in enumerate(CONV_CASES):
        n, ci, h, w, co, kh, kw, stride, pad, dil, has_bias = case
        c = f"case{i}"
        ho = conv_out_size(h, kh, stride, pad, dil)
        wo = conv_out_size(w, kw, stride, pad, dil)
        assert ho > 0 and wo > 0, case

        x = s.randn(n, ci, h, w)
        # Kaiming-like scaling keeps outputs O(1) regardless of fan-in.
        weight = s.randn(co, ci, kh, kw) / (ci * kh * kw) ** 0.5
        bias = s.randn(co) if has_bias else None
        grad_out = s.randn(n, co, ho, wo)

        x64, w64 = f64(x, True), f64(weight, True)
        b64 = f64(bias, True) if has_bias else None
        out = F.conv2d(x64, w64, b64, stride=stride, padding=pad, dilation=dil)
        assert out.shape == (n, co, ho, wo)
        # grad of sum(out * grad_out) == backward with grad_out as upstream grad
        out.backward(f64(grad_out))

        tensors[f"{c}.x"] = x
        tensors[f"{c}.weight"] = weight
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.out"] = f32(out)
        tensors[f"{c}.grad_x"] = f32(x64.grad)
        tensors[f"{c}.grad_weight"] = f32(w64.grad)
        if has_bias:
            tensors[f"{c}.bias"] = bias
            tensors[f"{c}.grad_bias"] = f32(b64.grad)
        meta[c] = ints(case)
        print(f"  conv2d {c}: x[{n},{ci},{h},{w}] w[{co},{ci},{kh},{kw}] "
              f"stride={stride} pad={pad} dil={dil} bias={has_bias} -> out[{n},{co},{ho},{wo}]")
    return tensors, meta


def make_batch_norm(s):
    tensors, meta = {}, {}
    for i, (n, ch, h, w) in enumerate(BN_CASES):
        c = f"case{i}"
        x = bn_input(s, n, ch, h, w)
        p = bn_params(s, ch)
        grad_out = s.randn(n, ch, h, w)

        x64 = f64(x, True)
        g64, b64 = f64(p["weight"], True), f64(p["bias"], True)
        out, rm_new, rv_new = bn_train(x64, p, g64, b64)
        out.backward(f64(grad_out))

        # Eval mode normalises with the *initial* running stats.
        out_eval = F.batch_norm(f64(x), f64(p["running_mean"]), f64(p["running_var"]),
                                f64(p["weight"]), f64(p["bias"]),
                                training=False, eps=BN_EPS)

        tensors[f"{c}.x"] = x
        for k, v in p.items():
            tensors[f"{c}.{k}"] = v
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.out"] = f32(out)
        tensors[f"{c}.running_mean_new"] = f32(rm_new)
        tensors[f"{c}.running_var_new"] = f32(rv_new)
        tensors[f"{c}.grad_x"] = f32(x64.grad)
        tensors[f"{c}.grad_weight"] = f32(g64.grad)
        tensors[f"{c}.grad_bias"] = f32(b64.grad)
        tensors[f"{c}.out_eval"] = f32(out_eval)
        meta[c] = ints((n, ch, h, w))
        print(f"  batch_norm {c}: [{n},{ch},{h},{w}]")
    return tensors, meta


def make_elementwise(s):
    tensors, meta = {}, {}
    for i, shape in enumerate(ELEMENTWISE_CASES):
        c = f"case{i}"
        a, b, grad_out = s.randn(*shape), s.randn(*shape), s.randn(*shape)
        g = f64(grad_out)

        a64 = f64(a, True)
        relu_out = F.relu(a64)
        relu_out.backward(g)
        relu_grad = a64.grad

        add_out = f64(a) + f64(b)

        a64, b64 = f64(a, True), f64(b, True)
        add_relu_out = F.relu(a64 + b64)
        add_relu_out.backward(g)
        # d/da and d/db of relu(a + b) are the same tensor.
        assert torch.equal(a64.grad, b64.grad)

        tensors[f"{c}.a"] = a
        tensors[f"{c}.b"] = b
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.relu_out"] = f32(relu_out)
        tensors[f"{c}.relu_grad_a"] = f32(relu_grad)
        tensors[f"{c}.add_out"] = f32(add_out)
        tensors[f"{c}.add_relu_out"] = f32(add_relu_out)
        tensors[f"{c}.add_relu_grad"] = f32(a64.grad)
        meta[c] = ints(shape)
        print(f"  elementwise {c}: [{','.join(map(str, shape))}]")
    return tensors, meta


def make_residual_block(s):
    n, ch, h, w = RESIDUAL_SHAPE
    scale = 1.0 / (ch * 9) ** 0.5
    x = s.randn(n, ch, h, w)
    conv1_w = s.randn(ch, ch, 3, 3) * scale
    bn1 = bn_params(s, ch)
    conv2_w = s.randn(ch, ch, 3, 3) * scale
    bn2 = bn_params(s, ch)
    grad_out = s.randn(n, ch, h, w)

    x64 = f64(x, True)
    c1, c2 = f64(conv1_w, True), f64(conv2_w, True)
    g1, b1 = f64(bn1["weight"], True), f64(bn1["bias"], True)
    g2, b2 = f64(bn2["weight"], True), f64(bn2["bias"], True)

    # BasicBlock: conv-bn-relu-conv-bn, identity shortcut, relu after the add.
    y = F.conv2d(x64, c1, stride=1, padding=1)
    y, rm1, rv1 = bn_train(y, bn1, g1, b1)
    y = F.relu(y)
    y = F.conv2d(y, c2, stride=1, padding=1)
    y, rm2, rv2 = bn_train(y, bn2, g2, b2)
    out = F.relu(y + x64)
    out.backward(f64(grad_out))

    tensors = {
        "x": x,
        "conv1.weight": conv1_w,
        "conv2.weight": conv2_w,
        "grad_out": grad_out,
        "out": f32(out),
        "grad.x": f32(x64.grad),
        "grad.conv1.weight": f32(c1.grad),
        "grad.bn1.weight": f32(g1.grad),
        "grad.bn1.bias": f32(b1.grad),
        "grad.conv2.weight": f32(c2.grad),
        "grad.bn2.weight": f32(g2.grad),
        "grad.bn2.bias": f32(b2.grad),
        "new.bn1.running_mean": f32(rm1),
        "new.bn1.running_var": f32(rv1),
        "new.bn2.running_mean": f32(rm2),
        "new.bn2.running_var": f32(rv2),
    }
    for name, p in (("bn1", bn1), ("bn2", bn2)):
        for k, v in p.items():
            tensors[f"{name}.{k}"] = v
    print(f"  residual_block: [{n},{ch},{h},{w}]")
    return tensors, {"shape": ints(RESIDUAL_SHAPE)}


# Each file gets its own generator (seed + index) so that editing the cases
# of one file does not change the random data of the others.
FIXTURES = [
    ("conv2d.safetensors", make_conv2d),
    ("batch_norm.safetensors", make_batch_norm),
    ("elementwise.safetensors", make_elementwise),
    ("residual_block.safetensors", make_residual_block),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/fixtures",
                        help="output directory (default: tests/fixtures)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"base random seed (default: {DEFAULT_SEED})")
    args = parser.parse_args()

    # CPU only and single-threaded: reductions always run in the same order,
    # so the output is bit-identical from run to run.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    print(f"seed = {args.seed}, torch {torch.__version__}, out = {args.out}")

    total = 0
    for index, (name, make) in enumerate(FIXTURES):
        tensors, meta = make(Sampler(args.seed + index))
        total += save(tensors, meta, args.out, name)
    print(f"total {total} bytes ({total / 2**20:.2f} MiB)")
    assert total < 5 * 10**6, "fixtures must stay under 5 MB"


if __name__ == "__main__":
    main()
