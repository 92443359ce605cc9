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

import numpy as np
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

# resize cases: n c h w ho wo align_corners (bilinear)
RESIZE_CASES = [
    (1, 3, 9, 13, 18, 26, 1),    # upsample x2
    (1, 2, 5, 7, 18, 25, 1),     # odd upsample
    (1, 2, 18, 25, 9, 13, 1),    # downsample
    (1, 2, 6, 5, 1, 1, 1),       # output 1x1
    (1, 2, 6, 5, 1, 7, 1),       # output 1 in one dim only
    (1, 2, 1, 1, 5, 4, 1),       # input 1x1
    (2, 3, 7, 9, 16, 20, 0),     # align_corners=False upsample
    (1, 2, 20, 17, 7, 6, 0),     # align_corners=False downsample
    (1, 2, 9, 13, 13, 29, 0),    # align_corners=False, non-integer ratios
    (2, 4, 8, 16, 32, 64, 1),    # batch 2, x4
]

# softmax cases: outer len inner scale, x multiplier (not in the metadata)
SOFTMAX_CASES = [
    (1, 131072, 1, 1.0, 3.0),    # one spatial row as long as 256x512
    (2, 19, 256, 1.0, 1.0),      # over the channels of NCHW (inner = h*w)
    (64, 19, 1, 0.0625, 1.0),    # rows of K regions, scaled
    (3, 1, 5, 1.0, 1.0),         # length 1: out = 1, grad = 0
    (2, 777, 1, 2.0, 1.0),
    (1, 7, 9, 1.0, 1e4),         # |x| ~ 1e4: needs the max subtraction
]

# matmul cases: batch m k n trans_a trans_b
MATMUL_CASES = [
    (2, 13, 17, 11, 0, 0),
    (2, 13, 17, 11, 1, 0),
    (2, 13, 17, 11, 0, 1),
    (2, 13, 17, 11, 1, 1),
    (1, 1, 1, 1, 0, 0),
    (1, 64, 270, 19, 0, 0),
    (2, 320, 19, 32, 1, 0),     # OCR-like: pixels x regions, A stored [k, m]
    (2, 33, 5, 129, 0, 1),
]

# spatial gather cases: n k c h w, aux multiplier (not in the metadata)
SPATIAL_GATHER_CASES = [
    (1, 19, 32, 16, 24, 1.0),
    (2, 5, 12, 9, 13, 1.0),
    (1, 3, 7, 35, 49, 1.0),
    (1, 19, 16, 24, 40, 4.0),   # sharper softmax over more pixels
]

# object attention cases: n key k h w
OBJECT_ATTENTION_CASES = [
    (1, 16, 19, 9, 13),
    (2, 32, 5, 8, 8),
    (1, 256, 19, 6, 8),     # OCR's key_channels = 256, softmax not saturated
    (1, 8, 1, 5, 7),        # a single region: softmax over k is 1
]

IGNORE_LABEL = 255
CITYSCAPES_CLASS_WEIGHTS = [
    0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
    0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507,
]

# cross entropy cases: n k h w weighted, logits multiplier, ignored fraction
CE_CASES = [
    (1, 19, 16, 24, 1, 2.0, 0.2),
    (2, 5, 9, 13, 0, 2.0, 0.2),
    (1, 3, 7, 5, 1, 2.0, 0.2),
    (1, 4, 3, 3, 0, 2.0, 1.0),   # every pixel ignored
]

# OHEM cases: n k h w thresh min_kept weighted, logits multiplier, and which
# term sets the threshold (checked): "thresh", "min_kept" or "all" (min_kept
# > number of valid pixels, so the largest probability is the candidate).
OHEM_CASES = [
    (2, 19, 16, 16, 0.7, 100, 0, 2.0, "thresh"),
    (1, 19, 16, 16, 0.05, 200, 1, 2.0, "min_kept"),
    (1, 5, 9, 13, 0.9, 1000, 0, 2.0, "all"),
    (1, 4, 8, 8, 0.7, 50, 0, 4.0, "min_kept"),  # saturated probabilities
]

# SGD cases: len steps momentum weight_decay nesterov
SGD_CASES = [
    (1000, 3, 0.9, 5e-4, 0),
    (257, 4, 0.9, 1e-4, 1),
    (5, 2, 0.0, 0.0, 0),
]
SGD_BASE_LR = 0.1
SGD_POLY_POWER = 0.9
SGD_MAX_ITERS = 6      # short poly schedule so the lr visibly changes per step

