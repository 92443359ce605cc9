#!/usr/bin/env python3
"""Whole-model reference fixtures for the hrnet-ocr engine (tiny HRNet-OCR).

Builds `HRNetOCR` (tools/reference/hrnet_ocr.py) from the tiny config
`tests/fixtures/model/tiny_ocr.yaml`, initialises every tensor randomly from a
fixed seed, and writes three safetensors files to `tests/fixtures/model/`:

* `tiny_weights.safetensors`: the state dict under the official key names
  (no `model.` prefix); float32, `num_batches_tracked` int64 (all 0).
* `tiny_eval.safetensors`: eval-mode forward for two inputs `a` [1,3,64,96]
  and `b` [1,3,70,98] (aux, out, feats, context, ocr_feats).
* `tiny_train.safetensors`: one train-mode forward + backward, batch 2,
  Dropout2d disabled: loss, logits, gradients of every parameter and the
  updated BN running statistics.

Weights and inputs are drawn as float32; the model then runs in float64 and
the results are stored as float32. CPU, one thread, deterministic algorithms:
the output is byte-identical from run to run (`--check` verifies that by
building everything twice in memory).

Usage (from the repository root):

    python3 tools/reference/make_model_fixtures.py [--out tests/fixtures/model] [--seed N] [--check]
"""

import argparse
import hashlib
import json
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hrnet_ocr import HRNetOCR, hrnet_ocr_loss, load_cfg, set_dropout  # noqa: E402

DEFAULT_SEED = 20261125
REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "model")
CONFIG = os.path.join(DEFAULT_OUT, "tiny_ocr.yaml")
SIZE_LIMIT = 25 * 1024 * 1024

EVAL_INPUTS = {"a": (1, 3, 64, 96), "b": (1, 3, 70, 98)}
TRAIN_INPUT = (2, 3, 64, 96)
IGNORE_FRACTION = 0.1


