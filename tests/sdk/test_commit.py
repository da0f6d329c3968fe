"""Commits through the real SDK, API and CLI: a sandbox's changes become an OCI image that new
sandboxes start from; YAML `kind: Commit` with a TTL; pushes to a real registry (Debian's
docker-registry on loopback with htpasswd auth); bad input."""

import io
import json
import os
import tarfile
import subprocess
import tempfile
import time
import urllib.parse

import pytest

from warren_helpers import free_port, wait_until

API = "warren.dev/v1alpha1"

# Prints one line per path under the given roots: path, type, mode, owner, content hash or link
# target, and the hard-link group (first path with the same inode), sorted.
MANIFEST = r"""
import hashlib, os, stat, sys
out, first = [], {}
skip = {"/etc/hostname"}
for root in sys.argv[1:]:
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for n in sorted(dirs + files):
            p = os.path.join(d, n)
            if p in skip:
                continue
            st = os.lstat(p)
            m = st.st_mode
            if stat.S_ISLNK(m):
                what = "l " + os.readlink(p)
            elif stat.S_ISDIR(m):
                what = "d"
            elif stat.S_ISREG(m):
                link = first.setdefault(st.st_ino, p) if st.st_nlink > 1 else ""
                what = "f " + hashlib.sha256(open(p, "rb").read()).hexdigest()[:16] + " " + link
            else:
                what = "o %o" % stat.S_IFMT(m)
            out.append("%s %s %o %d:%d" % (p, what, stat.S_IMODE(m), st.st_uid, st.st_gid))
print("\n".join(sorted(out)))
"""

ROOTS = "/etc /home /opt /root /srv /var /usr/local"

CHANGES = r"""
set -e
echo hello > /home/user/hello.txt
chown 1000:1000 /home/user/hello.txt
chmod 0640 /home/user/hello.txt
ln /home/user/hello.txt /home/user/hello-hardlink
ln -s /home/user/hello.txt /home/user/hello-symlink
mkdir -p /opt/app/bin
printf '#!/bin/sh\necho app\n' > /opt/app/bin/run
chmod 0755 /opt/app/bin/run
head -c 200000 /dev/urandom > /opt/app/blob
rm /etc/issue
rm -rf /etc/skel
mkdir /etc/skel
echo replaced > /etc/skel/.profile
echo 'export FROM_COMMIT=1' >> /etc/profile
mkfifo /srv/fifo
chmod 4755 /opt/app/bin/run
"""


def commit(daemon, sandbox_id, image, expect=202, **spec):
    body = {"apiVersion": API, "kind": "Commit", "metadata": {"name": spec.pop("name", "")},
            "spec": {"sandbox": sandbox_id, "image": image, **spec}}
    r = daemon.request("POST", "/warren/v1/commits", body)
    assert r.status == expect, (r.status, r.body)
    return r.json()


def wait_done(daemon, name, timeout=60):
    got = {}

    def done():
        r = daemon.request("GET", f"/warren/v1/commits/{name}")
        assert r.status == 200, (r.status, r.body)
        got["c"] = r.json()
        return got["c"]["status"]["phase"] in ("Succeeded", "Failed")

    assert wait_until(done, timeout), f"commit {name} not done: {got}"
    return got["c"]


def manifest(sbx):
    r = sbx.commands.run(f"python3 -c '{MANIFEST}' {ROOTS}", user="root")
    assert r.exit_code == 0, r.stderr
    return r.stdout.splitlines()


def blobs(daemon):
    return sorted(os.listdir(os.path.join(daemon.data_dir, "images/oci/blobs/sha256")))


