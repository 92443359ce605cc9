"""Test-recipe fixtures from the official code: `multi_scale_inference` and `testval`.

For the tiny datasets `official_datasets.py` wrote, runs the official dataset classes
(HRNet/HRNet-Semantic-Segmentation, branch HRNet-OCR, commit 0bbb288, given with
--official) the way `tools/test.py` does: each test image as `__getitem__` prepares it,
`multi_scale_inference` with scales and flip, the `testval` border crop and the resize to
the label size. The model is the tiny HRNet-OCR of `tests/fixtures/model/` (the reference
model in `hrnet_ocr.py`), in float64 on the CPU (`.cuda()` is the identity). Writes, in
each dataset's folder:

- `inference.safetensors` (three datasets): the scores of each image under one recipe,
  with the 5-class `tiny_weights.safetensors`;
- `head.safetensors`: random class heads (`aux_head.3`, `cls_head`) for the dataset's own
  number of classes, which replace the 5-class ones (LIP's flip exchanges channels 14-19);
- `testval.safetensors`: for each recipe (single scale; multi-scale with flip; sliding
  windows; PASCAL-Context 59 also its `val` branch) the official `testval`'s confusion
  matrix (nonzero entries as rows `ground truth, prediction, count`), and per image the
  predicted classes, the runner-up class and the relative gap of their scores (which tells
  whether a differing pixel is a near tie); the recipe and the official `testval`'s mIoU,
  pixel and mean accuracy in the metadata.

`tests/kernels/infer.rs` runs the same through the engine.

    python3 tools/reference/official_inference.py --official /path/to/HRNet-Semantic-Segmentation

Needs torch, safetensors, numpy, opencv-python-headless, pillow and tqdm.
"""

import argparse
import json
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file as save_numpy
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
HEADS = ["aux_head.3.weight", "aux_head.3.bias", "cls_head.weight", "cls_head.bias"]
# the six layouts of official_datasets.py
FOLDERS = ["cityscapes", "lip", "pascal_ctx59", "pascal_ctx60", "ade20k", "cocostuff"]


def testval_recipes(folder, meta):
    """(name, list, scales, flip, crop) of each recipe a dataset's confusion is taken with.
    `windows` shrinks the crop below the scaled image (Cityscapes covers only scales above
    1 with windows); the `val` branch crops at random to the test size, a no-op for an
    image whose resized size is the crop, so its list has that one image."""
    crop, test_list = meta["crop"], meta["list"]
    cityscapes = meta["dataset"] == "cityscapes"
    recipes = [
        ("single", test_list, [1.0], False, crop),
        ("multiscale_flip", test_list, [0.75, 1.0, 1.5], True, crop),
        ("windows", test_list, [1.25] if cityscapes else [1.0], False, [16, 24] if cityscapes else [16, 16]),
    ]
    if folder == "pascal_ctx59":
        recipes.append(("val", "val.txt", [1.0, 1.5], True, [24, 32]))
    return recipes


def load_model(classes, heads=None):
    cfg = load_cfg(os.path.join(REPO, "tests/fixtures/model/tiny_ocr.yaml"))
    cfg["DATASET"]["NUM_CLASSES"] = classes
    model = HRNetOCR(cfg)
    weights = load_file(os.path.join(REPO, "tests/fixtures/model/tiny_weights.safetensors"))
    weights.update(heads or {})
    model.load_state_dict(weights, strict=True)
    return Run(model.double().eval()), bool(cfg["MODEL"].get("ALIGN_CORNERS", True))


