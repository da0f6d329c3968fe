"""Image-template figures against a live daemon (run by bench/run.sh):

* import of a ~200 MiB image (an OCI layout of three gzip layers: busybox, then ~200 MiB of host
  libraries), from `POST /warren/v1/templates` to the template being ready (blobs copied and
  verified, layers unpacked); the same image as an oci-archive; and a pull of it from Debian's
  docker-registry on loopback when that is installed;
* sandbox create (until envd answers /health) from that image template vs the `base` template,
  alternating, n samples each: layers are shared lower dirs, so the image's size must not matter.

Writes JSON with --json. Figures are for the machine it runs on.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time

from bench import Api, ms, pct


def blob(layout, data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs/sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)


def tar_layer(add):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        add(t)
    data = raw.getvalue()
    return data, gzip.compress(data, compresslevel=1)


def make_image(layout, target_mib=200):
    os.makedirs(os.path.join(layout, "blobs/sha256"))

    def base(t):
        for d in ["bin", "etc", "tmp", "home/user", "root"]:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            t.addfile(info)
        t.add("/bin/busybox", "bin/busybox")
        for name, content in [("etc/passwd", b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
                              ("etc/group", b"root:x:0:\nuser:x:1000:\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
        info = tarfile.TarInfo("bin/sh")
        info.type = tarfile.SYMTYPE
        info.linkname = "busybox"
        t.addfile(info)

    files = []
    total = 0
    for root, dirs, names in os.walk("/usr/lib/x86_64-linux-gnu"):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(root, n)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append(p)
                total += os.path.getsize(p)
            if total >= target_mib << 20:
                break
        if total >= target_mib << 20:
            break
    half = len(files) // 2
    layers = [tar_layer(base)]
    for part in (files[:half], files[half:]):
        layers.append(tar_layer(lambda t, part=part: [t.add(p, p.lstrip("/"), recursive=False) for p in part]))
    diff_ids = ["sha256:" + hashlib.sha256(raw).hexdigest() for raw, _ in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/bin"], "WorkingDir": "/"},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cd, cs = blob(layout, config)
    descs = []
    for _, gz in layers:
        d, s = blob(layout, gz)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                           "layers": descs}).encode()
    md, ms_ = blob(layout, manifest)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": md, "size": ms_, "annotations": {"org.opencontainers.image.ref.name": "big"}}]}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return sum(len(raw) for raw, _ in layers), sum(len(gz) for _, gz in layers)


def build(api, name, body, timeout=900):
    t0 = time.perf_counter()
    st, data = api.call("POST", "/warren/v1/templates", {"name": name, **body})
    assert st == 202, (st, data)
    while True:
        st, data = api.call("GET", f"/warren/v1/templates/{name}")
        v = json.loads(data)
        if v["status"] != "building":
            break
        assert time.perf_counter() - t0 < timeout, "template build timed out"
        time.sleep(0.05)
    took = ms(t0)
    assert v["status"] == "ready", v
    return took


def delete(api, name):
    st, data = api.call("DELETE", f"/warren/v1/templates/{name}")
    assert st == 204, (st, data)


def create_until_health(api, template):
    t0 = time.perf_counter()
    st, body = api.call("POST", "/v2/sandboxes", {"templateID": template, "metadata": {}, "envVars": {}})
    assert st == 201, (st, body)
    sid = json.loads(body)["sandboxID"]
    st, _ = api.call("GET", "/health", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})
    took = ms(t0)
    assert st == 204, st
    st, _ = api.call("DELETE", f"/sandboxes/{sid}")
    assert st == 204
    return took


def start_registry(tmp):
    if not shutil.which("docker-registry") or not shutil.which("skopeo"):
        return None, None
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = os.path.join(tmp, "registry.yml")
    with open(cfg, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {tmp}/registry\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--json")
    a = ap.parse_args()
    host, port = a.url.split("//")[1].split(":")
    api = Api(host, int(port), a.key)
    out = {}
    tmp = tempfile.mkdtemp(prefix="warren-bench-img-")
    try:
        layout = os.path.join(tmp, "layout")
        raw, gz = make_image(layout)
        out["image"] = {"uncompressed_mib": raw / 2**20, "compressed_mib": gz / 2**20, "layers": 3}
        print(f"image: {raw / 2**20:.0f} MiB uncompressed, {gz / 2**20:.0f} MiB gzip, 3 layers")

        t = build(api, "bench-big", {"ociDir": layout})
        out["import oci-dir ms"] = t
        print(f"import (oci-dir): {t / 1000:.2f} s ({raw / 2**20 / (t / 1000):.0f} MiB/s uncompressed)")

        archive = os.path.join(tmp, "big.oci.tar")
        with tarfile.open(archive, "w") as tf:
            tf.add(layout, ".")
        delete(api, "bench-big")
        t = build(api, "bench-big", {"ociArchive": archive})
        out["import oci-archive ms"] = t
        print(f"import (oci-archive): {t / 1000:.2f} s")
        os.unlink(archive)

        reg, addr = start_registry(tmp)
        if reg:
            try:
                subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:big",
                                f"docker://{addr}/bench/big:1"], check=True)
                delete(api, "bench-big")
                t = build(api, "bench-big", {"image": f"{addr}/bench/big:1"})
                out["pull loopback registry ms"] = t
                print(f"pull (loopback docker-registry): {t / 1000:.2f} s")
            finally:
                reg.kill()
                reg.wait()

        base, img = [], []
        for _ in range(3):  # warm-up
            create_until_health(api, "base")
            create_until_health(api, "bench-big")
        for _ in range(a.n):
            base.append(create_until_health(api, "base"))
            img.append(create_until_health(api, "bench-big"))
        for label, s in [("base", base), ("image (200 MiB, 3 layers)", img)]:
            print(f"create until envd /health, {label}: p50 {pct(s, 50):.1f} ms, p90 {pct(s, 90):.1f} ms")
        ratio = pct(img, 50) / pct(base, 50)
        print(f"image / base p50: {ratio:.3f}")
        out["create base ms"] = base
        out["create image ms"] = img
        out["image/base p50"] = ratio
        delete(api, "bench-big")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
