"""Test-recipe fixtures from the official code: `multi_scale_inference` and `testval`.

For the tiny datasets `official_datasets.py` wrote, runs the official dataset classes
(HRNet/HRNet-Semantic-Segmentation, branch HRNet-OCR, commit 0bbb288, given with
--official) the way `tools/test.py` does: each test image as `__getitem__` prepares it,
`multi_scale_inference` with scales and flip, the `testval` border crop and the resize to
the label size. The model is the tiny HRNet-OCR of `tests/fixtures/model/` (the reference
model in `hrnet_ocr.py`, with `tiny_weights.safetensors`: 5 classes), in float64 on the
CPU (`.cuda()` is the identity). Writes each recipe's scores per image to
`inference.safetensors` in the dataset's folder. `tests/kernels/official.rs` runs the same
through the engine.

    python3 tools/reference/official_inference.py --official /path/to/HRNet-Semantic-Segmentation
"""

import argparse
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

np.int = int  # the official code predates numpy 1.24
torch.Tensor.cuda = lambda self, *args, **kwargs: self
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
from hrnet_ocr import HRNetOCR, load_cfg  # noqa: E402

# folder, class, test list, base size, crop (h, w), scales, flip: each recipe's branches
# (Cityscapes' whole pass and shifted windows; the padded datasets' crop padding, windows
# every two thirds of the crop, testval's short side and padding, cut or kept).
RECIPES = [
    ("cityscapes", "cityscapes", "list/cityscapes/val.lst", 40, (24, 40), [0.75, 1.5], True),
    ("pascal_ctx60", "pascal_ctx", "testval.txt", 24, (24, 24), [1.0, 1.25], True),
    ("ade20k", "ade20k", "list/ade20k/testval.lst", 24, (24, 24), [0.5, 1.5], False),
]
CLASSES = 5


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="a checkout of the official repository")
    parser.add_argument("--fixtures", default=os.path.join(REPO, "tests/fixtures/datasets"))
    args = parser.parse_args()
    config_module = types.ModuleType("config")
    config_module.config = types.SimpleNamespace(TRAIN=types.SimpleNamespace(RANDOM_BRIGHTNESS=False))
    sys.modules["config"] = config_module
    sys.path.insert(0, os.path.join(args.official, "lib"))
    import datasets  # the official package

    torch.set_num_threads(1)
    cfg = load_cfg(os.path.join(REPO, "tests/fixtures/model/tiny_ocr.yaml"))
    model = HRNetOCR(cfg)
    weights = load_file(os.path.join(REPO, "tests/fixtures/model/tiny_weights.safetensors"))
    model.load_state_dict(weights, strict=True)
    model = model.double().eval()
    align = bool(cfg["MODEL"].get("ALIGN_CORNERS", True))

    def run(image):
        return [o for o in model(image.double())]

    for folder, cls, list_path, base, crop, scales, flip in RECIPES:
        root = os.path.join(args.fixtures, folder) + "/"
        ds = getattr(datasets, cls)(
            root=root, list_path=list_path, num_classes=CLASSES, multi_scale=False, flip=False,
            ignore_label=255, base_size=base, crop_size=crop,
        )
        config = types.SimpleNamespace(
            MODEL=types.SimpleNamespace(NUM_OUTPUTS=2, ALIGN_CORNERS=align),
            TEST=types.SimpleNamespace(OUTPUT_INDEX=-1),
        )
        out = {}
        with torch.no_grad():
            for i in range(len(ds)):
                image, label, _, _, *border = ds[i]
                size = label.shape
                image = torch.from_numpy(image).unsqueeze(0)
                pred = ds.multi_scale_inference(config, run, image, scales=scales, flip=flip)
                # testval: the border padding cut where the class returns it, then the
                # resize to the label's size.
                if border:
                    pad_h, pad_w = border[0]
                    pred = pred[:, :, 0:pred.size(2) - pad_h, 0:pred.size(3) - pad_w]
                if pred.shape[-2:] != size:
                    pred = F.interpolate(pred, size, mode="bilinear", align_corners=align)
                out[f"scores.{i}"] = pred[0].float().contiguous()
        save_file(out, root + "inference.safetensors", metadata={
            "scales": ",".join(str(s) for s in scales), "flip": str(flip), "base_size": str(base),
            "crop": f"{crop[0]}x{crop[1]}", "list": list_path,
        })
        print(folder, {k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main()
