#!/usr/bin/env bash
# Installs what Warren needs, builds it, installs `warren`, `warren-envd` and `warren-code-interpreter`
# into /usr/local/bin and starts the daemon with the embedded `base` template (and
# `code-interpreter-v1`, whose Python layer install-deps.sh builds). Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

LISTEN="${WARREN_LISTEN:-127.0.0.1:3000}"
DATA_DIR="${WARREN_DATA_DIR:-/var/lib/warren}"
LOG="${WARREN_LOG:-/var/log/warren.log}"

scripts/install-deps.sh
cargo build --release -p warren -p warren-envd -p warren-codeinterp
install -m 0755 target/release/warren target/release/warren-envd \
  target/release/warren-code-interpreter /usr/local/bin/

if curl -fsS "http://$LISTEN/health" >/dev/null 2>&1; then
  echo "a daemon already answers on $LISTEN; stop it first to restart with the new build"
else
  mkdir -p "$(dirname "$LOG")"
  nohup /usr/local/bin/warren serve --listen "$LISTEN" --data-dir "$DATA_DIR" >>"$LOG" 2>&1 &
  for _ in $(seq 1 100); do
    curl -fsS "http://$LISTEN/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS "http://$LISTEN/health" >/dev/null || { echo "daemon did not start; see $LOG"; tail -n 20 "$LOG"; exit 1; }
fi

KEY="${WARREN_API_KEY:-$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["api_keys"][0]["key"])' "$DATA_DIR/config.json" 2>/dev/null || true)}"
cat <<MSG
Warren is serving on http://$LISTEN (data: $DATA_DIR, log: $LOG).
Point the E2B SDKs at it:
  export E2B_API_URL=http://$LISTEN E2B_SANDBOX_URL=http://$LISTEN E2B_API_KEY=${KEY:-<key from $DATA_DIR/config.json>}
Try it:
  warren sandbox create && warren sandbox list
MSG