# metrics cases: n k h w
METRICS_CASES = [
    (1, 19, 16, 24),
    (2, 5, 9, 13),
]

# concat cases: n h w, then the channel counts of the inputs
CONCAT_CASES = [
    (2, 5, 7, [3, 4, 1]),
    (1, 4, 6, [18, 36, 72, 144]),   # HRNet's four branches (w18) at one size
    (3, 1, 1, [2, 2]),
]

# dropout2d cases: n c h w seed p
DROPOUT_CASES = [
    (2, 64, 3, 5, 12345, 0.05),
    (1, 512, 2, 2, 7, 0.5),
    (3, 8, 1, 1, 4000000000, 0.2),   # seed above 2^31
]


# ---------------------------------------------------------------- helpers

class Sampler:
    """Draws float32 tensors from a private generator (deterministic per seed)."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float32)

    def uniform(self, lo, hi, *shape):
        return torch.rand(*shape, generator=self.gen, dtype=torch.float32) * (hi - lo) + lo

    def labels(self, k, ignored, *shape):
        """int32 class labels in [0, k), a fraction `ignored` set to IGNORE_LABEL."""
        label = torch.randint(0, k, shape, generator=self.gen, dtype=torch.int32)
        drop = torch.rand(*shape, generator=self.gen) < ignored
        return label.masked_fill(drop, IGNORE_LABEL)


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
        assert t.dtype in (torch.float32, torch.int32) and t.is_contiguous(), key
    save_file(tensors, path, metadata=metadata)
    canonicalize_header(path)
    print(f"  wrote {path}: {len(tensors)} tensors, {os.path.getsize(path)} bytes")
    return os.path.getsize(path)


def nums(values):
    """Metadata string: ints as is, floats as their shortest round-trip literal (0.0625)."""
    return " ".join(repr(float(v)) if isinstance(v, float) else str(int(v)) for v in values)


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
        meta[c] = nums(case)
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
        meta[c] = nums((n, ch, h, w))
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
        meta[c] = nums(shape)
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
    return tensors, {"shape": nums(RESIDUAL_SHAPE)}


def make_resize(s):
    tensors, meta = {}, {}
    for i, case in enumerate(RESIZE_CASES):
        n, ch, h, w, ho, wo, align = case
        c = f"case{i}"
        x = s.randn(n, ch, h, w)
        grad_out = s.randn(n, ch, ho, wo)

        x64 = f64(x, True)
        out = F.interpolate(x64, size=(ho, wo), mode="bilinear", align_corners=bool(align))
        out.backward(f64(grad_out))

        tensors[f"{c}.x"] = x
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.out"] = f32(out)
        tensors[f"{c}.grad_x"] = f32(x64.grad)
        meta[c] = nums(case)
        print(f"  resize {c}: [{n},{ch},{h},{w}] -> [{ho},{wo}] align_corners={align}")
    return tensors, meta


def make_softmax(s):
    tensors, meta = {}, {}
    for i, (outer, length, inner, scale, mult) in enumerate(SOFTMAX_CASES):
        c = f"case{i}"
        x = s.randn(outer, length, inner) * mult
        grad_out = s.randn(outer, length, inner)

        x64 = f64(x, True)
        out = torch.softmax(scale * x64, dim=1)
        out.backward(f64(grad_out))

        tensors[f"{c}.x"] = x
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.out"] = f32(out)
        tensors[f"{c}.grad_x"] = f32(x64.grad)
        meta[c] = nums((outer, length, inner, scale))
        print(f"  softmax {c}: [{outer},{length},{inner}] scale={scale} |x|~{mult}")
    return tensors, meta


def make_matmul(s):
    tensors, meta = {}, {}
    for i, case in enumerate(MATMUL_CASES):
        batch, m, k, n, trans_a, trans_b = case
        c = f"case{i}"
        a = s.randn(batch, *((k, m) if trans_a else (m, k)))
        b = s.randn(batch, *((n, k) if trans_b else (k, n)))
        grad_out = s.randn(batch, m, n)

        a64, b64 = f64(a, True), f64(b, True)
        op_a = a64.transpose(1, 2) if trans_a else a64
        op_b = b64.transpose(1, 2) if trans_b else b64
        out = torch.bmm(op_a, op_b)
        out.backward(f64(grad_out))

        tensors[f"{c}.a"] = a
        tensors[f"{c}.b"] = b
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.out"] = f32(out)
        tensors[f"{c}.grad_a"] = f32(a64.grad)
        tensors[f"{c}.grad_b"] = f32(b64.grad)
        meta[c] = nums(case)
        print(f"  matmul {c}: {batch} x [{m},{k}] @ [{k},{n}] "
              f"trans_a={trans_a} trans_b={trans_b}")
    return tensors, meta


def make_spatial_gather(s):
    tensors, meta = {}, {}
    for i, (n, k, ch, h, w, mult) in enumerate(SPATIAL_GATHER_CASES):
        c = f"case{i}"
        aux = s.randn(n, k, h, w) * mult
        feats = s.randn(n, ch, h, w)
        grad_out = s.randn(n, ch, k, 1)

        aux64, feats64 = f64(aux, True), f64(feats, True)
        probs = torch.softmax(aux64.view(n, k, h * w), dim=2)          # over pixels
        context = torch.bmm(probs, feats64.view(n, ch, h * w).transpose(1, 2))  # [n,k,c]
        out = context.permute(0, 2, 1).unsqueeze(3)                     # [n,c,k,1]
        out.backward(f64(grad_out))

        tensors[f"{c}.aux"] = aux
        tensors[f"{c}.feats"] = feats
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.out"] = f32(out)
        tensors[f"{c}.grad_aux"] = f32(aux64.grad)
        tensors[f"{c}.grad_feats"] = f32(feats64.grad)
        meta[c] = nums((n, k, ch, h, w))
        print(f"  spatial_gather {c}: aux[{n},{k},{h},{w}] feats[{n},{ch},{h},{w}] |aux|~{mult}")
    return tensors, meta


def make_object_attention(s):
    tensors, meta = {}, {}
    for i, case in enumerate(OBJECT_ATTENTION_CASES):
        n, kc, k, h, w = case  # kc = key channels, k = number of regions
        c = f"case{i}"
        query = s.randn(n, kc, h, w)
        key = s.randn(n, kc, k, 1)
        value = s.randn(n, kc, k, 1)
        grad_out = s.randn(n, kc, h, w)

        q64, k64, v64 = f64(query, True), f64(key, True), f64(value, True)
        q = q64.view(n, kc, h * w).permute(0, 2, 1)   # [n, hw, kc]
        kk = k64.view(n, kc, k)                       # [n, kc, k]
        v = v64.view(n, kc, k).permute(0, 2, 1)       # [n, k, kc]
        sim = torch.softmax(torch.bmm(q, kk) * kc ** -0.5, dim=-1)  # over regions
        out = torch.bmm(sim, v).permute(0, 2, 1).reshape(n, kc, h, w)
        out.backward(f64(grad_out))

        tensors[f"{c}.query"] = query
        tensors[f"{c}.key"] = key
        tensors[f"{c}.value"] = value
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.out"] = f32(out)
        tensors[f"{c}.grad_query"] = f32(q64.grad)
        tensors[f"{c}.grad_key"] = f32(k64.grad)
        tensors[f"{c}.grad_value"] = f32(v64.grad)
        meta[c] = nums(case)
        print(f"  object_attention {c}: query[{n},{kc},{h},{w}] key/value[{n},{kc},{k},1] "
              f"max sim {sim.max().item():.3f}")
    return tensors, meta


def class_weights(s, k):
    """Cityscapes class weights for 19 classes, random in [0.5, 1.5) otherwise."""
    if k == len(CITYSCAPES_CLASS_WEIGHTS):
        return torch.tensor(CITYSCAPES_CLASS_WEIGHTS, dtype=torch.float32)
    return s.uniform(0.5, 1.5, k)


def ohem_cross_entropy(logits, label, weight, thresh, min_kept):
    """HRNet-OCR's OhemCrossEntropy on float64 logits.

    Returns (loss, kept mask, threshold, sorted target probabilities of the
    valid pixels). Pixels are kept when valid and their target probability is
    strictly below max(p_sorted[min(min_kept, valid - 1)], thresh).
    """
    target = label.long()
    pixel_losses = F.cross_entropy(logits, target, weight=weight,
                                   ignore_index=IGNORE_LABEL, reduction="none")
    valid = target != IGNORE_LABEL
    with torch.no_grad():
        index = target.masked_fill(~valid, 0).unsqueeze(1)  # ignored: class 0, masked anyway
        prob = torch.softmax(logits, dim=1).gather(1, index).squeeze(1)
        p_sorted = prob[valid].sort().values
        threshold = max(p_sorted[min(min_kept, p_sorted.numel() - 1)].item(), thresh)
        kept = valid & (prob < threshold)
    return pixel_losses[kept].mean(), kept, threshold, p_sorted


def make_losses(s):
    tensors, meta = {}, {}
    for i, case in enumerate(CE_CASES):
        n, k, h, w, weighted, mult, ignored = case
        c = f"ce{i}"
        logits = s.randn(n, k, h, w) * mult
        label = s.labels(k, ignored, n, h, w)
        weight = class_weights(s, k) if weighted else None

        x64 = f64(logits, True)
        loss = F.cross_entropy(x64, label.long(), weight=f64(weight) if weighted else None,
                               ignore_index=IGNORE_LABEL)
        if (label == IGNORE_LABEL).all():
            # PyTorch's mean over zero pixels is 0/0 = NaN. Our documented
            # semantics: no valid pixel gives loss 0 and a zero gradient.
            assert torch.isnan(loss), case
            loss_value, grad = torch.zeros(1), torch.zeros_like(logits)
        else:
            loss.backward()
            loss_value, grad = f32(loss.view(1)), f32(x64.grad)

        tensors[f"{c}.logits"] = logits
        tensors[f"{c}.label"] = label
        if weighted:
            tensors[f"{c}.weight"] = weight
        tensors[f"{c}.loss"] = loss_value
        tensors[f"{c}.grad_logits"] = grad
        meta[c] = nums((n, k, h, w, weighted))
        print(f"  cross_entropy {c}: [{n},{k},{h},{w}] weighted={weighted} "
              f"valid={(label != IGNORE_LABEL).sum().item()} loss={loss_value.item():.6f}")

    for i, case in enumerate(OHEM_CASES):
        n, k, h, w, thresh, min_kept, weighted, mult, regime = case
        c = f"ohem{i}"
        logits = s.randn(n, k, h, w) * mult
        label = s.labels(k, 0.2, n, h, w)
        weight = class_weights(s, k) if weighted else None

        x64 = f64(logits, True)
        loss, kept, threshold, p_sorted = ohem_cross_entropy(
            x64, label, f64(weight) if weighted else None, thresh, min_kept)
        loss.backward()

        # Check that each case exercises the intended branch, and that no other
        # target probability sits so close to the threshold that float32
        # kernels could keep a different set of pixels.
        valid = p_sorted.numel()
        candidate = p_sorted[min(min_kept, valid - 1)].item()
        assert {"thresh": candidate < thresh,
                "min_kept": min_kept < valid and candidate > thresh,
                "all": min_kept > valid}[regime], (case, candidate, valid)
        others = p_sorted[p_sorted != threshold]
        gap = (others - threshold).abs().min().item()
        assert gap > 1e-5 * threshold, (case, gap)
        assert kept.any(), case

        tensors[f"{c}.logits"] = logits
        tensors[f"{c}.label"] = label
        if weighted:
            tensors[f"{c}.weight"] = weight
        tensors[f"{c}.loss"] = f32(loss.view(1))
        tensors[f"{c}.grad_logits"] = f32(x64.grad)
        tensors[f"{c}.kept"] = f32(kept)
        tensors[f"{c}.threshold"] = torch.tensor([threshold], dtype=torch.float32)
        meta[c] = nums((n, k, h, w, thresh, min_kept, weighted))
        print(f"  ohem {c}: [{n},{k},{h},{w}] thresh={thresh} min_kept={min_kept} "
              f"weighted={weighted} valid={valid} kept={kept.sum().item()} "
              f"threshold={threshold:.6f} ({regime}) gap={gap:.2e} loss={loss.item():.6f}")
    return tensors, meta


def sgd_by_hand(param, grads, lr, momentum, weight_decay, nesterov):
    """The update rule of torch.optim.SGD (dampening 0), written out."""
    p, buf = param.clone(), None
    for g, step_lr in zip(grads, lr.tolist()):
        d = g + weight_decay * p
        if momentum != 0:
            buf = d.clone() if buf is None else momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        p = p - step_lr * d
    return p, buf


def make_sgd(s):
    tensors, meta = {}, {}
    for i, case in enumerate(SGD_CASES):
        length, steps, momentum, weight_decay, nesterov = case
        c = f"case{i}"
        param = s.randn(length)
        grads = s.randn(steps, length)
        # Poly schedule, rounded to float32 first: the stored lr is the one used.
        lr = torch.tensor([SGD_BASE_LR * (1 - t / SGD_MAX_ITERS) ** SGD_POLY_POWER
                           for t in range(steps)], dtype=torch.float32)

        p64 = f64(param, True)
        opt = torch.optim.SGD([p64], lr=lr[0].item(), momentum=momentum,
                              weight_decay=weight_decay, nesterov=bool(nesterov),
                              foreach=False)
        for t in range(steps):
            opt.param_groups[0]["lr"] = lr[t].item()
            p64.grad = f64(grads[t])
            opt.step()
        # With momentum 0 PyTorch keeps no buffer; store zeros.
        buf = opt.state[p64].get("momentum_buffer")
        buf = torch.zeros(length, dtype=torch.float64) if buf is None else buf

        p_ref, buf_ref = sgd_by_hand(f64(param), f64(grads), lr, momentum,
                                     weight_decay, nesterov)
        assert torch.allclose(p64.detach(), p_ref, rtol=0, atol=1e-12), case
        assert buf_ref is None or torch.allclose(buf, buf_ref, rtol=0, atol=1e-12), case

        tensors[f"{c}.param"] = param
        tensors[f"{c}.grads"] = grads
        tensors[f"{c}.lr"] = lr
        tensors[f"{c}.param_final"] = f32(p64)
        tensors[f"{c}.momentum_final"] = f32(buf)
        meta[c] = nums(case)
        print(f"  sgd {c}: len={length} steps={steps} momentum={momentum} "
              f"weight_decay={weight_decay} nesterov={nesterov} lr={lr.tolist()}")
    return tensors, meta


def make_metrics(s):
    tensors, meta = {}, {}
    for i, case in enumerate(METRICS_CASES):
        n, k, h, w = case
        c = f"case{i}"
        logits = s.randn(n, k, h, w)
        label = s.labels(k, 0.1, n, h, w)

        top2 = logits.topk(2, dim=1).values
        assert (top2[:, 0] > top2[:, 1]).all(), "argmax tie"
        pred = logits.argmax(dim=1).to(torch.int32)
        # get_confusion_matrix convention: row = ground truth, column = prediction.
        valid = label != IGNORE_LABEL
        index = label[valid].long() * k + pred[valid].long()
        confusion = torch.bincount(index, minlength=k * k).view(k, k).to(torch.int32)

        tensors[f"{c}.logits"] = logits
        tensors[f"{c}.label"] = label
        tensors[f"{c}.pred"] = pred
        tensors[f"{c}.confusion"] = confusion
        meta[c] = nums(case)
        print(f"  metrics {c}: [{n},{k},{h},{w}] valid={valid.sum().item()} "
              f"correct={confusion.diagonal().sum().item()}")
    return tensors, meta


def make_concat(s):
    tensors, meta = {}, {}
    for i, (n, h, w, chans) in enumerate(CONCAT_CASES):
        c = f"case{i}"
        inputs = [s.randn(n, ci, h, w) for ci in chans]
        grad_out = s.randn(n, sum(chans), h, w)

        in64 = [f64(x, True) for x in inputs]
        out = torch.cat(in64, dim=1)
        out.backward(f64(grad_out))

        for j, (x, x64) in enumerate(zip(inputs, in64)):
            tensors[f"{c}.in{j}"] = x
            tensors[f"{c}.grad_in{j}"] = f32(x64.grad)
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.out"] = f32(out)
        meta[c] = nums((n, h, w, *chans))
        print(f"  concat {c}: [{n},{'+'.join(map(str, chans))},{h},{w}] -> "
              f"[{n},{sum(chans)},{h},{w}]")
    return tensors, meta


def hash32(v):
    """32-bit integer hash (all arithmetic modulo 2^32) of the dropout mask."""
    h = v & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def dropout_keep(n, ch, seed, p):
    """Counter-based Dropout2d mask [n, ch]: unit n*ch + c is kept when u >= p.

    u = top 24 bits of hash32(hash32(seed) ^ unit) / 2^24, exact in float32;
    the comparison is done in float32 against float32(p).
    """
    base = hash32(seed)
    keep = np.zeros((n, ch), dtype=bool)
    for b in range(n):
        for k in range(ch):
            u = np.float32((hash32(base ^ (b * ch + k)) >> 8) / 16777216.0)
            keep[b, k] = u >= np.float32(p)
    return keep


def make_dropout(s):
    tensors, meta = {}, {}
    for i, case in enumerate(DROPOUT_CASES):
        n, ch, h, w, seed, p = case
        c = f"case{i}"
        x = s.randn(n, ch, h, w)
        grad_out = s.randn(n, ch, h, w)

        keep = dropout_keep(n, ch, seed, p)
        assert keep.any() and not keep.all(), case
        # float32 scale and float32 product, so the reference is bit-exact:
        # x * scale where kept, +0.0 where dropped.
        scale = np.float32(1.0) / (np.float32(1.0) - np.float32(p))
        mask = keep[:, :, None, None]
        zero = np.float32(0.0)
        out = np.where(mask, x.numpy() * scale, zero).astype(np.float32)
        grad_x = np.where(mask, grad_out.numpy() * scale, zero).astype(np.float32)

        tensors[f"{c}.x"] = x
        tensors[f"{c}.out"] = torch.from_numpy(np.ascontiguousarray(out))
        tensors[f"{c}.grad_out"] = grad_out
        tensors[f"{c}.grad_x"] = torch.from_numpy(np.ascontiguousarray(grad_x))
        tensors[f"{c}.keep"] = torch.from_numpy(keep.astype(np.float32))
        meta[c] = nums(case)
        print(f"  dropout {c}: [{n},{ch},{h},{w}] seed={seed} p={p} scale={float(scale)!r} "
              f"kept={int(keep.sum())}/{keep.size}")
    return tensors, meta


# Each file gets its own generator (seed + index in this list) so that editing
# the cases of one file does not change the random data of the others. Only
# append: inserting a file would renumber the streams of the files after it.
FIXTURES = [
    ("conv2d.safetensors", make_conv2d),
    ("batch_norm.safetensors", make_batch_norm),
    ("elementwise.safetensors", make_elementwise),
    ("residual_block.safetensors", make_residual_block),
    ("resize.safetensors", make_resize),
    ("softmax.safetensors", make_softmax),
    ("matmul.safetensors", make_matmul),
    ("spatial_gather.safetensors", make_spatial_gather),
    ("object_attention.safetensors", make_object_attention),
    ("losses.safetensors", make_losses),
    ("sgd.safetensors", make_sgd),
    ("metrics.safetensors", make_metrics),
    ("concat.safetensors", make_concat),
    ("dropout.safetensors", make_dropout),
]

# Size budgets in bytes: the layer fixtures (the first four files), the
# OCR/training fixtures after them and the extra layers (concat, dropout)
# at the end are capped separately.
LAYER_FIXTURES = 4
OCR_FIXTURES = 12      # files [LAYER_FIXTURES, OCR_FIXTURES) of FIXTURES
LAYER_BUDGET = 5 * 10**6
OCR_BUDGET = 4.5 * 10**6
EXTRA_BUDGET = 300 * 10**3


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

    sizes = []
    for index, (name, make) in enumerate(FIXTURES):
        tensors, meta = make(Sampler(args.seed + index))
        sizes.append(save(tensors, meta, args.out, name))
    layer = sum(sizes[:LAYER_FIXTURES])
    ocr = sum(sizes[LAYER_FIXTURES:OCR_FIXTURES])
    extra = sum(sizes[OCR_FIXTURES:])
    for what, total in (("layer", layer), ("ocr/training", ocr), ("extra", extra),
                        ("total", layer + ocr + extra)):
        print(f"{what}: {total} bytes ({total / 2**20:.2f} MiB)")
    assert layer < LAYER_BUDGET, "layer fixtures must stay under 5 MB"
    assert ocr < OCR_BUDGET, "ocr/training fixtures must stay under 4.5 MB"
    assert extra < EXTRA_BUDGET, "concat/dropout fixtures must stay under 300 KB"


if __name__ == "__main__":
    main()
