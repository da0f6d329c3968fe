"""Code-interpreter figures against a live daemon (bench/run.sh starts one and calls this):

* cold: `Sandbox.create()` (template code-interpreter-v1) → first `run_code("1+1")` result, p50,
  split into the create call and the first cell (which waits for the default kernel's start);
* warm pool: the same against a ready SandboxSet of code-interpreter-v1 (the kernel was started
  before the claim);
* `run_code("1+1")` on a warm kernel, p50: server-side (an HTTP client inside the sandbox posting
  to localhost:49999/execute), raw HTTP through the router, and through the SDK; and for
  comparison the kernel alone: jupyter_client (in the template's venv, inside the sandbox) sending
  `execute_request` to an ipykernel of its own and waiting for `idle`, with IPython's on-disk
  history as ipykernel has it by default and off as the server starts its kernels;
* memory of an idle code-interpreter sandbox (its cgroup's memory.current, and the RSS of its
  processes), next to an idle base sandbox.

    python3 bench/codeinterp.py --url http://127.0.0.1:PORT --key KEY [-n N] [--json out.json]
        [--only cold,pooled,warm,memory]
"""
import argparse
import glob
import http.client
import json
import os
import time
import urllib.parse

from bench import Api, ms, pct
from pools import delete_set, put_set, wait_ready

TEMPLATE = "code-interpreter-v1"

# Runs inside the sandbox: the server's own latency, without router or SDK.
INSIDE = r"""
import http.client, json, time
c = http.client.HTTPConnection("127.0.0.1", 49999)
body = json.dumps({"code": "1+1"})
ts = []
for i in range(%d):
    t = time.perf_counter()
    c.request("POST", "/execute", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse(); data = r.read()
    ts.append((time.perf_counter() - t) * 1000)
    assert b'"text":"2"' in data, data
ts.sort()
print(json.dumps({"p50": ts[len(ts) // 2], "p99": ts[int(len(ts) * 0.99)]}))
"""


# Runs inside the sandbox with the template's Python: the kernel alone, no server.
KERNEL_ALONE = r"""
import json, sys, time
from jupyter_client.manager import KernelManager

def start(extra):
    km = KernelManager(kernel_name="python3")
    km.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"] + extra
    km.start_kernel()
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
    return km, kc

def once(kc):
    t = time.perf_counter()
    mid = kc.execute("1+1")
    while True:
        m = kc.get_iopub_msg(timeout=10)
        if (m["parent_header"].get("msg_id") == mid and m["msg_type"] == "status"
                and m["content"]["execution_state"] == "idle"):
            break
    dt = (time.perf_counter() - t) * 1000
    kc.get_shell_msg(timeout=10)
    return dt

kernels = {"history": start([]), "no_history": start(["--HistoryManager.enabled=False"])}
ts = {k: [] for k in kernels}
for _ in range(%d):  # interleaved, so that load changes hit both alike
    for k, (km, kc) in kernels.items():
        ts[k].append(once(kc))
for km, kc in kernels.values():
    km.shutdown_kernel(now=True)
print(json.dumps({k: sorted(v)[len(v) // 2] for k, v in ts.items()}))
"""


def p50(xs):
    return round(pct(xs, 50), 2)


def cold(n):
    from e2b_code_interpreter import Sandbox

    total, create, first = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        sbx = Sandbox.create(timeout=60)
        t1 = time.perf_counter()
        r = sbx.run_code("1+1")
        t2 = time.perf_counter()
        assert r.text == "2", r
        total.append((t2 - t0) * 1000)
        create.append((t1 - t0) * 1000)
        first.append((t2 - t1) * 1000)
        sbx.kill()
    return {"create_to_first_result_p50_ms": p50(total), "create_p50_ms": p50(create),
            "first_run_code_p50_ms": p50(first)}


def pooled(api, n):
    from e2b_code_interpreter import Sandbox

    put_set(api, "ci-bench", 2, template=TEMPLATE)
    total = []
    try:
        for _ in range(n):
            wait_ready(api, "ci-bench", 1)
            time.sleep(1.0)  # let the member's kernel come up (it starts with the server)
            t0 = time.perf_counter()
            sbx = Sandbox.create(timeout=60)
            r = sbx.run_code("1+1")
            total.append((time.perf_counter() - t0) * 1000)
            assert r.text == "2", r
            sbx.kill()
    finally:
        delete_set(api, "ci-bench")
    return {"pooled_create_to_first_result_p50_ms": p50(total)}


