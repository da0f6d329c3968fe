"""Warm-pool figures against a live daemon (run by bench/run.sh after bench.py):

* claim latency: POST /v2/sandboxes against a ready pool, over one keep-alive connection
  (the HTTP round trip on loopback), and the daemon's own claim histogram (mean);
* claim through the SDK: Sandbox.create() against a ready pool, and create + first command;
* a burst of 100 concurrent creates (100 threads, one connection each) against a pool of 100,
  and against an empty pool (every create cold);
* refill rate: an empty pool told to hold N members, time until all N are ready.

Every figure is for the machine it runs on (2 cores in BENCHMARKS.md). Writes JSON with --json.
"""
import argparse
import http.client
import json
import statistics
import threading
import time

from bench import Api, ms, pct

API = "warren.dev/v1alpha1"


def put_set(api, name, replicas, **spec):
    body = {"apiVersion": API, "kind": "SandboxSet", "metadata": {"name": name},
            "spec": {"replicas": replicas, "template": "base", **spec}}
    st, data = api.call("PUT", f"/warren/v1/sandboxsets/{name}", body)
    assert st == 200, (st, data)


def status(api, name):
    st, data = api.call("GET", f"/warren/v1/sandboxsets/{name}")
    assert st == 200, (st, data)
    return json.loads(data)["status"]


