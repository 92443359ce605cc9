#!/usr/bin/env bash
# Everything of the browser build that CI checks: lints of the wasm32 code, the kernel suite
# in headless Chromium (tools/web/test.sh), the page's build, and the page test. Run
# tools/web/setup.sh once first.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
# Debian's clippy and rustfmt for the toolchain that builds the wasm (rustup's come first
# on PATH otherwise).
PATH=/usr/bin:$PATH $WEB_CARGO clippy --release --no-default-features "${WEB_TARGET[@]}" \
    --lib --test web -- -D warnings
PATH=/usr/bin:$PATH $WEB_CARGO clippy --release --manifest-path web/Cargo.toml "${WEB_TARGET[@]}" -- -D warnings
cargo fmt --manifest-path web/Cargo.toml --check
tools/web/test.sh
tools/web/build.sh
python3 tools/web/page_test.py
