"""Privileges inside a sandbox, as an agent's code would meet them: root keeps only ordinary
capabilities, every process has no_new_privs and the seccomp filter, and the usual escape tools
(namespaces, mounts, clocks, hostname, device nodes, kernel modules) fail."""

import pytest
from e2b import CommandExitException

# CAP_CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE,
# NET_RAW, SYS_CHROOT, SETFCAP: the set crates/runtime/src/init.rs keeps.
KEPT = [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 31]
KEPT_MASK = sum(1 << c for c in KEPT)


def status_fields(sbx, user):
    out = sbx.commands.run("cat /proc/self/status", user=user).stdout
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


@pytest.mark.parametrize("user", ["root", "user"])
def test_no_new_privs_seccomp_and_bounding_set(sandbox, user):
    st = status_fields(sandbox, user)
    assert st["NoNewPrivs"].strip() == "1"
    assert st["Seccomp"].strip() == "2", "seccomp filter mode"
    assert int(st["CapBnd"], 16) == KEPT_MASK
    if user == "root":
        assert int(st["CapEff"], 16) == KEPT_MASK
    else:
        assert int(st["CapEff"], 16) == 0


@pytest.mark.parametrize(
    "command",
    [
        "unshare --user --map-root-user true",
        "unshare --mount true",
        "unshare --net true",
        "mount -t tmpfs none /mnt",
        "hostname evil",
        "date -s '2000-01-01'",
        "mknod /tmp/sda b 8 0",
        "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); sys.exit(0 if l.syscall(175, 0, 0, 0) == 0 else 1)'",  # init_module
        "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); sys.exit(0 if l.syscall(321, 0, 0, 0) >= 0 else 1)'",  # bpf
        "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); sys.exit(0 if l.syscall(250, 0, 0, 0, 0, 0) >= 0 else 1)'",  # keyctl
    ],
)
def test_escape_tools_fail_even_as_root(sandbox, command):
    with pytest.raises(CommandExitException):
        sandbox.commands.run(command, user="root")


def test_hostname_and_clock_unchanged_and_dev_is_minimal(sandbox):
    assert sandbox.commands.run("hostname").stdout.strip() == sandbox.sandbox_id
    devs = set(sandbox.commands.run("ls /dev", user="root").stdout.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx"} <= devs
    assert not any(d.startswith(("sd", "vd", "nvme", "mem", "kmsg", "port")) for d in devs), devs


def test_sys_is_read_only_and_proc_is_the_sandboxs(sandbox):
    with pytest.raises(CommandExitException):
        sandbox.commands.run("echo 1 > /sys/kernel/profiling", user="root")
    pids = sandbox.commands.run("ls /proc | grep -c '^[0-9]'", user="root").stdout.strip()
    assert int(pids) <= 4
