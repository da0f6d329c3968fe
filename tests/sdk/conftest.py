"""Fixtures: one live `warren serve` per session, and sandboxes killed after each test.

The daemon runs from $WARREN_BIN (default target/debug/warren, warren-envd next to it) on a
free loopback port, with a fresh temp data dir and a random API key. It needs root (namespaces,
cgroups, nftables). At the end of the session every sandbox still known to the API is killed
through the API, the data dir and cgroups are checked for leftovers, and the daemon gets SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile

import pytest

from warren_helpers import (
    Daemon,
    free_port,
    host_state,
    mounts_under,
    remove_data_dir,
    remove_host_state,
    sandbox_factory,
    start_daemon,
    wait_until,
)

_SESSION: dict = {}


@pytest.fixture(scope="session")
def daemon():
    if os.geteuid() != 0:
        pytest.exit("the warren daemon needs root (namespaces, cgroups, nftables)", returncode=2)
    d = start_daemon()
    _SESSION["daemon"] = d
    saved = {k: os.environ.get(k) for k in d.sdk_env()}
    saved["E2B_DEBUG"] = os.environ.pop("E2B_DEBUG", None)
    saved["E2B_DOMAIN"] = os.environ.pop("E2B_DOMAIN", None)
    os.environ.update(d.sdk_env())
    try:
        yield d
    finally:
        problems = _shutdown(d)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if problems:
            pytest.fail(
                "daemon teardown found problems (data dir kept at "
                f"{d.data_dir}, log at {d.log_path}):\n- " + "\n- ".join(problems),
                pytrace=False,
            )
        remove_data_dir(d)


def _shutdown(d: Daemon) -> list:
    problems = []
    if not d.alive():
        problems.append(f"warren died during the session (status {d.proc.returncode}):\n{d.log_tail()}")
        return problems

    # Kill whatever is left through the API, before stopping the daemon.
    left = d.list_ids()
    _SESSION["leftover"] = left
    for sid in left:
        d.ids.add(sid)
        r = d.request("DELETE", f"/sandboxes/{sid}")
        if r.status != 204:
            problems.append(f"DELETE /sandboxes/{sid} at teardown -> {r.status} {r.body!r}")
    if not wait_until(lambda: d.list_ids() == [], 15):
        problems.append(f"sandboxes still listed after kill: {d.list_ids()}")
    if not wait_until(lambda: d.sandbox_dirs() == [], 15):
        problems.append(f"sandbox dirs left under {d.data_dir}/sandboxes: {d.sandbox_dirs()}")
    if not wait_until(lambda: d.cgroup_leaks() == [], 15):
        problems.append(f"sandbox cgroups left while the daemon runs: {d.cgroup_leaks()}")
    # Each network namespace the daemon prepares ahead of creates (4) has a veth on the bridge.
    if not wait_until(lambda: len(d.veths()) <= 4, 15):
        problems.append(f"sandbox veths left while the daemon runs: {d.veths()}")

    status = d.stop()
    if status != 0:
        problems.append(f"warren exited with status {status} after SIGTERM:\n{d.log_tail(20)}")

    if not wait_until(lambda: d.processes_in_cgroup() == [], 5):
        problems.append(f"processes left in {d.cgroup_name}: {d.processes_in_cgroup()}")
    leaks = d.cgroup_leaks()
    if leaks:
        problems.append(f"sandbox cgroups left after the daemon stopped: {leaks}")
    if d.sandbox_dirs():
        problems.append(f"sandbox dirs left after the daemon stopped: {d.sandbox_dirs()}")
    if mounts_under(d.data_dir):
        problems.append(f"mounts left under the data dir (sandbox disks?): {mounts_under(d.data_dir)}")
    # With no sandbox left, a stopping daemon gives back its bridge, prepared namespaces,
    # nftables tables and cgroup parents.
    if not wait_until(lambda: host_state(d.prefix) == [], 5):
        problems.append(f"host state left after the daemon stopped: {host_state(d.prefix)}")
    problems += remove_host_state(d.prefix)
    return problems


@pytest.fixture
def new_sandbox(daemon):
    """Factory: `new_sandbox(**Sandbox.create kwargs)`; every sandbox is killed afterwards."""
    from e2b import Sandbox

    yield from sandbox_factory(daemon, Sandbox)


@pytest.fixture
def sandbox(new_sandbox):
    return new_sandbox()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    d = _SESSION.get("daemon")
    if d is None:
        return
    left = _SESSION.get("leftover")
    if left:
        terminalreporter.write_line(f"warren: sandboxes left by tests and killed at teardown: {left}")
    if exitstatus != 0:
        terminalreporter.write_sep("-", f"warren daemon log ({d.log_path}), last lines")
        terminalreporter.write_line(d.log_tail(40))
    else:
        import contextlib

        with contextlib.suppress(OSError):
            os.unlink(d.log_path)


@pytest.fixture
def registry():
    """Debian's docker-registry on a free loopback port with htpasswd auth (alice / s3cret)."""
    d = tempfile.mkdtemp(prefix="warren-test-registry-")
    hp = subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], capture_output=True, check=True).stdout
    with open(os.path.join(d, "htpasswd"), "wb") as f:
        f.write(hp)
    addr = f"127.0.0.1:{free_port()}"
    with open(os.path.join(d, "config.yml"), "w") as f:
        f.write(f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {d}/data}}}}\n"
                f"http: {{addr: \"{addr}\"}}\nauth: {{htpasswd: {{realm: test, path: {d}/htpasswd}}}}\n")
    proc = subprocess.Popen(["docker-registry", "serve", os.path.join(d, "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        try:
            socket.create_connection(("127.0.0.1", int(addr.split(":")[1])), 0.2).close()
            return True
        except OSError:
            return False

    assert wait_until(up, 10), "registry did not start"
    yield addr
    proc.terminate()
    proc.wait()
    shutil.rmtree(d, ignore_errors=True)
