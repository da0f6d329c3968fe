"""Hostile code: filling the disk. Each sandbox's files live on a file system of its own, of the
daemon's `--sandbox-disk-mb` (1024 MiB by default): writing past it fails with "No space left on
device" inside that sandbox only, the host spends at most the cap on it, and killing the sandbox
gives everything back (crates/runtime/src/linux/disk.rs; docs/hostile-code.md)."""

import glob
import os

import pytest
from e2b import CommandExitException, NotEnoughSpaceException

from warren_helpers import mounts_under, wait_until

CAP = 1024 << 20


def df_root(sbx):
    """(total, available) bytes of / inside the sandbox, as df sees them."""
    total, avail = sbx.commands.run("df -B1 --output=size,avail / | tail -1").stdout.split()
    return int(total), int(avail)


def loops_backed_by(prefix):
    out = []
    for f in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(f) as fh:
                if fh.read().startswith(prefix):
                    out.append(f)
        except OSError:
            pass
    return out


def test_filling_the_disk_gets_enospc_inside_only(daemon, new_sandbox):
    full, neighbour = new_sandbox(), new_sandbox()
    total, avail = df_root(full)
    # df shows the sandbox's own disk (the cap less ext4's journal and tables), not the host's.
    assert CAP * 0.9 < total <= CAP, total

    # Reserve all but 8 MiB without writing (fallocate: CI stays quick), then write real data
    # past the end, as root: no capability lets it through.
    full.commands.run(f"fallocate -l {avail - (8 << 20)} /home/user/hog", user="root")
    with pytest.raises(CommandExitException) as e:
        full.commands.run("dd if=/dev/zero of=/home/user/more bs=1M count=64 conv=fsync", user="root")
    assert "No space left on device" in e.value.stderr, e.value
    with pytest.raises(CommandExitException) as e:
        full.commands.run("head -c 4000000 /dev/zero > /home/user/again")
    assert "No space left on device" in e.value.stderr, e.value
    # The file API hits the same wall: 507, the SDK's NotEnoughSpaceException.
    with pytest.raises(NotEnoughSpaceException):
        full.files.write("/home/user/big.bin", b"x" * (16 << 20))
    assert full.commands.run("echo still-alive").stdout == "still-alive\n"

    # The neighbour and the host are untouched.
    neighbour.commands.run("dd if=/dev/zero of=/home/user/ten bs=1M count=10 conv=fsync")
    assert neighbour.commands.run("du -m /home/user/ten").stdout.split()[0] == "10"
    image = os.path.join(daemon.data_dir, "sandboxes", full.sandbox_id, "disk.img")
    assert os.stat(image).st_blocks * 512 <= CAP, "the host spends at most the cap"
    st = os.statvfs(daemon.data_dir)
    assert st.f_bavail * st.f_frsize > 1 << 30, "the host disk keeps its free space"

    # E2B metrics report the sandbox's disk.
    m = wait_until(lambda: [p for p in full.get_metrics() if p.disk_used > CAP * 0.8], 15)
    assert m and m[-1].disk_total == total, m

    # Freed space is usable again.
    full.commands.run("rm /home/user/hog && echo ok > /home/user/after")
    assert full.files.read("/home/user/after") == "ok\n"

    # Killing the sandbox removes its file system, mount and loop device.
    sdir = os.path.join(daemon.data_dir, "sandboxes", full.sandbox_id)
    assert mounts_under(sdir) and loops_backed_by(sdir)
    assert full.kill() is True
    assert wait_until(lambda: not os.path.exists(sdir), 10)
    assert mounts_under(sdir) == []
    assert wait_until(lambda: loops_backed_by(sdir) == [], 10), loops_backed_by(sdir)
    assert neighbour.commands.run("cat /proc/mounts >/dev/null && echo fine").stdout == "fine\n"
