"""The official OHEM criterion on the tiny model's outputs, as the official train loop uses it.

Runs `OhemCrossEntropy` of the official code (HRNet/HRNet-Semantic-Segmentation, branch
HRNet-OCR, commit 0bbb288: `lib/core/criterion.py`, given with --official) on the tiny
model's training-mode outputs of `tests/fixtures/model/tiny_train.safetensors` (`aux`,
`out`, their `label`) the way `lib/core/function.py` trains: `losses = criterion(outputs,
labels)` (the aux output's unreduced cross entropy plus the OHEM term of the main output,
with `LOSS.BALANCE_WEIGHTS` 0.4 and 1), then `loss = losses.mean()` and its backward.
Writes `tests/fixtures/model/official_ohem.safetensors`: for each case the loss and its
gradient with respect to both outputs, in float64 and stored as float32.

With `--model`, also the same four kinds of case at the model level: the micro model of
`tests/fixtures/model/micro_ocr.yaml` (`hrnet_ocr.py`, random weights, training mode,
dropout off, in float64) on a random batch, the official criterion and `losses.mean()` on its
outputs, and the gradient of every parameter. Writes
`tests/fixtures/model/official_ohem_micro.safetensors`: `weights/<name>` (parameters and
running statistics), `input`, `label`, and per case its parameters, loss and `grad/<name>`.

Cases: with class weights and without; `OHEMKEEP` below the pixel count (the kept set
decided by the threshold, or by the min_kept-th probability) and above it (the official
default 100000). Thresholds and ranks are chosen where the sorted target probabilities
have a clear gap, so that float32 rounding of the logits cannot move a pixel across.

    python3 tools/reference/official_criterion.py --official /path/to/HRNet-Semantic-Segmentation [--model]
"""

import argparse
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
BALANCE = [0.4, 1.0]


def clear_rank(sorted_probs, around, window=400):
    """The rank near `around` whose probability is farthest (relatively) from both
    neighbours."""
    best, gap = around, -1.0
    for i in range(max(1, around - window), min(len(sorted_probs) - 1, around + window)):
        g = min(sorted_probs[i] - sorted_probs[i - 1], sorted_probs[i + 1] - sorted_probs[i]) / sorted_probs[i]
        if g > gap:
            best, gap = i, g
    return best, gap


