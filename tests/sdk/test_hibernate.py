"""Hibernation with the official SDK: `pause()` freezes, the daemon hibernates a sandbox idle in
pause for `--hibernate-after` (CRIU dumps its processes to disk and frees the memory), and
`connect()` wakes it transparently with its processes, memory, listening sockets, files and
address. Uses its own daemon (hibernating after 1 s), not the session one."""

import os
import time

import pytest
from e2b import Sandbox, SandboxState

from warren_helpers import Daemon, mounts_under, remove_data_dir, remove_host_state, start_daemon, wait_until

COUNTER = (
    "python3 -c 'import time\nn = 0\nwhile True:\n    n += 1\n"
    "    open(\"/tmp/counter\", \"a\").write(f\"{n}\\n\")\n    time.sleep(0.05)'"
)
SERVER = (
    "python3 -c 'import socket\ns = socket.socket()\ns.bind((\"0.0.0.0\", 8080))\ns.listen()\n"
    "n = 0\nwhile True:\n    c, _ = s.accept()\n    n += 1\n    c.sendall(f\"{n}\\n\".encode())\n    c.close()'"
)
ASK = (
    "python3 -c 'import socket\ntry:\n    print(socket.create_connection((\"127.0.0.1\", 8080)).recv(10).decode().strip())\n"
    "except OSError as e:\n    print(e)'"
)


@pytest.fixture
def hib_daemon(request):
    saved = os.environ.get("WARREN_HIBERNATE_AFTER")
    os.environ["WARREN_HIBERNATE_AFTER"] = "1s"
    try:
        d = start_daemon()
    finally:
        if saved is None:
            os.environ.pop("WARREN_HIBERNATE_AFTER", None)
        else:
            os.environ["WARREN_HIBERNATE_AFTER"] = saved
    daemons = [d]
    yield daemons
    last = daemons[-1]
    if last.alive():
        for sid in last.list_ids():
            last.request("DELETE", f"/sandboxes/{sid}")
        wait_until(lambda: last.sandbox_dirs() == [], 10)
        last.stop()
    remove_host_state(d.prefix)
    remove_data_dir(d)
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.failed:
        for x in daemons:
            if os.path.exists(x.log_path):
                os.unlink(x.log_path)


def detail(d: Daemon, sid: str) -> dict:
    r = d.request("GET", f"/sandboxes/{sid}")
    assert r.status == 200, (r.status, r.body)
    return r.json()


def numbers(text: str) -> list:
    return [int(x) for x in text.split()]


def test_idle_pause_hibernates_and_connect_wakes_with_memory(hib_daemon):
    d = hib_daemon[0]
    opts = dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)
    sbx = Sandbox.create(timeout=300, **opts)
    sid = sbx.sandbox_id
    sbx.commands.run(COUNTER, background=True)
    sbx.commands.run(SERVER, background=True, user="root")
    assert wait_until(lambda: sbx.commands.run(ASK).stdout.strip().isdigit(), 5)
    served = int(sbx.commands.run(ASK).stdout)
    sbx.files.write("/home/user/note.txt", "kept on disk")
    ip_before = sbx.commands.run("hostname -I").stdout.split()

    assert sbx.pause() is True
    assert detail(d, sid)["memoryLocation"] == "ram"
    # Idle for more than 1 s: the daemon hibernates it; clients still see "paused".
    assert wait_until(lambda: detail(d, sid).get("memoryLocation") == "disk", 15), d.log_tail()
    info = detail(d, sid)
    assert info["state"] == "paused"
    assert info["persistentContents"] == ["memory", "filesystem", "ip"]
    assert Sandbox.get_info(sid, **opts).state == SandboxState.PAUSED
    # Every process ended: its memory is back with the host.
    assert wait_until(lambda: d.processes_in_cgroup() == [], 5), d.processes_in_cgroup()
    counted = numbers(open(f"{d.data_dir}/sandboxes/{sid}/disk/upper/tmp/counter").read())

    again = Sandbox.connect(sid, **opts)
    assert detail(d, sid)["state"] == "running"
    assert again.files.read("/home/user/note.txt") == "kept on disk"
    assert again.commands.run("hostname -I").stdout.split() == ip_before
    # The python process carried on from its memory: no restart, no gap.
    assert wait_until(lambda: len(again.files.read("/tmp/counter").split()) > len(counted) + 5, 5)
    seq = numbers(again.files.read("/tmp/counter"))
    assert seq == list(range(1, len(seq) + 1)), seq[-20:]
    # The listener kept its socket and its count.
    answer = again.commands.run(ASK).stdout.strip()
    assert answer == str(served + 1), answer


def test_hibernated_sandbox_wakes_after_a_daemon_restart_and_kill_cleans_up(hib_daemon):
    d = hib_daemon[0]
    opts = dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)
    sbx = Sandbox.create(timeout=300, **opts)
    sid = sbx.sandbox_id
    sleeper = sbx.commands.run("sleep 600", background=True)
    r = d.request("POST", f"/warren/v1/sandboxes/{sid}/hibernate")
    assert r.status == 200, (r.status, r.body)
    assert r.json()["memoryLocation"] == "disk"
    # Bad input: an unknown sandbox answers in E2B's error shape.
    bad = d.request("POST", "/warren/v1/sandboxes/doesnotexist/hibernate")
    assert bad.status == 404 and bad.json()["code"] == 404, bad.body

    assert d.stop(timeout=20) == 0
    d2 = Daemon(
        binary=d.binary, envd=d.envd, port=d.port, api_key=d.api_key,
        data_dir=d.data_dir, log_path=f"{d.log_path}.2",
    )
    hib_daemon.append(d2)
    d2.start()
    assert d2.list_ids() == [sid]
    assert detail(d2, sid)["memoryLocation"] == "disk"
    again = Sandbox.connect(sid, **opts)
    # envd's own memory came back: it still knows the process it started before.
    assert sleeper.pid in [p.pid for p in again.commands.list()]
    assert again.commands.run("echo woke").stdout == "woke\n"

    # Killed while hibernated: images, pinned network namespace and cgroups all go.
    r = d2.request("POST", f"/warren/v1/sandboxes/{sid}/hibernate")
    assert r.status == 200, (r.status, r.body)
    assert again.kill() is True
    assert wait_until(lambda: d2.sandbox_dirs() == [], 10), d2.sandbox_dirs()
    assert mounts_under(d2.data_dir) == []
    assert d2.cgroup_leaks() == []
