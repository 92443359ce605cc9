#!/usr/bin/env bash
# Builds the page: the web crate for wasm32, its JavaScript bindings by wasm-bindgen, and
# the example picture, into web/pkg/. Serve web/ with any static server, e.g.
#   python3 -m http.server -d web 8000      then open http://localhost:8000/
set -euo pipefail
source "$(dirname "$0")/env.sh"
$WEB_CARGO build --release --manifest-path "$ROOT/web/Cargo.toml" "${WEB_TARGET[@]}"
rm -rf "$ROOT/web/pkg"
wasm-bindgen --target web --no-typescript --out-dir "$ROOT/web/pkg" \
    "$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/hrnet_ocr_web.wasm"
cp "$ROOT/assets/scene.png" "$ROOT/web/pkg/scene.png"
echo "built web/pkg ($(du -sh "$ROOT/web/pkg" | cut -f1)); serve web/ and open index.html"