def ohem_cases(out, label, weights):
    """The four kinds of case, their thresholds and ranks in clear gaps of the main output's
    sorted target probabilities at the label size."""
    up = F.interpolate(out, label.shape[-2:], mode="bilinear", align_corners=True)
    valid = label != 255
    probs = F.softmax(up, 1).gather(1, label.clamp(max=up.shape[1] - 1).unsqueeze(1))[:, 0][valid]
    probs = np.sort(probs.detach().numpy())
    n = len(probs)
    median, _ = clear_rank(probs, n // 2)
    ranked, rank_gap = clear_rank(probs, n // 3)
    low, _ = clear_rank(probs, n // 4)
    thresh = lambda i: float((probs[i] + probs[i + 1]) / 2)  # noqa: E731
    print(f"{n} valid pixels; min_kept rank {ranked}: relative gap {rank_gap:.2e}")
    return {
        # the official defaults: every probability below 0.9, min_kept past the pixels
        "defaults": (0.9, 100000, None),
        # the threshold decides (the min_kept-th probability is below it)
        "weighted_threshold": (thresh(median), 1000, weights),
        # the min_kept-th probability decides (the threshold is below it)
        "min_kept": (float(probs[0] / 2), ranked, None),
        # min_kept past the pixels: everything below the largest probability, or the threshold
        "weighted_min_kept_above": (thresh(low), 100000, weights),
    }


def case_params(thres, min_kept, weight):
    return torch.tensor([thres, float(min_kept), float(weight is not None)])


def model_level(criterion_class, path):
    """The official criterion on the micro model's outputs, and every parameter's gradient."""
    sys.path.insert(0, HERE)
    from hrnet_ocr import HRNetOCR, load_cfg, set_dropout

    gen = torch.Generator().manual_seed(20261206)
    model = HRNetOCR(load_cfg(os.path.join(REPO, "tests/fixtures/model/micro_ocr.yaml"))).double()
    set_dropout(model, 0.0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            elif t.is_floating_point():
                fan_in = t[0].numel() if t.dim() > 1 else 10
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) / fan_in ** 0.5)
    model.train()
    weights_in = {f"weights/{k}": v.float().contiguous() for k, v in model.state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    x = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 64, 64), generator=gen)
    label[torch.rand(label.shape, generator=gen) < 0.1] = 255
    with torch.no_grad():
        cases = ohem_cases(model(x)[1], label, torch.tensor([0.7, 1.4, 1.1], dtype=torch.float64))
    out = {**weights_in, "input": x.float(), "label": label}
    for name, (thres, min_kept, weight) in cases.items():
        model.zero_grad()
        criterion = criterion_class(ignore_label=255, thres=thres, min_kept=min_kept, weight=weight)
        loss = criterion(model(x), label).mean()  # the official train loop
        loss.backward()
        out[f"{name}.params"] = case_params(thres, min_kept, weight)
        if weight is not None:
            out[f"{name}.weight"] = weight.float()
        out[f"{name}.loss"] = loss.detach().float().reshape(1)
        for pname, p in model.named_parameters():
            out[f"{name}.grad/{pname}"] = p.grad.float().contiguous()
        print("model", name, f"thresh {thres:.6f} min_kept {min_kept} loss {loss.item():.6f}")
    save_file(out, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="a checkout of the official repository")
    parser.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/model/official_ohem.safetensors"))
    parser.add_argument("--model", action="store_true", help="also the model-level fixture of the micro model")
    parser.add_argument(
        "--model-out", default=os.path.join(REPO, "tests/fixtures/model/official_ohem_micro.safetensors"))
    args = parser.parse_args()
    config_module = types.ModuleType("config")
    config_module.config = types.SimpleNamespace(
        MODEL=types.SimpleNamespace(NUM_OUTPUTS=2, ALIGN_CORNERS=True),
        LOSS=types.SimpleNamespace(BALANCE_WEIGHTS=BALANCE),
    )
    sys.modules["config"] = config_module
    sys.path.insert(0, os.path.join(args.official, "lib"))
    from core.criterion import OhemCrossEntropy  # the official criterion

    torch.set_num_threads(1)
    f = load_file(os.path.join(REPO, "tests/fixtures/model/tiny_train.safetensors"))
    label = f["label"].long()
    aux0, out0 = f["aux"].double(), f["out"].double()

    cases = ohem_cases(out0, label, torch.tensor([0.8, 1.3, 1.0, 0.6, 1.5], dtype=torch.float64))
    out = {}
    for name, (thres, min_kept, weight) in cases.items():
        criterion = OhemCrossEntropy(ignore_label=255, thres=thres, min_kept=min_kept, weight=weight)
        aux = aux0.clone().requires_grad_()
        main_out = out0.clone().requires_grad_()
        losses = criterion([aux, main_out], label)
        loss = losses.mean()  # the official train loop
        loss.backward()
        out[f"{name}.params"] = case_params(thres, min_kept, weight)
        if weight is not None:
            out[f"{name}.weight"] = weight.float()
        out[f"{name}.loss"] = loss.detach().float().reshape(1)
        out[f"{name}.grad_aux"] = aux.grad.float().contiguous()
        out[f"{name}.grad_out"] = main_out.grad.float().contiguous()
        print(name, f"thresh {thres:.6f} min_kept {min_kept} loss {loss.item():.6f}")
    save_file(out, args.out)
    if args.model:
        model_level(OhemCrossEntropy, args.model_out)


if __name__ == "__main__":
    main()
