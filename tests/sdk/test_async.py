"""The same protocol through AsyncSandbox."""

import asyncio

import pytest
from e2b import AsyncSandbox, CommandExitException, SandboxQuery, SandboxState
from e2b.exceptions import FileNotFoundException, SandboxNotFoundException

pytestmark = pytest.mark.asyncio


async def _create(daemon, **kw):
    kw.setdefault("timeout", 120)
    sbx = await AsyncSandbox.create(**kw)
    daemon.register(sbx.sandbox_id)
    return sbx


async def test_async_run_files_kill(daemon):
    sbx = await _create(daemon, envs={"A": "1"})
    try:
        r = await sbx.commands.run("echo hi $A")
        assert (r.stdout, r.stderr, r.exit_code) == ("hi 1\n", "", 0)
        with pytest.raises(CommandExitException) as ei:
            await sbx.commands.run("echo bad >&2; exit 7")
        assert (ei.value.exit_code, ei.value.stderr) == (7, "bad\n")
        assert (await sbx.commands.run("id -un", user="root")).stdout == "root\n"
        assert (await sbx.commands.run("pwd", cwd="/tmp")).stdout == "/tmp\n"

        data = bytes(range(256))
        info = await sbx.files.write("a/b.bin", data)
        assert info.path == "/home/user/a/b.bin"
        assert bytes(await sbx.files.read("a/b.bin", format="bytes")) == data
        assert await sbx.files.exists("/home/user/a/b.bin") is True
        assert [e.name for e in await sbx.files.list("/home/user/a")] == ["b.bin"]
        with pytest.raises(FileNotFoundException):
            await sbx.files.read("/nope")
    finally:
        assert await sbx.kill() is True
    assert await sbx.is_running() is False
    assert await AsyncSandbox.kill(sbx.sandbox_id) is False


async def test_async_concurrent_sandboxes(daemon):
    sbxs = await asyncio.gather(*(_create(daemon) for _ in range(3)))
    try:
        assert len({s.sandbox_id for s in sbxs}) == 3
        outs = await asyncio.gather(*(s.commands.run("hostname") for s in sbxs))
        assert [o.stdout for o in outs] == [s.sandbox_id + "\n" for s in sbxs]
        # each writes the same path; each reads back its own
        await asyncio.gather(*(s.files.write("/tmp/who", s.sandbox_id) for s in sbxs))
        got = await asyncio.gather(*(s.files.read("/tmp/who") for s in sbxs))
        assert got == [s.sandbox_id for s in sbxs]
    finally:
        assert await asyncio.gather(*(s.kill() for s in sbxs)) == [True, True, True]


async def test_async_pause_connect_and_list(daemon):
    sbx = await _create(daemon, metadata={"async": "yes"})
    try:
        h = await sbx.commands.run("sleep 600", background=True)
        await sbx.files.write("/tmp/p.txt", "paused")
        assert await sbx.pause() is True
        assert await sbx.is_running() is False
        assert (await sbx.get_info()).state == SandboxState.PAUSED
        listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"async": "yes"})).next_items()
        assert [(s.sandbox_id, s.state) for s in listed] == [(sbx.sandbox_id, SandboxState.PAUSED)]

        again = await AsyncSandbox.connect(sbx.sandbox_id)
        assert await again.is_running() is True
        assert await again.files.read("/tmp/p.txt") == "paused"
        assert h.pid in [p.pid for p in await again.commands.list()]
    finally:
        await sbx.kill()


async def test_async_streaming_output(daemon):
    sbx = await _create(daemon)
    try:
        chunks = []
        r = await sbx.commands.run(
            "for i in 1 2 3; do echo line$i; sleep 0.05; done", on_stdout=chunks.append
        )
        assert "".join(chunks) == "line1\nline2\nline3\n"
        assert r.stdout == "line1\nline2\nline3\n"
    finally:
        await sbx.kill()


async def test_async_connect_unknown(daemon):
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.connect("doesnotexist")
