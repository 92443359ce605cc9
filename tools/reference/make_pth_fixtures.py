#!/usr/bin/env python3
"""Generate PyTorch checkpoint fixtures for the hrnet-ocr `.pth` reader tests.

Writes small checkpoints in both of torch.save's formats (legacy pickle stream
and zip), the expected float32 values as safetensors, and a few broken or
hostile files. The hostile pickle is written byte by byte and never loaded.

Usage (from the repository root):

    python3 tools/reference/make_pth_fixtures.py [--out tests/fixtures/pth] [--seed N]
"""

import argparse
import collections
import io
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np
import torch
from safetensors.torch import save_file

DEFAULT_SEED = 20260611
SIZE_CAP = 100 * 1024

# The legacy format's first three pickles (torch/serialization.py).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
SYS_INFO = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}


def make_state_dict(gen):
    """An OrderedDict that covers every dtype, view kind and rebuild function the reader handles."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    sd = collections.OrderedDict()
    sd["conv.weight"] = randn(3, 4)
    sd["conv.bias"] = randn(5)
    sd["block.weight"] = randn(2, 3, 3, 1)
    sd["bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    # float16 edge values: max, min normal, subnormals, signed zero, inf, nan.
    sd["half"] = torch.cat([randn(4), torch.tensor(
        [65504.0, 6.103515625e-05, 5.960464477539063e-08, 3.0e-06, -0.0, float("inf"),
         float("-inf"), float("nan")])]).half()
    sd["double"] = randn(2, 2).double() / 3.0
    sd["transposed"] = randn(4, 3).t()  # non-contiguous: strides (1, 3)
    base = randn(16)
    sd["shared.a"] = base[1:7].view(2, 3)  # two views of one storage
    sd["shared.b"] = base[9:13]
    sd["strided"] = randn(4, 6)[1:, ::2]  # offset 6, strides (6, 2)
    sd["expanded"] = randn(1).expand(3, 2)  # stride 0
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(randn(2))  # goes through _rebuild_parameter
    sd["misc.bfloat16"] = randn(3).bfloat16()
    sd["misc.int64"] = torch.tensor([-5, 123456789012345, 2**53 + 1], dtype=torch.int64)
    sd["misc.int32"] = torch.tensor([-7, 2**31 - 1], dtype=torch.int32)
    sd["misc.int16"] = torch.tensor([-32768, 12], dtype=torch.int16)
    sd["misc.int8"] = torch.tensor([-128, 127], dtype=torch.int8)
    sd["misc.uint8"] = torch.tensor([0, 255], dtype=torch.uint8)
    sd["misc.bool"] = torch.tensor([True, False, True])
    return sd


def to_f32(t):
    """A tensor as contiguous float32, converted as the reader does."""
    t = t.detach()
    if t.dtype == torch.float16:
        # numpy converts half exactly, NaN payload included; torch's CPU path makes every
        # half NaN 0x7fffffff.
        return torch.from_numpy(t.contiguous().numpy().astype(np.float32))
    return t.to(torch.float32).contiguous().clone()


def expected_f32(sd):
    """The reader's output: every tensor as contiguous float32, in dict order."""
    return collections.OrderedDict((k, to_f32(v)) for k, v in sd.items())


class _Py2Pickler(pickle.Pickler):
    """Pickles OrderedDicts as Python 2 did: `OrderedDict([[key, value], ...])` via REDUCE."""

    def reducer_override(self, obj):
        if type(obj) is collections.OrderedDict:
            return collections.OrderedDict, ([[k, v] for k, v in obj.items()],)
        return NotImplemented


class Py2PickleModule:
    """A `pickle_module` for torch.save that uses `_Py2Pickler`."""
    Pickler = _Py2Pickler
    dump = staticmethod(pickle.dump)


def legacy_header():
    """The magic, protocol and sys_info pickles that open a legacy file."""
    return b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, LEGACY_PROTOCOL, SYS_INFO))


def hostile_pickle():
    """A main pickle that would call os.system('echo pwned') (PROTO 2, GLOBAL, arg tuple, REDUCE,
    STOP), then an empty storage-key list."""
    cmd = b"echo pwned"
    return (b"\x80\x02" + b"cos\nsystem\n" + b"X" + struct.pack("<I", len(cmd)) + cmd
            + b"\x85" + b"R" + b"." + b"\x80\x02].")


