#!/usr/bin/env bash
# The kernel suite in the browser: tests/web.rs built for wasm32 and run by wasm-bindgen's
# test runner in headless Chromium (WebGPU on SwiftShader, shaders compiled by Tint), with
# the flags in tools/web/webdriver.json.
set -euo pipefail
source "$(dirname "$0")/env.sh"
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
export CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-1200}"
export WASM_BINDGEN_TEST_WEBDRIVER_JSON="$ROOT/tools/web/webdriver.json"
cd "$ROOT"
$WEB_CARGO test --release --manifest-path "$ROOT/Cargo.toml" --no-default-features \
    "${WEB_TARGET[@]}" --test web "$@"
