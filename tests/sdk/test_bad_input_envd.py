"""Bad input aimed at a running sandbox: envd's Connect RPC and file API, and the router's
sandbox addressing. Each gets a clear Connect or HTTP error, envd and the daemon keep serving, and
envd holds no more processes, watchers or file descriptors afterwards than before."""

import glob
import os
import struct

import pytest
from e2b import InvalidArgumentException, NotFoundException, SandboxException

from warren_helpers import SANDBOX_DOMAIN, wait_until

ENVD = "49983"


class Envd:
    """Raw HTTP to one sandbox's envd through the router."""

    def __init__(self, daemon, sandbox):
        self.daemon = daemon
        self.sid = sandbox.sandbox_id
        token = daemon.request("GET", f"/sandboxes/{self.sid}").json()["envdAccessToken"]
        self.headers = {"E2b-Sandbox-Id": self.sid, "E2b-Sandbox-Port": ENVD, "X-Access-Token": token}

    def post(self, path, raw, content_type="application/json", **extra):
        return self.daemon.request(
            "POST", path, raw=raw, api_key=None, headers={**self.headers, "Content-Type": content_type, **extra}
        )

    def get(self, path):
        return self.daemon.request("GET", path, api_key=None, headers=self.headers)

    def stream(self, path, raw):
        return self.post(path, raw, content_type="application/connect+json")


def envelope(payload: bytes, flags: int = 0, length=None) -> bytes:
    return struct.pack(">BI", flags, len(payload) if length is None else length) + payload


def end_of_stream_error(body: bytes) -> dict:
    """The Connect end-of-stream message (flag 0x02) of a streaming response, as JSON."""
    import json

    at = 0
    while at + 5 <= len(body):
        flags, n = struct.unpack(">BI", body[at : at + 5])
        msg = body[at + 5 : at + 5 + n]
        at += 5 + n
        if flags & 0x02:
            return json.loads(msg or b"{}").get("error", {})
    raise AssertionError(f"no end-of-stream message in {body!r}")


def envd_host_pid(daemon, sandbox):
    """The host pid of the sandbox's envd (its pid 1): the first process of its cgroup whose
    innermost pid is 1."""
    for procs in glob.glob(f"/sys/fs/cgroup/*/{daemon.cgroup_name}/{sandbox.sandbox_id}/cgroup.procs"):
        for pid in open(procs).read().split():
            status = open(f"/proc/{pid}/status").read()
            nspid = next(l for l in status.splitlines() if l.startswith("NSpid:")).split()
            if nspid[-1] == "1":
                return int(pid)
    raise AssertionError("no envd found for " + sandbox.sandbox_id)


def envd_census(daemon, sandbox):
    """What envd holds, read from the host (envd is not dumpable, so root in the sandbox cannot
    look): open fds other than sockets (its pooled HTTP connections come and go with the
    router's), anon inodes among them (inotify, eventfd, pidfd), and its child processes."""
    pid = envd_host_pid(daemon, sandbox)
    kinds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed while we looked
        kind = target.split(":")[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    return sum(n for k, n in kinds.items() if k != "socket"), kinds.get("anon_inode", 0), len(children)


@pytest.fixture
def envd(daemon, sandbox):
    sandbox.commands.run("true")  # envd's lazily made state (reaper, pidfds) exists from here
    before = envd_census(daemon, sandbox)
    yield Envd(daemon, sandbox)
    assert sandbox.commands.run("echo alive").stdout == "alive\n"
    assert wait_until(lambda: envd_census(daemon, sandbox) == before, 5), (
        "envd leaked fds, watchers or processes",
        before,
        envd_census(daemon, sandbox),
    )


# ---- Connect RPC -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # no envelope at all
        b"\x00\x00\x00",  # a truncated envelope header
        envelope(b'{"process":{"cmd":"/bin/true"}}', length=1000),  # shorter than it says
        envelope(b"{not json"),
        envelope(b'{"process":{"cmd":7}}'),  # wrongly typed field
        envelope(b'{"process":{"cmd":"/bin/true"}}', flags=0x01),  # compressed, never negotiated
    ],
    ids=["empty", "truncated-header", "truncated-payload", "not-json", "wrong-type", "compressed-flag"],
)
def test_malformed_connect_envelopes(envd, raw):
    r = envd.stream("/process.Process/Start", raw)
    if r.status == 200:
        err = end_of_stream_error(r.body)
    else:
        err = r.json()
    assert err["code"] in ("invalid_argument", "unimplemented", "internal"), (r.status, r.body)
    assert err["message"], (r.status, r.body)


def test_oversized_frame_is_refused_without_reading_it(envd):
    # An envelope announcing 1 GiB: refused on the header, before any body arrives.
    r = envd.stream("/process.Process/Start", envelope(b"{}", length=1 << 30))
    err = end_of_stream_error(r.body) if r.status == 200 else r.json()
    assert err["code"] == "resource_exhausted", (r.status, r.body)
    assert "larger than" in err["message"]


def test_oversized_unary_body_is_refused(envd):
    r = envd.post("/process.Process/List", b"{" + b" " * (17 << 20) + b"}")
    assert r.status in (413, 429, 400), (r.status, r.body[:200])
    assert r.json()["code"] == "resource_exhausted"