def repack(src, dst, compress=False, byteorder=None):
    """Copies a torch zip with Python's writer, optionally deflating or changing `byteorder`."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", method) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if byteorder is not None and info.filename.endswith("/byteorder"):
                data = byteorder
            zout.writestr(info.filename, data)


def write_zip64(src, dst):
    """Rewrites a stored zip so that every size and offset lives in a zip64 extra field."""
    with zipfile.ZipFile(src) as zin:
        entries = [(i.filename.encode(), zin.read(i.filename)) for i in zin.infolist()]
    out = io.BytesIO()
    central = []
    for name, data in entries:
        offset = out.tell()
        crc = zlib.crc32(data)
        extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc,
                              0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra)))
        out.write(name + extra + data)
        extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc,
                                   0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0,
                                   0xFFFFFFFF) + name + extra)
    cd_offset = out.tell()
    for record in central:
        out.write(record)
    cd_size = out.tell() - cd_offset
    eocd64 = out.tell()
    out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(entries),
                          len(entries), cd_size, cd_offset))
    out.write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                          0xFFFFFFFF, 0))
    with open(dst, "wb") as f:
        f.write(out.getvalue())


def check_same(path, expected):
    """torch.load must read `path` back to the expected values (a check on the fixture itself)."""
    # Only files this script just wrote; torch's weights_only unpickler rejects protocol 4 FRAMEs.
    obj = torch.load(path, weights_only=False)
    sd = obj["state_dict"] if "state_dict" in obj else obj
    got = expected_f32(sd)
    assert list(got) == list(expected), path
    for k in expected:
        assert torch.equal(got[k].view(-1).view(torch.int32),
                           expected[k].view(-1).view(torch.int32)), (path, k)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/fixtures/pth")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"seed {args.seed}")

    gen = torch.Generator().manual_seed(args.seed)
    sd = make_state_dict(gen)
    expected = expected_f32(sd)
    checkpoint = {"epoch": 3, "best_mIoU": 0.5,
                  "state_dict": sd,
                  "optimizer": {"state": {}, "param_groups": [
                      {"lr": 0.01, "momentum": 0.9, "nesterov": False, "params": [0, 1, 2]}]}}

    def out(name):
        return os.path.join(args.out, name)

    save_file(dict(expected), out("expected.safetensors"), metadata={"order": " ".join(expected)})
    torch.save(sd, out("legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(sd, out("zip.pth"))
    torch.save(checkpoint, out("checkpoint_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(checkpoint, out("checkpoint_zip.pth"), pickle_protocol=4)
    torch.save(sd, out("py2_legacy.pth"), pickle_module=Py2PickleModule,
               _use_new_zipfile_serialization=False)
    write_zip64(out("zip.pth"), out("zip64.pth"))
    for name in ("legacy.pth", "zip.pth", "checkpoint_legacy.pth", "checkpoint_zip.pth",
                 "py2_legacy.pth", "zip64.pth"):
        check_same(out(name), expected)

    # Files the reader must refuse.
    repack(out("zip.pth"), out("deflated.pth"), compress=True)
    repack(out("zip.pth"), out("big_endian.pth"), byteorder=b"big")
    with open(out("legacy.pth"), "rb") as f:
        legacy = f.read()
    with open(out("truncated.pth"), "wb") as f:
        f.write(legacy[: len(legacy) * 3 // 4])
    with open(out("hostile.pth"), "wb") as f:
        f.write(legacy_header() + hostile_pickle())
    # A legit torch file whose one stride-0 view would need 4 TiB as float32.
    torch.save({"x": torch.ones(1).expand(2**20, 2**20)}, out("expanded_bomb.pth"),
               _use_new_zipfile_serialization=False)

    total = 0
    for name in sorted(os.listdir(args.out)):
        size = os.path.getsize(out(name))
        total += size
        print(f"{name}: {size} bytes")
    print(f"total {total} bytes")
    assert total < SIZE_CAP, f"fixtures take {total} bytes, over the {SIZE_CAP} cap"


if __name__ == "__main__":
    main()