def wait_ready(api, name, n, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(api, name)
        if s["availableReplicas"] >= n and s["startingReplicas"] == 0:
            return
        time.sleep(0.01)
    raise RuntimeError(f"pool {name} not ready with {n}: {status(api, name)}")


def delete_set(api, name):
    api.call("DELETE", f"/warren/v1/sandboxsets/{name}")


def kill_all(api):
    while True:
        st, data = api.call("GET", "/sandboxes")
        ids = [s["sandboxID"] for s in json.loads(data)]
        if not ids:
            return
        for sid in ids:
            api.call("DELETE", f"/sandboxes/{sid}")


def wait_no_members(api, timeout=120):
    """Until the daemon reports no pooled or starting sandbox (pool members are not listed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = metrics(api)
        if all(metric_value(text, "warren_sandboxes", state=s) == 0 for s in ("pooled", "creating", "killing")):
            return
        time.sleep(0.05)


def metrics(api):
    st, data = api.call("GET", "/metrics")
    return data.decode()


def metric_value(text, name, **labels):
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def create(api, envs=None):
    st, data = api.call("POST", "/v2/sandboxes", {"templateID": "base", "envVars": envs or {}, "metadata": {}})
    assert st == 201, (st, data)
    return json.loads(data)["sandboxID"]


def bench_claim_http(api, n):
    """n claims from a pool big enough that none misses; refills run between claims."""
    put_set(api, "bench-claim", 10)
    wait_ready(api, "bench-claim", 10)
    before = metrics(api)
    samples, ids = [], []
    for _ in range(n):
        wait_ready(api, "bench-claim", 10)
        t0 = time.perf_counter()
        ids.append(create(api, {"X": "1"}))
        samples.append(ms(t0))
        api.call("DELETE", f"/sandboxes/{ids[-1]}")
    after = metrics(api)
    lbl = {"pool": "bench-claim"}
    d_sum = metric_value(after, "warren_pool_claim_seconds_sum", **lbl) - metric_value(before, "warren_pool_claim_seconds_sum", **lbl)
    d_cnt = metric_value(after, "warren_pool_claim_seconds_count", **lbl) - metric_value(before, "warren_pool_claim_seconds_count", **lbl)
    misses = metric_value(after, "warren_pool_misses_total", template="base") - metric_value(before, "warren_pool_misses_total", template="base")
    assert misses == 0, f"{misses} claims missed the pool"
    return samples, (d_sum / d_cnt * 1000 if d_cnt else float("nan"))


def bench_claim_sdk(url, key, api, n):
    from e2b import Sandbox

    create_only, with_cmd = [], []
    for i in range(n + 1):
        wait_ready(api, "bench-claim", 10)
        t0 = time.perf_counter()
        s = Sandbox.create(api_url=url, sandbox_url=url, api_key=key, envs={"X": "pool"})
        t1 = ms(t0)
        out = s.commands.run("echo $X")
        t2 = ms(t0)
        assert out.stdout == "pool\n", out
        s.kill()
        if i:  # the first call pays imports and connection set-up
            create_only.append(t1)
            with_cmd.append(t2)
    delete_set(api, "bench-claim")
    wait_no_members(api)
    return create_only, with_cmd


def burst(host, port, key, n):
    """n threads, each with its own connection, start together; returns (wall ms, per-create ms)."""
    barrier = threading.Barrier(n + 1)
    lat, ids, errors = [None] * n, [None] * n, []

    def one(i):
        a = Api(host, port, key)
        a.conn.connect()
        barrier.wait()
        t0 = time.perf_counter()
        try:
            ids[i] = create(a)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        lat[i] = ms(t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = ms(t0)
    assert not errors, errors[:3]
    assert len(set(ids)) == n
    return wall, lat


def bench_bursts(api, host, port, key, n):
    out = {}
    put_set(api, "bench-burst", n, scaleStrategy={"maxUnavailable": n})
    t0 = time.perf_counter()
    wait_ready(api, "bench-burst", n)
    refill_s = (time.perf_counter() - t0)
    out["refill"] = {"members": n, "seconds": refill_s, "per_second": n / refill_s}
    # The burst; the refill runs meanwhile, as it would in production (it competes for the CPU).
    before = metrics(api)
    wall, lat = burst(host, port, key, n)
    after = metrics(api)
    claims = metric_value(after, "warren_pool_claims_total", pool="bench-burst") - metric_value(before, "warren_pool_claims_total", pool="bench-burst")
    out["burst_pool"] = {"n": n, "wall_ms": wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "from_pool": claims}
    kill_all(api)
    delete_set(api, "bench-burst")
    wait_no_members(api)

    wall, lat = burst(host, port, key, n)
    out["burst_cold"] = {"n": n, "wall_ms": wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "from_pool": 0}
    kill_all(api)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--json")
    a = ap.parse_args()
    host, port = a.url.split("//")[1].split(":")
    port = int(port)
    api = Api(host, port, a.key)

    http_lat, server_mean = bench_claim_http(api, a.n)
    sdk_create, sdk_cmd = bench_claim_sdk(a.url, a.key, api, max(10, a.n // 2))
    bursts = bench_bursts(api, host, port, a.key, a.burst)

    rows = {
        "claim: POST /v2/sandboxes (HTTP)": http_lat,
        "claim: SDK Sandbox.create()": sdk_create,
        "claim: SDK create + echo $X": sdk_cmd,
    }
    print(f"\n{'pool operation':<36} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    summary = {}
    for name, s in rows.items():
        summary[name] = {"n": len(s), "p50": pct(s, 50), "p99": pct(s, 99), "mean": statistics.mean(s)}
        print(f"{name:<36} {len(s):>4} {pct(s, 50):>8.2f} {pct(s, 99):>8.2f} {statistics.mean(s):>8.2f}")
    summary["claim: daemon histogram mean ms"] = server_mean
    print(f"claim inside the daemon (histogram mean): {server_mean:.2f} ms")
    for k in ("burst_pool", "burst_cold"):
        b = bursts[k]
        print(f"{k:<22} {b['n']} creates: all done in {b['wall_ms']:.0f} ms "
              f"(per create p50 {b['p50_ms']:.0f} ms, p99 {b['p99_ms']:.0f} ms; {b['from_pool']:.0f} from the pool)")
    r = bursts["refill"]
    print(f"refill: {r['members']} members ready in {r['seconds']:.2f} s = {r['per_second']:.0f} sandboxes/s")
    summary.update(bursts)
    if a.json:
        json.dump(summary, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
