"""Issue 5 figures: commit of a 100 MiB change against a running daemon (bench/run.sh starts one).

For each kind of change, a fresh `base` sandbox writes 100 MiB, then `POST /warren/v1/commits`
runs and the daemon's own figures are read back from the Commit status: how long the sandbox was
frozen (copy of the upper dir to a staging tar) and the total (staging + gzip + blobs + layer
unpack + image write). A sandbox is then created from the committed image (template create time).

- `random`: one 100 MiB file from /dev/urandom (incompressible: gzip's worst case);
- `files`:  2000 files of 50 KiB of base64 text (~100 MiB, compressible, many inodes).

    python3 bench/commit.py --url http://127.0.0.1:PORT --key KEY [-n 3] [--json out.json]
"""

import argparse
import http.client
import json
import os
import statistics
import time
import urllib.parse

CHANGES = {
    "random": "head -c 104857600 /dev/urandom > /home/user/big",
    "files": "mkdir -p /home/user/many && cd /home/user/many && "
    "head -c 76800000 /dev/urandom | base64 -w 0 | split -b 51200 -a 4 - f && ls | wc -l",
}


def request(url, key, method, path, body=None):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    h = {"X-API-Key": key, "Content-Type": "application/json"}
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
    r = c.getresponse()
    data = r.read()
    return r.status, (json.loads(data) if data else None)


def one(url, key, kind, i, settle):
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=600)
    try:
        r = sbx.commands.run(CHANGES[kind], timeout=600)
        assert r.exit_code == 0, r.stderr
        time.sleep(settle)
        image = f"bench/{kind}:{i}"
        t0 = time.monotonic()
        st, c = request(url, key, "POST", "/warren/v1/commits",
                        {"kind": "Commit", "metadata": {"name": ""},
                         "spec": {"sandbox": sbx.sandbox_id, "image": image}})
        assert st == 202, (st, c)
        name = c["metadata"]["name"]
        while c["status"]["phase"] not in ("Succeeded", "Failed"):
            time.sleep(0.02)
            st, c = request(url, key, "GET", f"/warren/v1/commits/{name}")
        client_total = (time.monotonic() - t0) * 1000
        assert c["status"]["phase"] == "Succeeded", c
        t1 = time.monotonic()
        dst = Sandbox.create(template=image, timeout=60)
        create_ms = (time.monotonic() - t1) * 1000
        dst.kill()
        request(url, key, "DELETE", f"/warren/v1/commits/{name}")
        s = c["status"]
        return {
            "freeze_ms": s["freezeDurationMs"],
            "total_ms": s["totalDurationMs"],
            "client_ms": client_total,
            "layer_mib": s["size"] / 2**20,
            "create_from_image_ms": create_ms,
        }
    finally:
        sbx.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds between the end of the write and the commit request")
    a = ap.parse_args()
    os.environ.update({"E2B_API_URL": a.url, "E2B_SANDBOX_URL": a.url, "E2B_API_KEY": a.key})
    out = {}
    for kind in CHANGES:
        runs = [one(a.url, a.key, kind, i, a.settle) for i in range(a.n)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out[kind] = {"median": med, "runs": runs}
        print(f"settle {a.settle:.1f} s, commit 100 MiB {kind:6}: frozen {med['freeze_ms']:.0f} ms, total {med['total_ms']:.0f} ms "
              f"(client {med['client_ms']:.0f} ms), layer {med['layer_mib']:.1f} MiB gz, "
              f"create from image {med['create_from_image_ms']:.0f} ms  (median of {a.n})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
