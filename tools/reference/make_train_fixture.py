#!/usr/bin/env python3
"""Multi-step training fixture for the hrnet-ocr engine (tiny HRNet-OCR).

Starts from exactly the weights (and running statistics) in
`tests/fixtures/model/tiny_weights.safetensors` (written by
`make_model_fixtures.py`), then runs 5 SGD training steps of the tiny model
(`tests/fixtures/model/tiny_ocr.yaml`) and writes
`tests/fixtures/model/tiny_train5.safetensors`:

* model in train mode (batch statistics; BN running stats updated every step,
  momentum 0.1), OCR Dropout2d disabled (p = 0);
* 5 fixed batches: input [2,3,64,96] randn, label int64 [2,64,96] (classes
  0..4, about 10% set to 255), no augmentation;
* loss = `hrnet_ocr_loss` (0.4 * CE(aux) + 1.0 * CE(out), bilinear resize with
  align_corners True, ignore 255, mean, no class weights);
* `torch.optim.SGD(all params, lr=0.001, momentum=0.9, weight_decay=5e-4,
  nesterov=False)`, one group;
* HRNet-OCR's poly schedule: step 0 runs at base_lr; after the optimizer step
  with index i the lr becomes base_lr * (1 - i / max_iter) ** 0.9 (max_iter =
  10) for the next step, so lr_t = base_lr * (1 - (t - 1) / 10) ** 0.9, t >= 1;
* each step: zero_grad, forward, loss, backward, optimizer.step().

Tensors: `input` [5,2,3,64,96] f32, `label` [5,2,64,96] int64, `lr` [5] (the lr
each step ran with), `loss` [5] (loss of each step, before its update),
`final/<key>` for every parameter and `final_buffer/<key>` for every
running_mean / running_var after the 5 steps.

Everything runs in float64 on the CPU with one thread and deterministic
algorithms; results are stored as float32. `--check` builds twice in memory and
requires byte-identical output.

Usage (from the repository root):

    python3 tools/reference/make_train_fixture.py [--out tests/fixtures/model] [--seed N] [--check]
"""

import argparse
import hashlib
import json
import os
import sys

import torch
from safetensors.torch import load_file, save

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hrnet_ocr import HRNetOCR, hrnet_ocr_loss, load_cfg, set_dropout  # noqa: E402
from make_model_fixtures import CONFIG, DEFAULT_OUT, IGNORE_FRACTION, REPO, TRAIN_INPUT, f32, _meta  # noqa: E402

DEFAULT_SEED = 20261126
WEIGHTS = os.path.join(DEFAULT_OUT, "tiny_weights.safetensors")
OUT_NAME = "tiny_train5.safetensors"
SIZE_LIMIT = 10 * 1024 * 1024

STEPS = 5
# 0.001, not the official 0.01: at 0.01 these random tiny weights train chaotically and
# PyTorch itself in float32 leaves its own float64 run by 1.6e-3 within 4 steps, so no
# float32 engine could be held to 1e-3; at 0.001 float32 and float64 agree to ~1e-6.
BASE_LR = 0.001
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
MAX_ITER = 10
POWER = 0.9


def poly_lr(base_lr, max_iters, cur_iters):
    """HRNet-OCR's `adjust_learning_rate` (utils/utils.py)."""
    return base_lr * ((1 - float(cur_iters) / max_iters) ** POWER)


def make_batches(seed, num_classes):
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = TRAIN_INPUT
    xs, labels = [], []
    for _ in range(STEPS):
        x = torch.randn(TRAIN_INPUT, generator=gen)
        label = torch.randint(0, num_classes, (n, h, w), generator=gen, dtype=torch.int64)
        ignore = torch.rand((n, h, w), generator=gen) < IGNORE_FRACTION
        label[ignore] = 255
        xs.append(x)
        labels.append(label)
    return torch.stack(xs), torch.stack(labels)


