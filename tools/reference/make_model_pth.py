#!/usr/bin/env python3
"""Writes the tiny model's weights as PyTorch checkpoints the way the released HRNet-OCR
files are laid out, for the loader tests:

  tests/fixtures/model/tiny_legacy.pth  legacy (pre-1.6) format, keys prefixed `model.`,
                                         plus `loss.criterion.weight` (like *_torch11.pth)
  tests/fixtures/model/tiny_zip.pth     zip format, {'state_dict': ..., 'epoch': ...}
                                         with keys prefixed `module.`, no num_batches_tracked

Run from the repository root after make_model_fixtures.py:
    python3 tools/reference/make_model_pth.py
"""
import collections

import torch
from safetensors.torch import load_file

DIR = "tests/fixtures/model"


def main():
    weights = load_file(f"{DIR}/tiny_weights.safetensors")
    legacy = collections.OrderedDict((f"model.{k}", v) for k, v in weights.items())
    legacy["loss.criterion.weight"] = torch.ones(5)
    torch.save(legacy, f"{DIR}/tiny_legacy.pth", _use_new_zipfile_serialization=False)
    state = collections.OrderedDict(
        (f"module.{k}", v) for k, v in weights.items() if not k.endswith("num_batches_tracked")
    )
    torch.save({"epoch": 3, "best_mIoU": 0.5, "state_dict": state}, f"{DIR}/tiny_zip.pth")


if __name__ == "__main__":
    main()
