"""Checkpoints, restores and forks with the official SDK and Warren's REST API: `create_snapshot`
(memory, or filesystem only), `Sandbox.create(template=<snapshot id>)`, `fork(count)`,
`list_snapshots`, `delete_snapshot`, `kind: Checkpoint` objects (keepRunning, TTL), a restore
after a daemon restart, and bad input. Real CRIU; one daemon of its own per test."""

import os
import shutil
import time

import pytest
from e2b import Sandbox
from e2b.exceptions import InvalidArgumentException, NotFoundException, SandboxException

from warren_helpers import Daemon, remove_data_dir, remove_host_state, start_daemon, wait_until

# A server whose count lives only in the python process's memory: every fork starts from the
# count at the checkpoint, and each fork's answers move only its own count.
SERVER = (
    "python3 -c 'import socket\ns = socket.socket()\ns.bind((\"0.0.0.0\", 8080))\ns.listen()\n"
    "n = 0\nwhile True:\n    c, _ = s.accept()\n    n += 1\n    c.sendall(f\"{n}\\n\".encode())\n    c.close()'"
)
ASK = (
    "python3 -c 'import socket\ntry:\n    print(socket.create_connection((\"127.0.0.1\", 8080)).recv(10).decode().strip())\n"
    "except OSError as e:\n    print(e)'"
)


@pytest.fixture
def ck_daemon(request):
    d = start_daemon()
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


def opts(d: Daemon) -> dict:
    return dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)


def serving(sbx) -> int:
    sbx.commands.run(SERVER, background=True, user="root")
    assert wait_until(lambda: sbx.commands.run(ASK).stdout.strip().isdigit(), 5)
    return int(sbx.commands.run(ASK).stdout)


def envd_status(d: Daemon, sid: str, token: str) -> int:
    """Status of an authenticated envd request (read a file) to `sid` with `token`."""
    r = d.request(
        "GET",
        "/files?path=/etc/hostname",
        api_key=None,
        headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token},
    )
    return r.status


def test_fork_of_ten_continues_independently(ck_daemon):
    d = ck_daemon[0]
    src = Sandbox.create(timeout=300, envs={"FROM_CREATE": "yes"}, **opts(d))
    served = serving(src)
    src.files.write("/home/user/note.txt", "before")

    t = time.monotonic()
    forks = src.fork(count=10)
    took = time.monotonic() - t
    print(f"fork of 10 through the SDK: {took * 1000:.0f} ms")
    assert all(isinstance(f, Sandbox) for f in forks), forks
    ids = {f.sandbox_id for f in forks}
    assert len(ids) == 10 and src.sandbox_id not in ids

    # The source runs on, unchanged.
    assert src.commands.run(ASK).stdout.strip() == str(served + 1)
    ips = {src.commands.run("hostname -I").stdout.split()[0]}
    for f in forks:
        # The memory of the checkpoint is in every fork: the count goes on from it.
        assert f.commands.run(ASK).stdout.strip() == str(served + 1)
        assert f.files.read("/home/user/note.txt") == "before"
        assert f.commands.run("echo $FROM_CREATE").stdout.strip() == "yes"
        assert f.commands.run("hostname").stdout.strip() == f.sandbox_id
        ips.add(f.commands.run("hostname -I").stdout.split()[0])
    assert len(ips) == 11, ips

    # A change in one fork is invisible in the others and in the source.
    a, b = forks[0], forks[1]
    for _ in range(3):
        a.commands.run(ASK)
    a.files.write("/home/user/note.txt", "changed in a")
    assert a.commands.run(ASK).stdout.strip() == str(served + 5)
    assert b.commands.run(ASK).stdout.strip() == str(served + 2)
    assert b.files.read("/home/user/note.txt") == "before"
    assert src.files.read("/home/user/note.txt") == "before"

    # Each fork was re-keyed: its own token works, the source's does not.
    assert envd_status(d, a.sandbox_id, a._envd_access_token) == 200
    assert envd_status(d, a.sandbox_id, src._envd_access_token) == 401
    assert envd_status(d, src.sandbox_id, a._envd_access_token) == 401

    # A fork hibernates and wakes like any sandbox (its root stacks the checkpoint's files).
    c = forks[2]
    r = d.request("POST", f"/warren/v1/sandboxes/{c.sandbox_id}/hibernate")
    assert r.status == 200, r.body
    c = Sandbox.connect(c.sandbox_id, **opts(d))
    assert c.commands.run(ASK).stdout.strip() == str(served + 2)
    assert c.files.read("/home/user/note.txt") == "before"

    # The fork's checkpoint is internal: no snapshot listed; it holds the forks' files.
    assert Sandbox.list_snapshots(**opts(d)).next_items() == []
    for f in forks:
        assert f.kill() is True
    assert wait_until(lambda: d.list_ids() == [src.sandbox_id], 10)