def test_round_trip_sees_the_same_tree(daemon, new_sandbox):
    src = new_sandbox()
    r = src.commands.run(CHANGES, user="root")
    assert r.exit_code == 0, r.stderr
    want = manifest(src)
    assert any(line.startswith("/home/user/hello-hardlink f ") for line in want)
    assert not any(line.startswith("/etc/issue ") for line in want)

    c = commit(daemon, src.sandbox_id, "local/roundtrip:v1")
    assert c["status"]["phase"] in ("Pending", "Running", "Succeeded")
    c = wait_done(daemon, c["metadata"]["name"])
    st = c["status"]
    assert st["phase"] == "Succeeded", st
    assert st["digest"].startswith("sha256:")
    assert 0 < st["freezeDurationMs"] < 5000, st
    assert st["size"] > 200000 * 0.9, "the random blob is in the layer"

    # The source keeps running after the commit.
    assert src.commands.run("echo alive").stdout.strip() == "alive"

    dst = new_sandbox(template="local/roundtrip:v1")
    got = manifest(dst)
    assert got == want, "\n".join(
        ["only in source:"] + sorted(set(want) - set(got)) + ["only in copy:"] + sorted(set(got) - set(want))
    )
    assert dst.commands.run("/opt/app/bin/run").stdout.strip() == "app"

    # A commit of the copy builds on the committed image: one more layer, same history below.
    r = dst.commands.run("echo two > /home/user/second", user="root")
    assert r.exit_code == 0
    c2 = wait_done(daemon, commit(daemon, dst.sandbox_id, "local/roundtrip:v2")["metadata"]["name"])
    assert c2["status"]["phase"] == "Succeeded", c2
    layout = os.path.join(daemon.data_dir, "images/oci")
    out = subprocess.run(["skopeo", "inspect", f"oci:{layout}:local/roundtrip:v2"],
                         capture_output=True, text=True, check=True).stdout
    v1 = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout}:local/roundtrip:v1"],
                                   capture_output=True, text=True, check=True).stdout)
    v2 = json.loads(out)
    assert v2["Layers"][: len(v1["Layers"])] == v1["Layers"]
    assert len(v2["Layers"]) == len(v1["Layers"]) + 1

    # A paused sandbox commits without another freeze.
    src.pause()
    c3 = wait_done(daemon, commit(daemon, src.sandbox_id, "local/roundtrip:paused")["metadata"]["name"])
    assert c3["status"]["phase"] == "Succeeded", c3
    assert c3["status"]["freezeDurationMs"] == 0
    detail = daemon.request("GET", f"/sandboxes/{src.sandbox_id}").json()
    assert detail["state"] == "paused", detail
    # The paused sandbox's image holds the same tree.
    paused_copy = new_sandbox(template="local/roundtrip:paused")
    assert manifest(paused_copy) == want
    paused_copy.kill()

    for name in (c["metadata"]["name"], c2["metadata"]["name"], c3["metadata"]["name"]):
        assert daemon.request("DELETE", f"/warren/v1/commits/{name}").status == 204


def test_an_image_in_use_is_replaced_and_its_sandboxes_keep_their_layers(daemon, new_sandbox):
    """Committing (or building) over an image that sandboxes run on replaces it for new
    sandboxes; the running ones keep the layers they started on through image gc, and those
    layers go when the last of them ends."""
    layers = os.path.join(daemon.data_dir, "images/layers")
    src = new_sandbox()
    src.commands.run("echo one > /home/user/which && head -c 100000 /dev/urandom > /home/user/blob", user="root")
    c1 = wait_done(daemon, commit(daemon, src.sandbox_id, "local/inuse:v1")["metadata"]["name"])
    assert c1["status"]["phase"] == "Succeeded", c1
    old = new_sandbox(template="local/inuse:v1")
    blob_sum = old.commands.run("sha256sum /home/user/blob").stdout

    src.commands.run("rm /home/user/blob && echo two > /home/user/which", user="root")
    c2 = wait_done(daemon, commit(daemon, src.sandbox_id, "local/inuse:v1")["metadata"]["name"])
    assert c2["status"]["phase"] == "Succeeded", c2
    assert c2["status"]["digest"] != c1["status"]["digest"]
    new = new_sandbox(template="local/inuse:v1")
    assert new.files.read("/home/user/which") == "two\n"
    assert new.commands.run("test -e /home/user/blob || echo gone").stdout == "gone\n"

    # Deleting the first commit runs an image gc: nothing names the old image any more, but the
    # old sandbox still stacks its layers, so they stay.
    with_old = set(os.listdir(layers))
    assert daemon.request("DELETE", f"/warren/v1/commits/{c1['metadata']['name']}").status == 204
    assert set(os.listdir(layers)) == with_old
    assert old.files.read("/home/user/which") == "one\n"
    assert old.commands.run("sha256sum /home/user/blob").stdout == blob_sum
    # ... through a hibernation and wake too.
    r = daemon.request("POST", f"/warren/v1/sandboxes/{old.sandbox_id}/hibernate")
    assert r.status == 200, (r.status, r.body)
    old.connect()
    assert old.commands.run("cat /home/user/which").stdout == "one\n"

    # When the old sandbox ends, the layers only it used go.
    old.kill()
    assert wait_until(lambda: set(os.listdir(layers)) < with_old, 15), sorted(with_old)
    assert new.files.read("/home/user/which") == "two\n"
    assert daemon.request("DELETE", f"/warren/v1/commits/{c2['metadata']['name']}").status == 204


