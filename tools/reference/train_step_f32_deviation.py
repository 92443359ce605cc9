#!/usr/bin/env python3
"""How far PyTorch's own float32 training step lands from the float64 fixture.

`tests/fixtures/model/tiny_train.safetensors` holds one training step of the tiny model
(forward, loss, backward) computed in float64 from float32 weights and inputs; the engine's
test holds each parameter gradient to 1e-3 relative L2 of it. This script runs the same
step in float32 on a device of your choice (CPU, or CUDA with cuDNN's kernels, TF32 off
unless --tf32) and prints each gradient's relative L2 deviation from the fixture, worst
first: what float32 rounding alone does to the deepest gradients on that device.

    python3 tools/reference/train_step_f32_deviation.py [--device cpu|cuda] [--tf32] [--top 12]
"""

import argparse
import os
import sys

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from hrnet_ocr import HRNetOCR, hrnet_ocr_loss, load_cfg, set_dropout  # noqa: E402

FIXTURES = os.path.join(HERE, "..", "..", "tests", "fixtures", "model")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    device = torch.device(args.device)
    cfg = load_cfg(os.path.join(FIXTURES, "tiny_ocr.yaml"))
    weights = load_file(os.path.join(FIXTURES, "tiny_weights.safetensors"))
    fixture = load_file(os.path.join(FIXTURES, "tiny_train.safetensors"))

    model = HRNetOCR(cfg)
    model.load_state_dict(weights, strict=True)
    set_dropout(model, 0.0)
    model.to(device).float().train()
    x = fixture["input"].to(device)
    label = fixture["label"].to(device)
    aux, out = model(x)
    loss = hrnet_ocr_loss(aux, out, label, cfg)
    loss.backward()

    def rel(got, want):
        want = want.double()
        return ((got.detach().cpu().double() - want).norm() / want.norm().clamp_min(1e-30)).item()

    # Biases feeding a training-mode BN have a true gradient of zero: no relative error.
    zero = ("conv3x3_ocr.0.bias", "aux_head.0.bias")
    errors = sorted(((rel(p.grad, fixture[f"grad/{name}"]), name) for name, p in model.named_parameters()
                     if name not in zero), reverse=True)
    what = f"{args.device}{' tf32' if args.tf32 else ''}, torch {torch.__version__}"
    print(f"float32 step on {what}: loss {loss.item():.7f} (fixture {fixture['loss'].item():.7f})")
    print(f"gradients beyond 1e-3: {sum(e > 1e-3 for e, _ in errors)} of {len(errors)}")
    for err, name in errors[:args.top]:
        print(f"  {err:.2e}  {name}")
    print(f"  conv1.weight: {dict((n, e) for e, n in errors)['conv1.weight']:.2e}")


if __name__ == "__main__":
    main()
