"""Checkpoints of the micro model as the official code writes them: an ImageNet-pretrained
HRNet (both PyTorch formats) and a training `checkpoint.pth.tar`.

The official experiments start from an ImageNet classification HRNet (`MODEL.PRETRAINED`,
loaded by `init_weights` of the official `seg_hrnet_ocr.py`: `last_layer` renamed
`aux_head`, `model.` stripped, the keys the model has loaded). This writes such a file for
the micro model of `tests/fixtures/model/micro_ocr.yaml` (the reference model in
`hrnet_ocr.py`): every backbone tensor with random values (running variances positive,
`num_batches_tracked` as int64), half of them under a `model.` prefix; the classifier's
own tensors the segmentation model lacks (`incre_modules`, `downsamp_modules`,
`final_layer`, `classifier`); and a segmentation HRNet's `last_layer.0` / `last_layer.1`,
which land in `aux_head`. No OCR or class head tensor: those stay fresh.

Writes `tests/fixtures/model/micro_pretrained_legacy.pth` (the legacy format) and
`micro_pretrained_zip.pth` (the zip format), with the same tensors.

Also `micro_checkpoint.pth.tar` as the official `tools/train.py` saves one after an epoch:
`{'epoch', 'best_mIoU' (a numpy float64, as the official validation returns it),
'state_dict' (the `FullModel`'s: `model.` keys), 'optimizer'}`, the optimizer an SGD with
the official two parameter groups (`NONBACKBONE_KEYWORDS` cls, aux, ocr) after two steps,
so that every parameter has a momentum buffer; and `micro_checkpoint_momentum.safetensors`,
each parameter's buffer by name as (sum, sum of squares).

    python3 tools/reference/make_micro_fixtures.py [--seed N]
"""

import argparse
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
from hrnet_ocr import HRNetOCR, load_cfg  # noqa: E402

HEAD = ("cls_head", "aux_head", "conv3x3_ocr", "ocr_")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/model"))
    parser.add_argument("--seed", type=int, default=20261206)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = HRNetOCR(load_cfg(os.path.join(REPO, "tests/fixtures/model/micro_ocr.yaml")))
    state = model.state_dict()

    def draw(name, like):
        if name.endswith("num_batches_tracked"):
            return torch.tensor(1000, dtype=torch.int64)
        if name.endswith("running_var"):
            return torch.rand(like.shape) + 0.5
        return torch.randn(like.shape) * 0.1

    pretrained = {}
    backbone = [k for k in state if not k.startswith(HEAD)]
    for i, name in enumerate(backbone):
        pretrained[("model." if i % 2 else "") + name] = draw(name, state[name])
    # A segmentation HRNet's head, which the official rename puts in aux_head.
    for name in state:
        if name.startswith(("aux_head.0.", "aux_head.1.")):
            pretrained[name.replace("aux_head", "last_layer")] = draw(name, state[name])
    # The classifier's own tensors, which the segmentation model has no place for.
    for name, shape in [
        ("incre_modules.0.0.conv1.weight", (8, 4, 1, 1)),
        ("downsamp_modules.0.0.weight", (16, 32, 3, 3)),
        ("final_layer.0.weight", (64, 32, 1, 1)),
        ("classifier.weight", (10, 64)),
        ("classifier.bias", (10,)),
    ]:
        pretrained[name] = torch.randn(shape)
    torch.save(pretrained, os.path.join(args.out, "micro_pretrained_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(pretrained, os.path.join(args.out, "micro_pretrained_zip.pth"))
    fresh = [k for k in state if k.startswith(HEAD) and not k.startswith(("aux_head.0.", "aux_head.1."))]
    print(f"{len(pretrained)} tensors: {len(backbone)} backbone, {len(fresh)} of the model left fresh")
    write_training_checkpoint(model, os.path.join(args.out, "micro_checkpoint.pth.tar"))


class FullModel(torch.nn.Module):
    """The official wrapper whose state dict a training checkpoint holds (`model.` keys)."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def write_training_checkpoint(model, path):
    full = FullModel(model)
    params = dict(full.named_parameters())
    keywords = ["cls", "aux", "ocr"]
    backbone = [p for k, p in params.items() if not any(w in k for w in keywords)]
    head = [p for k, p in params.items() if any(w in k for w in keywords)]
    optimizer = torch.optim.SGD([{"params": backbone, "lr": 0.01}, {"params": head, "lr": 0.1}],
                                lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=False)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        aux, out = model(torch.randn(2, 3, 32, 32))
        (0.4 * aux.square().mean() + out.square().mean()).backward()
        optimizer.step()
    torch.save({
        "epoch": 3,
        "best_mIoU": np.float64(0.4123),
        "state_dict": full.state_dict(),
        "optimizer": optimizer.state_dict(),
    }, path)
    print(f"{path}: {len(full.state_dict())} state tensors, {len(optimizer.state_dict()['state'])} momentum buffers")
    # Each parameter's momentum buffer by name, in two numbers (sum, sum of squares): what a
    # reader that maps the optimizer's indices to names must find.
    fingerprints = {}
    for name, param in model.named_parameters():
        buffer = optimizer.state[param]["momentum_buffer"].double()
        fingerprints[name] = torch.tensor([buffer.sum(), buffer.square().sum()], dtype=torch.float64).float()
    save_file(fingerprints, path.replace(".pth.tar", "_momentum.safetensors"))


if __name__ == "__main__":
    main()
