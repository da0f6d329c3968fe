#!/usr/bin/env python3
"""Soak (issue 8's figure): N sandboxes, each running a command every second for M minutes,
through the router with the exact Connect `Start` request `commands.run` sends. Reports errors
(target 0), the daemon's RSS at the start and the end (should stay flat), and command latency
percentiles. Kills its sandboxes at the end.

    python3 bench/soak.py --url URL --key KEY --daemon-pid PID -n 200 --minutes 10
"""
import argparse
import base64
import concurrent.futures as cf
import http.client
import json
import threading
import time
import urllib.parse

from bench import api_json as call, rss_bytes


def rss_mib(pid):
    return rss_bytes(pid) / (1024 * 1024)


def frames(body):
    i = 0
    while i + 5 <= len(body):
        flags, n = body[i], int.from_bytes(body[i + 1:i + 5], "big")
        yield flags, json.loads(body[i + 5:i + 5 + n] or b"{}")
        i += 5 + n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--daemon-pid", type=int, required=True)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)

    with cf.ThreadPoolExecutor(4) as ex:
        made = list(ex.map(lambda _: call(a.url, a.key, "POST", "/sandboxes",
                                          {"templateID": "base", "timeout": 3600}), range(a.n)))
    sandboxes = [(m["sandboxID"], m["envdAccessToken"]) for m in made]
    rss_start = rss_mib(a.daemon_pid)
    stop_at = time.monotonic() + a.minutes * 60
    lat, errors, lock = [], [], threading.Lock()
    rss_samples = []

    def worker(idx):
        sid, token = sandboxes[idx]
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        n = 0
        nxt = time.monotonic() + idx / a.n  # spread the sandboxes over the second
        while nxt < stop_at:
            time.sleep(max(0.0, nxt - time.monotonic()))
            n += 1
            payload = json.dumps({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", f"echo {idx}-{n}"],
                                              "envs": {}}, "stdin": False}).encode()
            body = b"\0" + len(payload).to_bytes(4, "big") + payload
            t0 = time.monotonic()
            try:
                conn.request("POST", "/process.Process/Start", body, {
                    "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
                    "E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token})
                r = conn.getresponse()
                data = r.read()
                out, ended, err = b"", False, None
                for flags, msg in frames(data):
                    if flags & 2:
                        err = msg.get("error")
                        continue
                    ev = msg.get("event", {})
                    if "data" in ev and "stdout" in ev["data"]:
                        out += base64.b64decode(ev["data"]["stdout"])
                    if "end" in ev:
                        ended = ev["end"].get("exitCode", 0) == 0
                ok = r.status == 200 and ended and err is None and out.strip() == f"{idx}-{n}".encode()
                if not ok:
                    raise RuntimeError(f"status {r.status} ended={ended} err={err} out={out[:80]!r}")
                with lock:
                    lat.append(time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{sid}: {e}")
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
            nxt += 1.0

    def sampler():
        while time.monotonic() < stop_at:
            rss_samples.append(round(rss_mib(a.daemon_pid), 1))
            time.sleep(30)

    threading.Thread(target=sampler, daemon=True).start()
    t = time.monotonic()
    with cf.ThreadPoolExecutor(a.n) as ex:
        list(ex.map(worker, range(a.n)))
    elapsed = time.monotonic() - t
    rss_end = rss_mib(a.daemon_pid)
    lat.sort()

    def p(q):
        return round(lat[min(len(lat) - 1, int(q * (len(lat) - 1)))] * 1e3, 1) if lat else None

    out = {
        "sandboxes": a.n, "minutes": round(elapsed / 60, 2), "commands_ok": len(lat),
        "errors": len(errors), "rate_per_s": round(len(lat) / elapsed, 1),
        "latency_ms_p50": p(0.5), "latency_ms_p99": p(0.99), "latency_ms_max": p(1.0),
        "daemon_rss_mib_start": round(rss_start, 1), "daemon_rss_mib_end": round(rss_end, 1),
        "daemon_rss_mib_samples": rss_samples,
    }
    for k, v in out.items():
        print(f"{k:24} {v}")
    if errors:
        print("first errors:", errors[:5])
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)
    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda s: call(a.url, a.key, "DELETE", f"/sandboxes/{s[0]}"), sandboxes))


if __name__ == "__main__":
    main()