def init_tiny(model, gen):
    """Random float32 initialisation keeping activations O(1).

    conv weight ~ N(0, 1/fan_in) (std sqrt(1/fan_in)); conv bias ~ N(0, 0.1^2);
    BN weight ~ U(0.5, 1.5), bias ~ N(0, 0.1^2), running_mean ~ N(0, 0.1^2),
    running_var ~ U(0.5, 1.5), num_batches_tracked = 0. Tensors are drawn in
    module-registration order from one generator."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Conv2d):
                w = mod.weight
                fan_in = w.shape[1] * w.shape[2] * w.shape[3]
                w.copy_(torch.randn(w.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
            elif isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.copy_(0.5 + torch.rand(c, generator=gen))
                mod.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                mod.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                mod.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                mod.num_batches_tracked.zero_()
            elif len(list(mod.parameters(recurse=False))) > 0:
                raise TypeError(f"unexpected parameterised module {name}: {type(mod)}")


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def build(seed, cfg):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    model = HRNetOCR(cfg)
    init_tiny(model, gen)
    # the stored float32 weights are exactly the ones the float64 model uses
    weights = {}
    for k, v in model.state_dict().items():
        weights[k] = v.clone() if k.endswith("num_batches_tracked") else f32(v)
    n_params = sum(p.numel() for p in model.parameters())

    # ---- eval
    eval_t = {}
    m = HRNetOCR(cfg)
    m.load_state_dict(weights)
    m.double().eval()
    with torch.no_grad():
        for case, shape in EVAL_INPUTS.items():
            x = torch.randn(shape, generator=gen)
            r = m.forward_with_intermediates(x.double())
            eval_t[f"{case}.input"] = f32(x)
            for key in ("aux", "out", "feats", "context", "ocr_feats"):
                eval_t[f"{case}.{key}"] = f32(r[key])

    # ---- train (one forward + backward, no dropout)
    train_t = {}
    m = HRNetOCR(cfg)
    m.load_state_dict(weights)
    set_dropout(m, 0.0)
    m.double().train()
    x = torch.randn(TRAIN_INPUT, generator=gen)
    n, _, h, w = TRAIN_INPUT
    k = m.num_classes
    label = torch.randint(0, k, (n, h, w), generator=gen, dtype=torch.int64)
    ignore = torch.rand((n, h, w), generator=gen) < IGNORE_FRACTION
    label[ignore] = 255
    r = m.forward_with_intermediates(x.double())
    loss, (l_aux, l_main) = hrnet_ocr_loss(r["aux"], r["out"], label, cfg, return_terms=True)
    loss.backward()
    train_t["input"] = f32(x)
    train_t["label"] = label.contiguous()
    train_t["loss"] = f32(loss.reshape(1))
    train_t["loss_aux"] = f32(l_aux.reshape(1))
    train_t["loss_main"] = f32(l_main.reshape(1))
    for key in ("aux", "out", "feats", "context", "ocr_feats"):
        train_t[key] = f32(r[key])
    for name, p in m.named_parameters():
        train_t[f"grad/{name}"] = f32(p.grad)
    for name, b in m.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            train_t[f"buffer/{name}"] = f32(b)

    stats = {
        "n_params": n_params,
        "loss": loss.item(), "loss_aux": l_aux.item(), "loss_main": l_main.item(),
        "ignored": int(ignore.sum()),
        "eval_absmax": {c: {kk: float(eval_t[f"{c}.{kk}"].abs().max())
                            for kk in ("aux", "out", "feats", "ocr_feats")}
                        for c in EVAL_INPUTS},
        "eval_std": {c: {kk: float(eval_t[f"{c}.{kk}"].std())
                         for kk in ("aux", "out", "feats", "ocr_feats")}
                     for c in EVAL_INPUTS},
        "train_absmax": {kk: float(train_t[kk].abs().max()) for kk in ("aux", "out", "feats")},
        "zero_grad_bias": {kk: float(train_t[f"grad/{kk}"].abs().max())
                           for kk in ("conv3x3_ocr.0.bias", "aux_head.0.bias")},
    }
    meta = {"seed": str(seed), "config": "tests/fixtures/model/tiny_ocr.yaml"}
    files = {
        "tiny_weights.safetensors": save(weights, metadata=_meta(meta)),
        "tiny_eval.safetensors": save(eval_t, metadata=_meta(meta)),
        "tiny_train.safetensors": save(train_t, metadata=_meta(meta)),
    }
    return files, stats


def _meta(meta):
    # one metadata entry (a JSON string with sorted keys) so its order is stable
    return {"info": json.dumps(meta, sort_keys=True)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--check", action="store_true",
                    help="build twice in memory and require byte-identical files")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = load_cfg(args.config)

    files, stats = build(args.seed, cfg)
    if args.check:
        again, _ = build(args.seed, cfg)
        for name, data in files.items():
            if again[name] != data:
                raise SystemExit(f"non-deterministic output: {name}")
        print("determinism check: two builds byte-identical")

    print(f"seed {args.seed}, config {os.path.relpath(args.config, REPO)}")
    print(f"tiny model parameters: {stats['n_params']}")
    print(f"train loss {stats['loss']:.6f} (aux CE {stats['loss_aux']:.6f}, "
          f"main CE {stats['loss_main']:.6f}), ignored labels {stats['ignored']}")
    print(f"eval |max|: {stats['eval_absmax']}")
    print(f"eval std:   {stats['eval_std']}")
    print(f"train |max|: {stats['train_absmax']}")
    print(f"|grad| of biases before a train-mode BN (expected ~0): {stats['zero_grad_bias']}")

    os.makedirs(args.out, exist_ok=True)
    total = 0
    for name, data in files.items():
        path = os.path.join(args.out, name)
        with open(path, "wb") as f:
            f.write(data)
        total += len(data)
        print(f"{os.path.relpath(path, REPO)}: {len(data)} bytes "
              f"({len(data) / 1e6:.2f} MB) sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    print(f"total {total} bytes ({total / 1e6:.2f} MB)")
    if total >= SIZE_LIMIT:
        raise SystemExit(f"model fixtures too large: {total} bytes >= {SIZE_LIMIT}")


if __name__ == "__main__":
    main()
