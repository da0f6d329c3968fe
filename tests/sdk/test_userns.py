"""`warren serve --user-namespaces`: every sandbox in its own user namespace, root inside mapped to
an unprivileged host uid range that a restart keeps. Uses its own daemon with the option on."""

import os

import pytest
from e2b import Sandbox

from warren_helpers import Daemon, remove_data_dir, remove_host_state, start_daemon, wait_until


@pytest.fixture
def userns_daemon():
    saved = os.environ.get("WARREN_USER_NAMESPACES")
    os.environ["WARREN_USER_NAMESPACES"] = "true"
    try:
        d = start_daemon()
    finally:
        if saved is None:
            os.environ.pop("WARREN_USER_NAMESPACES", None)
        else:
            os.environ["WARREN_USER_NAMESPACES"] = saved
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


def host_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("Uid:"))
    return int(line.split()[2])


def mapping(sbx) -> tuple:
    inside, outside, count = sbx.commands.run("cat /proc/self/uid_map", user="root").stdout.split()
    assert inside == "0" and count == "65536"
    return int(outside)


def host_pids_of(sbx_pid_cmd: str) -> list:
    """Host pids of processes whose command line contains the marker."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if sbx_pid_cmd.encode() in f.read():
                    found.append(int(p))
        except OSError:
            pass
    return found


def test_root_in_a_sandbox_is_an_unprivileged_host_uid_and_restarts_keep_the_range(userns_daemon):
    d = userns_daemon[0]
    opts = dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)
    a = Sandbox.create(timeout=120, **opts)
    b = Sandbox.create(timeout=120, **opts)
    base_a, base_b = mapping(a), mapping(b)
    assert base_a != base_b, "one range per sandbox"
    assert base_a >= 65536 and base_b >= 65536, "never host root's ids"

    # A process running as root in the sandbox is the range's first uid on the host, one
    # running as `user` (1000) is base + 1000.
    a.commands.run("exec -a warren-userns-root-marker sleep 300", user="root", background=True)
    a.commands.run("exec -a warren-userns-user-marker sleep 300", user="user", background=True)
    assert wait_until(lambda: host_pids_of("warren-userns-user-marker") != [], 5)
    assert {host_uid(p) for p in host_pids_of("warren-userns-root-marker")} == {base_a}
    assert {host_uid(p) for p in host_pids_of("warren-userns-user-marker")} == {base_a + 1000}

    # Files keep their owners inside, and plain ids on disk (what commits export).
    a.commands.run("echo r > /root-made && chown 1000:1000 /home/user", user="root")
    a.files.write("/home/user/by-api.txt", "hello")
    out = a.commands.run("stat -c '%u %n' /root-made /home/user/by-api.txt /usr/bin/env", user="root").stdout
    assert out.split("\n")[:3] == ["0 /root-made", "1000 /home/user/by-api.txt", "0 /usr/bin/env"], out
    upper = os.path.join(d.data_dir, "sandboxes", a.sandbox_id, "upper")
    assert os.stat(os.path.join(upper, "root-made")).st_uid == 0
    assert os.stat(os.path.join(upper, "home/user/by-api.txt")).st_uid == 1000

    # Privileged ports still bind for root in the sandbox.
    r = a.commands.run("python3 -c 'import socket; s=socket.socket(); s.bind((\"0.0.0.0\", 80)); print(\"bound\")'", user="root")
    assert r.stdout.strip() == "bound"

    # A restart on the same data dir re-adopts the sandbox with its recorded range.
    assert d.stop(timeout=20) == 0
    d2 = Daemon(binary=d.binary, envd=d.envd, port=d.port, api_key=d.api_key, data_dir=d.data_dir,
                log_path=f"{d.log_path}.2")
    userns_daemon.append(d2)
    saved = os.environ.get("WARREN_USER_NAMESPACES")
    os.environ["WARREN_USER_NAMESPACES"] = "true"
    try:
        d2.start()
    finally:
        if saved is None:
            os.environ.pop("WARREN_USER_NAMESPACES", None)
    again = Sandbox.connect(a.sandbox_id, **opts)
    assert mapping(again) == base_a, "the adopted sandbox keeps its range"
    # The restarted daemon knows which ranges are taken: a new sandbox gets a free one.
    c = Sandbox.create(timeout=60, **opts)
    assert mapping(c) not in (base_a, base_b)
    for s in (again, b, c):
        s.kill()
