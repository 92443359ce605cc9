#!/usr/bin/env python3
"""PyTorch eager on the whole model (HRNet-OCR), forward and training step, on CPU or CUDA.

Builds the independent PyTorch reference implementation (tools/reference/hrnet_ocr.py)
from the official Cityscapes W48 experiment file (configs/official/cityscapes/), as it is
(`--config w48`) or with the stages narrowed to W18-small-v2 (`--config w18-small-v2`:
stage-1 blocks 2; stages 2-4 with 1, 3, 2 modules of 2 blocks per branch; widths
18/36/72/144), and times at N x 3 x H x W (default 2x3x256x256):

* forward: an inference forward (eval mode, no autograd), as `hrnet-ocr bench` times;
* training step: zero_grad, forward, the OCR loss (0.4 aux + main), backward, SGD step.

On CUDA (`--device cuda`) cuDNN autotunes (`torch.backends.cudnn.benchmark = True`) and every
timing ends with a synchronize; TF32 stays off unless `--tf32` is given.

Prints one JSON object per pass, as the other peers do, with
"case": "<config>+ocr NxCxHxW" (the name `hrnet-ocr bench --json` gives the same run). Usage:

    python3 benches/peers/torch_model.py [--config w18-small-v2] [--size 256 | HxW] [--batch 2]
        [--iters 5] [--device cpu|cuda] [--tf32] [--forward-only]
"""

import argparse
import copy
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(REPO, "configs", "official", "cityscapes",
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


def parse_size(text):
    """N or HxW, as `hrnet-ocr bench --size` takes it."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected N or HxW")
    return parts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=("w18-small-v2", "w48"), default="w18-small-v2")
    ap.add_argument("--size", type=parse_size, default=[256, 256], help="N or HxW")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 in matmul and conv")
    ap.add_argument("--forward-only", action="store_true")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("torch is not installed: pip install torch (the PyTorch peer is skipped)")
    sys.path.insert(0, os.path.join(REPO, "tools", "reference"))
    from hrnet_ocr import HRNetOCR, hrnet_ocr_loss, load_cfg

    torch.set_num_threads(os.cpu_count())
    cfg = load_cfg(CONFIG)
    if args.config == "w18-small-v2":
        cfg = w18_small_v2(cfg)
    device = torch.device(args.device)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("torch_model.py: --device cuda, but torch sees no CUDA device")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model = HRNetOCR(cfg).to(device)
    n, (h, w) = args.batch, args.size
    x = torch.randn(n, 3, h, w, device=device)
    label = torch.randint(0, 19, (n, h, w), device=device)
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

    if args.device == "cuda":
        adapter = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        peer = "pytorch-cuda-tf32" if args.tf32 else "pytorch-cuda-fp32"
    else:
        adapter = f"{os.uname().machine} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
        peer = "pytorch-cpu"

    def timed(fn):
        start = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    passes = (("forward", forward),) if args.forward_only else (("forward", forward), ("training step", step))
    for name, fn in passes:
        first = timed(fn)
        times = [timed(fn) for _ in range(args.iters)]
        print(json.dumps({
            "peer": peer,
            "case": f"{args.config}+ocr {n}x3x{h}x{w}",
            "pass": name,
            "ms": round(1e3 * sum(times) / len(times), 3),
            "best_ms": round(1e3 * min(times), 3),
            "first_ms": round(1e3 * first, 3),
            "iters": args.iters,
            "adapter": adapter,
        }), flush=True)


if __name__ == "__main__":
    main()