def warm(url, key, n):
    from e2b_code_interpreter import Sandbox

    sbx = Sandbox.create(timeout=120)
    try:
        sbx.run_code("1+1")
        sbx.files.write("/tmp/inside.py", INSIDE % n)
        inside = json.loads(sbx.commands.run("python3 /tmp/inside.py").stdout)
        sbx.files.write("/tmp/kernel_alone.py", KERNEL_ALONE % n)
        alone = json.loads(
            sbx.commands.run("/opt/warren/venv/bin/python /tmp/kernel_alone.py", timeout=300).stdout
        )
        u = urllib.parse.urlparse(url)
        c = http.client.HTTPConnection(u.hostname, u.port)
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999",
                   "Content-Type": "application/json"}
        router = []
        for _ in range(n):
            t0 = time.perf_counter()
            c.request("POST", "/execute", body=json.dumps({"code": "1+1"}), headers=headers)
            data = c.getresponse().read()
            router.append(ms(t0))
            assert b'"text":"2"' in data
        sdk = []
        for _ in range(n):
            t0 = time.perf_counter()
            assert sbx.run_code("1+1").text == "2"
            sdk.append(ms(t0))
        return {"warm_kernel_alone_p50_ms": round(alone["no_history"], 2),
                "warm_kernel_alone_with_history_p50_ms": round(alone["history"], 2),
                "warm_server_side_p50_ms": round(inside["p50"], 2),
                "warm_router_http_p50_ms": p50(router), "warm_sdk_p50_ms": p50(sdk)}
    finally:
        sbx.kill()


def cgroup_memory(sandbox_id):
    """(charged bytes incl. page cache, anonymous bytes) of the sandbox's memory cgroup, v2 or v1."""
    for d in glob.glob(f"/sys/fs/cgroup/**/{sandbox_id}", recursive=True):
        for usage, anon_key in (("memory.current", "anon"), ("memory.usage_in_bytes", "total_rss")):
            if os.path.exists(f"{d}/{usage}"):
                with open(f"{d}/{usage}") as f:
                    total = int(f.read())
                with open(f"{d}/memory.stat") as f:
                    stat = dict(line.split() for line in f)
                return total, int(stat.get(anon_key, 0))
    return None, None


def idle_memory():
    from e2b import Sandbox as Base
    from e2b_code_interpreter import Sandbox

    out = {}
    for name, cls in (("code_interpreter", Sandbox), ("base", Base)):
        sbx = cls.create(timeout=120)
        try:
            if name == "code_interpreter":
                sbx.run_code("1+1")  # the default kernel is up
            time.sleep(3)
            total, anon = cgroup_memory(sbx.sandbox_id)
            rss = sbx.commands.run("ps -eo rss=", user="root").stdout.split()
            out[f"idle_{name}_cgroup_mib"] = round(total / 2**20, 1) if total else None
            out[f"idle_{name}_cgroup_anon_mib"] = round(anon / 2**20, 1) if anon else None
            out[f"idle_{name}_rss_mib"] = round(sum(int(x) for x in rss) / 1024, 1)
        finally:
            sbx.kill()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--only", default="cold,pooled,warm,memory", help="parts to run")
    a = ap.parse_args()
    only = set(a.only.split(","))
    os.environ.update(E2B_API_URL=a.url, E2B_SANDBOX_URL=a.url, E2B_API_KEY=a.key)
    u = urllib.parse.urlparse(a.url)
    api = Api(u.hostname, u.port, a.key)

    res = {}
    if "cold" in only:
        res.update(cold(a.n))
    if "pooled" in only:
        res.update(pooled(api, a.n))
    if "warm" in only:
        res.update(warm(a.url, a.key, max(100, a.n)))
    if "memory" in only:
        res.update(idle_memory())
    print("code interpreter:")
    for k, v in res.items():
        print(f"  {k}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
