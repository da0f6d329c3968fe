#!/usr/bin/env bash
# Builds and installs CRIU 4.1.1 into /usr/local/sbin/criu. Idempotent; run as root.
#
# Why from source: Debian bookworm's criu 3.17 fails `criu check` on kernels >= 6.13 (the vvar mapping
# was split in two; fixed upstream in CRIU 4.1), and trixie's 4.1.1 binary package needs a newer libc.
# So we build Debian trixie's own upstream tarball (checked against a pinned sha256) with bookworm's
# libraries. The download goes through apt (the machine's configured mirror and proxy) with a private
# deb-src list; when that fails, the copy in ../shared/vendor/ beside the checkout is used.
set -euo pipefail

version=4.1.1
tarball="criu_${version}.orig.tar.xz"
sha256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
prefix=/usr/local
here="$(cd "$(dirname "$0")" && pwd)"

# Our patches (scripts/criu-patches) are part of the build's identity: a changed patch set rebuilds.
stamp_file="$prefix/share/warren/criu.stamp"
# CRIU caches its kernel feature probe (about 100 ms per run) only on a tmpfs; /run is not one on
# these machines, so the cache goes to /run/criu, which the daemon mounts as a small tmpfs.
rundir=/run/criu
stamp="$version rundir=$rundir $(cat "$here"/criu-patches/*.patch 2>/dev/null | sha256sum | cut -d' ' -f1)"
if "$prefix/sbin/criu" --version 2>/dev/null | grep -q "Version: ${version}\$" &&
  [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi

build_deps=(gcc make pkg-config libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
  python3-protobuf libnl-3-dev libnl-route-3-dev libcap-dev libnet1-dev libbsd-dev libnftables-dev
  libgnutls28-dev uuid-dev libaio-dev xz-utils patch)
missing=()
for p in "${build_deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing CRIU build deps: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work="$(mktemp -d /tmp/criu-build.XXXXXX)"
trap 'rm -rf "$work"' EXIT

fetch_with_apt() {
  # The machine's Debian mirror (whatever the apt sources name), with trixie's deb-src added in a
  # private list so the host's apt state is not touched. apt-get source fetches .dsc, .orig and
  # .debian parts; only the .orig tarball matters, so its own failures for the others are ignored.
  local uri
  uri="$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
    grep -v security | grep -oE '(https?|file)://[^ ]*' | grep -i debian | head -n1)" || true
  [ -n "$uri" ] || return 1
  mkdir -p "$work/apt/lists/partial" "$work/src"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" >"$work/apt/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$work/apt/lists" -o "APT::Get::List-Cleanup=0")
  apt-get "${opts[@]}" update -qq >/dev/null 2>&1 || return 1
  (cd "$work/src" && timeout 120 apt-get "${opts[@]}" source --download-only -qq "criu=${version}-1" >/dev/null 2>&1) || true
  [ -f "$work/src/$tarball" ] || return 1
  cp "$work/src/$tarball" "$work/$tarball"
}

checked() { echo "$sha256  $1" | sha256sum -c --quiet - >/dev/null 2>&1; }

if fetch_with_apt && checked "$work/$tarball"; then
  echo "CRIU ${version}: source from Debian trixie via apt"
else
  fallback=""
  for d in "$here/../../shared/vendor" "$here/../shared/vendor" /work/shared/vendor; do
    [ -f "$d/$tarball" ] && { fallback="$d/$tarball"; break; }
  done
  if [ -z "$fallback" ]; then
    echo "install-criu.sh: cannot get $tarball (apt download failed, no vendored copy)" >&2
    exit 1
  fi
  cp "$fallback" "$work/$tarball"
  checked "$work/$tarball" || { echo "install-criu.sh: $fallback fails its sha256 check" >&2; exit 1; }
  echo "CRIU ${version}: source from $fallback"
fi

tar -C "$work" -xf "$work/$tarball"
src="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'criu-*' | head -n1)"
for p in "$here"/criu-patches/*.patch; do
  [ -f "$p" ] || continue
  patch -d "$src" -p1 --quiet <"$p"
done
echo "building CRIU ${version} (about 90 s on 2 cores)"
make -C "$src" -j"$(nproc)" RUNDIR="$rundir" criu >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }
install -D -m 0755 "$src/criu/criu" "$prefix/sbin/criu"
mkdir -p "$(dirname "$stamp_file")"
echo "$stamp" >"$stamp_file"
"$prefix/sbin/criu" --version