def train(seed, cfg, weights_path, dtype=torch.float64, jitter=0.0, noise_seed=0):
    """The five steps; `jitter` scales random relative noise (drawn from `noise_seed`) put on
    every parameter after step 0, for `--sensitivity`. Returns the model, the batches, the lrs and the losses."""
    torch.manual_seed(seed)
    weights = load_file(weights_path)

    model = HRNetOCR(cfg)
    model.load_state_dict(weights, strict=True)
    set_dropout(model, 0.0)
    model.to(dtype).train()
    # the model starts from exactly the stored float32 values
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, weights[k].to(dtype)), k

    xs, labels = make_batches(seed, model.num_classes)

    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY, nesterov=False)
    lrs, losses = [], []
    for t in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        aux, out = model(xs[t].to(dtype))
        loss = hrnet_ocr_loss(aux, out, labels[t], cfg)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if t == 0 and jitter:
            noise = torch.Generator().manual_seed(noise_seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + jitter * torch.randn(p.shape, generator=noise, dtype=dtype))
        # as HRNet-OCR's train loop: adjust_learning_rate(..., i_iter + cur_iters)
        # after the step
        new_lr = poly_lr(BASE_LR, MAX_ITER, t)
        for g in opt.param_groups:
            g["lr"] = new_lr
    return model, xs, labels, lrs, losses


def final_state(model):
    tensors = {f"final/{name}": f32(p) for name, p in model.named_parameters()}
    for name, b in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            tensors[f"final_buffer/{name}"] = f32(b)
    return tensors


def sensitivity(seed, cfg, weights_path):
    """How far float32 rounding alone moves the five-step result: PyTorch's own float32 run,
    and float64 runs with every parameter jittered by 2e-7 (relative) after step 0, against
    the float64 run. Prints the worst relative L2 deviation of a final tensor."""
    want = final_state(train(seed, cfg, weights_path)[0])
    runs = [("PyTorch float32", torch.float32, 0.0)]
    runs += [(f"float64, jitter 2e-7 #{k}", torch.float64, 2e-7) for k in range(3)]
    for k, (what, dtype, jitter) in enumerate(runs):
        got = final_state(train(seed, cfg, weights_path, dtype, jitter, noise_seed=k)[0])
        err = {n: ((got[n].double() - want[n].double()).norm() / want[n].double().norm()).item()
               for n in want}
        worst = max(err, key=err.get)
        print(f"{what}: worst final tensor {worst} off by {err[worst]:.2e}")


def build(seed, cfg, weights_path):
    model, xs, labels, lrs, losses = train(seed, cfg, weights_path)
    tensors = {
        "input": f32(xs),
        "label": labels.contiguous(),
        "lr": torch.tensor(lrs, dtype=torch.float64).to(torch.float32),
        "loss": torch.tensor(losses, dtype=torch.float64).to(torch.float32),
        **final_state(model),
    }
    meta = {
        "seed": str(seed), "config": "tests/fixtures/model/tiny_ocr.yaml",
        "weights": "tests/fixtures/model/tiny_weights.safetensors",
        "steps": str(STEPS), "base_lr": str(BASE_LR), "momentum": str(MOMENTUM),
        "weight_decay": str(WEIGHT_DECAY), "nesterov": "false",
        "max_iter": str(MAX_ITER), "power": str(POWER), "dropout": "0",
    }
    data = save(tensors, metadata=_meta(meta))
    stats = {"lr": lrs, "loss": losses, "ignored": int((labels == 255).sum()),
             "n_params": sum(p.numel() for p in model.parameters())}
    return data, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--check", action="store_true",
                    help="build twice in memory and require byte-identical files")
    ap.add_argument("--sensitivity", action="store_true",
                    help="print how far float32 rounding alone moves the result, write nothing")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = load_cfg(args.config)
    if args.sensitivity:
        sensitivity(args.seed, cfg, args.weights)
        return

    data, stats = build(args.seed, cfg, args.weights)
    if args.check:
        again, _ = build(args.seed, cfg, args.weights)
        if again != data:
            raise SystemExit(f"non-deterministic output: {OUT_NAME}")
        print("determinism check: two builds byte-identical")

    print(f"seed {args.seed}, config {os.path.relpath(args.config, REPO)}, "
          f"weights {os.path.relpath(args.weights, REPO)}")
    print(f"tiny model parameters: {stats['n_params']}, ignored labels {stats['ignored']}")
    for t, (lr, loss) in enumerate(zip(stats["lr"], stats["loss"])):
        print(f"step {t}: lr {lr:.10g} loss {loss:.10f}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, OUT_NAME)
    with open(path, "wb") as f:
        f.write(data)
    print(f"{os.path.relpath(path, REPO)}: {len(data)} bytes "
          f"({len(data) / 1e6:.2f} MB) sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    if len(data) >= SIZE_LIMIT:
        raise SystemExit(f"train fixture too large: {len(data)} bytes >= {SIZE_LIMIT}")


if __name__ == "__main__":
    main()
