"""Issue 3 figures against a running daemon (bench/run.sh starts one and calls this):

- `commands.run("true")` round trips per second through the router, 1 client and 16 clients;
- 100 MiB written and read through envd's `/files` (octet-stream upload, streamed download);
- proxy overhead: HTTP GET to a keep-alive server inside the sandbox, via the router vs directly
  to the sandbox's address, p50 and p99.

    python3 bench/parity.py --url http://127.0.0.1:PORT --key KEY [--json out.json]
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import statistics
import time
import urllib.parse

SERVER = r"""
import http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        super().setup()
        # Headers and body leave in two writes: without this, Nagle + delayed ACK add 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run_rate(sbx_id, clients, seconds):
    from e2b import Sandbox

    last_error = [None]

    def worker(_):
        s = Sandbox.connect(sbx_id)
        n, errors, end = 0, 0, time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                s.commands.run("true")
                n += 1
            except Exception as e:  # noqa: BLE001 - counted and reported, not hidden
                errors += 1
                last_error[0] = repr(e)[:200]
        return n, errors

    s = Sandbox.connect(sbx_id)
    for _ in range(20):
        s.commands.run("true")  # warm connections
    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(worker, range(clients)))
    total, errors = sum(r[0] for r in results), sum(r[1] for r in results)
    if errors:
        print(f"{clients} clients: {errors} failed calls, last: {last_error[0]}")
    return total / (time.monotonic() - t), errors


WRK_SCRIPT = """
local payload = '{"process":{"cmd":"/bin/bash","args":["-l","-c","true"],"envs":{}},"stdin":false}'
local n = #payload
wrk.method = "POST"
wrk.body = string.char(0, 0, math.floor(n/65536)%256, math.floor(n/256)%256, n%256) .. payload
wrk.headers["Content-Type"] = "application/connect+json"
wrk.headers["Connect-Protocol-Version"] = "1"
wrk.headers["E2b-Sandbox-Id"] = "SANDBOX_ID"
wrk.headers["E2b-Sandbox-Port"] = "49983"
wrk.headers["X-Access-Token"] = "ACCESS_TOKEN"
"""


def wrk_rate(url, sbx_id, token, connections, seconds):
    """The same Start request the SDK sends for commands.run("true") (bash -l -c true), from
    wrk: a C client whose own CPU cost is small, so the figure is what the daemon, envd and bash
    can do on this machine. Also returns the CPU time the sandbox (envd + bash) and the daemon
    spent per command."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT.replace("SANDBOX_ID", sbx_id).replace("ACCESS_TOKEN", token))
    threads = min(2, connections)
    cg = next(
        (os.path.join(root, sbx_id, "cpuacct.usage") for root in
         [f"/sys/fs/cgroup/cpuacct/{d}" for d in os.listdir("/sys/fs/cgroup/cpuacct") if d.startswith("warren-")]
         if os.path.exists(os.path.join(root, sbx_id))),
        None,
    )
    found = subprocess.run(["pgrep", "-f", "--", f"--listen {urllib.parse.urlparse(url).netloc}"],
                           capture_output=True, text=True).stdout.split()
    daemon_pid = int(found[0]) if found else None

    def cpu():
        sb = int(open(cg).read()) / 1e9 if cg else 0.0
        if daemon_pid is None:
            return sb, 0.0
        fields = open(f"/proc/{daemon_pid}/stat").read().rsplit(")", 1)[1].split()
        return sb, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    sb0, d0 = cpu()
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "-s", f.name, f"{url}/process.Process/Start"],
        capture_output=True, text=True, check=True,
    ).stdout
    sb1, d1 = cpu()
    os.unlink(f.name)
    rate = float(next(l for l in out.splitlines() if l.startswith("Requests/sec:")).split()[1])
    total = int(next(l for l in out.splitlines() if "requests in" in l).split()[0])
    errors = sum(int(x) for l in out.splitlines() if l.startswith("  Non-2xx") for x in l.split()[-1:])
    return rate, errors, (sb1 - sb0) / total * 1e3, (d1 - d0) / total * 1e3


def js_rate(sbx_id, clients, seconds):
    """commands.run("true") with the official JS SDK: `clients` concurrent callers in one Node process."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        ["node", os.path.join(here, "js", "cmdrate.mjs"), sbx_id, str(clients), str(seconds)],
        capture_output=True, text=True, check=True, cwd=os.path.join(here, "js"),
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["rate"], r["errors"]


