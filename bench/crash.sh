#!/usr/bin/env bash
# The benchmark tier of the crash-safety test: 100 SIGKILLs of the daemon at random moments of
# creates, pauses, resumes, hibernations, commits and kills, each followed by a restart and a consistency check
# (tests/sdk/test_crash.py). Run as root after `cargo build -p warren -p warren-envd`.
#   bench/crash.sh [ITERATIONS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
export WARREN_CRASH_ITERATIONS="${1:-100}"
[ -n "${2:-}" ] && export WARREN_CRASH_SEED="$2"
WARREN_BIN="${WARREN_BIN:-$PWD/target/debug/warren}" python3 -m pytest tests/sdk/test_crash.py -q