class Run(torch.nn.Module):
    """The model in float64 on a float32 image, its outputs as a list (as the official
    inference indexes them)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return list(self.model(image.double()))


def official_config(classes, ignore, align, scales, flip):
    return types.SimpleNamespace(
        MODEL=types.SimpleNamespace(NUM_OUTPUTS=2, ALIGN_CORNERS=align),
        TEST=types.SimpleNamespace(OUTPUT_INDEX=-1, SCALE_LIST=scales, FLIP_TEST=flip),
        DATASET=types.SimpleNamespace(NUM_CLASSES=classes),
        TRAIN=types.SimpleNamespace(IGNORE_LABEL=ignore),
    )


def scores_of(ds, config, run, image, label, border, scales, flip):
    """The scores `testval` takes its confusion of: multi-scale inference, the border
    padding cut where the class returns it, resized to the label's size."""
    pred = ds.multi_scale_inference(config, run, image, scales=scales, flip=flip)
    if border:
        pad_h, pad_w = border
        pred = pred[:, :, 0:pred.size(2) - pad_h, 0:pred.size(3) - pad_w]
    if pred.shape[-2:] != label.shape[-2:]:
        pred = F.interpolate(pred, label.shape[-2:], mode="bilinear", align_corners=config.MODEL.ALIGN_CORNERS)
    return pred


def write_scores(datasets, fixtures):
    run, align = load_model(CLASSES)
    for folder, cls, list_path, base, crop, scales, flip in RECIPES:
        root = os.path.join(fixtures, folder) + "/"
        ds = getattr(datasets, cls)(
            root=root, list_path=list_path, num_classes=CLASSES, multi_scale=False, flip=False,
            ignore_label=255, base_size=base, crop_size=crop,
        )
        config = official_config(CLASSES, 255, align, scales, flip)
        out = {}
        with torch.no_grad():
            for i in range(len(ds)):
                image, label, _, _, *border = ds[i]
                image = torch.from_numpy(image).unsqueeze(0)
                pred = scores_of(ds, config, run, image, torch.from_numpy(label), border[0] if border else None, scales, flip)
                out[f"scores.{i}"] = pred[0].float().contiguous()
        save_file(out, root + "inference.safetensors", metadata={
            "scales": ",".join(str(s) for s in scales), "flip": str(flip), "base_size": str(base),
            "crop": f"{crop[0]}x{crop[1]}", "list": list_path,
        })
        print(folder, {k: tuple(v.shape) for k, v in out.items()})


def random_heads(classes, seed, ds):
    """Class heads for `classes`, drawn with the spread of the tiny model's own; the class
    weights then made orthogonal to the mean feature over `ds`'s images, so that a pixel's
    own features rather than what all pixels share pick its class, and many classes win
    somewhere (LIP's left and right ones too)."""
    tiny = load_file(os.path.join(REPO, "tests/fixtures/model/tiny_weights.safetensors"))
    rng = np.random.default_rng(seed)
    heads = {}
    for name in HEADS:
        shape = (classes,) + tuple(tiny[name].shape[1:])
        heads[name] = torch.from_numpy(rng.normal(0.0, float(tiny[name].std()), shape).astype(np.float32))
    run, _ = load_model(classes, heads)
    features = []
    hook = run.model.cls_head.register_forward_hook(lambda m, inputs, out: features.append(inputs[0]))
    with torch.no_grad():
        for i in range(len(ds)):
            run(torch.from_numpy(ds[i][0]).unsqueeze(0))
    hook.remove()
    mean = torch.cat([f.flatten(2) for f in features], 2).mean(2)[0].float()
    weight = heads["cls_head.weight"][:, :, 0, 0]
    weight -= torch.outer(weight @ mean, mean) / mean.dot(mean)
    return heads


