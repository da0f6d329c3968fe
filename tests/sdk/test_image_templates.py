"""Templates from OCI images, through the API and the E2B SDK.

The image is an OCI layout built by tests/images/make-busybox-image.sh with umoci from Debian's
busybox-static (no network): two layers (the second whites out a file of the first) and a config
with Env, WorkingDir and User. A sandbox of the template must see the image's files, env, workdir
and user, and Warren's /etc/hosts; the template cannot be deleted while the sandbox lives.
"""

import os
import subprocess
import time

import pytest

from warren_helpers import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def busybox_layout(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "layout"
    subprocess.run(
        [os.path.join(ROOT, "tests/images/make-busybox-image.sh"), str(out), "v1"],
        check=True,
        capture_output=True,
    )
    return str(out)


def wait_built(daemon, name, timeout=60):
    def done():
        r = daemon.request("GET", f"/warren/v1/templates/{name}")
        assert r.status == 200, (r.status, r.body)
        return r.json() if r.json()["status"] != "building" else None

    view = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = done()
        if view:
            return view
        time.sleep(0.1)
    raise AssertionError(f"template {name} still building after {timeout}s")


@pytest.fixture
def image_template(daemon, busybox_layout):
    name = f"bb-{os.getpid()}-{time.monotonic_ns() % 100000}"
    r = daemon.request("POST", "/warren/v1/templates", {"name": name, "ociDir": busybox_layout, "imageName": "v1"})
    assert r.status == 202, (r.status, r.body)
    assert r.json()["status"] in ("building", "ready")
    view = wait_built(daemon, name)
    assert view["status"] == "ready", view
    yield name
    daemon.request("DELETE", f"/warren/v1/templates/{name}")


def test_sandbox_from_an_image_template(daemon, image_template, new_sandbox):
    view = daemon.request("GET", f"/warren/v1/templates/{image_template}").json()
    t = view["template"]
    assert len(t["layers"]) == 2
    assert t["workdir"] == "/data" and t["user"] == "1000"
    assert t["env"]["IMAGE_GREETING"] == "hi from config"

    sbx = new_sandbox(template=image_template, envs={"FROM_CREATE": "yes"})
    r = sbx.commands.run("pwd; id -un; echo $IMAGE_GREETING $FROM_CREATE; cat hello.txt; ls /data")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "/data"
    assert lines[1] == "user"
    assert lines[2] == "hi from config yes"
    assert lines[3] == "hello from the image"
    assert "removed-later.txt" not in lines[4:], "the second layer's whiteout hides the file"
    assert "localhost" in sbx.files.read("/etc/hosts")
    assert sbx.files.read("/data/hello.txt") == "hello from the image\n"
    # Writes go to the sandbox's upper dir, never to the shared layers.
    sbx.files.write("/data/hello.txt", "changed", user="root")
    assert sbx.files.read("/data/hello.txt") == "changed"
    other = new_sandbox(template=image_template)
    assert other.files.read("/data/hello.txt") == "hello from the image\n"

    # Deleted while in use: new creates of it fail, the sandboxes on it keep their layers (also
    # through a hibernation and wake), and the layers go when the last of them ends.
    r = daemon.request("DELETE", f"/warren/v1/templates/{image_template}")
    assert r.status == 204, (r.status, r.body)
    assert daemon.request("GET", f"/warren/v1/templates/{image_template}").status == 404
    r = daemon.request("POST", "/sandboxes", {"templateID": image_template})
    assert r.status == 404, (r.status, r.body)
    assert all(os.path.exists(p) for p in t["layers"]), "layers in use are kept"
    assert other.commands.run("cat /data/hello.txt").stdout == "hello from the image\n"
    # A busybox image has no glibc: envd runs through the loader of its init layer, so that
    # CRIU finds every file it maps inside the sandbox and the sandbox hibernates.
    r = daemon.request("POST", f"/warren/v1/sandboxes/{sbx.sandbox_id}/hibernate")
    assert r.status == 200, (r.status, r.body)
    sbx.connect()
    assert sbx.files.read("/data/hello.txt") == "changed"
    assert sbx.commands.run("cat /data/removed-later.txt || echo hidden").stdout == "hidden\n"
    sbx.kill()
    assert all(os.path.exists(p) for p in t["layers"]), "the other sandbox still stacks them"
    other.kill()
    # Its layers are collected once nothing uses them.
    # (Only its own: other tests of the same daemon, e.g. commits, may keep images in the store.)
    assert wait_until(lambda: not any(os.path.exists(p) for p in t["layers"]), 15), t["layers"]


def test_template_bad_input(daemon, busybox_layout, tmp_path):
    def create(body):
        return daemon.request("POST", "/warren/v1/templates", body)

    r = create({"name": "x1", "image": "UPPER::bad"})
    assert r.status == 400 and "invalid image reference" in r.json()["message"], r.body
    r = create({"name": "x1"})
    assert r.status == 400 and "exactly one of" in r.json()["message"], r.body
    r = create({"name": "../x", "ociDir": busybox_layout})
    assert r.status == 400 and "invalid template name" in r.json()["message"], r.body
    r = create({"name": "base", "ociDir": busybox_layout})
    assert r.status == 409, r.body
    r = create({"name": "x1", "ociDir": "/nonexistent/layout"})
    assert r.status == 400 and "not a directory" in r.json()["message"], r.body
    assert daemon.request("GET", "/warren/v1/templates/nope").status == 404
    r = daemon.request("DELETE", "/warren/v1/templates/base")
    assert r.status == 409 and "built into the daemon" in r.json()["message"], r.body

    # An archive with a `../` member: the build fails with a clear error, and the template is
    # not created.
    evil = tmp_path / "evil.tar"
    subprocess.run(
        ["python3", "-c", f"""
import io, tarfile
with tarfile.open({str(evil)!r}, "w") as t:
    data = b"x"
    info = tarfile.TarInfo("../../escape")
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))
"""],
        check=True,
    )
    r = create({"name": "evil", "ociArchive": str(evil)})
    assert r.status == 202, r.body
    view = wait_built(daemon, "evil")
    assert view["status"] == "failed"
    assert "climbs out" in view["build"]["error"], view
    assert not os.path.exists(os.path.join(os.path.dirname(daemon.data_dir), "escape"))
    assert daemon.request("DELETE", "/warren/v1/templates/evil").status == 204

