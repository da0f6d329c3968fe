"""Sandbox lifecycle through the official SDK: pause/resume, kill, list, timeouts, info."""

import os
import secrets
import time
from datetime import datetime, timedelta, timezone

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import SandboxNotFoundException, SandboxNotRunningException

from warren_helpers import wait_until


def _list(query=None):
    pager = Sandbox.list(query=query)
    out = []
    while True:
        out.extend(pager.next_items())
        if not pager.has_next:
            return out


def test_pause_then_connect_resumes_files_and_processes(daemon, new_sandbox):
    sbx = new_sandbox()
    sid = sbx.sandbox_id
    sbx.files.write("/home/user/keep.txt", "kept across pause")
    sleeper = sbx.commands.run("sleep 600", background=True)
    sbx.commands.run(
        # Written aside and renamed: a read never sees the file truncated and still empty.
        "i=0; while true; do i=$((i+1)); echo $i > /home/user/counter.new; "
        "mv /home/user/counter.new /home/user/counter; sleep 0.1; done",
        background=True,
    )
    assert sbx.commands.run("sleep 0.5; cat /home/user/counter").exit_code == 0
    # the same file seen from the host, in the sandbox's overlay upper dir (on its own disk)
    host_counter = os.path.join(daemon.data_dir, "sandboxes", sid, "disk", "upper", "home", "user", "counter")

    def counter(s) -> int:
        return int(s.files.read("/home/user/counter").strip())

    c_before = counter(sbx)
    assert sbx.pause() is True
    assert sbx.is_running() is False
    info = sbx.get_info()
    assert info.state == SandboxState.PAUSED
    assert Sandbox.get_info(sid).state == SandboxState.PAUSED
    # already paused: the SDK maps 409 to False
    assert Sandbox.pause(sid) is False
    # listed as paused, not as running
    assert sid in [s.sandbox_id for s in _list(SandboxQuery(state=[SandboxState.PAUSED]))]
    assert sid not in [s.sandbox_id for s in _list(SandboxQuery(state=[SandboxState.RUNNING]))]
    # envd behind a paused sandbox is not reachable
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("echo should-not-run")
    # frozen: the counter does not move while paused
    frozen = int(open(host_counter).read())
    assert frozen >= c_before
    time.sleep(2)
    assert int(open(host_counter).read()) == frozen

    resumed = Sandbox.connect(sid)
    assert resumed.sandbox_id == sid
    assert resumed.is_running() is True
    assert resumed.get_info().state == SandboxState.RUNNING
    assert resumed.files.read("/home/user/keep.txt") == "kept across pause"
    assert sleeper.pid in [p.pid for p in resumed.commands.list()]
    c_resumed = counter(resumed)
    assert c_resumed >= frozen
    time.sleep(1.5)
    # ... and counts on after resume
    assert counter(resumed) > c_resumed
    # the old handle works again too
    assert sbx.commands.run("echo back").stdout == "back\n"


def test_instance_connect_resumes(sandbox):
    sandbox.pause()
    assert sandbox.is_running() is False
    assert sandbox.connect() is sandbox
    assert sandbox.is_running() is True
    assert sandbox.commands.run("echo ok").stdout == "ok\n"


def test_kill(daemon, new_sandbox):
    sbx = new_sandbox()
    sid = sbx.sandbox_id
    assert sbx.kill() is True
    assert sbx.is_running() is False
    assert Sandbox.kill(sid) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sid)
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("echo x")
    assert sid not in daemon.list_ids()
    assert sid not in daemon.sandbox_dirs()


def test_kill_paused_sandbox(daemon, new_sandbox):
    sbx = new_sandbox()
    sbx.pause()
    assert Sandbox.kill(sbx.sandbox_id) is True
    assert sbx.sandbox_id not in daemon.list_ids()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def test_list_with_metadata_filter(new_sandbox):
    run = secrets.token_hex(6)
    a = new_sandbox(metadata={"suite": run, "n": "1"})
    b = new_sandbox(metadata={"suite": run, "n": "2"})
    new_sandbox(metadata={"suite": "other-" + run})

    only_a = _list(SandboxQuery(metadata={"suite": run, "n": "1"}))
    assert [s.sandbox_id for s in only_a] == [a.sandbox_id]
    assert only_a[0].metadata == {"suite": run, "n": "1"}
    assert only_a[0].state == SandboxState.RUNNING
    assert only_a[0].template_id == "base"

    both = _list(SandboxQuery(metadata={"suite": run}))
    assert sorted(s.sandbox_id for s in both) == sorted([a.sandbox_id, b.sandbox_id])
    assert _list(SandboxQuery(metadata={"suite": run, "n": "3"})) == []


def test_list_metadata_filter_with_reserved_characters(new_sandbox):
    key, value = "k&y =", "v=1&x 2/ü"
    a = new_sandbox(metadata={key: value})
    new_sandbox(metadata={key: value + "-no"})
    got = _list(SandboxQuery(metadata={key: value}))
    assert [s.sandbox_id for s in got] == [a.sandbox_id]
    assert got[0].metadata == {key: value}