def write_testval(datasets, fixtures, seed):
    from core.function import testval  # the official test loop
    from utils.utils import get_confusion_matrix

    for index, folder in enumerate(FOLDERS):
        root = os.path.join(fixtures, folder) + "/"
        with open(root + "meta.json") as f:
            meta = json.load(f)
        classes, ignore = meta["classes"], meta["ignore"]
        plain = getattr(datasets, meta["dataset"])(
            root=root, list_path=meta["list"], num_classes=classes, multi_scale=False, flip=False,
            ignore_label=ignore, base_size=meta["base_size"], crop_size=tuple(meta["crop"]),
        )
        heads = random_heads(classes, seed + index, plain)
        save_file({k: v.contiguous() for k, v in heads.items()}, root + "head.safetensors")
        run, align = load_model(classes, heads)
        if folder == "pascal_ctx59":
            with open(root + meta["list"]) as f:
                first = f.readline()
            with open(root + "val.txt", "w") as f:
                f.write(first)
        tensors, metadata = {}, {}
        for name, list_path, scales, flip, crop in testval_recipes(folder, meta):
            ds = getattr(datasets, meta["dataset"])(
                root=root, list_path=list_path, num_classes=classes, multi_scale=False, flip=False,
                ignore_label=ignore, base_size=meta["base_size"], crop_size=tuple(crop),
            )
            config = official_config(classes, ignore, align, scales, flip)
            loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, num_workers=0)
            mean_iou, _, pixel_acc, mean_acc = testval(config, ds, loader, run)
            confusion = np.zeros((classes, classes))
            with torch.no_grad():
                for i, batch in enumerate(loader):
                    image, label, _, _, *border = batch
                    border = [int(b) for b in border[0]] if border else None
                    pred = scores_of(ds, config, run, image, label, border, scales, flip)
                    confusion += get_confusion_matrix(label, pred, label.size(), classes, ignore)
                    top = torch.topk(pred[0].double(), 2, dim=0)
                    tensors[f"{name}.pred.{i}"] = top.indices[0].numpy().astype(np.uint8)
                    tensors[f"{name}.runner_up.{i}"] = top.indices[1].numpy().astype(np.uint8)
                    gap = (top.values[0] - top.values[1]) / top.values[0]
                    tensors[f"{name}.gap.{i}"] = gap.numpy().astype(np.float32)
                    same = np.argmax(pred[0].numpy(), axis=0) == top.indices[0].numpy()
                    assert same.all() or (gap.numpy()[~same] == 0).all(), "argmax and topk disagree"
            # The loop above is testval's: the same figures from the same matrix.
            tp, pos, res = np.diag(confusion), confusion.sum(1), confusion.sum(0)
            assert np.isclose((tp / np.maximum(1.0, pos + res - tp)).mean(), mean_iou)
            assert np.isclose(tp.sum() / pos.sum(), pixel_acc)
            assert np.isclose((tp / np.maximum(1.0, pos)).mean(), mean_acc)
            gt, pr = np.nonzero(confusion)
            tensors[f"{name}.confusion"] = np.stack([gt, pr, confusion[gt, pr]], 1).astype(np.int32)
            metadata[name] = json.dumps({
                "list": list_path, "scales": scales, "flip": flip, "crop": list(crop),
                "base_size": meta["base_size"], "images": len(ds), "mean_iou": float(mean_iou),
                "pixel_accuracy": float(pixel_acc), "mean_accuracy": float(mean_acc),
            })
            print(folder, name, f"mIoU {mean_iou:.4f}", f"{int(confusion.sum())} pixels")
        save_numpy(tensors, root + "testval.safetensors", metadata=metadata)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="a checkout of the official repository")
    parser.add_argument("--fixtures", default=os.path.join(REPO, "tests/fixtures/datasets"))
    parser.add_argument("--seed", type=int, default=20261206)
    args = parser.parse_args()
    config_module = types.ModuleType("config")
    config_module.config = types.SimpleNamespace(TRAIN=types.SimpleNamespace(RANDOM_BRIGHTNESS=False))
    sys.modules["config"] = config_module
    sys.path.insert(0, os.path.join(args.official, "lib"))
    import datasets  # the official package

    torch.set_num_threads(1)
    write_scores(datasets, args.fixtures)
    write_testval(datasets, args.fixtures, args.seed)


if __name__ == "__main__":
    main()
