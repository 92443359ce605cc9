# Sourced by the web build and test scripts: the wasm32 toolchain and its variables.
# rustup's toolchain here has no wasm32 standard library and none can be downloaded, so the
# browser build uses Debian's rustc-web (whose LLVM has the wasm32 backend) and cargo-web
# with the standard library's own source (rust-web-src), compiled for wasm32 by cargo's
# build-std (RUSTC_BOOTSTRAP lets a stable compiler take that flag), linked by Debian's
# wasm-ld. `tools/web/setup.sh` installs all of it.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export RUSTC=/usr/bin/rustc
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld-19
export CARGO_TARGET_DIR="${WEB_TARGET_DIR:-$ROOT/target/web}"
WEB_CARGO=/usr/bin/cargo
WEB_TARGET=(--target wasm32-unknown-unknown -Zbuild-std=std,panic_abort)
