"""Label fixtures from the official dataset classes.

Builds a tiny dataset in each official layout (random images; label files that use every
encoding corner: Cityscapes label ids including unlabelled ones and 255, LIP's left and
right classes, zero labels, COCO-Stuff ids without a class, palette PNGs), runs the
official repository's dataset classes on it (HRNet/HRNet-Semantic-Segmentation, branch
HRNet-OCR, commit 0bbb288: `lib/` of a checkout given with --official) and writes what
their `__getitem__` returns for each image: the encoded labels and the prepared image's
shape. `tests/data.rs` reads the same layouts through this engine and must match.

    python3 tools/reference/official_datasets.py --official /path/to/HRNet-Semantic-Segmentation

Needs numpy, opencv-python-headless and pillow. PyTorch is not needed: the dataset classes
import it only for the Cityscapes class weights and for inference, so a stub stands in,
and `config` (read for TRAIN.RANDOM_BRIGHTNESS) is a stub with it off.
"""

import argparse
import json
import os
import struct
import sys
import types

import numpy as np
from PIL import Image

# The official code predates numpy 1.24, which removed np.int.
np.int = int


def stub_modules():
    torch = types.ModuleType("torch")

    class Weights(list):
        def cuda(self):
            return self

    torch.FloatTensor = Weights
    torch.utils = types.ModuleType("torch.utils")
    torch.utils.data = types.ModuleType("torch.utils.data")
    torch.utils.data.Dataset = object
    torch.nn = types.ModuleType("torch.nn")
    torch.nn.functional = types.ModuleType("torch.nn.functional")
    sys.modules.update({
        "torch": torch,
        "torch.utils": torch.utils,
        "torch.utils.data": torch.utils.data,
        "torch.nn": torch.nn,
        "torch.nn.functional": torch.nn.functional,
    })
    config = types.ModuleType("config")
    config.config = types.SimpleNamespace(TRAIN=types.SimpleNamespace(RANDOM_BRIGHTNESS=False))
    sys.modules["config"] = config


def write_png(path, array, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if palette:
        image = Image.fromarray(array.astype(np.uint8), mode="P")
        rng = np.random.default_rng(7)
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    else:
        image = Image.fromarray(array.astype(np.uint8))
    image.save(path)


def write_safetensors(path, tensors):
    """int32 tensors in the safetensors layout (8-byte header length, JSON, data)."""
    header, data, offset = {}, b"", 0
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name], dtype="<i4").tobytes()
        header[name] = {"dtype": "I32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


# name, class, list file, label value pool, palette PNGs, classes, ignore label, base, crop
DATASETS = [
    ("cityscapes", "cityscapes", "list/cityscapes/val.lst", list(range(34)) + [255], False, 19, 255, 40, (24, 40)),
    ("lip", "lip", "list/lip/testvalList.txt", list(range(20)) + [255], True, 20, 255, 24, (24, 24)),
    ("pascal_ctx59", "pascal_ctx", "testval.txt", list(range(60)) + [255], True, 59, -1, 24, (24, 24)),
    ("pascal_ctx60", "pascal_ctx", "testval.txt", list(range(60)) + [255], True, 60, -1, 24, (24, 24)),
    ("ade20k", "ade20k", "list/ade20k/testval.lst", list(range(151)) + [255], True, 150, 255, 24, (24, 24)),
    ("cocostuff", "cocostuff", "list/cocostuff/testval.lst", list(range(183)) + [255], True, 171, 255, 24, (24, 24)),
]
SIZES = [(23, 31), (31, 23), (16, 16)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="a checkout of the official repository")
    parser.add_argument("--out", default="tests/fixtures/datasets")
    parser.add_argument("--seed", type=int, default=20261205)
    args = parser.parse_args()
    stub_modules()
    sys.path.insert(0, os.path.join(args.official, "lib"))
    import datasets  # the official package

    rng = np.random.default_rng(args.seed)
    for name, cls, list_path, pool, palette, classes, ignore, base, crop in DATASETS:
        root = os.path.join(args.out, name) + "/"
        lines = []
        for i, (h, w) in enumerate(SIZES):
            image = f"images/{i}.png"
            label = f"labels/{i}_label.png"
            write_png(root + image, rng.integers(0, 256, (h, w, 3)))
            write_png(root + label, rng.choice(pool, (h, w)), palette=palette)
            lines.append(f"{image} {label}\n")
        os.makedirs(os.path.dirname(root + list_path) or root, exist_ok=True)
        with open(root + list_path, "w") as f:
            f.writelines(lines)
        ds = getattr(datasets, cls)(
            root=root, list_path=list_path, num_classes=classes, multi_scale=False, flip=False,
            ignore_label=ignore, base_size=base, crop_size=crop,
        )
        tensors = {}
        for i in range(len(SIZES)):
            item = ds[i]
            tensors[f"labels.{i}"] = np.asarray(item[1], dtype=np.int32)
            tensors[f"image_shape.{i}"] = np.asarray(item[0].shape, dtype=np.int32)
        write_safetensors(root + "official.safetensors", tensors)
        with open(root + "meta.json", "w") as f:
            json.dump({"dataset": cls, "list": list_path, "classes": classes, "ignore": ignore,
                       "base_size": base, "crop": list(crop), "images": len(SIZES)}, f, indent=1)
            f.write("\n")
        print(name, {k: v.shape for k, v in tensors.items()})


if __name__ == "__main__":
    main()
