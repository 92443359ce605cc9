#!/usr/bin/env bash
# Fuzzes every parser of outside data with libFuzzer (cargo-fuzz), SECONDS per target
# (default 60), and fails on any crash, hang (10 s on one input) or huge allocation.
#
#   fuzz/run.sh [SECONDS]            all targets
#   TARGETS="pth image" fuzz/run.sh  some of them
#
# Works on the stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only
# flags, and `--sanitizer none` needs no sanitizer runtime. Without a sanitizer libFuzzer's
# -malloc_limit_mb has no malloc hook to act on, so fuzz/src/lib.rs enforces the same limit
# in the targets' allocator. Each target fuzzes a scratch copy of its seed corpus
# (fuzz/corpus.run/, not committed) starting from fuzz/corpus/<target>/ and the fixed crash
# inputs in fuzz/regressions/<target>/; crash inputs land in fuzz/artifacts/<target>/ and
# the full libFuzzer output in fuzz/logs/<target>.log.
# To keep a crash as a regression once fixed: move it to fuzz/regressions/<target>/
# (tests/fuzz_corpus.rs replays those in `cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
targets="${TARGETS:-pth safetensors config_yaml image labels}"
cargo_fuzz_version="0.13.2"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz $cargo_fuzz_version"
    cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi
# libfuzzer-sys compiles libFuzzer itself (C++).
if ! command -v c++ >/dev/null 2>&1; then
    echo "no C++ compiler found: installing g++"
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq g++ >/dev/null
fi

# One release build of every target, with debug assertions and overflow checks (an overflow
# is a bug too); the binaries are then run directly, so nothing is rebuilt between targets.
flags=(--sanitizer none --debug-assertions)
cargo fuzz build "${flags[@]}"
bin="${CARGO_TARGET_DIR:-fuzz/target}/$(rustc -vV | sed -n 's/^host: //p')/release"

failed=()
summary=()
for target in $targets; do
    scratch="fuzz/corpus.run/$target"
    rm -rf "$scratch"
    mkdir -p "$scratch" "fuzz/artifacts/$target" fuzz/logs
    cp fuzz/corpus/"$target"/* "$scratch"/
    dirs=("$scratch")
    if [ -d "fuzz/regressions/$target" ]; then dirs+=("fuzz/regressions/$target"); fi
    log="fuzz/logs/$target.log"
    echo "=== fuzzing $target for ${seconds}s (log: $log)"
    status=0
    "$bin/$target" -artifact_prefix="fuzz/artifacts/$target/" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 \
        -print_final_stats=1 "${dirs[@]}" >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n 1)
    corpus=$(find "$scratch" -type f | wc -l)
    line="$target: ${execs:-?} executions, corpus $corpus files, peak RSS ${rss:-?} MB"
    if [ "$status" -ne 0 ]; then
        line="$line: FAILED (exit $status)"
        failed+=("$target")
        tail -n 40 "$log"
        ls -l "fuzz/artifacts/$target"
    fi
    echo "$line"
    summary+=("$line")
done

echo "=== fuzzing summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing found problems in: ${failed[*]} (inputs in fuzz/artifacts/<target>/;" \
        "replay one with: $bin/<target> <file>, or RUSTC_BOOTSTRAP=1 cargo fuzz run ${flags[*]} <target> <file>)"
    exit 1
fi
