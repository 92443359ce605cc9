#!/usr/bin/env bash
# Everything of the browser build that CI checks: lints of the wasm32 code, the kernel suite
# in headless Chromium (tools/web/test.sh), the page's build, and the page test. Run
# tools/web/setup.sh once first.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
# Debian's clippy for the toolchain that builds the wasm (rustup's comes first on PATH
# otherwise): the engine's wasm32 code, the browser suite and the page's crate.
PATH=/usr/bin:$PATH $WEB_CARGO clippy --release --no-default-features "${WEB_TARGET[@]}" \
    -p hrnet-ocr -p hrnet-ocr-web --lib --test web -- -D warnings
cargo fmt -p hrnet-ocr-web --check
tools/web/test.sh
tools/web/build.sh
python3 tools/web/page_test.py
