#!/usr/bin/env bash
# Installs the Debian packages Warren needs at run time and for its tests. Idempotent; run as root.
set -euo pipefail

packages=(
  nftables      # nft: sandbox egress rules, NAT, east-west drop
  iproute2      # ip: used by tests to build their own "outside" network namespace
  util-linux    # nsenter: used by the runtime's kernel tests; fallocate in the disk-cap test
  e2fsprogs     # mkfs.ext4 (>= 1.47 for assume_storage_prezeroed): each sandbox's capped disk
  procps        # ps, visible inside sandboxes through the host's /usr
  python3       # Debian's /usr/bin/python3, visible inside base-template sandboxes
  python3-venv  # the venv of the code-interpreter-v1 template (scripts/build-code-interpreter-template.sh)
  ca-certificates
  curl
  busybox-static   # tests: the rootfs of test images (tests/images/make-busybox-image.sh)
  umoci            # tests: builds test OCI images; reads images Warren writes
  skopeo           # tests: pushes test images to a registry; inspects images Warren writes
  docker-registry  # tests: a real registry on loopback (pull with auth)
  apache2-utils    # tests: htpasswd for that registry
  openssl          # tests: a CA and certificates for the node agent's TLS
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# CRIU 4.1.1 (hibernate, checkpoint, fork), built from source: bookworm's 3.17 cannot work on this
# kernel. Skipped when /usr/local/sbin/criu is already 4.1.1.
"$(dirname "$0")/install-criu.sh"

# The Python layer of the code-interpreter-v1 template (pip from PyPI into the layer; rebuilt only
# when its requirements change).
"$(dirname "$0")/build-code-interpreter-template.sh"

# cargo-fuzz (scripts/fuzz.sh), from crates.io into ~/.cargo/bin; skipped when already there.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
