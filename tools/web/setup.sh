#!/usr/bin/env bash
# Installs what the browser build and its tests need, all from Debian and crates.io: the
# wasm32 toolchain (Debian's rustc-web and cargo-web with the standard library's source,
# wasm-ld, clippy), Chromium with its WebDriver, and wasm-bindgen's CLI at the version Cargo.lock
# pins for the wasm-bindgen crate (the two must match).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
need=()
for pkg in rustc-web cargo-web rust-web-src rust-web-clippy lld-19 chromium chromium-driver; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$ROOT/Cargo.lock")
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$version" ]; then
    cargo install -q wasm-bindgen-cli --version "$version"
fi