def test_snapshots_restore_memory_or_files_and_delete(ck_daemon):
    d = ck_daemon[0]
    src = Sandbox.create(timeout=300, **opts(d))
    served = serving(src)
    src.files.write("/home/user/note.txt", "snap")
    snap = src.create_snapshot(name="snap-one")
    assert snap.snapshot_id == "snap-one" and snap.names == ["snap-one"]
    fs_snap = src.create_snapshot(mode="filesystem")
    assert fs_snap.snapshot_id != snap.snapshot_id
    listed = {s.snapshot_id for s in Sandbox.list_snapshots(**opts(d)).next_items()}
    assert listed == {snap.snapshot_id, fs_snap.snapshot_id}
    only = src.list_snapshots(name="snap-one").next_items()
    assert [s.snapshot_id for s in only] == ["snap-one"]

    # Memory: the server carries on with its count, and the new sandbox is the caller's.
    r = Sandbox.create(template=snap.snapshot_id, timeout=120, **opts(d))
    assert r.sandbox_id != src.sandbox_id
    assert r.commands.run(ASK).stdout.strip() == str(served + 1)
    assert r.get_info().template_id == "snap-one"
    # Files only: the same files, fresh processes (no server).
    f = Sandbox.create(template=fs_snap.snapshot_id, timeout=120, **opts(d))
    assert f.files.read("/home/user/note.txt") == "snap"
    assert "refused" in f.commands.run(ASK).stdout.lower()
    detail = d.request("GET", f"/warren/v1/checkpoints/{fs_snap.snapshot_id}").json()
    assert detail["spec"]["persistentContents"] == ["filesystem"]
    assert detail["status"]["memorySize"] == 0

    # In use by a sandbox: the delete is refused, clearly.
    with pytest.raises(SandboxException) as e:
        Sandbox.delete_snapshot(snap.snapshot_id, **opts(d))
    assert r.sandbox_id in str(e.value)
    r.kill()
    f.kill()
    assert Sandbox.delete_snapshot(snap.snapshot_id, **opts(d)) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id, **opts(d)) is False
    # Restore of a deleted checkpoint.
    with pytest.raises(SandboxException) as e:
        Sandbox.create(template=snap.snapshot_id, **opts(d))
    assert "snap-one" in str(e.value)
    assert not os.path.exists(os.path.join(d.data_dir, "checkpoints", "snap-one"))
    # The source never noticed.
    assert src.commands.run(ASK).stdout.strip() == str(served + 1)


