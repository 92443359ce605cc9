#!/usr/bin/env bash
# Builds and runs every kernel-benchmark peer on the cases of shapes.txt, one after the other,
# writes their JSON lines to results/<peer>.jsonl and prints the comparison table.
#
#   benches/peers/run.sh                 # all peers, 10 timed calls per case
#   ITERS=20 SKIP_TORCH=1 benches/peers/run.sh
#
# Besides the kernels, hrnet-ocr and PyTorch also run the whole model (W18-small-v2 + OCR at
# 2x3x256x256: inference forward and training step); compare.py joins those rows too.
#
# Environment: ITERS (timed calls per case for burn and torch, default 10), SHAPES (default shapes.txt next to this
# script), SKIP_HRNET / SKIP_BURN / SKIP_TORCH=1 to leave a peer out (its old results file, if
# any, is left in place and still compared), PYTHON (default python3), CUBECL_AUTOTUNE_CACHE
# (default false: burn autotunes afresh on every run).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
shapes=$(realpath "${SHAPES:-$here/shapes.txt}")
iters=${ITERS:-10}
python=${PYTHON:-python3}
results="$here/results"
mkdir -p "$results"

note() { printf '== %s\n' "$*" >&2; }

# Keeps only the JSON lines of a peer's stdout; fails when the peer failed or printed none.
run_peer() {
    local name=$1
    shift
    local out="$results/$name.jsonl"
    note "running $name"
    if "$@" | grep '^{' > "$out.tmp" && [[ -s "$out.tmp" ]]; then
        mv "$out.tmp" "$out"
        note "$name: $(wc -l < "$out") results -> ${out#"$repo"/}"
    else
        rm -f "$out.tmp"
        note "$name FAILED (see the messages above); no results written"
    fi
}

if [[ -z "${SKIP_HRNET:-}" ]]; then
    note "building hrnet-ocr (release)"
    if (cd "$repo" && cargo build --release --quiet); then
        # Each case is timed for about 1.5 s (at least 3 calls) after one untimed call.
        run_peer hrnet-ocr "$repo/target/release/hrnet-ocr" bench --kernels \
            --shapes "$shapes" --json --budget-ms 1500
        # The whole model, forward and training step, as torch_model.py times it.
        run_peer hrnet-ocr-model "$repo/target/release/hrnet-ocr" bench --config w18-small-v2 \
            --size 256 --batch 2 --iters 3 --json
    else
        note "hrnet-ocr build FAILED"
    fi
fi

if [[ -z "${SKIP_BURN:-}" ]]; then
    note "building the burn peer (release; the first build takes a long while)"
    if (cd "$here/burn" && cargo build --release --quiet); then
        # No persistent autotune cache by default, so first_ms always includes burn's autotuning
        # (3 to 12 minutes on 2-core lavapipe); CUBECL_AUTOTUNE_CACHE=true keeps and reuses it.
        run_peer burn-wgpu env CUBECL_AUTOTUNE_CACHE="${CUBECL_AUTOTUNE_CACHE:-false}" \
            "$here/burn/target/release/hrnet-ocr-peer-burn" "$shapes" --iters "$iters"
    else
        note "burn peer build FAILED"
    fi
fi

if [[ -z "${SKIP_TORCH:-}" ]]; then
    if "$python" -c 'import torch' 2> /dev/null; then
        run_peer pytorch-cpu "$python" "$here/torch_peer.py" "$shapes" --iters "$iters"
        run_peer pytorch-cpu-model "$python" "$here/torch_model.py" --size 256 --batch 2 --iters 3
    else
        note "PyTorch not installed for $python: skipping the pytorch-cpu peer"
    fi
fi

shopt -s nullglob
files=("$results"/*.jsonl)
if ((${#files[@]} == 0)); then
    note "no results to compare"
    exit 1
fi
python3 "$here/compare.py" "${files[@]}" | tee "$results/table.md"
