"""A live `warren serve` daemon for the SDK tests, and raw-HTTP helpers to poke at it."""

from __future__ import annotations

import glob
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]

# The E2B error body: every control-plane error must be `{"code": int, "message": str}`.


@dataclass
class Response:
    status: int
    headers: Dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_body(self) -> Dict[str, Any]:
        """The body parsed as an E2B error, asserting its shape."""
        ctype = self.headers.get("content-type", "")
        assert ctype.startswith("application/json"), (self.status, ctype, self.body)
        body = self.json()
        assert isinstance(body, dict), body
        assert isinstance(body.get("code"), int) and not isinstance(body.get("code"), bool), body
        assert isinstance(body.get("message"), str) and body["message"], body
        assert body["code"] == self.status, (self.status, body)
        return body


SANDBOX_DOMAIN = "sbx.warren.test"
# The DNS server the daemon's DNS filter (domain names in allow_out) forwards to: a fake one that
# tests/sdk/test_network_domains.py runs in a network namespace of its own at this address.
DNS_UPSTREAM = "10.254.253.2"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_binary() -> Path:
    raw = os.environ.get("WARREN_BIN", "target/debug/warren")
    p = Path(raw)
    if not p.is_absolute():
        p = (Path.cwd() / raw) if (Path.cwd() / raw).exists() else (REPO_ROOT / raw)
    return p.resolve()


def derived_name_prefix(data_dir: str) -> str:
    """The `w<tag>` prefix the daemon derives from its data dir (FNV-1a, as in
    crates/runtime/src/linux/mod.rs `LinuxRuntimeConfig::derived`); its cgroup parent is
    `warren-<prefix>`."""
    h = 0xCBF29CE484222325
    for b in os.fsencode(os.path.abspath(data_dir)):
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "w" + "".join(alphabet[(h >> (i * 8)) % 36] for i in range(3))


def host_state(prefix: str) -> List[str]:
    """Host objects named after a daemon's `w<tag>` prefix: its bridge, veths, nftables tables
    and cgroup parents."""
    out = []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix):
            out.append(f"link {name}")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    for line in tables.splitlines():
        if line.strip().endswith(f" warren_{prefix}"):
            out.append(line.strip())
    out += sorted(glob.glob(f"/sys/fs/cgroup/*/warren-{prefix}") + glob.glob(f"/sys/fs/cgroup/warren-{prefix}"))
    return out


def remove_host_state(prefix: str) -> List[str]:
    """Removes what `host_state` lists (the daemon leaves it behind on purpose so that sandboxes
    survive a restart; a test daemon with a throwaway data dir must not). Returns failures."""
    failures = []
    for item in host_state(prefix):
        if item.startswith("link "):
            cmd = ["ip", "link", "del", item.split()[1]]
        elif item.startswith("table "):
            cmd = ["nft", "delete"] + item.split()
        else:
            # cgroup parent: children first (there should be none), then the parent
            for child in sorted(glob.glob(item + "/**/", recursive=True), key=len, reverse=True):
                try:
                    os.rmdir(child)
                except OSError as e:
                    failures.append(f"rmdir {child}: {e}")
            continue
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 and "No such" not in r.stderr and "Cannot find" not in r.stderr:
            failures.append(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return failures


def mounts_under(path: str) -> List[str]:
    prefix = os.path.abspath(path).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(prefix) or mp == prefix.rstrip("/"):
                out.append(mp)
    return out


@dataclass
class Daemon:
    binary: Path
    envd: Path
    port: int
    api_key: str
    data_dir: str
    log_path: str
    proc: Optional[subprocess.Popen] = None
    # Every sandbox id the tests created (through the fixtures or `register`).
    ids: set = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def prefix(self) -> str:
        return derived_name_prefix(self.data_dir)

    def veths(self) -> List[str]:
        return [x for x in host_state(self.prefix) if x.startswith("link ") and x != f"link {self.prefix}br"]

    @property
    def cgroup_name(self) -> str:
        return "warren-" + derived_name_prefix(self.data_dir)

    def register(self, sandbox_id: str) -> str:
        self.ids.add(sandbox_id)
        return sandbox_id

    def sdk_env(self) -> Dict[str, str]:
        return {
            "E2B_API_KEY": self.api_key,
            "E2B_API_URL": self.url,
            "E2B_SANDBOX_URL": self.url,
        }

    # ---- process management -------------------------------------------------------------

    def start(self) -> None:
        env = dict(os.environ)
        env.pop("WARREN_API_KEY", None)
        env["RUST_LOG"] = env.get("RUST_LOG", "info")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--data-dir",
                self.data_dir,
                "--api-key",
                self.api_key,
                # Host routing (`<port>-<id>.<domain>`) and get_host(); the SDK keeps sending envd
                # traffic to E2B_SANDBOX_URL, so nothing needs to resolve this name.
                "--domain",
                SANDBOX_DOMAIN,
                "--dns-upstream",
                DNS_UPSTREAM,
                "--envd-binary",
                str(self.envd),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"warren exited with {self.proc.returncode} during startup:\n{self.log_tail()}"
                )
            try:
                r = self.request("GET", "/health", api_key=None)
                if r.status == 200:
                    return
                last = r
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError(f"warren did not answer GET /health within 30 s ({last!r}):\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, wait; returns the exit status (SIGKILLs and raises if it hangs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"warren ignored SIGTERM for {timeout} s:\n{self.log_tail()}")
        self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError as e:
            return f"<no log: {e}>"

    # ---- raw HTTP -----------------------------------------------------------------------

    _DEFAULT = object()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: Optional[bytes] = None,
        api_key: Any = _DEFAULT,
        headers: Optional[Dict[str, str]] = None,
        timeout: float = 30,
    ) -> Response:
        h: Dict[str, str] = {}
        if api_key is Daemon._DEFAULT:
            api_key = self.api_key
        if api_key is not None:
            h["X-API-KEY"] = api_key
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def list_ids(self) -> List[str]:
        r = self.request("GET", "/v2/sandboxes")
        assert r.status == 200, (r.status, r.body)
        return sorted(s["sandboxID"] for s in r.json())

    # ---- leak checks --------------------------------------------------------------------

    def sandbox_dirs(self) -> List[str]:
        d = Path(self.data_dir) / "sandboxes"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def cgroup_leaks(self) -> List[str]:
        """Sandbox cgroups left behind: any child of this daemon's cgroup parent (v1
        controllers and the unified v2 tree), and any `warren-*/<id>` for an id we created."""
        leaks = set()
        own = glob.glob(f"/sys/fs/cgroup/*/{self.cgroup_name}") + glob.glob(
            f"/sys/fs/cgroup/{self.cgroup_name}"
        )
        for parent in own:
            for child in os.listdir(parent):
                if os.path.isdir(os.path.join(parent, child)):
                    leaks.add(os.path.join(parent, child))
        for parent in glob.glob("/sys/fs/cgroup/unified/warren-*") + glob.glob(
            "/sys/fs/cgroup/*/warren-*"
        ):
            for sid in self.ids:
                if os.path.isdir(os.path.join(parent, sid)):
                    leaks.add(os.path.join(parent, sid))
        return sorted(leaks)

    def processes_in_cgroup(self) -> List[str]:
        """Host processes still inside this daemon's cgroup parent."""
        out = []
        needle = f"/{self.cgroup_name}/"
        for status in glob.glob("/proc/[0-9]*/cgroup"):
            try:
                with open(status) as f:
                    text = f.read()
            except OSError:
                continue
            if needle in text:
                pid = status.split("/")[2]
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    cmd = "?"
                out.append(f"{pid}: {cmd}")
        return out


