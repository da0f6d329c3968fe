"""Issue 7 figures: checkpoints and forks against a running daemon (bench/run.sh starts one).

For each size, a fresh `base` sandbox runs a python process holding that many MiB of random
bytes (every page present and non-zero, so CRIU must copy it all). Then:

- `checkpoint`: `PUT /warren/v1/checkpoints/NAME` (keepRunning: true): the client's wall time,
  the daemon's freeze time, and the size on disk (memory images + files copy);
- `restore10`: `POST /warren/v1/checkpoints/NAME/restore {"count": 10}` until all ten answer
  envd's `/health` through the router: ten new sandboxes, each re-keyed;
- `fork10`: `POST /sandboxes/{id}/fork {"count": 10}` (checkpoint + ten restores, the E2B call)
  until all ten answer `/health`.

The daemon's sandboxes are limited to 512 MiB, so sizes stop at 400 MiB here; the runtime bench
(`cargo test -p warren-runtime --test hibernate -- --ignored bench_checkpoint`) has 1,000 MiB.

    python3 bench/checkpoint.py --url http://127.0.0.1:PORT --key KEY [--sizes 10,100,400] [-n 3]
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def request(url, key, method, path, body=None, headers=None):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    h = {"X-API-Key": key, "Content-Type": "application/json"}
    h.update(headers or {})
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    try:
        return r.status, (json.loads(data) if data else None)
    except ValueError:
        return r.status, data


def wait_health(url, key, ids, deadline_s=30):
    """Polls envd's /health of every sandbox in parallel; returns when all answered 2xx."""
    done = {}

    def poll(sid):
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            st, _ = request(url, key, "GET", "/health",
                            headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})
            if 200 <= st < 300:
                done[sid] = time.monotonic()
                return
            time.sleep(0.005)

    threads = [threading.Thread(target=poll, args=(s,)) for s in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == len(ids), f"only {len(done)} of {len(ids)} answered /health"


def kill_all(url, key, ids):
    for sid in ids:
        request(url, key, "DELETE", f"/sandboxes/{sid}")


def ten(url, key, method, path):
    t0 = time.monotonic()
    st, items = request(url, key, method, path, {"count": 10, "timeout": 120})
    assert st == 201, (st, items)
    ids = [i["sandbox"]["sandboxID"] for i in items if "sandbox" in i]
    assert len(ids) == 10, items
    answered = time.monotonic() - t0
    wait_health(url, key, ids)
    all_health = time.monotonic() - t0
    kill_all(url, key, ids)
    return answered * 1000, all_health * 1000


def one_size(url, key, mib, n):
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=1200)
    rows = []
    try:
        hold = (
            "python3 -c 'import os, time\nchunk = os.urandom(1 << 20)\n"
            f"held = [bytearray(chunk) for _ in range({mib})]\n"
            "open(\"/tmp/ready\", \"w\").write(\"1\")\nwhile True:\n    time.sleep(1)'"
        )
        sbx.commands.run(hold, background=True)
        end = time.monotonic() + 60
        while not sbx.files.exists("/tmp/ready"):
            assert time.monotonic() < end, "holder did not start"
            time.sleep(0.1)
        for i in range(n):
            name = f"bench-{mib}-{i}"
            t0 = time.monotonic()
            st, c = request(url, key, "PUT", f"/warren/v1/checkpoints/{name}",
                            {"kind": "Checkpoint", "metadata": {"name": name},
                             "spec": {"sandbox": sbx.sandbox_id, "keepRunning": True}})
            client_ms = (time.monotonic() - t0) * 1000
            assert st == 201, (st, c)
            s = c["status"]
            restore_answer, restore_health = ten(
                url, key, "POST", f"/warren/v1/checkpoints/{name}/restore")
            fork_answer, fork_health = ten(url, key, "POST", f"/sandboxes/{sbx.sandbox_id}/fork")
            request(url, key, "DELETE", f"/warren/v1/checkpoints/{name}")
            row = {
                "held_mib": mib,
                "checkpoint_ms": round(client_ms, 1),
                "freeze_ms": round(s["freezeDurationMs"], 1),
                "memory_mib": round(s["memorySize"] / 1048576, 1),
                "files_mib": round(s["filesystemSize"] / 1048576, 2),
                "restore10_answer_ms": round(restore_answer, 1),
                "restore10_all_health_ms": round(restore_health, 1),
                "fork10_answer_ms": round(fork_answer, 1),
                "fork10_all_health_ms": round(fork_health, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        sbx.kill()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--sizes", default="10,100,400")
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    import os

    os.environ.setdefault("E2B_API_URL", a.url)
    os.environ.setdefault("E2B_SANDBOX_URL", a.url)
    os.environ.setdefault("E2B_API_KEY", a.key)
    out = []
    for mib in [int(x) for x in a.sizes.split(",")]:
        rows = one_size(a.url, a.key, mib, a.n)
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "held_mib"}
        print(f"{mib} MiB median: " + ", ".join(f"{k}={v}" for k, v in med.items()), flush=True)
        out.append({"held_mib": mib, "runs": rows, "median": med})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
