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
    a = ap.parse_args()
    os.environ.update(E2B_API_URL=a.url, E2B_SANDBOX_URL=a.url, E2B_API_KEY=a.key)
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=600)
    out = {}
    try:
        out["run_true_per_s_1_client"], out["run_true_errors_1_client"] = run_rate(
            sbx.sandbox_id, 1, a.seconds
        )
        out["run_true_per_s_16_clients"], out["run_true_errors_16_clients"] = run_rate(
            sbx.sandbox_id, 16, a.seconds
        )
        u = urllib.parse.urlparse(a.url)
        info = http.client.HTTPConnection(u.hostname, u.port)
        info.request("GET", f"/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": a.key})
        token = json.loads(info.getresponse().read())["envdAccessToken"]
        w, r = files_throughput(a.url, sbx.sandbox_id, token, a.mib)
        out["files_write_mib_s"], out["files_read_mib_s"] = w, r

        sbx.commands.run(f"python3 -c '{SERVER}' >/dev/null 2>&1", background=True)
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
    for k, v in out.items():
        print(f"{k:32} {v:10.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