def new_daemon() -> Daemon:
    binary = resolve_binary()
    if not binary.is_file():
        raise RuntimeError(
            f"warren binary not found at {binary}: build it (cargo build -p warren -p warren-envd) "
            "or set WARREN_BIN"
        )
    envd = binary.parent / "warren-envd"
    if not envd.is_file():
        raise RuntimeError(f"warren-envd not found next to {binary}")
    log_fd, log_path = tempfile.mkstemp(prefix="warren-pytest-", suffix=".log")
    os.close(log_fd)
    while True:
        data_dir = tempfile.mkdtemp(prefix="warren-pytest-")
        if not host_state(derived_name_prefix(data_dir)):
            break
        os.rmdir(data_dir)  # another daemon owns these names: pick another data dir
    return Daemon(
        binary=binary,
        envd=envd,
        port=free_port(),
        api_key="wpt_" + secrets.token_hex(16),
        data_dir=data_dir,
        log_path=log_path,
    )


def start_daemon(attempts: int = 6) -> Daemon:
    """Starts a daemon on a fresh data dir. The daemon derives its /20 subnet from the data dir
    (128 slots), so it can clash with another daemon's bridge: then retry with another dir."""
    last = None
    for _ in range(attempts):
        d = new_daemon()
        try:
            d.start()
            return d
        except RuntimeError as e:
            last = e
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
            remove_host_state(derived_name_prefix(d.data_dir))
            remove_data_dir(d)
            if "overlaps" not in str(e):
                raise
    raise RuntimeError(f"no free sandbox subnet after {attempts} data dirs: {last}")


def remove_data_dir(daemon: Daemon) -> None:
    """Deletes the data dir, but never through a mount point (a leaked sandbox rootfs could
    bind host directories)."""
    if mounts_under(daemon.data_dir):
        return
    shutil.rmtree(daemon.data_dir, ignore_errors=True)


def wait_until(pred, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def sandbox_factory(daemon, sandbox_class):
    """Generator behind the `new_sandbox`-style fixtures: yields `make(**create kwargs)` for
    `sandbox_class` (the core SDK's or the code interpreter's) and kills every sandbox it made."""
    made = []

    def make(**kwargs):
        kwargs.setdefault("timeout", 120)
        sbx = sandbox_class.create(**kwargs)
        daemon.register(sbx.sandbox_id)
        made.append(sbx)
        return sbx

    yield make
    for sbx in made:
        sandbox_class.kill(sbx.sandbox_id)
    assert daemon.alive(), f"warren died during the test:\n{daemon.log_tail()}"
