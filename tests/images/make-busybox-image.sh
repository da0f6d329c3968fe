#!/usr/bin/env bash
# Builds a small OCI image layout from Debian's busybox-static with umoci (no network, no Docker):
# two layers (busybox, then files + a whiteout of a base file) and a config with Env, WorkingDir and
# User, for Warren's image-template tests. Usage: make-busybox-image.sh OUT_DIR [TAG]
set -euo pipefail
out=${1:?usage: make-busybox-image.sh OUT_DIR [TAG]}
tag=${2:-latest}
command -v umoci >/dev/null || { echo "umoci is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "/bin/busybox is missing (busybox-static)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:$tag"
umoci unpack --image "$out:$tag" "$work/b" >/dev/null
r=$work/b/rootfs
mkdir -p "$r"/{bin,etc,home/user,root,tmp,data}
chmod 1777 "$r/tmp"
cp /bin/busybox "$r/bin/busybox"
for a in sh ls cat echo env pwd id mkdir rm sleep stat test true false wc head touch ln readlink find sort uname hostname; do
  ln -s busybox "$r/bin/$a"
done
# E2B SDKs run commands with `/bin/bash -l -c`: busybox has no bash applet, so a shim.
printf '#!/bin/sh\nexec /bin/sh "$@"\n' > "$r/bin/bash"
chmod 755 "$r/bin/bash"
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' > "$r/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\n' > "$r/etc/group"
chown 1000:1000 "$r/home/user"
echo base > "$r/data/removed-later.txt"
umoci repack --image "$out:$tag" "$work/b" >/dev/null
# Second layer: new files and a whiteout of a file of the first (umoci diffs against the unpack).
rm -rf "$work/b"
umoci unpack --image "$out:$tag" "$work/b" >/dev/null
echo "hello from the image" > "$r/data/hello.txt"
rm "$r/data/removed-later.txt"
umoci repack --image "$out:$tag" "$work/b" >/dev/null
umoci config --image "$out:$tag" \
  --config.env "IMAGE_GREETING=hi from config" --config.env "PATH=/bin" \
  --config.workingdir /data --config.user 1000 >/dev/null
umoci gc --layout "$out"
