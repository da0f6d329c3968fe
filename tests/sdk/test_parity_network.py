"""Issue 3 parity: network rules (create and update_network), private traffic, metrics, gzip and
file metadata, and the exception classes, with the sync and async SDK.

Egress tests only reach a listener in a network namespace this module creates (never a real
external address): `ip netns` + a veth pair with 10.254.<n>.1 on the host side and the listener
on 10.254.<n>.2:18080. The namespace has no route back to the sandbox subnet, so a reply only
arrives when the daemon masqueraded the sandbox's traffic.
"""

import asyncio
import http.client
import os
import subprocess
import time

import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    NotFoundException,
    Sandbox,
    SandboxException,
)
from e2b.exceptions import SandboxNotFoundException

CONNECT = (
    "python3 -c 'import socket,sys; s=socket.create_connection((sys.argv[1], 18080), timeout=2);"
    " print(s.recv(100).decode().strip())' "
)


class Outside:
    """A TCP listener in a namespace of its own that answers `hello-from-outside`."""

    def __init__(self, tag: str, octet: int):
        self.ns, self.host_if, self.peer_if = f"wpt-{tag}", f"wpt{tag}h", f"wpt{tag}p"
        self.addr = f"10.254.{octet}.2"
        self.close()
        sh = lambda c: subprocess.run(c, shell=True, check=True, capture_output=True)  # noqa: E731
        sh(f"ip netns add {self.ns}")
        sh(f"ip link add {self.host_if} type veth peer name {self.peer_if}")
        sh(f"ip link set {self.peer_if} netns {self.ns}")
        sh(f"ip addr add 10.254.{octet}.1/24 dev {self.host_if} && ip link set {self.host_if} up")
        sh(
            f"ip -n {self.ns} addr add {self.addr}/24 dev {self.peer_if} && "
            f"ip -n {self.ns} link set {self.peer_if} up && ip -n {self.ns} link set lo up"
        )
        code = (
            "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
            " s.bind(('0.0.0.0', 18080)); s.listen()\nwhile True:\n  c,_=s.accept();"
            " c.sendall(b'hello-from-outside\\n'); c.close()"
        )
        self.server = subprocess.Popen(["ip", "netns", "exec", self.ns, "python3", "-c", code])
        time.sleep(0.3)

    def close(self):
        server = getattr(self, "server", None)
        if server:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


@pytest.fixture(scope="module")
def outside():
    a, b = Outside("na", 81), Outside("nb", 82)
    yield a, b
    a.close()
    b.close()


def reaches(sbx, addr: str) -> bool:
    r = sbx.commands.run(CONNECT + addr + " 2>&1; true", timeout=15)
    return "hello-from-outside" in r.stdout


def test_network_rules_at_create_and_update_network(new_sandbox, outside):
    a, b = outside
    sbx = new_sandbox(network={"allow_out": [a.addr], "deny_out": ["0.0.0.0/0"]})
    assert reaches(sbx, a.addr), "allow_out is an exception to deny_out"
    assert not reaches(sbx, b.addr), "0.0.0.0/0 in deny_out blocks the rest"

    sbx.update_network({"deny_out": [f"{a.addr}/32"]})
    assert not reaches(sbx, a.addr) and reaches(sbx, b.addr)

    # The update replaces everything: no rules at all.
    Sandbox.update_network(sbx.sandbox_id, {})
    assert reaches(sbx, a.addr) and reaches(sbx, b.addr)

    # allow_internet_access=False with an exception.
    sbx.update_network({"allow_internet_access": False, "allow_out": [b.addr]})
    assert not reaches(sbx, a.addr) and reaches(sbx, b.addr)
    info = sbx.get_info()
    assert info.allow_internet_access is False


def test_allow_internet_access_false_at_create_blocks(new_sandbox, outside):
    a, _ = outside
    sbx = new_sandbox(allow_internet_access=False)
    assert not reaches(sbx, a.addr)
    sbx.update_network({"allow_internet_access": True})
    assert reaches(sbx, a.addr)


def test_update_network_errors(new_sandbox, daemon):
    sbx = new_sandbox()
    with pytest.raises(SandboxException) as e:
        sbx.update_network({"deny_out": ["example.com"]})
    assert "400" in str(e.value) and "allow_out" in str(e.value)
    with pytest.raises(SandboxException) as e:
        sbx.update_network({"allow_out": ["not a name!"]})
    assert "400" in str(e.value)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.update_network("nosuchsandbox", {"deny_out": ["1.2.3.4"]})
    with pytest.raises(AuthenticationException):
        Sandbox.update_network(sbx.sandbox_id, {}, api_key="wrong")


def test_rules_are_removed_with_the_sandbox(daemon, new_sandbox, outside):
    a, _ = outside
    sbx = new_sandbox(network={"deny_out": ["0.0.0.0/0"]})
    table = f"warren_{daemon.prefix}"
    chain = f"eg_{sbx.sandbox_id}"
    ruleset = lambda: subprocess.run(  # noqa: E731
        ["nft", "list", "table", "inet", table], capture_output=True, text=True
    ).stdout
    assert chain in ruleset()
    sbx.kill()
    assert chain not in ruleset()


