"""Isolation, as seen through the SDK: sandboxes see neither each other nor the host."""

import os
import secrets
import socket
import subprocess

import pytest
from e2b import CommandExitException
from e2b.exceptions import FileNotFoundException


def test_sandboxes_do_not_see_each_others_files(new_sandbox):
    a, b = new_sandbox(), new_sandbox()
    secret = secrets.token_hex(16)
    for path in ("/tmp/only-in-a.txt", "/home/user/only-in-a.txt"):
        a.files.write(path, secret)
        assert a.files.read(path) == secret
        assert b.files.exists(path) is False
        with pytest.raises(FileNotFoundException):
            b.files.read(path)
        with pytest.raises(CommandExitException):
            b.commands.run(f"cat {path}")
    # nothing of A's shows up anywhere in B's writable places
    r = b.commands.run(f"grep -rl {secret} /tmp /home /root /var /run 2>/dev/null; true", user="root")
    assert r.stdout == ""


def test_sandboxes_do_not_see_each_others_processes(new_sandbox):
    a, b = new_sandbox(), new_sandbox()
    marker = "4242.{}".format(secrets.randbelow(10**6))
    a.commands.run(f"sleep {marker}", background=True)
    assert f"sleep {marker}" in a.commands.run("ps -e -o args=").stdout
    ps_b = b.commands.run("ps -e -o args=", user="root").stdout
    assert f"sleep {marker}" not in ps_b
    # B sees only its own init (envd) and the ps itself
    assert len(ps_b.splitlines()) == 2, ps_b
    assert b.commands.run("ps -e -o pid=", user="root").stdout.split()[0] == "1"
    # and nothing from B's command list belongs to A
    assert [p.args for p in b.commands.list()] == []


def test_host_shadow_is_not_readable(sandbox):
    # a relative path climbs only to the sandbox's own root: this names the sandbox's /etc/shadow
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("../../../etc/shadow")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/etc/shadow", user="root")
    with pytest.raises(CommandExitException):
        sandbox.commands.run("cat /etc/shadow")
    with pytest.raises(CommandExitException):
        sandbox.commands.run("cat /etc/shadow", user="root")
    host_shadow = open("/etc/shadow").read()
    root_line = next(line for line in host_shadow.splitlines() if line.startswith("root:"))
    r = sandbox.commands.run(
        "cat /etc/passwd /etc/group /etc/gshadow /etc/shadow- 2>/dev/null; true", user="root"
    )
    assert root_line not in r.stdout


def test_host_root_and_home_are_not_visible(sandbox):
    marker = f".warren-pytest-{secrets.token_hex(6)}"
    created = []
    try:
        for d in ("/root", "/home"):
            p = os.path.join(d, marker)
            with open(p, "w") as f:
                f.write("host secret")
            created.append(p)
        sandbox_root = sandbox.commands.run("ls -A /root", user="root").stdout.split()
        sandbox_home = sandbox.commands.run("ls -A /home", user="root").stdout.split()
        assert marker not in sandbox_root
        assert marker not in sandbox_home
        assert sandbox_home == ["user"]
        host_root = set(os.listdir("/root")) - {".bashrc", ".profile", marker}
        assert host_root.isdisjoint(sandbox_root), host_root & set(sandbox_root)
        assert sandbox.files.exists(f"/root/{marker}", user="root") is False
        assert sandbox.files.exists(f"/home/{marker}") is False
    finally:
        for p in created:
            os.unlink(p)


def test_host_data_dir_and_hostname_are_not_visible(daemon, sandbox):
    assert sandbox.files.exists(daemon.data_dir, user="root") is False
    assert sandbox.files.exists(daemon.log_path, user="root") is False
    r = sandbox.commands.run("hostname")
    assert r.stdout.strip() != socket.gethostname()


def test_sandbox_cannot_reach_another_sandbox(new_sandbox):
    a, b = new_sandbox(), new_sandbox()
    b_ip = b.commands.run("hostname -I").stdout.split()[0]
    b.commands.run("python3 -m http.server 8123 --bind 0.0.0.0", background=True)
    probe = "python3 -c \"import socket,sys; socket.create_connection((sys.argv[1], 8123), timeout=2); print('open')\" "
    # positive control: B reaches its own server
    for _ in range(40):
        try:
            if b.commands.run(probe + b_ip).stdout == "open\n":
                break
        except CommandExitException:
            pass
    else:
        pytest.fail("B's own http server never came up")
    with pytest.raises(CommandExitException):
        a.commands.run(probe + b_ip)


def test_sandbox_cannot_reach_host_services(sandbox):
    gw = sandbox.commands.run("ip route show default | awk '{print $3}'").stdout.strip()
    host_ip = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    ).stdout
    assert gw and gw in host_ip, (gw, host_ip)
    srv = socket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        # positive control: the listener is reachable on the bridge address from the host
        socket.create_connection((gw, port), timeout=2).close()
        probe = (
            "python3 -c \"import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), "
            "timeout=2); print('open')\" "
        )
        with pytest.raises(CommandExitException):
            sandbox.commands.run(f"{probe} {gw} {port}")
    finally:
        srv.close()
