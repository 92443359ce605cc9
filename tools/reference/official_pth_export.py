"""The engine's `.pth` export, loaded as the official `tools/test.py` loads `TEST.MODEL_FILE`.

Runs `hrnet-ocr convert --to pth` on the tiny model's weights, loads the file with
`torch.load(weights_only=True)` (so only the loader's allow-list of globals is accepted),
keeps `k[6:]` of each key as the official test script does (its `FullModel`'s `model.`),
updates the reference model's state dict with them and loads it; then compares that model's
logits on a random input with the engine's (`hrnet-ocr forward` with the same `.pth`), and
checks that `convert` back to safetensors gives bit-identical weights.

    cargo build --release
    python3 tools/reference/official_pth_export.py --bin target/release/hrnet-ocr
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
from hrnet_ocr import HRNetOCR, load_cfg  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="the hrnet-ocr binary")
    args = parser.parse_args()
    model_dir = os.path.join(REPO, "tests/fixtures/model")
    weights = os.path.join(model_dir, "tiny_weights.safetensors")
    config = os.path.join(model_dir, "tiny_ocr.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        pth = os.path.join(tmp, "final_state.pth")
        subprocess.run([args.bin, "convert", weights, pth, "--to", "pth"], check=True)
        # tools/test.py, lines 82-92 of the official code.
        pretrained_dict = torch.load(pth, weights_only=True)
        if "state_dict" in pretrained_dict:
            pretrained_dict = pretrained_dict["state_dict"]
        model = HRNetOCR(load_cfg(config))
        model_dict = model.state_dict()
        pretrained_dict = {k[6:]: v for k, v in pretrained_dict.items() if k[6:] in model_dict.keys()}
        missing = set(model_dict) - set(pretrained_dict)
        assert all(k.endswith("num_batches_tracked") for k in missing), sorted(missing)[:5]
        model_dict.update(pretrained_dict)
        model.load_state_dict(model_dict)
        model = model.double().eval()
        torch.manual_seed(7)
        image = torch.randn(1, 3, 48, 64)
        with torch.no_grad():
            aux, out = model(image.double())
        save_file({"input": image.contiguous()}, os.path.join(tmp, "input.safetensors"))
        engine_out = os.path.join(tmp, "engine.safetensors")
        subprocess.run([args.bin, "forward", "--config", config, "--weights", pth,
                        "--input", os.path.join(tmp, "input.safetensors"), "--output", engine_out], check=True)
        engine = load_file(engine_out)
        for name, want in [("aux", aux), ("out", out)]:
            got = engine[name].double()
            err = ((got - want).norm() / want.norm()).item()
            print(f"{name}: relative L2 error {err:.2e}")
            assert err < 1e-4, name
        back = os.path.join(tmp, "back.safetensors")
        subprocess.run([args.bin, "convert", pth, back], check=True)
        original, again = load_file(weights), load_file(back)
        same = all(torch.equal(original[k], again[k]) for k in again) and set(again) <= set(original)
        print(f"convert back: {len(again)} tensors, bit-identical: {same}")
        assert same


if __name__ == "__main__":
    main()
