#!/usr/bin/env python3
"""PyTorch (CPU) on the whole model: W18-small-v2 + OCR, forward and training step.

Builds the independent PyTorch reference implementation (tools/reference/hrnet_ocr.py)
with the W18-small-v2 layout (the official Cityscapes W48 experiment file with the
stages narrowed: stage-1 blocks 2; stages 2-4 with 1, 3, 2 modules of 2 blocks per branch;
widths 18/36/72/144), and times at N x 3 x H x W (default 2x3x256x256):

* forward: an inference forward (eval mode, no autograd), as `hrnet-ocr bench` times;
* training step: zero_grad, forward, the OCR loss (0.4 aux + main), backward, SGD step.

Prints one JSON object per pass, as the other peers do, with
"case": "w18-small-v2+ocr NxCxHxW". Usage:

    python3 benches/peers/torch_model.py [--size 256] [--batch 2] [--iters 5]
"""

import argparse
import copy
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(os.path.dirname(REPO), "shared", "official_configs", "cityscapes",
                      "seg_hrnet_ocr_w48_train_512x1024_sgd_lr1e-2_wd5e-4_bs_12_epoch484.yaml")


def w18_small_v2(cfg):
    cfg = copy.deepcopy(cfg)
    extra = cfg["MODEL"]["EXTRA"]
    extra["STAGE1"]["NUM_BLOCKS"] = [2]
    for stage, modules in (("STAGE2", 1), ("STAGE3", 3), ("STAGE4", 2)):
        branches = len(extra[stage]["NUM_CHANNELS"])
        extra[stage]["NUM_MODULES"] = modules
        extra[stage]["NUM_BLOCKS"] = [2] * branches
        extra[stage]["NUM_CHANNELS"] = [18 << b for b in range(branches)]
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("torch is not installed: pip install torch (the PyTorch peer is skipped)")
    sys.path.insert(0, os.path.join(REPO, "tools", "reference"))
    from hrnet_ocr import HRNetOCR, hrnet_ocr_loss, load_cfg

    torch.set_num_threads(os.cpu_count())
    cfg = w18_small_v2(load_cfg(CONFIG))
    model = HRNetOCR(cfg)
    n, s = args.batch, args.size
    x = torch.randn(n, 3, s, s)
    label = torch.randint(0, 19, (n, s, s))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def forward():
        model.eval()
        with torch.no_grad():
            model(x)

    def step():
        model.train()
        opt.zero_grad()
        aux, out = model(x)
        hrnet_ocr_loss(aux, out, label, cfg).backward()
        opt.step()

    adapter = f"{os.uname().machine} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
    for name, fn in (("forward", forward), ("training step", step)):
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(json.dumps({
            "peer": "pytorch-cpu",
            "case": f"w18-small-v2+ocr {n}x3x{s}x{s}",
            "pass": name,
            "ms": round(1e3 * sum(times) / len(times), 3),
            "best_ms": round(1e3 * min(times), 3),
            "first_ms": round(1e3 * first, 3),
            "iters": args.iters,
            "adapter": adapter,
        }), flush=True)


if __name__ == "__main__":
    main()
