#!/usr/bin/env bash
# Runs Warren's whole test suite on a fresh Debian 12 machine, as root: formatting and lints, Rust
# unit tests, real-kernel runtime tests, and the official E2B Python SDK against a live daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh must run as root: the runtime tests create namespaces, cgroups and veths" >&2
  exit 1
fi

scripts/install-deps.sh
python3 -m pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt

echo "== cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test (unit and real-kernel tests)"
cargo build --workspace --all-targets
cargo test --workspace
echo "== fuzz targets (cargo-fuzz, briefly)"
scripts/fuzz.sh
echo "== E2B Python SDK conformance (pytest)"
WARREN_BIN="$PWD/target/debug/warren" python3 -m pytest tests/sdk -q
echo "== E2B JS SDK conformance (node --test)"
# Node comes with the machine; a fresh Debian 12 gets Debian's (node:test exists since 18).
command -v npm >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error && WARREN_BIN="$PWD/../../target/debug/warren" node --test --test-concurrency=1 .)
