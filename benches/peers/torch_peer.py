#!/usr/bin/env python3
"""Peer benchmark for hrnet-ocr's kernels on PyTorch (CPU).

Runs the cases of benches/peers/shapes.txt and prints one JSON object per case and pass:

    {"peer": "pytorch-cpu", "case": "...", "pass": "forward", "ms": ..., "first_ms": ...,
     "gflops": ..., "iters": ..., "adapter": "..."}

usage: torch_peer.py SHAPES_FILE [--iters N] [--threads N]
"""

import argparse
import json
import os
import platform
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("torch_peer.py: PyTorch is not installed (pip install torch); skipping the PyTorch peer")

PEER = "pytorch-cpu"
PASSES = ("forward", "forward+backward")


def parse_shapes(path):
    """Yields (kind, params) for every case line of the shapes file."""
    arity = {"conv": 7, "matmul": 3, "softmax": 2}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            kind, values = fields[0], fields[1:]
            if arity.get(kind) != len(values):
                sys.exit(f"{path}:{number}: unrecognised case {line.strip()!r}")
            yield kind, [int(value) for value in values]


def conv_out(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def case_name(kind, p):
    if kind == "conv":
        ci, co, h, w, k, stride, _pad = p
        return f"conv {ci}->{co} {k}x{k} s{stride} {h}x{w}"
    if kind == "matmul":
        return "matmul {}x{}x{}".format(*p)
    return "softmax {}x{}".format(*p)


def forward_flops(kind, p):
    if kind == "conv":
        ci, co, h, w, k, stride, pad = p
        return 2 * ci * co * k * k * conv_out(h, k, stride, pad) * conv_out(w, k, stride, pad)
    if kind == "matmul":
        m, k, n = p
        return 2 * m * k * n
    return None


def make_case(kind, p, generator):
    """Returns (inputs, op) for one case."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    if kind == "conv":
        ci, co, h, w, k, stride, pad = p
        inputs = [randn(1, ci, h, w), randn(co, ci, k, k)]
        return inputs, lambda x, weight: F.conv2d(x, weight, None, stride, pad)
    if kind == "matmul":
        m, k, n = p
        return [randn(m, k), randn(k, n)], torch.matmul
    rows, length = p
    return [randn(rows, length)], lambda x: torch.softmax(x, dim=-1)


def time_calls(call, iters):
    start = time.perf_counter()
    call()
    first_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    for _ in range(iters):
        call()
    return first_ms, (time.perf_counter() - start) * 1e3 / iters


def bench(kind, p, pass_name, iters, generator):
    inputs, op = make_case(kind, p, generator)
    if pass_name == "forward":
        def call():
            with torch.no_grad():
                op(*inputs)
        return time_calls(call, iters)

    leaves = [tensor.requires_grad_() for tensor in inputs]
    with torch.no_grad():
        upstream = torch.randn(op(*inputs).shape, generator=generator)

    def call():
        grads = torch.autograd.grad(op(*leaves), leaves, upstream)
        assert len(grads) == len(leaves)
    return time_calls(call, iters)


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("shapes")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="intra-op threads (default: all cores)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0x5EED)
    adapter = f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"pytorch peer on {adapter}, {args.iters} timed calls per case", file=sys.stderr)

    for kind, p in parse_shapes(args.shapes):
        flops = forward_flops(kind, p)
        for pass_name in PASSES:
            first_ms, ms = bench(kind, p, pass_name, args.iters, generator)
            factor = 1 if pass_name == "forward" else 3
            record = {
                "peer": PEER,
                "case": case_name(kind, p),
                "pass": pass_name,
                "ms": round(ms, 4),
                "first_ms": round(first_ms, 2),
                "gflops": None if flops is None else round(flops * factor / (ms * 1e6), 3),
                "iters": args.iters,
                "adapter": adapter,
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