def files_throughput(url, sbx_id, token, mib):
    u = urllib.parse.urlparse(url)
    headers = {
        "E2b-Sandbox-Id": sbx_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": token,
    }
    chunk = os.urandom(1 << 20)

    def body():
        for _ in range(mib):
            yield chunk

    c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    t = time.monotonic()
    c.request(
        "POST",
        "/files?path=/tmp/bench.bin&username=root",
        body=body(),
        headers={**headers, "Content-Type": "application/octet-stream"},
        encode_chunked=True,
    )
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
    write = mib / (time.monotonic() - t)
    t = time.monotonic()
    c.request("GET", "/files?path=/tmp/bench.bin&username=root", headers=headers)
    r = c.getresponse()
    got = 0
    while True:
        b = r.read(1 << 20)
        if not b:
            break
        got += len(b)
    assert got == mib << 20, got
    read = mib / (time.monotonic() - t)
    return write, read


def get_latencies(host, port, headers, n):
    c = http.client.HTTPConnection(host, port, timeout=10)
    out = []
    for i in range(n + 50):
        t = time.perf_counter()
        c.request("GET", "/", headers=headers)
        r = c.getresponse()
        r.read()
        assert r.status == 200, r.status
        if i >= 50:
            out.append((time.perf_counter() - t) * 1e6)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--json")
    ap.add_argument("--no-js", action="store_true", help="skip the JS SDK rate")
    ap.add_argument("--only-rate", action="store_true", help="only the wrk command rate")
    ap.add_argument("--conns", default="1,16", help="wrk connection counts, comma-separated")
    a = ap.parse_args()
    os.environ.update(E2B_API_URL=a.url, E2B_SANDBOX_URL=a.url, E2B_API_KEY=a.key)
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=600)
    out = {}
    try:
        u = urllib.parse.urlparse(a.url)
        info = http.client.HTTPConnection(u.hostname, u.port)
        info.request("GET", f"/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": a.key})
        token = json.loads(info.getresponse().read())["envdAccessToken"]
        for c in (int(x) for x in a.conns.split(",")):
            rate, errors, sb_ms, d_ms = wrk_rate(a.url, sbx.sandbox_id, token, c, a.seconds)
            out[f"run_true_per_s_wrk_{c}_conn"] = rate
            out[f"run_true_errors_wrk_{c}_conn"] = errors
            out[f"run_true_cpu_ms_sandbox_wrk_{c}_conn"] = sb_ms
            out[f"run_true_cpu_ms_daemon_wrk_{c}_conn"] = d_ms
        if a.only_rate:
            return report(out, a.json)
        out["run_true_per_s_1_client"], out["run_true_errors_1_client"] = run_rate(
            sbx.sandbox_id, 1, a.seconds
        )
        out["run_true_per_s_16_clients"], out["run_true_errors_16_clients"] = run_rate(
            sbx.sandbox_id, 16, a.seconds
        )
        if not a.no_js:
            for c in (1, 16):
                out[f"run_true_per_s_js_{c}_clients"], out[f"run_true_errors_js_{c}_clients"] = js_rate(
                    sbx.sandbox_id, c, a.seconds
                )
        w, r = files_throughput(a.url, sbx.sandbox_id, token, a.mib)
        out["files_write_mib_s"], out["files_read_mib_s"] = w, r

        sbx.commands.run(f"python3 -c '{SERVER}' >/dev/null 2>&1", background=True, timeout=0)
        ip = sbx.commands.run("hostname -I").stdout.split()[0]
        time.sleep(0.5)
        via = get_latencies(
            u.hostname, u.port, {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}, a.n
        )
        direct = get_latencies(ip, 8000, {}, a.n)
        for name, xs in (("router", via), ("direct", direct)):
            out[f"get_{name}_p50_us"] = pct(xs, 50)
            out[f"get_{name}_p99_us"] = pct(xs, 99)
            out[f"get_{name}_mean_us"] = statistics.mean(xs)
    finally:
        sbx.kill()
    report(out, a.json)


def report(out, path):
    for k, v in out.items():
        print(f"{k:40} {v:10.2f}")
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