def test_checkpoint_objects_keep_running_ttl_and_restore_after_restart(ck_daemon):
    d = ck_daemon[0]
    src = Sandbox.create(timeout=300, **opts(d))
    sid = src.sandbox_id
    served = serving(src)

    def ckpt(name, **spec):
        body = {"apiVersion": "warren.dev/v1alpha1", "kind": "Checkpoint",
                "metadata": {"name": name}, "spec": {"sandbox": sid, **spec}}
        return d.request("PUT", f"/warren/v1/checkpoints/{name}", body)

    r = ckpt("short", ttlAfterFinished="1s")
    assert r.status == 201, r.body
    st = r.json()["status"]
    assert st["phase"] == "Succeeded" and st["size"] > 0 and st["freezeDurationMs"] > 0, st
    assert ckpt("short", ttlAfterFinished="1s").status == 200, "apply is idempotent"
    # TTL: collected by the background tick.
    assert wait_until(
        lambda: d.request("GET", "/warren/v1/checkpoints/short").status == 404, 10
    )
    assert not os.path.exists(os.path.join(d.data_dir, "checkpoints", "short"))

    # keepRunning: false: the checkpoint is taken, then the sandbox ends.
    r = ckpt("last", keepRunning=False)
    assert r.status == 201, r.body
    assert wait_until(lambda: sid not in d.list_ids(), 5)

    assert d.stop(timeout=20) == 0
    d2 = Daemon(
        binary=d.binary, envd=d.envd, port=d.port, api_key=d.api_key,
        data_dir=d.data_dir, log_path=f"{d.log_path}.2",
    )
    ck_daemon.append(d2)
    d2.start()
    got = d2.request("GET", "/warren/v1/checkpoints/last")
    assert got.status == 200 and got.json()["status"]["phase"] == "Succeeded", got.body
    restored = d2.request("POST", "/warren/v1/checkpoints/last/restore", {"count": 2})
    assert restored.status == 201, restored.body
    items = restored.json()
    assert all("sandbox" in i for i in items), items
    for i in items:
        s = Sandbox.connect(i["sandbox"]["sandboxID"], **opts(d2))
        assert s.commands.run(ASK).stdout.strip() == str(served + 1)
        s.kill()


def test_bad_input(ck_daemon):
    d = ck_daemon[0]
    with pytest.raises(NotFoundException):
        Sandbox.create_snapshot("doesnotexist", **opts(d))
    r = d.request("POST", "/warren/v1/checkpoints",
                  {"kind": "Checkpoint", "metadata": {"name": "x"}, "spec": {"sandbox": "nope"}})
    assert r.status == 404 and r.json()["code"] == 404, r.body
    r = d.request("POST", "/warren/v1/checkpoints",
                  {"kind": "Checkpoint", "metadata": {"name": "x"},
                   "spec": {"sandbox": "nope", "persistentContents": ["memory"]}})
    assert r.status == 400 and "filesystem" in r.json()["message"], r.body

    src = Sandbox.create(timeout=300, **opts(d))
    sid = src.sandbox_id
    served = serving(src)
    for count in (0, 101, -1):
        r = d.request("POST", f"/sandboxes/{sid}/fork", {"count": count})
        assert r.status == 400 and "between 1 and 100" in r.json()["message"], (count, r.body)
    with pytest.raises(InvalidArgumentException):
        src.fork(count=21)
    r = d.request("POST", "/sandboxes/doesnotexist/fork", {"count": 1})
    assert r.status == 404, r.body
    r = d.request("POST", "/warren/v1/checkpoints/doesnotexist/restore", {"count": 1})
    assert r.status == 404, r.body

    # A corrupted image directory: a clear per-item error, nothing left behind, source untouched.
    snap = src.create_snapshot(name="broken")
    images = os.path.join(d.data_dir, "checkpoints", "broken", "images")
    for name in os.listdir(images):
        if name.startswith("pages-") or name.startswith("core-"):
            with open(os.path.join(images, name), "r+b") as fh:
                fh.truncate(7)
    before = d.sandbox_dirs()
    r = d.request("POST", "/warren/v1/checkpoints/broken/restore", {"count": 1})
    assert r.status == 201, r.body
    err = r.json()[0]["error"]
    assert err["code"] == 500 and "restore" in err["message"], err
    with pytest.raises(SandboxException):
        Sandbox.create(template=snap.snapshot_id, **opts(d))
    assert d.sandbox_dirs() == before
    assert src.commands.run(ASK).stdout.strip() == str(served + 1)

    # A hibernated sandbox: wake it first.
    r = d.request("POST", f"/warren/v1/sandboxes/{sid}/hibernate")
    assert r.status == 200, r.body
    with pytest.raises(SandboxException) as e:
        src.create_snapshot()
    assert "hibernated" in str(e.value)
    r = d.request("POST", f"/sandboxes/{sid}/fork", {"count": 2})
    assert r.status == 409, r.body
    # Then it carries on, from its memory.
    again = Sandbox.connect(sid, **opts(d))
    assert again.commands.run(ASK).stdout.strip() == str(served + 2)
    assert shutil.which("criu") or os.path.exists("/usr/local/sbin/criu")