@pytest.mark.parametrize(
    "path", ["/process.Process/Nope", "/filesystem.Filesystem/Teleport", "/nosuch.Service/Start"]
)
def test_unknown_rpc_methods(envd, path):
    r = envd.post(path, b"{}")
    assert r.status in (404, 501), (r.status, r.body)
    assert r.json()["code"] in ("unimplemented", "not_found")


def test_unknown_pids(envd, sandbox):
    assert sandbox.commands.kill(999_999) is False
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999_999)
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(999_999, "x")
    r = envd.post("/process.Process/SendSignal", b'{"process":{"pid":999999},"signal":"SIGNAL_SIGKILL"}')
    assert (r.status, r.json()["code"]) == (404, "not_found")


def test_signals_to_pid_1_do_not_reach_envd(envd, sandbox):
    # pid 1 is envd itself, not a process envd started: it is not addressable.
    assert sandbox.commands.kill(1) is False
    for sig in ("SIGNAL_SIGKILL", "SIGNAL_SIGTERM"):
        r = envd.post("/process.Process/SendSignal", b'{"process":{"pid":1},"signal":"%s"}' % sig.encode())
        assert r.status == 404, (r.status, r.body)
    # and killing it from inside is refused by the kernel (pid 1 of its namespace ignores it)
    sandbox.commands.run("kill -9 1 || true", user="root")
    assert envd.get("/health").status == 204


# ---- files -----------------------------------------------------------------------------


def test_paths_with_nul_bytes(envd, sandbox):
    with pytest.raises((InvalidArgumentException, SandboxException)) as e:
        sandbox.files.write("/tmp/a\x00b", "x")
    assert "nul" in str(e.value).lower() or "400" in str(e.value)
    with pytest.raises((InvalidArgumentException, SandboxException)):
        sandbox.files.read("/tmp/a\x00b")
    r = envd.get("/files?path=/tmp/a%00b")
    assert r.status == 400, (r.status, r.body)
    assert r.json()["message"]
    r = envd.post("/filesystem.Filesystem/Stat", b'{"path":"/tmp/a\\u0000b"}')
    assert (r.status, r.json()["code"]) == (400, "invalid_argument"), (r.status, r.body)


def test_upload_to_a_directory_path(envd, sandbox):
    with pytest.raises(SandboxException) as e:
        sandbox.files.write("/tmp", "x")
    assert "directory" in str(e.value).lower()
    # the directory is still a directory
    assert sandbox.files.get_info("/tmp").type.value == "dir"


def test_watchers_on_missing_paths(envd, sandbox):
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir("/no/such/dir")
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir("/no/such/dir", recursive=True)
    # a file is not a directory to watch
    sandbox.files.write("/tmp/plain", "x")
    with pytest.raises((InvalidArgumentException, SandboxException)):
        sandbox.files.watch_dir("/tmp/plain")
    r = envd.post("/filesystem.Filesystem/GetWatcherEvents", b'{"watcherId":"nope"}')
    assert (r.status, r.json()["code"]) == (404, "not_found")
    r = envd.post("/filesystem.Filesystem/RemoveWatcher", b'{"watcherId":"nope"}')
    assert r.status in (200, 404), (r.status, r.body)


# ---- router addressing -----------------------------------------------------------------


@pytest.mark.parametrize("port", ["0", "65536", "70000", "-1", "99999999999999999999", "8000x"])
def test_ports_out_of_range_by_header(daemon, sandbox, port):
    r = daemon.request(
        "GET", "/", api_key=None, headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": port}
    )
    assert r.status == 400, (port, r.status, r.body)
    assert "port" in r.error_body()["message"]


@pytest.mark.parametrize("port", ["0", "65536", "70000", "99999999999999999999"])
def test_ports_out_of_range_by_host(daemon, sandbox, port):
    r = daemon.request("GET", "/", api_key=None, headers={"Host": f"{port}-{sandbox.sandbox_id}.{SANDBOX_DOMAIN}"})
    assert r.status == 400, (port, r.status, r.body)
    assert "out of range" in r.error_body()["message"]


@pytest.mark.parametrize("label", ["8000-nosuchsandbox", "49983-doesnotexist0"])
def test_host_names_that_match_no_sandbox(daemon, label):
    r = daemon.request("GET", "/health", api_key=None, headers={"Host": f"{label}.{SANDBOX_DOMAIN}:1234"})
    assert r.status == 502, (r.status, r.body)
    assert "was not found" in r.error_body()["message"]
    assert r.headers.get("should-retry") == "false"


def test_host_name_with_a_bad_sandbox_id(daemon):
    r = daemon.request("GET", "/", api_key=None, headers={"Host": f"8000-Not_An.Id.{SANDBOX_DOMAIN}"})
    assert r.status == 400, (r.status, r.body)
    r.error_body()


def test_get_host_routes_through_the_router(daemon, sandbox):
    host = sandbox.get_host(8000)
    assert host == f"8000-{sandbox.sandbox_id}.{SANDBOX_DOMAIN}"
    sandbox.commands.run("echo served > /tmp/index.html && cd /tmp && python3 -m http.server 8000", background=True)
    from warren_helpers import wait_until

    def fetch():
        return daemon.request("GET", "/index.html", api_key=None, headers={"Host": host})

    assert wait_until(lambda: fetch().status == 200, 10)
    assert fetch().body == b"served\n"
    # other names under the domain stay the API's
    r = daemon.request("GET", "/health", api_key=None, headers={"Host": f"api.{SANDBOX_DOMAIN}"})
    assert r.status == 200
