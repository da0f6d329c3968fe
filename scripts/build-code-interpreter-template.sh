#!/usr/bin/env bash
# Builds the Python layer of the `code-interpreter-v1` template: a venv at /opt/warren/venv (as the
# sandbox sees it) made with Debian's /usr/bin/python3, which sandboxes see through the base
# template's read-only /usr, with the packages of templates/code-interpreter/requirements.txt
# installed by pip from PyPI. Nothing goes into the host's system Python.
#
# The daemon stacks this layer on the base template and adds the warren-code-interpreter binary
# (see crates/cli/src/code_interpreter.rs). Idempotent: rebuilds only when the requirements, this
# script or the host python change. Run as root.
set -euo pipefail
SELF="$(realpath "$0")"
cd "$(dirname "$SELF")/.."

DEST="${WARREN_CODE_INTERPRETER_LAYER:-/var/lib/warren-templates/code-interpreter-v1}"
REQ=templates/code-interpreter/requirements.txt
PY=/usr/bin/python3
VENV_IN_SANDBOX=/opt/warren/venv

stamp="$( (cat "$REQ" "$SELF"; "$PY" -VV) | sha256sum | cut -d' ' -f1)"
if [ -f "$DEST/stamp" ] && [ "$(cat "$DEST/stamp")" = "$stamp" ] && [ -d "$DEST/rootfs" ]; then
  exit 0
fi

echo "building the code-interpreter-v1 template layer in $DEST (pip install from PyPI)"
mkdir -p "$(dirname "$DEST")"
tmp="$DEST.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
venv="$tmp/rootfs$VENV_IN_SANDBOX"
mkdir -p "$tmp/rootfs/opt/warren"
"$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir -r "$REQ"
# Matplotlib's font cache, built now rather than in each sandbox's first plotting cell (seconds).
mpl="$tmp/rootfs/opt/warren/matplotlib"
mkdir -p "$mpl"
MPLCONFIGDIR="$mpl" "$venv/bin/python" -c "import matplotlib.font_manager"
# The venv was made at a host path: point its scripts, config and the font cache at the path
# sandboxes see, so `pip`, `jupyter` and friends work inside a sandbox too.
grep -rlF "$venv" "$venv/bin" "$venv/pyvenv.cfg" "$mpl" | while read -r f; do
  sed -i "s#$venv#$VENV_IN_SANDBOX#g" "$f"
done
"$venv/bin/python" -m pip freeze --disable-pip-version-check >"$tmp/rootfs/opt/warren/packages.txt"
echo "$stamp" >"$tmp/stamp"

# Running sandboxes may use the old layer as an overlay lower dir: move it aside, then drop it.
if [ -e "$DEST" ]; then
  old="$DEST.old.$$"
  mv "$DEST" "$old"
  rm -rf "$old" || true
fi
mv "$tmp" "$DEST"
trap - EXIT
echo "code-interpreter-v1 layer ready: $(du -sh "$DEST" | cut -f1)"