def test_list_pagination(new_sandbox):
    run = secrets.token_hex(6)
    ids = sorted(new_sandbox(metadata={"page": run}).sandbox_id for _ in range(3))
    pager = Sandbox.list(query=SandboxQuery(metadata={"page": run}), limit=2)
    first = pager.next_items()
    assert len(first) == 2
    assert pager.has_next is True
    second = pager.next_items()
    assert len(second) == 1
    assert pager.has_next is False
    assert sorted(s.sandbox_id for s in first + second) == ids


def test_get_info_fields(new_sandbox):
    before = datetime.now(timezone.utc)
    sbx = new_sandbox(timeout=120, metadata={"owner": "pytest", "x": "y"})
    after = datetime.now(timezone.utc)
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base"
    assert info.metadata == {"owner": "pytest", "x": "y"}
    assert info.state == SandboxState.RUNNING
    slack = timedelta(seconds=2)
    assert before - slack <= info.started_at <= after + slack
    assert abs((info.end_at - info.started_at) - timedelta(seconds=120)) < timedelta(seconds=1)
    assert isinstance(info.envd_version, str) and info.envd_version
    assert info.cpu_count >= 1
    assert info.memory_mb >= 1


def test_set_timeout_and_connect_only_extends(sandbox):
    sandbox.set_timeout(10)
    now = datetime.now(timezone.utc)
    end = sandbox.get_info().end_at
    assert timedelta(seconds=8) <= end - now <= timedelta(seconds=12), end - now
    sandbox.set_timeout(600)
    end = sandbox.get_info().end_at
    assert timedelta(seconds=598) <= end - datetime.now(timezone.utc) <= timedelta(seconds=602)
    # connect(timeout) on a running sandbox never shortens
    Sandbox.connect(sandbox.sandbox_id, timeout=30)
    assert abs(sandbox.get_info().end_at - end) < timedelta(seconds=1)
    # ... but extends
    sandbox.set_timeout(20)
    Sandbox.connect(sandbox.sandbox_id, timeout=300)
    end = sandbox.get_info().end_at
    assert timedelta(seconds=298) <= end - datetime.now(timezone.utc) <= timedelta(seconds=302)


def test_timeout_kills_sandbox(daemon, new_sandbox):
    t0 = time.monotonic()
    sbx = new_sandbox(timeout=2)
    sid = sbx.sandbox_id
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    time.sleep(max(0.0, 4.0 - (time.monotonic() - t0)))
    assert sbx.is_running() is False
    assert sid not in daemon.list_ids()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sid)
    assert Sandbox.kill(sid) is False


def test_set_timeout_shortens_to_expiry(daemon, sandbox):
    sandbox.set_timeout(1)
    time.sleep(3)
    assert sandbox.is_running() is False
    assert sandbox.sandbox_id not in daemon.list_ids()


def test_on_timeout_pause_pauses_instead_of_killing(new_sandbox):
    sbx = new_sandbox(timeout=2, lifecycle={"on_timeout": "pause"})
    assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
    sbx.files.write("/tmp/x", "kept")
    time.sleep(4)
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.files.read("/tmp/x") == "kept"


def test_auto_resume(new_sandbox):
    sbx = new_sandbox(timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": True})
    assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
    sbx.commands.run("echo 41 > /tmp/state")
    sbx.pause()
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    # Any traffic through the router wakes it: envd here, with memory and files kept.
    assert sbx.commands.run("cat /tmp/state").stdout == "41\n"
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.state == SandboxState.RUNNING
    # It runs for the timeout it was created with again.
    remaining = (info.end_at - datetime.now(timezone.utc)).total_seconds()
    assert 50 < remaining <= 61


def test_auto_resume_after_timeout_pause(new_sandbox):
    sbx = new_sandbox(timeout=2, lifecycle={"on_timeout": "pause", "auto_resume": True})
    sbx.files.write("/tmp/x", "kept")
    time.sleep(4)
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    assert sbx.files.read("/tmp/x") == "kept"
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING


def test_concurrent_kills_exactly_one_wins(new_sandbox):
    import concurrent.futures

    sbx = new_sandbox()
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: Sandbox.kill(sbx.sandbox_id), range(4)))
    assert sorted(results) == [False, False, False, True]


def test_pause_kill_race_ends_killed(daemon, new_sandbox):
    import concurrent.futures

    sbx = new_sandbox()

    def pause():
        try:
            return Sandbox.pause(sbx.sandbox_id)
        except SandboxNotFoundException:
            return "gone"

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        p = ex.submit(pause)
        k = ex.submit(Sandbox.kill, sbx.sandbox_id)
        assert k.result() is True
        assert p.result() in (True, "gone")
    assert sbx.sandbox_id not in daemon.list_ids()
    assert wait_until(lambda: sbx.sandbox_id not in daemon.sandbox_dirs(), 5)


def test_connect_to_process_after_resume_streams_the_rest(new_sandbox):
    sbx = new_sandbox()
    h = sbx.commands.run("for i in $(seq 1 30); do echo line$i; sleep 0.1; done", background=True)
    time.sleep(0.5)
    assert sbx.pause() is True
    time.sleep(0.5)
    resumed = Sandbox.connect(sbx.sandbox_id)
    res = resumed.commands.connect(h.pid).wait()
    lines = res.stdout.splitlines()
    assert res.exit_code == 0
    assert lines[-1] == "line30"
    # consecutive, no gaps or repeats from wherever it joined
    first = int(lines[0][4:])
    assert lines == [f"line{i}" for i in range(first, 31)]
