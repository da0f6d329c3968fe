#!/usr/bin/env bash
# The benchmark command: builds release binaries, installs the peer runtimes (crun, runc, runsc),
# starts a daemon on a scratch data dir and runs bench/bench.py against it. Run as root.
#   bench/run.sh [-n SAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
N=50
[ "${1:-}" = "-n" ] && N="$2"

scripts/install-deps.sh
for p in crun runc runsc wrk; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || {
    apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq crun runc runsc wrk >/dev/null; break; }
done
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
python3 -m pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt
cargo build --release -q -p warren -p warren-envd -p warren-codeinterp
BIN="${CARGO_TARGET_DIR:-target}/release"

# crun 1.8 refuses hybrid cgroup hosts while a controller (hugetlb here) is left to cgroup v2;
# binding hugetlb to a v1 hierarchy is the documented workaround (it changes nothing for Warren).
if [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ]; then
  mkdir -p /sys/fs/cgroup/hugetlb
  mountpoint -q /sys/fs/cgroup/hugetlb || mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
fi

DATA=$(mktemp -d /tmp/warren-bench.XXXXXX)
PORT=$((20000 + RANDOM % 10000))
KEY=bench-$RANDOM$RANDOM
WARREN_API_KEY=$KEY "$BIN/warren" serve --listen 127.0.0.1:$PORT --data-dir "$DATA" >"$DATA.log" 2>&1 &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done

echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, kernel $(uname -r)"
python3 bench/bench.py --url "http://127.0.0.1:$PORT" --key "$KEY" --rootfs "$DATA/templates/base/rootfs" -n "$N" --json "$DATA.json"
cp "$DATA.json" bench/last-run.json
# Warm pools: claim latency (HTTP, SDK), bursts of 100 against a pool of 100 and an empty pool,
# refill rate.
python3 bench/pools.py --url "http://127.0.0.1:$PORT" --key "$KEY" -n "$N" --json "$DATA.pools.json"
cp "$DATA.pools.json" bench/last-run-pools.json
# Issue 3 figures: commands.run rate, /files throughput, router overhead (BENCHMARKS.md).
python3 bench/parity.py --url "http://127.0.0.1:$PORT" --key "$KEY" --json "$DATA.parity.json"
cp "$DATA.parity.json" bench/last-run-parity.json
# What the audit log costs: the same command rate against a daemon that keeps none.
NA_DATA=$(mktemp -d /tmp/warren-bench-noaudit.XXXXXX)
NA_PORT=$((PORT + 1))
WARREN_API_KEY=$KEY "$BIN/warren" serve --no-audit --listen 127.0.0.1:$NA_PORT --data-dir "$NA_DATA" >"$NA_DATA.log" 2>&1 &
NA_DAEMON=$!
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$NA_PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
python3 bench/parity.py --url "http://127.0.0.1:$NA_PORT" --key "$KEY" --only-rate --json "$DATA.noaudit.json"
kill $NA_DAEMON; wait $NA_DAEMON 2>/dev/null || true
rm -rf "$NA_DATA" "$NA_DATA.log"
# What the per-sandbox disk cap costs a create: the same loop against a daemon without caps.
ND_DATA=$(mktemp -d /tmp/warren-bench-nodisk.XXXXXX)
ND_PORT=$((PORT + 2))
WARREN_API_KEY=$KEY "$BIN/warren" serve --sandbox-disk-mb 0 --listen 127.0.0.1:$ND_PORT --data-dir "$ND_DATA" >"$ND_DATA.log" 2>&1 &
ND_DAEMON=$!
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$ND_PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
python3 bench/bench.py --url "http://127.0.0.1:$ND_PORT" --key "$KEY" --rootfs "$ND_DATA/templates/base/rootfs" -n "$N" --only-create --json "$DATA.nodisk.json"
kill $ND_DAEMON; wait $ND_DAEMON 2>/dev/null || true
rm -rf "$ND_DATA" "$ND_DATA.log"
# Issue 4 figures: code-interpreter-v1 create → first run_code, warm run_code, idle memory.
python3 bench/codeinterp.py --url "http://127.0.0.1:$PORT" --key "$KEY" -n 20 --json "$DATA.codeinterp.json"
# Issue 5 figures: import of a ~200 MiB image (layout, oci-archive, loopback registry pull) and
# create from an image template vs base.
python3 bench/images.py --url "http://127.0.0.1:$PORT" --key "$KEY" -n "$N" --json "$DATA.images.json"
# Issue 5 figures: commit of a 100 MiB change (freeze time and total), create from the image.
python3 bench/commit.py --url "http://127.0.0.1:$PORT" --key "$KEY" -n 3 --json "$DATA.commit.json"
# Issue 7 figures: hibernate and wake at 10, 100 and 1,000 MiB (real CRIU, LinuxRuntime directly).
cargo test -q -p warren-runtime --test hibernate -- --ignored --nocapture bench 2>&1 | grep '^BENCH'
# Issue 7 figures: checkpoint (size, freeze) and fork of 10 until all answer /health, through the
# daemon (10/100/400 MiB; sandboxes are limited to 512 MiB) and the runtime (up to 1,000 MiB).
python3 bench/checkpoint.py --url "http://127.0.0.1:$PORT" --key "$KEY" -n 3 --json "$DATA.checkpoint.json"
cp "$DATA.checkpoint.json" bench/last-run-checkpoint.json
# Issue 8 figures: 1,000 idle sandboxes (host memory each besides their own cgroups), then the soak
# (200 sandboxes × one command per second; SOAK_MINUTES=10 is the issue's figure).
python3 bench/density.py --url "http://127.0.0.1:$PORT" --key "$KEY" --daemon-pid $DAEMON -n 1000 --json "$DATA.density.json"
python3 bench/soak.py --url "http://127.0.0.1:$PORT" --key "$KEY" --daemon-pid $DAEMON -n 200 --minutes "${SOAK_MINUTES:-10}" --json "$DATA.soak.json"
