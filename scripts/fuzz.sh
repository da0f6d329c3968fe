#!/usr/bin/env bash
# Runs each cargo-fuzz target of fuzz/ for a short while (WARREN_FUZZ_SECONDS each, default 45:
# about 3 minutes of fuzzing plus the build) and fails on a crash: a panic, a failed assertion,
# an overflow (debug assertions are on), or an input that takes over 10 s or 2 GiB.
#
# cargo-fuzz needs a nightly compiler for its -Z flags. The machines have only the stable
# toolchain and cannot fetch another, so the same stable compiler is told to accept them
# (RUSTC_BOOTSTRAP=1): the build links libFuzzer and instruments for coverage exactly as on
# nightly. Without AddressSanitizer (`-s none`): the harnesses and the code under test are safe
# Rust, where a bug shows as a panic, and the build is much shorter.
#
# A crash leaves its input in fuzz/artifacts/<target>/; replay it with
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --features libfuzzer -s none -a <target> <file>
# and add it to fuzz/seeds/<target>/ with the fix, so every later run replays it first.
# cargo-fuzz itself is installed by scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${WARREN_FUZZ_SECONDS:-45}
targets=(connect_envelope host_router tar_whiteout yaml_objects)
export RUSTC_BOOTSTRAP=1
flags=(--features libfuzzer -s none -a)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed: run scripts/install-deps.sh (cargo install cargo-fuzz --locked)" >&2
  exit 1
fi

echo "== fuzz: building the targets ($(cargo fuzz --version), $(rustc --version))"
cargo fuzz build "${flags[@]}"
mkdir -p target
failed=()
for t in "${targets[@]}"; do
  echo "== fuzz $t (${seconds} s)"
  mkdir -p "corpus/$t"
  log="target/fuzz-$t.log"
  # The first corpus directory gets the new inputs; the seeds (and crashes found earlier, once
  # added there) are replayed first on every run.
  if cargo fuzz run "${flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || tail -n 3 "$log"
  else
    # The panic message comes before the backtrace; the replay command at the end.
    grep -E -A1 'panicked at|ERROR: libFuzzer' "$log" >&2 || true
    tail -n 15 "$log" >&2
    echo "!! fuzz target $t failed (log: fuzz/$log); the input is in fuzz/artifacts/$t/" >&2
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: crashes in ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no crash"
