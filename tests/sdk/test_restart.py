"""A daemon restart (SIGTERM, start again on the same data dir) keeps sandboxes running and
re-adopts them. Uses its own daemon, not the session one."""

import os
import threading
import time

import pytest
from e2b import Sandbox, SandboxState

from warren_helpers import Daemon, host_state, remove_data_dir, remove_host_state, start_daemon, wait_until


@pytest.fixture
def own_daemon(request):
    d = start_daemon()
    daemons = [d]
    yield daemons
    last = daemons[-1]
    if last.alive():
        for sid in last.list_ids():
            last.request("DELETE", f"/sandboxes/{sid}")
        wait_until(lambda: last.sandbox_dirs() == [], 10)
        last.stop()
    for x in daemons:
        if x.alive():
            x.stop()
    remove_host_state(d.prefix)
    remove_data_dir(d)
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.failed:
        for x in daemons:
            if os.path.exists(x.log_path):
                os.unlink(x.log_path)


def _restart(daemons, stop=True):
    """SIGTERM the last daemon (unless already stopped) and start a new one on its data dir,
    port and key."""
    d = daemons[-1]
    if stop:
        assert d.stop(timeout=20) == 0
    d2 = Daemon(
        binary=d.binary,
        envd=d.envd,
        port=d.port,
        api_key=d.api_key,
        data_dir=d.data_dir,
        log_path=f"{daemons[0].log_path}.{len(daemons) + 1}",
    )
    daemons.append(d2)
    d2.start()
    return d2


def test_restart_readopts_running_sandboxes(own_daemon):
    d = own_daemon[0]
    opts = dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)
    sbx = Sandbox.create(timeout=120, **opts)
    sid = sbx.sandbox_id
    sbx.files.write("/home/user/survive.txt", "across restarts")
    sleeper = sbx.commands.run("sleep 600", background=True)
    # one whose timeout runs out while the daemon is down
    expiring = Sandbox.create(timeout=3, **opts)

    # a command stream open through the router while the daemon is told to stop
    streaming = {}

    def long_run():
        try:
            sbx.commands.run("sleep 60")
            streaming["outcome"] = "returned"
        except Exception as e:  # noqa: BLE001
            streaming["outcome"] = e

    th = threading.Thread(target=long_run)
    th.start()
    time.sleep(0.3)

    t = time.monotonic()
    assert d.stop(timeout=20) == 0
    assert time.monotonic() - t < 12, "SIGTERM took too long with an open command stream"
    th.join(10)
    assert not th.is_alive()

    # the sandbox keeps running without the daemon, and so do its bridge and cgroups
    assert d.processes_in_cgroup() != []
    assert f"link {d.prefix}br" in host_state(d.prefix)

    time.sleep(max(0.0, 3.5 - (time.monotonic() - t)))
    d2 = _restart(own_daemon, stop=False)
    # the expired one is killed at (or right after) start
    assert wait_until(lambda: expiring.sandbox_id not in d2.list_ids(), 5), d2.list_ids()
    assert wait_until(lambda: expiring.sandbox_id not in d2.sandbox_dirs(), 5)
    assert d2.list_ids() == [sid]

    again = Sandbox.connect(sid, **opts)
    assert again.files.read("/home/user/survive.txt") == "across restarts"
    assert sleeper.pid in [p.pid for p in again.commands.list()]
    assert again.commands.run("echo after-restart").stdout == "after-restart\n"
    assert again.get_info().metadata == {}

    assert again.kill() is True
    assert wait_until(lambda: d2.sandbox_dirs() == [], 10)
    assert d2.cgroup_leaks() == []
    assert d2.stop() == 0
    assert wait_until(lambda: d2.processes_in_cgroup() == [], 5), d2.processes_in_cgroup()
    # no sandbox left: the stopped daemon gave back its bridge, tables and cgroup parents
    assert wait_until(lambda: host_state(d2.prefix) == [], 5), host_state(d2.prefix)