def test_deleting_a_template_that_a_hibernated_sandbox_uses(daemon, new_sandbox):
    """A template can be deleted while sandboxes use it: new creates fail, a hibernated sandbox
    on it wakes on the layers it started on."""
    src = new_sandbox()
    src.commands.run("echo one > /home/user/which", user="root")
    c = wait_done(daemon, commit(daemon, src.sandbox_id, "local/doomed:v1")["metadata"]["name"])
    assert c["status"]["phase"] == "Succeeded", c
    on = new_sandbox(template="local/doomed:v1")
    r = daemon.request("POST", f"/warren/v1/sandboxes/{on.sandbox_id}/hibernate")
    assert r.status == 200, (r.status, r.body)
    r = daemon.request("DELETE", "/warren/v1/templates/local%2Fdoomed:v1")
    assert r.status == 204, (r.status, r.body)
    assert daemon.request("GET", "/warren/v1/templates/local%2Fdoomed:v1").status == 404
    r = daemon.request("POST", "/sandboxes", {"templateID": "local/doomed:v1"})
    assert r.status == 404, (r.status, r.body)
    on.connect()
    assert on.commands.run("cat /home/user/which").stdout == "one\n"
    on.kill()
    daemon.request("DELETE", f"/warren/v1/commits/{c['metadata']['name']}")


def test_commit_of_a_hibernated_sandbox(daemon, new_sandbox):
    """A hibernated sandbox has no process to freeze: its upper dir on disk is committed as it
    is, and it stays hibernated until it is woken."""
    sbx = new_sandbox()
    assert sbx.commands.run("echo asleep > /home/user/hib.txt").exit_code == 0
    r = daemon.request("POST", f"/warren/v1/sandboxes/{sbx.sandbox_id}/hibernate")
    assert r.status == 200, (r.status, r.body)
    assert r.json()["memoryLocation"] == "disk", r.body

    c = wait_done(daemon, commit(daemon, sbx.sandbox_id, "local/hibernated:v1")["metadata"]["name"])
    assert c["status"]["phase"] == "Succeeded", c
    assert c["status"]["freezeDurationMs"] == 0
    detail = daemon.request("GET", f"/sandboxes/{sbx.sandbox_id}").json()
    assert detail["state"] == "paused" and detail["memoryLocation"] == "disk", detail

    dst = new_sandbox(template="local/hibernated:v1")
    assert dst.files.read("/home/user/hib.txt") == "asleep\n"
    # The source wakes as it was.
    sbx.connect()
    assert sbx.commands.run("cat /home/user/hib.txt").stdout == "asleep\n"
    dst.kill()
    assert daemon.request("DELETE", f"/warren/v1/commits/{c['metadata']['name']}").status == 204


