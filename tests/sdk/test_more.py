"""Less common paths: streams cut by kill, big files, watchers, PTY, concurrency, idempotency."""

import concurrent.futures
import hashlib
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from e2b import (
    CommandExitException,
    FilesystemEventType,
    InvalidArgumentException,
    Sandbox,
    SandboxException,
    SandboxState,
)
from e2b.exceptions import SandboxNotRunningException
from e2b.sandbox.commands.command_handle import PtySize


def test_kill_while_command_runs_ends_the_stream(sandbox):
    result = {}

    def run():
        t = time.monotonic()
        try:
            sandbox.commands.run("sleep 60")
            result["outcome"] = "returned"
        except Exception as e:  # noqa: BLE001 - recording the type
            result["outcome"] = e
        result["elapsed"] = time.monotonic() - t

    th = threading.Thread(target=run)
    th.start()
    time.sleep(0.5)
    assert Sandbox.kill(sandbox.sandbox_id) is True
    th.join(20)
    assert not th.is_alive(), "commands.run still blocked 20 s after the sandbox was killed"
    assert isinstance(result["outcome"], SandboxException), result
    assert result["elapsed"] < 15


def test_big_file_roundtrip(sandbox):
    data = os.urandom(16 * 1024 * 1024)
    sandbox.files.write("/tmp/big.bin", data)
    got = bytes(sandbox.files.read("/tmp/big.bin", format="bytes"))
    assert len(got) == len(data)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    r = sandbox.commands.run("sha256sum /tmp/big.bin")
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_octet_stream_upload(sandbox):
    data = bytes(range(256)) * 100
    sandbox.files.write("/tmp/o.bin", data, use_octet_stream=True)
    assert bytes(sandbox.files.read("/tmp/o.bin", format="bytes")) == data
    # streamed from an iterator (always octet-stream)
    sandbox.files.write("/tmp/it.bin", iter([b"ab", b"", b"cd" * 1000]))
    assert bytes(sandbox.files.read("/tmp/it.bin", format="bytes")) == b"ab" + b"cd" * 1000


def test_gzip_upload(sandbox):
    data = bytes(range(256)) * 100
    sandbox.files.write("/tmp/g.bin", data, gzip=True)
    assert bytes(sandbox.files.read("/tmp/g.bin", format="bytes")) == data


def test_gzip_download(sandbox):
    data = bytes(range(256)) * 100
    sandbox.files.write("/tmp/gd.bin", data)
    assert bytes(sandbox.files.read("/tmp/gd.bin", format="bytes", gzip=True)) == data


def test_read_directory_is_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("/home/user")


def test_write_under_a_file_fails(sandbox):
    sandbox.files.write("/tmp/plain", "x")
    with pytest.raises(SandboxException):
        sandbox.files.write("/tmp/plain/child.txt", "y")
    assert sandbox.files.read("/tmp/plain") == "x"


def test_commands_connect_to_background_process(sandbox):
    h = sandbox.commands.run("sleep 1; echo late; exit 4", background=True)
    again = sandbox.commands.connect(h.pid)
    with pytest.raises(CommandExitException) as ei:
        again.wait()
    assert ei.value.exit_code == 4
    assert ei.value.stdout == "late\n"


def test_concurrent_commands_in_one_sandbox(sandbox):
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        outs = list(ex.map(lambda i: sandbox.commands.run(f"sleep 0.3; echo {i}").stdout, range(6)))
    assert outs == [f"{i}\n" for i in range(6)]


def test_watch_dir(sandbox):
    sandbox.files.make_dir("/home/user/w")
    handle = sandbox.files.watch_dir("/home/user/w")
    try:
        sandbox.files.write("/home/user/w/new.txt", "hello")
        sandbox.commands.run("rm /home/user/w/new.txt")
        events = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            events += handle.get_new_events()
            if any(e.type == FilesystemEventType.REMOVE for e in events):
                break
            time.sleep(0.1)
        names_types = {(e.name, e.type) for e in events}
        assert ("new.txt", FilesystemEventType.CREATE) in names_types, events
        assert ("new.txt", FilesystemEventType.WRITE) in names_types, events
        assert ("new.txt", FilesystemEventType.REMOVE) in names_types, events
    finally:
        handle.stop()


def test_pty(sandbox):
    h = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sandbox.pty.send_stdin(h.pid, b"echo pty-$((6*7)); stty size; exit 0\n")
    chunks = []
    h.wait(on_pty=chunks.append)
    out = b"".join(chunks).decode(errors="replace")
    assert "pty-42" in out
    assert "30 100" in out


def test_parallel_creates(daemon):
    def make(_):
        s = Sandbox.create(timeout=60)
        daemon.register(s.sandbox_id)
        return s

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        sbxs = list(ex.map(make, range(8)))
    try:
        assert len({s.sandbox_id for s in sbxs}) == 8
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(lambda s: s.commands.run("hostname").stdout, sbxs))
        assert outs == [s.sandbox_id + "\n" for s in sbxs]
        ips = [s.commands.run("hostname -I").stdout.split()[0] for s in sbxs]
        assert len(set(ips)) == 8, ips
    finally:
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            assert list(ex.map(lambda s: s.kill(), sbxs)) == [True] * 8


def test_idempotency_key_returns_the_same_sandbox(daemon):
    key = "pytest-" + os.urandom(8).hex()
    a = Sandbox.create(timeout=60, idempotency_key=key)
    daemon.register(a.sandbox_id)
    try:
        b = Sandbox.create(timeout=60, idempotency_key=key)
        daemon.register(b.sandbox_id)
        if b.sandbox_id != a.sandbox_id:
            Sandbox.kill(b.sandbox_id)
        assert b.sandbox_id == a.sandbox_id
    finally:
        Sandbox.kill(a.sandbox_id)


def test_paused_sandbox_does_not_expire(new_sandbox):
    sbx = new_sandbox(timeout=3)
    sbx.files.write("/tmp/x", "still here")
    assert sbx.pause() is True
    time.sleep(4)
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    again = Sandbox.connect(sbx.sandbox_id, timeout=60)
    assert again.files.read("/tmp/x") == "still here"
    end = again.get_info().end_at
    assert timedelta(seconds=55) <= end - datetime.now(timezone.utc) <= timedelta(seconds=62)


def test_commands_after_timeout_kill_raise_not_running(new_sandbox):
    sbx = new_sandbox(timeout=1)
    time.sleep(2.5)
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("echo x")
    with pytest.raises(SandboxNotRunningException):
        sbx.files.read("/etc/hostname")
