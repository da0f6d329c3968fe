"""Hostile code: one test per attempt to get out of a sandbox or hurt the host or a neighbour,
each asserting containment (see docs/hostile-code.md for the table of attempts and defences).
Escapes already covered elsewhere: other sandboxes' files and processes, host files, the data dir
and other sandboxes' ports (test_isolation.py); namespaces, mounts, clocks, hostname, device
nodes, modules, bpf, keyrings (test_privileges.py); OOM (crates/runtime/tests/kernel.rs)."""

import hashlib
import os
import statistics
import tempfile
import time

import pytest
from e2b import CommandExitException

from warren_helpers import wait_until


def run_root(sbx, cmd, **kw):
    return sbx.commands.run(cmd, user="root", **kw)


def fails(sbx, cmd):
    try:
        run_root(sbx, cmd)
    except CommandExitException:
        return True
    return False


SYSCALL = "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); sys.exit(0 if l.syscall({}) >= 0 else 1)'"


@pytest.mark.parametrize(
    "name,args",
    [
        ("pivot_root", "155, b\"/tmp\", b\"/tmp\""),
        ("setns", "308, 0, 0"),
        ("perf_event_open", "298, 0, 0, -1, -1, 0"),
        ("kexec_load", "246, 0, 0, 0, 0"),
        ("open_by_handle_at", "304, 0, 0, 0"),
        ("userfaultfd", "323, 0"),
        ("add_key", "248, b\"user\", b\"k\", b\"v\", 1, -1"),
    ],
)
def test_privileged_syscalls_fail_as_root(sandbox, name, args):
    assert fails(sandbox, SYSCALL.format(args)), name


def test_envd_cannot_be_traced_or_read(sandbox):
    # envd (pid 1) holds the sandbox's tokens; it is not dumpable and root here lacks
    # CAP_SYS_PTRACE.
    assert fails(sandbox, SYSCALL.format("101, 16, 1, 0, 0"))  # PTRACE_ATTACH
    assert fails(sandbox, "cat /proc/1/environ")
    assert fails(sandbox, "cat /proc/1/mem")
    assert fails(sandbox, "readlink /proc/1/fd/0")
    assert fails(sandbox, "ls /proc/1/root/")


def test_setns_into_envd_namespaces_fails(sandbox):
    assert fails(sandbox, "nsenter -t 1 -m -p true")


def test_host_processes_are_invisible_and_unsignalable(daemon, sandbox):
    host_pid = daemon.proc.pid
    if host_pid < 10:
        pytest.skip("the daemon's host pid is also a pid inside the sandbox")
    out = run_root(sandbox, f"kill -0 {host_pid} 2>&1; echo rc=$?").stdout
    assert "rc=1" in out, out
    # PTRACE_ATTACH to it: no such process in the sandbox's pid namespace.
    assert fails(sandbox, SYSCALL.format(f"101, 16, {host_pid}, 0, 0"))
    assert daemon.alive()


def test_proc_sys_and_kernel_files_are_read_only_or_masked(sandbox):
    for path in ["/proc/sys/vm/drop_caches", "/proc/sys/kernel/core_pattern", "/proc/sys/vm/overcommit_memory"]:
        assert fails(sandbox, f"sh -c 'cat {path} > /tmp/v; cat /tmp/v > {path}'"), path
    out = run_root(sandbox, "cat /proc/timer_list /proc/keys 2>/dev/null | wc -c").stdout.strip()
    assert out == "0", "timer_list and keys are masked"
    assert run_root(sandbox, "ls /proc/acpi 2>/dev/null | wc -l").stdout.strip() == "0"


def test_overwriting_the_runtime_binary_through_proc_fails(daemon, sandbox):
    before = hashlib.sha256(daemon.envd.read_bytes()).hexdigest()
    for target in ["/proc/1/exe", "/proc/self/exe"]:
        assert fails(sandbox, f"python3 -c \"open('{target}', 'r+b').write(b'x')\""), target
    assert fails(sandbox, "sh -c 'echo x >> /usr/bin/python3'"), "host /usr is read-only"
    assert hashlib.sha256(daemon.envd.read_bytes()).hexdigest() == before


def test_file_api_paths_and_symlinks_stay_inside(daemon, sandbox):
    with tempfile.TemporaryDirectory(prefix="warren-hostile-") as host_dir:
        victim = os.path.join(host_dir, "victim.txt")
        with open(victim, "w") as f:
            f.write("host")
        # `..` cannot climb out of the sandbox's root.
        sandbox.files.write(f"/../../..{victim}", "through dots", user="root")
        # A symlink made inside the sandbox to the host's path names the sandbox's own file.
        run_root(sandbox, f"mkdir -p {host_dir}; ln -s {victim} /tmp/link")
        sandbox.files.write("/tmp/link", "through a link", user="root")
        assert open(victim).read() == "host"
        assert sandbox.files.read(victim, user="root") == "through a link"
        # /proc/self/root is the sandbox's root too (envd's /proc/1/root is not even readable).
        assert run_root(sandbox, f"cat /proc/self/root{victim}").stdout == "through a link"


def test_sandbox_cannot_reach_the_daemon_api(daemon, sandbox):
    gw = sandbox.commands.run("ip route show default | awk '{print $3}'").stdout.strip()
    probe = "python3 -c \"import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\" "
    for host in [gw, "127.0.0.1"]:
        assert fails(sandbox, f"{probe} {host} {daemon.port}"), host


def test_fork_bomb_stays_inside(new_sandbox):
    bomb, neighbour = new_sandbox(), new_sandbox()
    # The command's deadline kills its whole process group when it expires.
    t = time.monotonic()
    bomb.commands.run(":(){ :|:& };:", background=True, timeout=6)
    time.sleep(2)
    assert neighbour.commands.run("echo fine", timeout=30).stdout == "fine\n"
    # Once the deadline killed the bomb's process group, the sandbox serves again.
    time.sleep(max(0, 7 - (time.monotonic() - t)))

    def alive():
        try:
            return bomb.commands.run("echo alive", timeout=10).stdout == "alive\n"
        except Exception:  # noqa: BLE001 - still out of pids
            return False

    assert wait_until(alive, 30)


def test_memory_hog_is_killed_inside_and_the_sandbox_lives_on(new_sandbox):
    hog, neighbour = new_sandbox(), new_sandbox()
    with pytest.raises(CommandExitException) as e:
        hog.commands.run("python3 -c 'x = bytearray(900 * 1024 * 1024); print(len(x))'", timeout=60)
    # Killed by the kernel's OOM killer (the SDK reports a signal death as -1).
    assert e.value.exit_code in (137, -1) and "killed" in (e.value.error or "") + str(e.value), e.value
    assert hog.commands.run("echo alive").stdout == "alive\n"
    assert neighbour.commands.run("echo fine").stdout == "fine\n"


def test_cpu_hog_does_not_starve_a_neighbour(new_sandbox):
    hog, neighbour = new_sandbox(), new_sandbox()

    def latencies(n=15):
        out = []
        for _ in range(n):
            t = time.monotonic()
            neighbour.commands.run("echo x")
            out.append(time.monotonic() - t)
        return out

    quiet = statistics.median(latencies())
    for _ in range(4):
        hog.commands.run("python3 -c 'while True: pass'", background=True, timeout=60)
    time.sleep(1)
    busy = statistics.median(latencies())
    # Equal CPU weight: the neighbour gets its share within a scheduler period or two.
    assert busy < max(0.1, 5 * quiet), (quiet, busy)
