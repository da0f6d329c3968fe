"""commands.run and friends through the official SDK."""

import time

import pytest
from e2b import CommandExitException, InvalidArgumentException, Sandbox, TimeoutException

from warren_helpers import wait_until


def test_create_and_echo(sandbox):
    r = sandbox.commands.run("echo hi")
    assert r.stdout == "hi\n"
    assert r.stderr == ""
    assert r.exit_code == 0
    assert r.error is None


def test_failing_command_raises_with_exit_code_and_stderr(sandbox):
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("echo out; echo oops >&2; exit 3")
    e = ei.value
    assert e.exit_code == 3
    assert e.stdout == "out\n"
    assert e.stderr == "oops\n"


def test_stdout_and_stderr_streaming_callbacks(sandbox):
    out, err = [], []
    r = sandbox.commands.run(
        "for i in 1 2 3; do echo $i; echo e$i >&2; done",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert "".join(out) == "1\n2\n3\n"
    assert "".join(err) == "e1\ne2\ne3\n"
    assert r.stdout == "1\n2\n3\n"
    assert r.stderr == "e1\ne2\ne3\n"


def test_binary_and_large_output(sandbox):
    r = sandbox.commands.run("head -c 300000 /dev/zero | tr '\\0' 'a'; echo")
    assert r.stdout == "a" * 300000 + "\n"


def test_envs_at_create_and_per_command(new_sandbox):
    sbx = new_sandbox(envs={"SBX_VAR": "from-create", "OVR": "sandbox"})
    assert sbx.commands.run("echo $SBX_VAR").stdout == "from-create\n"
    assert sbx.commands.run("echo $CMD_VAR", envs={"CMD_VAR": "per-cmd"}).stdout == "per-cmd\n"
    # per-command value wins over the sandbox-wide one, for that command only
    assert sbx.commands.run("echo $OVR", envs={"OVR": "command"}).stdout == "command\n"
    assert sbx.commands.run("echo $OVR").stdout == "sandbox\n"
    assert sbx.commands.run("echo ${CMD_VAR:-unset}").stdout == "unset\n"
    # sandbox env vars reach root's processes too
    assert sbx.commands.run("echo $SBX_VAR", user="root").stdout == "from-create\n"


def test_env_value_with_spaces_and_quotes(sandbox):
    v = "a b 'c' \"d\" $e"
    r = sandbox.commands.run('printf %s "$V"', envs={"V": v})
    assert r.stdout == v


def test_cwd(sandbox):
    assert sandbox.commands.run("pwd").stdout == "/home/user\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sandbox.commands.run("pwd", cwd="/").stdout == "/\n"


def test_cwd_that_does_not_exist_fails(sandbox):
    # upstream envd answers invalid_argument "cwd '/does/not/exist' does not exist"
    with pytest.raises(InvalidArgumentException) as ei:
        sandbox.commands.run("pwd", cwd="/does/not/exist")
    assert "/does/not/exist" in str(ei.value)


def test_default_user_and_root(sandbox):
    assert sandbox.commands.run("id -un").stdout == "user\n"
    assert sandbox.commands.run("id -u").stdout == "1000\n"
    assert sandbox.commands.run("echo $HOME").stdout == "/home/user\n"
    assert sandbox.commands.run("id -un", user="root").stdout == "root\n"
    assert sandbox.commands.run("id -u", user="root").stdout == "0\n"
    assert sandbox.commands.run("pwd", user="root").stdout == "/root\n"


def test_hostname_is_sandbox_id(sandbox):
    assert sandbox.commands.run("hostname").stdout == sandbox.sandbox_id + "\n"


def test_background_process_list_and_kill(sandbox):
    h = sandbox.commands.run("sleep 600", background=True)
    assert isinstance(h.pid, int) and h.pid > 0
    procs = {p.pid: p for p in sandbox.commands.list()}
    assert h.pid in procs
    assert procs[h.pid].cmd == "/bin/bash"
    assert procs[h.pid].args == ["-l", "-c", "sleep 600"]
    assert sandbox.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    # like upstream envd (Go ProcessState.ExitCode()): a signalled process reports -1
    assert ei.value.exit_code == -1
    assert ei.value.error == "signal: killed"
    assert h.pid not in {p.pid for p in sandbox.commands.list()}
    assert sandbox.commands.kill(h.pid) is False


def test_background_output_and_wait(sandbox):
    h = sandbox.commands.run("sleep 0.3; echo done", background=True)
    r = h.wait()
    assert r.stdout == "done\n"
    assert r.exit_code == 0


def test_stdin(sandbox):
    h = sandbox.commands.run("read line; echo got:$line", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "hello\n")
    r = h.wait()
    assert r.stdout == "got:hello\n"


def test_command_timeout(sandbox):
    t = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30 && echo late > /tmp/late", timeout=1)
    assert time.monotonic() - t < 10
    # As on E2B, the command's deadline ends the command itself, not only the client's wait.
    assert wait_until(lambda: "sleep 30" not in sandbox.commands.run("ps -eo args").stdout, 5)
    assert not sandbox.files.exists("/tmp/late")


def test_timeout_zero_outlives_the_default_deadline(sandbox):
    h = sandbox.commands.run("sleep 300", background=True, timeout=0)
    short = sandbox.commands.run("sleep 300", background=True, timeout=1)
    time.sleep(2)
    pids = [p.pid for p in sandbox.commands.list()]
    assert h.pid in pids and short.pid not in pids
    h.kill()


def test_context_manager_kills(daemon):
    with Sandbox.create(timeout=60) as sbx:
        daemon.register(sbx.sandbox_id)
        assert sbx.commands.run("echo in").stdout == "in\n"
    assert sbx.sandbox_id not in daemon.list_ids()


def test_stdin_is_closed_by_default(sandbox):
    # without stdin=True a reader sees EOF at once instead of hanging
    t = time.monotonic()
    r = sandbox.commands.run("cat; echo eof", timeout=10)
    assert r.stdout == "eof\n"
    assert time.monotonic() - t < 5


def test_multibyte_character_split_across_writes(sandbox):
    r = sandbox.commands.run("printf '\\342\\202'; sleep 0.2; printf '\\254\\n'")
    assert r.stdout == "\u20ac\n"


def test_orphans_are_reaped(sandbox):
    for _ in range(3):
        sandbox.commands.run("for i in $(seq 20); do (sleep 0.05 &) ; done; true")
    time.sleep(0.5)
    r = sandbox.commands.run("ps -eo stat= | grep -c '^Z' || true")
    assert r.stdout == "0\n"


def test_memory_limit_is_enforced(sandbox):
    info = sandbox.get_info()
    assert (info.cpu_count, info.memory_mb) == (2, 512)
    ok = sandbox.commands.run("python3 -c \"b = b'x' * (100 << 20); print(len(b) >> 20)\"")
    assert ok.stdout == "100\n"
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("python3 -c \"b = b'x' * (700 << 20); print('survived')\"")
    assert "survived" not in ei.value.stdout
    assert sandbox.commands.run("echo alive").stdout == "alive\n"


def test_list_shows_process_config(sandbox):
    h = sandbox.commands.run("sleep 300", background=True, envs={"TAGGED": "yes"}, cwd="/tmp")
    try:
        [p] = [p for p in sandbox.commands.list() if p.pid == h.pid]
        assert p.cmd == "/bin/bash"
        assert p.args == ["-l", "-c", "sleep 300"]
        assert p.envs.get("TAGGED") == "yes"
        assert p.cwd == "/tmp"
    finally:
        sandbox.commands.kill(h.pid)


def test_login_shell_path_for_root_and_user(sandbox):
    # Commands run in a login shell (bash -l): /etc/profile sets PATH by user, as on Debian.
    root = sandbox.commands.run("echo $PATH", user="root").stdout.strip().split(":")
    user = sandbox.commands.run("echo $PATH", user="user").stdout.strip().split(":")
    assert root[:2] == ["/usr/local/sbin", "/usr/local/bin"] and "/usr/sbin" in root, root
    assert "/usr/sbin" not in user and "/usr/bin" in user, user
    # sh (dash) has no $EUID: the profile still works there.
    out = sandbox.commands.run("sh -lc 'echo $PATH'", user="root").stdout
    assert out.startswith("/usr/local/sbin:"), out
