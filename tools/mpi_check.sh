#!/usr/bin/env bash
# Data-parallel training through MPI (the `mpi` feature), as CI runs it: two ranks under
# `mpirun -np 2` on this machine's one adapter.
#  1. Their run ends with the very bytes of the same run with two in-process ranks
#     (`--devices 0,0`): the collectives differ, the arithmetic does not.
#  2. Their first step's loss is one device's at both images (1e-5): scenes of 256 cropped at
#     64 are never padded, so every image has as many labelled pixels, and the mean of the
#     ranks' losses (what the official DDP run minimises) is the global batch's.
#  3. A run stopped at a checkpoint and resumed under mpirun ends with the bytes of the run
#     that went straight through.
#  4. A rank that fails (rank 0 cannot write its checkpoint) ends the whole run with its
#     error, instead of leaving the other rank waiting in its next exchange.
# Installs Open MPI and libclang (for the MPI bindings) from the system's packages when
# missing. Usage: tools/mpi_check.sh [work folder]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/mpi-check}
rm -rf "$work" && mkdir -p "$work"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v mpirun >/dev/null || ! ldconfig -p | grep -q 'libclang'; then
    echo "installing Open MPI and libclang"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq openmpi-bin libopenmpi-dev libclang-dev >/dev/null
fi
cargo build --release --features mpi --bin hrnet-ocr
bin=${CARGO_TARGET_DIR:-target}/release/hrnet-ocr
# Open MPI refuses root unless told; two ranks may share two cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi() { mpirun --oversubscribe -np 2 "$bin" "$@"; }
run=(train --synthetic --steps 4 --batch 1 --crop 64 --size 256 --save-every 2)

mpi "${run[@]}" --out "$work/mpi"
"$bin" "${run[@]}" --devices 0,0 --out "$work/threads"
cmp "$work/mpi/final.safetensors" "$work/threads/final.safetensors"
echo "mpirun -np 2 and two in-process ranks: the same final weights, byte for byte"

"$bin" train --synthetic --steps 4 --batch 2 --crop 64 --size 256 --stop-after 1 --out "$work/one"
first_loss() { sed -n 2p "$1/train_log.csv" | cut -d, -f2; }
python3 - "$(first_loss "$work/mpi")" "$(first_loss "$work/one")" <<'PY'
import sys
ranks, one = map(float, sys.argv[1:])
err = abs(ranks - one) / abs(one)
print(f"first step's loss: 2 MPI ranks x 1 image {ranks}, one device x 2 images {one} ({err:.1e})")
sys.exit(0 if err <= 1e-5 else 1)
PY

mpi "${run[@]}" --stop-after 2 --out "$work/resumed"
mpi train --resume "$work/resumed/checkpoint.safetensors" --out "$work/resumed"
cmp "$work/mpi/final.safetensors" "$work/resumed/final.safetensors"
echo "an MPI run resumed from its step-2 checkpoint ends as the run that went straight through"

mkdir -p "$work/failing/checkpoint.safetensors"
if timeout 300 mpirun --oversubscribe -np 2 "$bin" "${run[@]}" --out "$work/failing" >"$work/failing.log" 2>&1; then
    echo "a run whose rank 0 cannot write its checkpoint succeeded" >&2
    exit 1
fi
grep -q 'error on rank 0 of 2: .*checkpoint.safetensors' "$work/failing.log" || {
    echo "the failed run did not name rank 0's error (timed out?):" >&2
    tail -20 "$work/failing.log" >&2
    exit 1
}
echo "a rank that failed ended the run with its error"