def test_yaml_commit_with_ttl_is_collected(daemon, new_sandbox):
    sbx = new_sandbox()
    assert sbx.commands.run("head -c 50000 /dev/urandom > /home/user/data").exit_code == 0
    before = blobs(daemon)
    doc = f"""apiVersion: agents.kruise.io/v1alpha1
kind: Commit
metadata:
  name: ttl-commit
spec:
  podName: {sbx.sandbox_id}
  containerName: sandbox
  image: local/ttl:v1
  ttl: 3s
"""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(doc)
    env = dict(os.environ, WARREN_URL=daemon.url, WARREN_API_KEY=daemon.api_key)
    try:
        out = subprocess.run([str(daemon.binary), "apply", "-f", f.name], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "commit/ttl-commit applied" in out.stdout
        c = wait_done(daemon, "ttl-commit")
        assert c["status"]["phase"] == "Succeeded", c
        assert c["status"]["expiresAt"]
        # apply is idempotent for the same spec
        out = subprocess.run([str(daemon.binary), "apply", "-f", f.name], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        out = subprocess.run([str(daemon.binary), "commit", "get", "ttl-commit"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert "Succeeded" in out.stdout, out
    finally:
        os.unlink(f.name)
    assert len(blobs(daemon)) > len(before)
    # After the TTL the object, the template and the blobs only it used are gone.
    assert wait_until(lambda: daemon.request("GET", "/warren/v1/commits/ttl-commit").status == 404, 15)
    r = daemon.request("POST", "/sandboxes", {"templateID": "local/ttl:v1"})
    assert r.status in (400, 404), (r.status, r.body)
    assert wait_until(lambda: not set(blobs(daemon)) - set(before), 10), (before, blobs(daemon))


def test_push_with_secret_wrong_password_and_down(daemon, new_sandbox, registry):
    env = dict(os.environ, WARREN_URL=daemon.url, WARREN_API_KEY=daemon.api_key)

    def secret(name, password):
        out = subprocess.run([str(daemon.binary), "secret", "create", name, "--username", "alice",
                              "--password-stdin"], input=password + "\n", env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr

    secret("reg-good", "s3cret")
    secret("reg-bad", "nope")
    r = daemon.request("GET", "/warren/v1/secrets")
    assert r.status == 200 and "s3cret" not in r.body.decode(), r.body

    sbx = new_sandbox()
    assert sbx.commands.run("echo pushed > /home/user/p").exit_code == 0
    image = f"{registry}/team/pushed:v1"

    bad = wait_done(daemon, commit(daemon, sbx.sandbox_id, image,
                                   registryAuth={"secrets": ["reg-bad"]})["metadata"]["name"])
    assert bad["status"]["phase"] == "Failed", bad
    assert "refused the credentials" in bad["status"]["message"], bad
    assert bad["status"]["pushed"] is False

    good = wait_done(daemon, commit(daemon, sbx.sandbox_id, image,
                                    registryAuth={"secrets": [{"name": "reg-good"}]})["metadata"]["name"])
    assert good["status"]["phase"] == "Succeeded", good
    assert good["status"]["pushed"] is True
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", "alice:s3cret",
                          f"docker://{image}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["Digest"] == good["status"]["digest"]

    down = f"127.0.0.1:{free_port()}/team/pushed:v1"
    c = wait_done(daemon, commit(daemon, sbx.sandbox_id, down, push=True)["metadata"]["name"])
    assert c["status"]["phase"] == "Failed", c
    assert "unreachable" in c["status"]["message"], c
    # The local image is there even though the push failed.
    assert c["status"]["digest"].startswith("sha256:")


def test_bad_commits(daemon, new_sandbox):
    sbx = new_sandbox()
    cases = [
        ({"sandbox": "nope", "image": "local/x:v1"}, 404, "not found"),
        ({"sandbox": sbx.sandbox_id, "image": "Bad Name"}, 400, "spec.image"),
        ({"sandbox": sbx.sandbox_id, "image": "local/x:v1", "ttl": "soon"}, 400, "spec.ttl"),
        ({"sandbox": sbx.sandbox_id, "image": "127.0.0.1:1/x:v1", "registryAuth": {"secrets": ["missing"]}},
         404, "secret"),
        ({"sandbox": sbx.sandbox_id, "image": "local/x:v1", "bogus": 1}, 400, "bogus"),
    ]
    for spec, status, text in cases:
        r = daemon.request("POST", "/warren/v1/commits", {"kind": "Commit", "metadata": {"name": ""}, "spec": spec})
        assert r.status == status, (spec, r.status, r.body)
        assert text in r.error_body()["message"], (spec, r.body)
        assert r.error_body()["code"] == status
    r = daemon.request("POST", "/warren/v1/commits", {"kind": "SandboxSet", "spec": {}})
    assert r.status == 400
    r = daemon.request("GET", "/warren/v1/commits/none")
    assert r.status == 404 and r.error_body()["code"] == 404
    r = daemon.request("DELETE", "/warren/v1/commits/none")
    assert r.status == 404
    r = daemon.request("POST", "/sandboxes", {"templateID": "local/never:v1"})
    assert r.status in (400, 404), (r.status, r.body)


def test_template_build_layers_and_cache(daemon, new_sandbox, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("v1\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM base\n"
        "RUN echo built > /opt/built\n"
        "ENV GREETING=hi\n"
        "WORKDIR /srv/app\n"
        "COPY src .\n"
        'RUN echo "$GREETING $(cat a.txt)" > out.txt\n'
        "USER user\n"
        "RUN whoami > /tmp/who\n"
    )
    env = dict(os.environ, WARREN_URL=daemon.url, WARREN_API_KEY=daemon.api_key)

    def build():
        out = subprocess.run([str(daemon.binary), "template", "build", "built-app", "-f",
                              str(tmp_path / "Dockerfile")], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    t0 = time.monotonic()
    first = build()
    first_s = time.monotonic() - t0
    assert "CACHED" not in first, first
    # The CLI shows the daemon's progress: every step's line, then the result.
    assert "step 1/8: FROM base" in first and "step 8/8: RUN whoami > /tmp/who" in first, first
    assert "built built-app (sha256:" in first, first
    t0 = time.monotonic()
    again = build()
    again_s = time.monotonic() - t0
    # Unchanged: every layer step (RUN, WORKDIR, COPY, RUN, RUN) is a cache hit, no sandbox runs.
    assert again.count("CACHED") == 5, again
    job = daemon.request("GET", "/warren/v1/templates/built-app/build").json()
    assert job["cacheHits"] == 5, job
    assert all(s["status"] in ("cached", "config", "done") for s in job["steps"]), job["steps"]
    assert [s["status"] for s in job["steps"] if s["status"] != "config"] == [
        "done", "cached", "cached", "cached", "cached", "cached"], job["steps"]
    print(f"template build: first {first_s:.2f} s, all cached {again_s:.2f} s")
    assert again_s < max(first_s / 2, 1.0), (first_s, again_s)
    (tmp_path / "src" / "a.txt").write_text("v2\n")
    third = build()
    # RUN and WORKDIR before the COPY are cached; the COPY and everything after run again.
    assert third.count("CACHED") == 2, third

    sbx = new_sandbox(template="built-app")
    r = sbx.commands.run("cat /opt/built /srv/app/out.txt /tmp/who", user="root")
    assert r.stdout.split() == ["built", "hi", "v2", "user"], r.stdout
    layout = os.path.join(daemon.data_dir, "images/oci")
    v = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout}:built-app"],
                                  capture_output=True, text=True, check=True).stdout)
    # base's /etc layer + 5 steps (RUN, WORKDIR, COPY, RUN, RUN); the result adds no layer
    assert len(v["Layers"]) == 6, v["Layers"]
    # The daemon ran it: the job shows every step, and the last run's cache hits.
    job = daemon.request("GET", "/warren/v1/templates/built-app/build").json()
    assert job["status"] == "ready" and job["cacheHits"] == 2, job
    assert [s["status"] for s in job["steps"]] == [
        "done", "cached", "config", "cached", "done", "done", "config", "done"], job["steps"]
    assert job["digest"] == v["Digest"]

    # The cache is made of ordinary image templates: deleting them empties it, the built template
    # keeps its layers (its image references them), and the next build runs every step again.
    cache = [t["name"] for t in daemon.request("GET", "/warren/v1/templates").json()
             if t["name"].startswith("warren-build/cache:")]
    assert len(cache) >= 8, cache  # 5 steps of the first build, 3 of the third
    for n in cache:
        r = daemon.request("DELETE", "/warren/v1/templates/" + urllib.parse.quote(n, safe=""))
        assert r.status == 204, (n, r.status, r.body)
    assert sbx.commands.run("cat /srv/app/out.txt").stdout == "hi v2\n"
    other = new_sandbox(template="built-app")
    assert other.commands.run("cat /opt/built").stdout == "built\n"
    other.kill()
    sbx.kill()
    fourth = build()
    assert "CACHED" not in fourth, fourth

    bad = tmp_path / "Bad"
    bad.write_text("FROM base\nRUN exit 3\n")
    out = subprocess.run([str(daemon.binary), "template", "build", "bad-app", "-f", str(bad)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "RUN exited with code 3" in out.stderr, out
    bad.write_text("FROM base\nEXPOSE 80\n")
    out = subprocess.run([str(daemon.binary), "template", "build", "bad-app", "-f", str(bad)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "line 2: unsupported instruction" in out.stderr, out
    bad.write_text("FROM no-such-template\nRUN true\n")
    out = subprocess.run([str(daemon.binary), "template", "build", "bad-app", "-f", str(bad)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no-such-template" in out.stderr, out
    bad.write_text("FROM base\nCOPY missing /x\n")
    out = subprocess.run([str(daemon.binary), "template", "build", "bad-app", "-f", str(bad)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "line 2" in out.stderr and "missing" in out.stderr, out
    # Straight to the API: a context with a `../` entry, a COPY with no context, bad names.
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as t:
        for name, data in (("Dockerfile", b"FROM base\nCOPY . /x\n"), ("../escape", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    r = daemon.request("POST", "/warren/v1/templates/bad-app/build", raw=evil.getvalue(),
                       headers={"Content-Type": "application/x-tar"})
    assert r.status == 400 and "not a relative path inside the context" in r.error_body()["message"], r.body
    r = daemon.request("POST", "/warren/v1/templates/bad-app/build", {"dockerfile": "FROM base\nCOPY a /x\n"})
    assert r.status == 400 and "needs a build context" in r.error_body()["message"], r.body
    r = daemon.request("POST", "/warren/v1/templates/Bad%20Name/build", {"dockerfile": "FROM base\n"})
    assert r.status == 400 and r.error_body()["code"] == 400, r.body
    r = daemon.request("POST", "/warren/v1/templates/base/build", {"dockerfile": "FROM base\n"})
    assert r.status == 409, r.body
    assert daemon.request("GET", "/warren/v1/templates/never-built/build").status == 404
    assert daemon.request("GET", "/warren/v1/templates/bad-app").status == 404


def wait_built(daemon, name, timeout=180):
    got = {}

    def done():
        r = daemon.request("GET", f"/warren/v1/templates/{name}/build")
        assert r.status == 200, (r.status, r.body)
        got["j"] = r.json()
        return got["j"]["status"] != "building"

    assert wait_until(done, timeout), f"build {name} not done: {got}"
    return got["j"]


def test_template_build_config_applies_to_sandboxes(daemon, new_sandbox):
    dockerfile = (
        "FROM base\n"
        'ENV GREETING="hello world" BUILD_MODE=test\n'
        "WORKDIR /srv/work\n"
        "RUN echo data > file.txt\n"
        "USER 1000\n"
        "RUN id -un > /tmp/numeric-user\n"
        "USER root\n"
        'ENTRYPOINT ["/bin/sh", "-c"]\n'
        'CMD ["echo started > /tmp/cmd-ran"]\n'
    )
    r = daemon.request("POST", "/warren/v1/templates/config-app/build", {"dockerfile": dockerfile})
    assert r.status == 202, r.body
    job = wait_built(daemon, "config-app")
    assert job["status"] == "ready", job
    assert "step 4/9: RUN echo data > file.txt" in job["log"], job["log"]

    layout = os.path.join(daemon.data_dir, "images/oci")
    cfg = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"oci:{layout}:config-app"],
                                    capture_output=True, text=True, check=True).stdout)["config"]
    assert "GREETING=hello world" in cfg["Env"] and "BUILD_MODE=test" in cfg["Env"], cfg
    assert cfg["WorkingDir"] == "/srv/work" and cfg["User"] == "root", cfg
    assert cfg["Entrypoint"] == ["/bin/sh", "-c"], cfg
    assert cfg["Cmd"] == ["echo started > /tmp/cmd-ran"], cfg

    # A sandbox of the template runs with them (base's default user is `user`: USER root wins).
    sbx = new_sandbox(template="config-app")
    r = sbx.commands.run("env; pwd; id -un; cat file.txt")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert "GREETING=hello world" in lines and "BUILD_MODE=test" in lines, lines
    assert lines[-3:] == ["/srv/work", "root", "data"], lines
    r = sbx.commands.run('echo "$GREETING"; pwd; id -u; cat /tmp/numeric-user')
    # `USER 1000` ran its RUN as base's uid 1000, by name.
    assert r.stdout.splitlines() == ["hello world", "/srv/work", "0", "user"], r
    # ENTRYPOINT + CMD is the start command envd ran at boot.
    assert wait_until(lambda: sbx.commands.run("cat /tmp/cmd-ran || true").stdout.strip() == "started", 10)

    # Config only, no layer step: the result is base's layers with the new config.
    r = daemon.request("POST", "/warren/v1/templates/config-only/build",
                       {"dockerfile": "FROM base\nENV ONLY=1\n"})
    assert r.status == 202, r.body
    assert wait_built(daemon, "config-only")["status"] == "ready"
    sbx = new_sandbox(template="config-only")
    assert sbx.commands.run("echo $ONLY; id -un").stdout.split() == ["1", "user"]