def test_paused_sandboxes_survive_restarts(own_daemon):
    d = own_daemon[0]
    opts = dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)
    sbxs = [Sandbox.create(timeout=300, **opts) for _ in range(2)]
    for i, s in enumerate(sbxs):
        s.files.write("/tmp/p.txt", f"paused {i}")
        assert s.pause() is True
    for cycle in range(5):
        d2 = _restart(own_daemon)
        assert d2.list_ids() == sorted(s.sandbox_id for s in sbxs)
        for i, s in enumerate(sbxs):
            assert Sandbox.get_info(s.sandbox_id, **opts).state == SandboxState.PAUSED
            again = Sandbox.connect(s.sandbox_id, **opts)
            assert again.files.read("/tmp/p.txt") == f"paused {i}", f"cycle {cycle}"
            assert again.pause() is True


def test_build_records_outlive_a_restart(own_daemon):
    d = own_daemon[0]
    done = d.request("POST", "/warren/v1/templates/rec-done/build", {"dockerfile": "FROM base\nRUN echo one > /one\n"})
    assert done.status == 202, done.body
    assert wait_until(lambda: d.request("GET", "/warren/v1/templates/rec-done/build").json()["status"] != "building", 60)
    slow = d.request("POST", "/warren/v1/templates/rec-slow/build", {"dockerfile": "FROM base\nRUN sleep 300\n"})
    assert slow.status == 202, slow.body
    assert wait_until(lambda: "sleep" in d.request("GET", "/warren/v1/templates/rec-slow/build").json()["log"], 30)
    d.proc.kill()  # a crash, in the middle of the slow build
    d.proc.wait()
    d2 = _restart(own_daemon, stop=False)
    finished = d2.request("GET", "/warren/v1/templates/rec-done/build")
    assert finished.status == 200 and finished.json()["status"] == "ready", finished.body
    assert "step 2/2" in finished.json()["log"]
    cut = d2.request("GET", "/warren/v1/templates/rec-slow/build").json()
    assert cut["status"] == "failed" and "daemon stopped" in cut["error"], cut
    assert cut["steps"][1]["status"] == "failed", cut


def test_e2b_build_records_outlive_a_restart(own_daemon):
    """E2B's `Template.build` protocol, straight over HTTP: a finished build still answers its
    status (with its logs and tags) after a crash, and one the crash cut short says so."""
    d = own_daemon[0]

    def build(name, cmd, tags=()):
        r = d.request("POST", "/v3/templates", {"name": name, "tags": list(tags)})
        assert r.status == 202, r.body
        bid = r.json()["buildID"]
        spec = {"fromTemplate": "base", "steps": [{"type": "RUN", "args": [cmd]}]}
        r = d.request("POST", f"/v2/templates/{name}/builds/{bid}", spec)
        assert r.status == 202, r.body
        return bid

    def status(daemon, name, bid):
        r = daemon.request("GET", f"/templates/{name}/builds/{bid}/status")
        assert r.status == 200, r.body
        return r.json()

    done = build("e2b-rec-done", "echo built-once", tags=["v1"])
    assert wait_until(lambda: status(d, "e2b-rec-done", done)["status"] != "building", 60)
    assert status(d, "e2b-rec-done", done)["status"] == "ready"
    slow = build("e2b-rec-slow", "sleep 300")
    assert wait_until(lambda: any("sleep" in m for m in status(d, "e2b-rec-slow", slow)["logs"]), 30)
    waiting = d.request("POST", "/v3/templates", {"name": "e2b-rec-waiting"}).json()["buildID"]
    d.proc.kill()  # a crash, in the middle of the slow build
    d.proc.wait()
    d2 = _restart(own_daemon, stop=False)

    finished = status(d2, "e2b-rec-done", done)
    assert finished["status"] == "ready", finished
    assert any("built-once" in m for m in finished["logs"]), finished["logs"]
    assert d2.request("GET", "/templates/e2b-rec-done/tags").json()[0]["tag"] == "v1"
    for name, bid in (("e2b-rec-slow", slow), ("e2b-rec-waiting", waiting)):
        cut = status(d2, name, bid)
        assert cut["status"] == "error" and "daemon stopped" in cut["reason"]["message"], cut
    # The cut build can be built again.
    again = build("e2b-rec-slow", "echo second-try")
    assert wait_until(lambda: status(d2, "e2b-rec-slow", again)["status"] == "ready", 60)
