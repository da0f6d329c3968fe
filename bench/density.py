#!/usr/bin/env python3
"""Density: how many idle sandboxes this machine holds, and the host memory each costs besides
its own processes (issue 8's figure). Creates N `base` sandboxes through the REST API, waits for
the memory to settle, then reads:

* host memory in use (MemTotal - MemAvailable) before and after;
* the memory charged to the sandboxes' own cgroups (memory.usage_in_bytes, v1 hierarchy: the
  sandbox's processes, their page cache and kernel memory);
* the daemon's RSS.

host overhead per sandbox = (host delta - sum of the sandboxes' cgroups) / N: what the kernel
and the daemon spend on a sandbox outside its cgroup (mounts, netns, veth, nft sets, records).
Kills every sandbox it created at the end.

    python3 bench/density.py --url URL --key KEY --daemon-pid PID -n 1000
"""
import argparse
import concurrent.futures as cf
import glob
import json
import time

from bench import api_json as call, rss_bytes as rss


def meminfo():
    m = {}
    for line in open("/proc/meminfo"):
        k, v = line.split(":")
        m[k] = int(v.split()[0]) * 1024
    return m["MemTotal"] - m["MemAvailable"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--daemon-pid", type=int, required=True)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--settle", type=float, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()

    base_used, base_rss = meminfo(), rss(a.daemon_pid)
    ids, errors = [], []
    t0 = time.monotonic()

    def create(_):
        return call(a.url, a.key, "POST", "/sandboxes", {"templateID": "base", "timeout": 3600})["sandboxID"]

    with cf.ThreadPoolExecutor(a.parallel) as ex:
        for f in cf.as_completed([ex.submit(create, i) for i in range(a.n)]):
            try:
                ids.append(f.result())
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                errors.append(str(e))
            if len(ids) % 100 == 0 and ids:
                print(f"{len(ids)} created, {time.monotonic() - t0:.1f} s", flush=True)
    created_s = time.monotonic() - t0
    time.sleep(a.settle)

    used, d_rss = meminfo(), rss(a.daemon_pid)
    cg = 0
    for sid in ids:
        for p in glob.glob(f"/sys/fs/cgroup/memory/warren-*/{sid}/memory.usage_in_bytes"):
            cg += int(open(p).read())
    alive = sum(1 for s in call(a.url, a.key, "GET", "/sandboxes") or [])
    mib = 1024 * 1024
    out = {
        "sandboxes": len(ids),
        "create_errors": len(errors),
        "listed_running": alive,
        "create_all_s": round(created_s, 1),
        "host_used_delta_mib": round((used - base_used) / mib, 1),
        "sandbox_cgroups_mib": round(cg / mib, 1),
        "per_sandbox_cgroup_mib": round(cg / mib / max(1, len(ids)), 2),
        "host_overhead_per_sandbox_mib": round((used - base_used - cg) / mib / max(1, len(ids)), 2),
        "daemon_rss_before_mib": round(base_rss / mib, 1),
        "daemon_rss_after_mib": round(d_rss / mib, 1),
        "daemon_rss_per_sandbox_kib": round((d_rss - base_rss) / 1024 / max(1, len(ids)), 1),
    }
    for k, v in out.items():
        print(f"{k:36} {v}")
    if errors:
        print("first errors:", errors[:3])
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)

    t1 = time.monotonic()
    with cf.ThreadPoolExecutor(a.parallel) as ex:
        list(ex.map(lambda s: call(a.url, a.key, "DELETE", f"/sandboxes/{s}"), ids))
    print(f"killed {len(ids)} in {time.monotonic() - t1:.1f} s; host used now "
          f"{round((meminfo() - base_used) / mib, 1)} MiB above the start")


if __name__ == "__main__":
    main()
