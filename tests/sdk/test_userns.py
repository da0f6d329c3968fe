"""User namespaces (on by default): every sandbox in its own user namespace, root inside mapped to
an unprivileged host uid range of its own that a restart keeps and a kill frees, and sandbox root
unable to do what host root can. `warren serve --user-namespaces=false` turns them off."""

import os

import pytest
from e2b import Sandbox

from warren_helpers import Daemon, remove_data_dir, remove_host_state, start_daemon, wait_until


def host_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("Uid:"))
    return int(line.split()[2])


def mapping(sbx) -> int:
    """The first host uid of the sandbox's range, as its own /proc/self/uid_map says."""
    inside, outside, count = sbx.commands.run("cat /proc/self/uid_map", user="root").stdout.split()
    assert inside == "0" and count == "65536"
    return int(outside)


def host_pids_of(marker: str) -> list:
    """Host pids of processes whose command line contains the marker."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(p))
        except OSError:
            pass
    return found


def test_root_inside_is_a_range_of_its_own_and_files_keep_their_owners(daemon, new_sandbox):
    a, b = new_sandbox(), new_sandbox()
    base_a, base_b = mapping(a), mapping(b)
    assert base_a != 0 and base_b != 0
    assert abs(base_a - base_b) >= 65536, "disjoint ranges, one per sandbox"
    assert base_a >= 65536 and base_b >= 65536, "never host root's or the distribution's ids"

    # A process of root in the sandbox is the range's first uid on the host, one of `user`
    # (1000) is base + 1000.
    tag = a.sandbox_id
    a.commands.run(f"exec -a userns-root-{tag} sleep 300", user="root", background=True)
    a.commands.run(f"exec -a userns-user-{tag} sleep 300", user="user", background=True)
    assert wait_until(lambda: host_pids_of(f"userns-user-{tag}") != [], 5)
    assert wait_until(lambda: host_pids_of(f"userns-root-{tag}") != [], 5)
    assert {host_uid(p) for p in host_pids_of(f"userns-root-{tag}")} == {base_a}
    assert {host_uid(p) for p in host_pids_of(f"userns-user-{tag}")} == {base_a + 1000}
    pid = host_pids_of(f"userns-root-{tag}")[0]

    # Inside, files keep their owners: made by root, by `user`, uploaded through the files API
    # (as `user`, the default), and the image's own files and the host /usr bind (root's).
    a.commands.run("echo r > /root-made", user="root")
    a.commands.run("echo u > /home/user/user-made", user="user")
    a.files.write("/home/user/by-api.txt", "hello")
    out = a.commands.run(
        "stat -c '%u:%g %n' /root-made /home/user/user-made /home/user/by-api.txt /etc/passwd "
        "/usr/bin/env",
        user="root",
    ).stdout.split("\n")
    assert out[:5] == [
        "0:0 /root-made",
        "1000:1000 /home/user/user-made",
        "1000:1000 /home/user/by-api.txt",
        "0:0 /etc/passwd",
        "0:0 /usr/bin/env",
    ], out
    # On the host, through the sandbox's own mounts, they belong to the range...
    root_view = f"/proc/{pid}/root"
    assert os.stat(f"{root_view}/root-made").st_uid == base_a
    assert os.stat(f"{root_view}/home/user/by-api.txt").st_uid == base_a + 1000
    # ...while its upper dir stores plain ids, as image layers do (what commits export).
    upper = os.path.join(daemon.data_dir, "sandboxes", a.sandbox_id, "disk", "upper")
    assert os.stat(os.path.join(upper, "root-made")).st_uid == 0
    assert os.stat(os.path.join(upper, "home/user/by-api.txt")).st_uid == 1000


def test_root_inside_cannot_do_what_host_root_can(daemon, sandbox):
    for what, cmd in [
        ("make a block device", "mknod /tmp/sda b 8 0"),
        ("make a memory device", "mknod /tmp/mem c 1 1"),
        ("make the host /usr bind writable", "mount -o remount,rw /usr"),
        ("write a host-owned file bound read-only", "echo x >> /usr/bin/env"),
        ("chown a host-owned file", "chown 1000 /usr/bin/env"),
        ("take its interface down", "ip link set eth0 down"),
        ("change its address", "ip addr add 192.0.2.1/32 dev eth0"),
    ]:
        r = sandbox.commands.run(f"{cmd}; echo rc=$?", user="root")
        assert "rc=0" not in r.stdout, f"root in the sandbox could {what}: {r.stdout} {r.stderr}"
    # The host /usr is untouched, and its file is still host root's on the host.
    assert os.stat("/usr/bin/env").st_uid == 0
    with open("/usr/bin/env", "rb") as f:
        assert not f.read().endswith(b"x\n")


def test_hibernate_keeps_the_range_and_forks_get_their_own(daemon, sandbox):
    opts = dict(api_key=daemon.api_key, api_url=daemon.url, sandbox_url=daemon.url)
    base = mapping(sandbox)
    sandbox.commands.run("echo before > /home/user/kept", user="user")
    r = daemon.request("POST", f"/warren/v1/sandboxes/{sandbox.sandbox_id}/hibernate")
    assert r.status == 200, r.body
    again = Sandbox.connect(sandbox.sandbox_id, **opts)
    assert mapping(again) == base, "a woken sandbox keeps its range"
    out = again.commands.run("cat /home/user/kept; stat -c %u /home/user/kept", user="user")
    assert out.stdout.split() == ["before", "1000"]

    # Forks are restored from one checkpoint, each into a user namespace of its own range.
    forks = again.fork(count=2)
    try:
        for f in forks:
            daemon.register(f.sandbox_id)
        bases = {mapping(f) for f in forks} | {base}
        assert len(bases) == 3, f"source and forks share a range: {bases}"
        for f in forks:
            assert f.commands.run("cat /home/user/kept; id -u", user="user").stdout.split() == [
                "before",
                "1000",
            ]
    finally:
        for f in forks:
            f.kill()


@pytest.fixture(params=[None])
def own_daemon(request):
    saved = os.environ.get("WARREN_USER_NAMESPACES")
    if request.param is not None:
        os.environ["WARREN_USER_NAMESPACES"] = request.param
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


def test_a_restart_keeps_the_range_and_a_kill_frees_it(own_daemon):
    d = own_daemon[0]
    opts = dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)
    a = Sandbox.create(timeout=120, **opts)
    b = Sandbox.create(timeout=120, **opts)
    base_a, base_b = mapping(a), mapping(b)

    # A restart on the same data dir re-adopts the sandbox with its recorded range.
    assert d.stop(timeout=20) == 0
    d2 = Daemon(binary=d.binary, envd=d.envd, port=d.port, api_key=d.api_key, data_dir=d.data_dir,
                log_path=f"{d.log_path}.2")
    own_daemon.append(d2)
    d2.start()
    again = Sandbox.connect(a.sandbox_id, **opts)
    assert mapping(again) == base_a, "the adopted sandbox keeps its range"
    # The restarted daemon knows which ranges are taken: new sandboxes get free ones.
    c = Sandbox.create(timeout=60, **opts)
    assert mapping(c) not in (base_a, base_b)
    # A kill frees the range: with all others held, the next sandboxes get it back (prepared
    # network namespaces hold a few ranges ahead, so look among the next several).
    b.kill()
    made = [Sandbox.create(timeout=60, **opts) for _ in range(6)]
    assert base_b in [mapping(s) for s in made], "the killed sandbox's range is reused"
    for s in [again, c, *made]:
        s.kill()


def test_a_commit_records_in_sandbox_ids_not_host_ids(daemon, new_sandbox):
    import json
    import subprocess
    import tarfile

    sbx = new_sandbox()
    r = sbx.commands.run("echo r > /srv/root-made && echo u > /home/user/user-made", user="root")
    assert r.exit_code == 0, r.stderr
    sbx.commands.run("chown 1000:1000 /home/user/user-made", user="root")
    body = {"apiVersion": "warren.dev/v1alpha1", "kind": "Commit", "metadata": {"name": ""},
            "spec": {"sandbox": sbx.sandbox_id, "image": "local/userns-commit:v1"}}
    r = daemon.request("POST", "/warren/v1/commits", body)
    assert r.status == 202, (r.status, r.body)
    name = r.json()["metadata"]["name"]
    done = wait_until(lambda: daemon.request("GET", f"/warren/v1/commits/{name}").json()["status"]["phase"]
                      in ("Succeeded", "Failed"), 60)
    assert done
    layout = os.path.join(daemon.data_dir, "images/oci")
    info = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout}:local/userns-commit:v1"],
                                     capture_output=True, text=True, check=True).stdout)
    top = info["Layers"][-1].split(":", 1)[1]
    owners = {}
    with tarfile.open(os.path.join(layout, "blobs/sha256", top)) as t:
        for m in t.getmembers():
            owners[m.name.lstrip("./")] = (m.uid, m.gid)
    assert owners["srv/root-made"] == (0, 0), owners
    assert owners["home/user/user-made"] == (1000, 1000), owners
    assert all(uid < 65536 and gid < 65536 for uid, gid in owners.values()), owners
    assert daemon.request("DELETE", f"/warren/v1/commits/{name}").status == 204


@pytest.mark.parametrize("own_daemon", ["false"], indirect=True)
def test_the_opt_out_runs_sandboxes_as_host_ids(own_daemon):
    d = own_daemon[0]
    opts = dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)
    sbx = Sandbox.create(timeout=120, **opts)
    assert sbx.commands.run("cat /proc/self/uid_map", user="root").stdout.split() == [
        "0", "0", "4294967295"]
    forks = sbx.fork(count=1)
    assert forks[0].commands.run("id -u", user="root").stdout.strip() == "0"
    for s in [sbx, *forks]:
        s.kill()
