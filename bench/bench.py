"""Warren's benchmark: latency of the sandbox lifecycle against a live daemon, and of the OCI
runtimes installed on the same machine (crun, runc, runsc) on the same root filesystem, in one run.

Run through bench/run.sh, which builds the release binaries and starts the daemon. Prints a table
of p50/p99 and writes the figures as JSON (--json).
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def pct(samples, p):
    s = sorted(samples)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Api:
    def __init__(self, host, port, key):
        self.conn = http.client.HTTPConnection(host, port)
        self.key = key

    def call(self, method, path, body=None, headers=None):
        h = {"X-API-Key": self.key}
        if body is not None:
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
        r = self.conn.getresponse()
        data = r.read()
        return r.status, data


def api_json(url, key, method, path, body=None):
    """One REST call on its own connection (safe from many threads, unlike an `Api`): the parsed
    JSON answer, or an exception on any non-2xx status."""
    import urllib.request

    req = urllib.request.Request(
        url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"X-API-KEY": key, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        data = r.read()
        return json.loads(data) if data else None


def rss_bytes(pid):
    """Resident memory of a process (the daemon), from /proc."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def ms(t0):
    return (time.perf_counter() - t0) * 1000


def bench_warren(api, n):
    create_health, pause, resume = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        st, body = api.call("POST", "/v2/sandboxes", {"templateID": "base", "metadata": {}, "envVars": {}})
        assert st == 201, (st, body)
        sbx = json.loads(body)
        sid = sbx["sandboxID"]
        st, _ = api.call("GET", "/health", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})
        create_health.append(ms(t0))
        assert st == 204, st
        t0 = time.perf_counter()
        st, body = api.call("POST", f"/sandboxes/{sid}/pause", {})
        pause.append(ms(t0))
        assert st == 204, (st, body)
        t0 = time.perf_counter()
        st, body = api.call("POST", f"/v2/sandboxes/{sid}/connect", {"timeout": 60})
        resume.append(ms(t0))
        assert st in (200, 201), (st, body)
        st, _ = api.call("DELETE", f"/sandboxes/{sid}")
        assert st == 204
    return {"create until envd /health": create_health, "pause": pause, "resume": resume}


def bench_sdk(url, key, n):
    from e2b import Sandbox

    samples = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        s = Sandbox.create(api_url=url, sandbox_url=url, api_key=key)
        out = s.commands.run("echo hi")
        took = ms(t0)
        assert out.stdout == "hi\n"
        s.kill()
        samples.append(took)
    # The first call pays the SDK's imports and connection set-up.
    return {"SDK create + first echo": samples[1:]}


def make_bundle(root, rootfs_layer, netns=True):
    """An OCI bundle whose rootfs is the base template's layer with the host /usr bound read-only,
    the same filesystem a Warren sandbox of the base template sees."""
    bundle = os.path.join(root, "bundle")
    os.makedirs(bundle)
    spec = subprocess.run(["crun", "spec", "--rootless"] if False else ["crun", "spec"], cwd=bundle, check=True)
    del spec
    cfg_path = os.path.join(bundle, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["root"] = {"path": rootfs_layer, "readonly": True}
    cfg["process"]["args"] = ["/bin/true"]
    cfg["process"]["terminal"] = False
    cfg["mounts"].append({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]})
    if not netns:
        cfg["linux"]["namespaces"] = [x for x in cfg["linux"]["namespaces"] if x["type"] != "network"]
    json.dump(cfg, open(cfg_path, "w"))
    return bundle


def bench_oci(rootfs_layer, n):
    results = {}
    tmp = tempfile.mkdtemp(prefix="warren-bench-oci-")
    try:
        bundle = make_bundle(tmp, rootfs_layer)
        for name, argv in [
            ("crun run (/bin/true)", ["crun", "run", "-b", bundle]),
            ("runc run (/bin/true)", ["runc", "run", "-b", bundle]),
            ("runsc run (/bin/true)", ["runsc", "--network=none", "--platform=ptrace", "run", "-bundle", bundle]),
        ]:
            if shutil.which(argv[0]) is None:
                print(f"  {argv[0]} not installed: skipped", file=sys.stderr)
                continue
            samples = []
            count = n if argv[0] != "runsc" else max(5, n // 5)
            failed = None
            for i in range(count):
                cid = f"wb{os.getpid()}{i}"
                t0 = time.perf_counter()
                r = subprocess.run(argv + [cid], capture_output=True)
                took = ms(t0)
                if r.returncode != 0:
                    failed = r.stderr.decode(errors="replace").strip()[:300]
                    break
                samples.append(took)
            if failed:
                print(f"  {argv[0]} failed: {failed}", file=sys.stderr)
                continue
            results[name] = samples
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--rootfs", required=True, help="the base template's lower layer")
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--json")
    ap.add_argument(
        "--only-create",
        action="store_true",
        help="only the create/pause/resume loop (for comparing daemon settings, e.g. disk caps)",
    )
    a = ap.parse_args()
    host, port = a.url.split("//")[1].split(":")
    api = Api(host, int(port), a.key)

    results = {}
    # Warm-up: page cache, first-use costs.
    bench_warren(api, 3)
    results.update(bench_warren(api, a.n))
    if not a.only_create:
        results.update(bench_sdk(a.url, a.key, max(10, a.n // 2)))
        results.update(bench_oci(a.rootfs, a.n))

    print(f"\n{'operation':<32} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    summary = {}
    for name, s in results.items():
        summary[name] = {"n": len(s), "p50": pct(s, 50), "p99": pct(s, 99), "mean": statistics.mean(s)}
        print(f"{name:<32} {len(s):>4} {pct(s, 50):>8.2f} {pct(s, 99):>8.2f} {statistics.mean(s):>8.2f}")
    base = summary["create until envd /health"]["p50"]
    if a.json:
        json.dump(summary, open(a.json, "w"), indent=2)
    if a.only_create:
        return
    print("\nratios (Warren create until /health, p50, over each runtime's run of /bin/true, p50):")
    for name in [k for k in summary if "run (" in k]:
        print(f"  warren / {name.split()[0]}: {base / summary[name]['p50']:.2f}")


if __name__ == "__main__":
    main()