def test_private_traffic_needs_the_traffic_token(new_sandbox, daemon):
    sbx = new_sandbox(network={"allow_public_traffic": False})
    token = sbx.traffic_access_token
    assert token
    sbx.commands.run("cd /tmp && python3 -m http.server 8000 >/dev/null 2>&1", background=True)

    def get(headers):
        h = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000", **headers}
        for _ in range(50):
            r = daemon.request("GET", "/", api_key=None, headers=h)
            if r.status != 502:
                return r
            time.sleep(0.1)
        return r

    assert get({}).status == 403
    assert get({"E2B-Traffic-Access-Token": "nope"}).status == 403
    assert get({"E2B-Traffic-Access-Token": token}).status == 200
    # envd itself is guarded by its access token, not the traffic token.
    assert sbx.commands.run("echo ok").stdout.strip() == "ok"
    # A second client gets the same token with connect.
    assert Sandbox.connect(sbx.sandbox_id).traffic_access_token == token


def test_get_metrics(new_sandbox):
    sbx = new_sandbox()
    sbx.commands.run("dd if=/dev/zero of=/home/user/blob bs=1M count=8 2>/dev/null; sync")
    metrics = sbx.get_metrics()
    assert len(metrics) >= 1
    m = metrics[-1]
    assert m.cpu_count == 2
    assert 0 <= m.cpu_used_pct <= 100
    assert m.mem_total == 512 * 1024 * 1024
    assert 0 < m.mem_used <= m.mem_total
    assert m.disk_total > 0 and m.disk_used >= 0
    assert m.timestamp is not None
    # A window that contains nothing.
    from datetime import datetime, timezone

    old = datetime(2001, 1, 1, tzinfo=timezone.utc)
    assert sbx.get_metrics(start=old, end=old) == []
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_metrics("nosuchsandbox")


def test_gzip_both_ways_and_metadata(sandbox):
    data = os.urandom(300_000) + b"z" * 300_000
    sandbox.files.write("/tmp/gz.bin", data, gzip=True)
    assert bytes(sandbox.files.read("/tmp/gz.bin", format="bytes", gzip=True)) == data
    assert bytes(sandbox.files.read("/tmp/gz.bin", format="bytes")) == data

    info = sandbox.files.write("/tmp/meta.txt", "x", metadata={"owner": "alice", "kind": "note"})
    assert info.metadata == {"owner": "alice", "kind": "note"}
    got = sandbox.files.get_info("/tmp/meta.txt")
    assert got.metadata == {"owner": "alice", "kind": "note"}


def test_gzip_corrupt_body_is_a_clear_error(sandbox, daemon):
    token = daemon.request("GET", f"/sandboxes/{sandbox.sandbox_id}").json()["envdAccessToken"]
    r = daemon.request(
        "POST",
        "/files?path=/tmp/bad.gz&username=user",
        raw=b"not gzip at all",
        api_key=None,
        headers={
            "E2b-Sandbox-Id": sandbox.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": token,
            "Content-Type": "application/octet-stream",
            "Content-Encoding": "gzip",
        },
    )
    assert r.status == 400, r.body
    r = daemon.request(
        "POST",
        "/files?path=/tmp/bad.br",
        raw=b"x",
        api_key=None,
        headers={
            "E2b-Sandbox-Id": sandbox.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": token,
            "Content-Type": "application/octet-stream",
            "Content-Encoding": "br",
        },
    )
    assert r.status == 415, r.body
    assert sandbox.commands.run("echo alive").stdout.strip() == "alive"


def test_file_not_found_maps_to_not_found_exception(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.files.read("/nope/nothing")


def test_async_network_metrics_and_traffic_token(daemon, outside):
    a, _ = outside

    async def main():
        sbx = await AsyncSandbox.create(
            timeout=120, network={"deny_out": ["0.0.0.0/0"], "allow_public_traffic": False}
        )
        daemon.register(sbx.sandbox_id)
        try:
            assert sbx.traffic_access_token
            r = await sbx.commands.run(CONNECT + a.addr + " 2>&1; true")
            assert "hello-from-outside" not in r.stdout
            await sbx.update_network({"allow_out": [a.addr]})
            r = await sbx.commands.run(CONNECT + a.addr + " 2>&1; true")
            assert "hello-from-outside" in r.stdout
            metrics = await sbx.get_metrics()
            assert metrics and metrics[0].mem_total == 512 * 1024 * 1024
            await sbx.files.write("/tmp/a.gz", b"abc" * 1000, gzip=True)
            assert bytes(await sbx.files.read("/tmp/a.gz", format="bytes", gzip=True)) == b"abc" * 1000
            with pytest.raises(SandboxNotFoundException):
                await AsyncSandbox.update_network("nosuchsandbox", {})
        finally:
            await sbx.kill()

    asyncio.run(main())
