#!/usr/bin/env bash
# The GPU check: runs the packed engine (tools/gpu/pack.sh) on this machine's Vulkan adapter and
# writes what it found to OUTDIR: info, every test executable's result, the kernel benchmarks,
# the whole model end to end, and the same model shapes in PyTorch eager on CUDA when torch is
# installed. Needs no Rust toolchain and no network.
#
#   tools/gpu/check.sh [--quick] [--pack ARCHIVE] OUTDIR
#
#   --quick     small shapes, few tests, short budgets: the form CI runs on lavapipe
#   --pack      the archive pack.sh wrote [default: .gpu/hrnet-ocr-gpu.tar.xz]
#
# OUTDIR receives (flat, so a remote runner can bring it all back):
#   summary.md      adapter, test results with every failing test by name, the tables
#   results.jsonl   every JSON line: kernel cases, model passes (hrnet-ocr and PyTorch)
#   tests.log       the test executables' output
#   info.txt        `hrnet-ocr info`
#   context_heads.txt  `bench --context-heads` (paper size; --quick: small), with the PyTorch
#                   reference's table beside it where torch imports
#   data_parallel.txt  `bench --devices`: the training step split over two ranks (devices 0 and
#                   1, or two ranks on device 0 where there is one) beside one device
# Exits non-zero when a test or a step failed; everything measured so far is written anyway.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
quick=
archive=$repo/.gpu/hrnet-ocr-gpu.tar.xz
out=
while (($#)); do
    case $1 in
        --quick) quick=1 ;;
        --pack) archive=$2; shift ;;
        -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
[[ -n $out ]] || { echo "check.sh: give an output folder (see --help)" >&2; exit 2; }
[[ -f $archive ]] || { echo "check.sh: no archive at $archive: run tools/gpu/pack.sh first" >&2; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd)
: > "$out/results.jsonl"
: > "$out/tests.log"
failures=()
started=$SECONDS

note() { printf '== check [%3ds]: %s\n' $((SECONDS - started)) "$*" >&2; }
fail() { failures+=("$1"); note "FAILED: $1"; }

work=$(mktemp -d)
# The tuning cache and Mesa's shader cache of this run alone: the check neither depends on
# nor leaves behind what earlier runs on the machine chose.
export XDG_CACHE_HOME=$work/cache
link=
cleanup() { [[ -n $link ]] && rm -f "$link"; rm -rf "$work"; }
trap cleanup EXIT
xz -dc "$archive" | tar -C "$work" -xf - || { echo "check.sh: cannot unpack $archive" >&2; exit 2; }
pack=$work/pack
bin=$pack/bin/hrnet-ocr

