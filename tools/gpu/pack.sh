#!/usr/bin/env bash
# Packs what tools/gpu/check.sh needs on a machine without Rust or network: the release CLI and
# every test executable, stripped, with the Vulkan loader's Debian package, in one .tar.xz.
#
#   tools/gpu/pack.sh [ARCHIVE]        # default: .gpu/hrnet-ocr-gpu.tar.xz (git ignores .gpu/)
#
# The test executables find their fixtures and the CLI at the absolute paths they were built
# at; the archive records that root (build-root) and check.sh links it to the checkout it runs
# in. Environment: XZ_LEVEL (default 9; CI packs at 1 to save time).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
archive=$(realpath -m "${1:-$repo/.gpu/hrnet-ocr-gpu.tar.xz}")
cd "$repo"

note() { printf '== pack: %s\n' "$*" >&2; }

note "building the CLI and the test executables (release)"
cargo build --release --quiet
# cargo names each test executable once in its JSON messages ("executable" of a test target).
mapfile -t executables < <(cargo test --release --no-run --message-format=json 2> /dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["target"]["name"] + "\t" + m["target"]["kind"][0] + "\t" + m["executable"])
')
((${#executables[@]} > 0)) || { echo "pack: cargo named no test executable" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/pack/bin" "$stage/pack/tests" "$stage/pack/deb"
cp target/release/hrnet-ocr "$stage/pack/bin/"
for entry in "${executables[@]}"; do
    IFS=$'\t' read -r name kind path <<< "$entry"
    # The browser suite (tests/web.rs) is empty natively.
    [[ $name == web ]] && continue
    # The library's and the binary's unit tests share their crate's name: keep them apart.
    case $kind in lib) name="unit-lib" ;; bin) name="unit-bin" ;; esac
    cp "$path" "$stage/pack/tests/$name"
done
strip "$stage/pack/bin/"* "$stage/pack/tests/"*
printf '%s\n' "$repo" > "$stage/pack/build-root"
git rev-parse --short HEAD > "$stage/pack/commit" 2> /dev/null || echo unknown > "$stage/pack/commit"

# The Vulkan loader and GLVND, for a machine that has a GPU driver but no loader: NVIDIA's
# Vulkan driver lives in libGLX_nvidia, which needs GLVND's dispatch libraries beside it.
# check.sh unpacks them into a folder of its own only when ldconfig finds no Vulkan loader.
# Optional: without apt they are left out.
loaders="libvulkan1 libglvnd0 libglx0 libegl1 libgl1 libopengl0 libgles2"
if command -v apt-get > /dev/null; then
    (cd "$stage/pack/deb" && apt-get download -qq $loaders 2> /dev/null) || note "the loaders not packed (apt-get download failed)"
fi

mkdir -p "$(dirname "$archive")"
tar -C "$stage" -cf - pack | xz -T0 "-${XZ_LEVEL:-9}" > "$archive.tmp"
mv "$archive.tmp" "$archive"
note "$(du -h "$archive" | cut -f1) -> $archive ($(ls "$stage/pack/tests" | wc -l) test executables)"
