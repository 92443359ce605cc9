#!/usr/bin/env bash
# The OCR paper's ablations on the procedural scenes (issue 21): OCR with and without
# object-region supervision (LOSS.BALANCE_WEIGHTS [0.4, 1] against [0, 1]), PPM, ASPP and no
# context head, each trained from the same fresh start by the same recipe and seed on the
# bundled model's configuration (models/procedural.yaml, its MODEL.CONTEXT_HEAD and loss
# weights changed), then scored on the 100 held-out scenes (seed 2, 128x128). Prints the
# table the README quotes.
#
#   tools/ablation.sh [OUT]        # default OUT: ablation/; STEPS=900 by default
#
# Each run: STEPS steps of batch 4, 64x64 crops of 128x128 scenes, seed 1. On lavapipe
# (2 cores) a run takes about 13 minutes at the default 900 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-ablation}
STEPS=${STEPS:-900}
BIN=${BIN:-target/release/hrnet-ocr}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet
mkdir -p "$OUT"

# name, MODEL.CONTEXT_HEAD, BALANCE_WEIGHTS[0]
RUNS=(
  "ocr ocr 0.4"
  "ocr_no_region_supervision ocr 0"
  "ppm ppm 0.4"
  "aspp aspp 0.4"
  "none none 0.4"
)

for run in "${RUNS[@]}"; do
  read -r name head aux <<<"$run"
  cfg="$OUT/$name.yaml"
  sed -e "s/^  ALIGN_CORNERS: true$/  ALIGN_CORNERS: true\n  CONTEXT_HEAD: $head/" \
      -e "s/^  BALANCE_WEIGHTS: \[0.4, 1\]$/  BALANCE_WEIGHTS: [$aux, 1]/" models/procedural.yaml >"$cfg"
  grep -q "CONTEXT_HEAD: $head" "$cfg" && grep -q "BALANCE_WEIGHTS: \[$aux, 1\]" "$cfg" ||
    { echo "could not write $cfg from models/procedural.yaml" >&2; exit 1; }
  if [ ! -f "$OUT/$name/final.safetensors" ]; then
    start=$(date +%s)
    "$BIN" train --config "$cfg" --synthetic --out "$OUT/$name" --steps "$STEPS" --batch 4 \
      --size 128 --crop 64 --seed 1 >"$OUT/$name.train.log" 2>&1
    echo $(( $(date +%s) - start )) >"$OUT/$name.seconds"
  fi
  "$BIN" eval --config "$cfg" --weights "$OUT/$name/final.safetensors" --synthetic >"$OUT/$name.eval.txt"
done

echo "| run | MODEL.CONTEXT_HEAD | LOSS.BALANCE_WEIGHTS | mIoU | pixel accuracy | train s |"
echo "| --- | --- | --- | --- | --- | --- |"
for run in "${RUNS[@]}"; do
  read -r name head aux <<<"$run"
  miou=$(awk '/^mIoU/ {print $2}' "$OUT/$name.eval.txt")
  acc=$(awk '/^pixel accuracy/ {print $3}' "$OUT/$name.eval.txt")
  echo "| $name | $head | [$aux, 1] | $miou | $acc | $(cat "$OUT/$name.seconds") |"
done