# The Vulkan loader (and GLVND): the packed ones, in a folder of their own, only when the system
# has no loader.
if ! ldconfig -p 2> /dev/null | grep -q 'libvulkan\.so\.1'; then
    debs=("$pack"/deb/*.deb)
    [[ -f ${debs[0]} ]] || { echo "check.sh: no Vulkan loader here and none packed" >&2; exit 2; }
    for deb in "${debs[@]}"; do dpkg-deb -x "$deb" "$work/loader"; done
    export LD_LIBRARY_PATH=$(dirname "$(find "$work/loader" -name 'libvulkan.so.1' | head -1)")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    note "using the packed Vulkan loader and GLVND ($LD_LIBRARY_PATH)"
fi
# NVIDIA's container images keep the driver's Vulkan manifest outside the loader's search path.
if ! ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json > /dev/null 2>&1 &&
    [[ -z ${VK_DRIVER_FILES:-} && -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    note "using the driver's manifest $VK_DRIVER_FILES"
fi

# The test executables read fixtures, and the CLI tests run the CLI, at the absolute paths they
# were built at: that root must be this checkout, or a link to it.
root=$(cat "$pack/build-root")
if [[ $(realpath -m "$root") != "$repo" ]]; then
    if [[ -e $root || -L $root ]]; then
        echo "check.sh: the executables were built at $root, which is another folder here;" \
            "pack from a checkout at a path that is free on this machine" >&2
        exit 2
    fi
    mkdir -p "$(dirname "$root")" && ln -s "$repo" "$root" && link=$root ||
        { echo "check.sh: cannot link $root to $repo" >&2; exit 2; }
fi
if [[ ! -x $repo/target/release/hrnet-ocr ]]; then
    mkdir -p "$repo/target/release" && cp "$bin" "$repo/target/release/hrnet-ocr"
fi

# --- info -------------------------------------------------------------------------------------
note "hrnet-ocr info"
"$bin" info > "$out/info.txt" 2>&1 || fail "hrnet-ocr info"
cat "$out/info.txt" >&2

# --- tests ------------------------------------------------------------------------------------
# Quick: every executable must start and list its tests; the kernel suite runs a slice.
declare -A test_rows
for exe in "$pack"/tests/*; do
    name=$(basename "$exe")
    if [[ -n $quick ]]; then
        if [[ $name == kernels ]]; then args=(matmul:: softmax::); else args=(--list); fi
        limit=300
    else
        args=()
        limit=$([[ $name == kernels ]] && echo 300 || echo 120)
    fi
    note "tests: $name ${args[*]}"
    log=$work/$name.log
    (cd "$repo" && timeout "$limit" "$exe" "${args[@]}") > "$log" 2>&1
    rc=$?
    { echo "### $name ${args[*]} (exit $rc)"; cat "$log"; } >> "$out/tests.log"
    result=$(grep -E '^test result:|tests?, [0-9]+ benchmarks' "$log" | tail -1)
    failed=$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | tr '\n' ' ')
    ((rc == 124)) && result="timed out after ${limit}s"
    test_rows[$name]="$rc|${result:-no result line}|${failed:-}"
    ((rc == 0)) || fail "test executable $name (exit $rc)${failed:+: $failed}"
done

# --- benchmarks -------------------------------------------------------------------------------
# label limit table command...: appends the command's JSON lines to results.jsonl and to the
# rows of one table (model or kernels).
run_json() {
    local label=$1 limit=$2 table=$3
    shift 3
    note "$label"
    local tmp=$work/step.jsonl
    timeout "$limit" "$@" > "$tmp" 2> "$work/step.err"
    local rc=$?
    grep '^{' "$tmp" | tee -a "$work/$table.jsonl" >> "$out/results.jsonl"
    if ((rc != 0)) || ! grep -q '^{' "$tmp"; then
        tail -5 "$work/step.err" >&2
        fail "$label (exit $rc)"
    fi
}
if [[ -n $quick ]]; then
    kernels_args=(--filter matmul --budget-ms 20)
    w18=(--size 64x128 --batch 1 --iters 1)
    w48=(--size 64x128 --batch 1 --iters 1)
    parallel=(--size 64x128 --batch 2 --iters 2)
else
    kernels_args=(--budget-ms 100)
    w18=(--size 512x1024 --batch 2 --iters 3)
    w48=(--size 1024x2048 --batch 1 --iters 3)
    parallel=(--size 512x1024 --batch 2 --iters 3)
fi
run_json "bench --kernels" 240 kernels "$bin" bench --kernels --json "${kernels_args[@]}"
run_json "bench w18-small-v2 ${w18[*]}" 180 model "$bin" bench --config w18-small-v2 --json "${w18[@]}"
run_json "bench w48 ${w48[*]} forward" 180 model "$bin" bench --config w48 --forward-only --json "${w48[@]}"

# --- PyTorch eager, the same model shapes -------------------------------------------------------
python=${PYTHON:-python3}
torch_note="PyTorch not run: \`$python -c 'import torch'\` failed"
if "$python" -c 'import torch' 2> /dev/null; then
    if "$python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
        device=cuda
    else
        device=cpu
    fi
    if [[ $device == cuda || -n $quick ]]; then
        torch_note="PyTorch eager on $device"
        peer=$repo/benches/peers/torch_model.py
        precisions=("")
        [[ $device == cuda ]] && precisions=("" --tf32)
        for tf32 in "${precisions[@]}"; do
            run_json "torch w18-small-v2 $device $tf32" 240 model "$python" "$peer" --device "$device" $tf32 \
                --config w18-small-v2 "${w18[@]}"
            run_json "torch w48 $device $tf32" 240 model "$python" "$peer" --device "$device" $tf32 \
                --config w48 --forward-only "${w48[@]}"
        done
    else
        torch_note="PyTorch not run: torch sees no CUDA device (the full check compares with CUDA only)"
    fi
fi
note "$torch_note"

# --- context heads: the OCR paper's comparison, beside the PyTorch reference where torch runs ---
heads_size=$([[ -n $quick ]] && echo small || echo paper)
reference=$work/context_heads_$heads_size.txt
if ! "$python" -c 'import torch' 2> /dev/null; then
    reference=
elif ! timeout 300 "$python" "$repo/tools/reference/context_heads.py" complexity --size "$heads_size" --time \
    --table "$reference" > /dev/null 2> "$work/heads.err"; then
    tail -5 "$work/heads.err" >&2
    fail "context_heads.py complexity --size $heads_size"
    reference=
fi
note "bench --context-heads --context-size $heads_size"
timeout 300 "$bin" bench --context-heads --context-size "$heads_size" ${reference:+--reference "$reference"} \
    > "$out/context_heads.txt" 2>&1 || fail "bench --context-heads --context-size $heads_size"

# --- data parallel: the training step over two ranks, synchronized batch norm ---------------------
devices=$(grep -cE '^  [0-9]+: ' "$out/info.txt" || true)
pair=$([[ ${devices:-0} -ge 2 ]] && echo 0,1 || echo 0,0)
note "bench --devices $pair ${parallel[*]}"
timeout 300 "$bin" bench --config w18-small-v2 --devices "$pair" "${parallel[@]}" \
    > "$out/data_parallel.txt" 2>&1 || fail "bench --devices $pair"

# --- summary ----------------------------------------------------------------------------------
{
    echo "# GPU check$([[ -n $quick ]] && echo ' (quick)')"
    echo
    echo "commit $(cat "$pack/commit"), $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - started)) s"
    echo
    echo '```'
    cat "$out/info.txt"
    echo '```'
    echo
    echo "## Tests"
    echo
    echo "| executable | exit | result | failing tests |"
    echo "|---|---:|---|---|"
    for name in $(printf '%s\n' "${!test_rows[@]}" | sort); do
        IFS='|' read -r rc result failed <<< "${test_rows[$name]}"
        echo "| $name | $rc | $result | ${failed:--} |"
    done
    echo
    echo "## The model, end to end (ms per pass; $torch_note)"
    echo
    python3 "$repo/benches/peers/compare.py" "$work/model.jsonl" || echo "(no model rows)"
    echo
    echo "## Kernels"
    echo
    python3 "$repo/benches/peers/compare.py" "$work/kernels.jsonl" || echo "(no kernel rows)"
    echo
    echo "## Context heads ($heads_size)"
    echo
    echo '```'
    cat "$out/context_heads.txt"
    echo '```'
    echo
    echo "## Data parallel (devices $pair)"
    echo
    echo '```'
    cat "$out/data_parallel.txt"
    echo '```'
    echo
    if ((${#failures[@]})); then
        echo "## Failed"
        printf -- '- %s\n' "${failures[@]}"
    else
        echo "Every step passed."
    fi
} > "$out/summary.md"
cat "$out/summary.md"
((${#failures[@]} == 0))
