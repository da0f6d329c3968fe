#!/usr/bin/env bash
# Builds the Python layer of the `code-interpreter-v1` template: a venv at /opt/warren/venv (as the
# sandbox sees it) made with Debian's /usr/bin/python3, which sandboxes see through the base
# template's read-only /usr, with the packages of templates/code-interpreter/requirements.txt
# installed by pip from PyPI. Nothing goes into the host's system Python. Plus Deno (its npm
# package's binary, at /opt/warren/deno/deno), whose `deno jupyter` kernel runs the JavaScript and
# TypeScript contexts.
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
DENO_VERSION=2.9.6

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

# Deno from the npm registry: the platform package holds the binary alone (no install script).
case "$(uname -m)" in
  x86_64) deno_pkg=@deno/linux-x64-glibc ;;
  aarch64) deno_pkg=@deno/linux-arm64-glibc ;;
  *) deno_pkg= ;;
esac
if [ -n "$deno_pkg" ]; then
  command -v npm >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  }
  tgz="$(cd "$tmp" && npm pack --silent "$deno_pkg@$DENO_VERSION")"
  tar -xzf "$tmp/$tgz" -C "$tmp" package/deno
  mkdir -p "$tmp/rootfs/opt/warren/deno"
  mv "$tmp/package/deno" "$tmp/rootfs/opt/warren/deno/deno"
  rm -rf "$tmp/$tgz" "$tmp/package"
  echo "deno $DENO_VERSION" >>"$tmp/rootfs/opt/warren/packages.txt"
else
  echo "no deno for $(uname -m): the template will have no JavaScript/TypeScript kernel" >&2
fi
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
