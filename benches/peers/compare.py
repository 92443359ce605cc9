#!/usr/bin/env python3
"""Side-by-side markdown table of kernel benchmark results.

Reads JSON-lines files written by the peers (hrnet-ocr `bench --kernels --json`, the burn peer,
torch_peer.py), one object per line with at least "peer", "case", "pass", "ms" and optionally
"gflops", "first_ms" and "adapter". Rows are joined on (case, pass); a peer without a result for
a row shows "-". The ratio columns give hrnet-ocr's throughput relative to each other peer
(their ms / hrnet-ocr's ms, which equals the GFLOP/s ratio), so above 1.00 x means hrnet-ocr is
faster.

usage: compare.py RESULTS.jsonl [RESULTS.jsonl ...] [--first]
"""

import argparse
import json
import sys

HRNET = "hrnet-ocr"
SHORT_NAMES = {"burn-wgpu": "burn", "pytorch-cpu": "torch"}


def load(paths):
    """Returns ({(case, pass): {peer: record}}, row order, peer order, {peer: adapter})."""
    results, rows, peers, adapters = {}, [], [], {}
    for path in paths:
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except OSError as err:
            print(f"compare.py: skipping {path}: {err}", file=sys.stderr)
            continue
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
                peer, key = record["peer"], (record["case"], record["pass"])
                float(record["ms"])
            except (ValueError, KeyError, TypeError) as err:
                print(f"compare.py: {path}:{number}: ignoring malformed line ({err})",
                      file=sys.stderr)
                continue
            if key not in results:
                results[key] = {}
                rows.append(key)
            if peer not in peers:
                peers.append(peer)
            if record.get("adapter"):
                adapters[peer] = record["adapter"]
            results[key][peer] = record
    return results, rows, peers, adapters


def fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def short(peer):
    return SHORT_NAMES.get(peer, peer)


def table(results, rows, peers, first):
    others = [peer for peer in peers if peer != HRNET]
    columns = [HRNET] + others
    header = ["case", "pass"]
    for peer in columns:
        header += [f"{short(peer)} ms", f"{short(peer)} GFLOP/s"]
        if first:
            header.append(f"{short(peer)} first ms")
    header += [f"{short(HRNET)} / {short(peer)}" for peer in others]

    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for key in rows:
        by_peer = results[key]
        cells = list(key)
        for peer in columns:
            record = by_peer.get(peer, {})
            cells += [fmt(record.get("ms"), 3), fmt(record.get("gflops"), 1)]
            if first:
                cells.append(fmt(record.get("first_ms"), 1))
        ours = by_peer.get(HRNET)
        for peer in others:
            theirs = by_peer.get(peer)
            if ours and theirs and float(ours["ms"]) > 0:
                cells.append(f"{float(theirs['ms']) / float(ours['ms']):.2f} x")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="JSON-lines result files")
    parser.add_argument("--first", action="store_true",
                        help="add first-call (warm-up, compile and autotune) columns")
    args = parser.parse_args()

    results, rows, peers, adapters = load(args.files)
    if not rows:
        sys.exit("compare.py: no results found")
    print(table(results, rows, peers, args.first))
    print()
    for peer in [HRNET] + [peer for peer in peers if peer != HRNET]:
        print(f"- {peer}: {adapters.get(peer, 'no results') if peer in peers else 'no results'}")


if __name__ == "__main__":
    main()
