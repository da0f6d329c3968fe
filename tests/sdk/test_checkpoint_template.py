"""Templates from a checkpoint, with the unmodified `e2b-code-interpreter` SDK: a code-interpreter
sandbox imports a slow module, a checkpoint of it becomes a template, and every sandbox of that
template (created cold, or claimed from a pool on it) starts with the module already imported in
its kernel, so its first `run_code` pays no import time. The checkpoint cannot be deleted while
the template exists. Real CRIU; one daemon of its own."""

import os
import subprocess
import time

import pytest
from e2b import Sandbox as CoreSandbox
from e2b.exceptions import SandboxException
from e2b_code_interpreter import Sandbox

from warren_helpers import Daemon, remove_data_dir, remove_host_state, start_daemon, wait_until

# Stands for a heavy import (pandas, torch, a model's weights): about a second of work at import.
HEAVY = """import time
_t0 = time.monotonic()
time.sleep(0.8)
TABLE = [i * i for i in range(300_000)]
LOAD_SECONDS = time.monotonic() - _t0
"""
IMPORT = "import sys\nsys.path.insert(0, '/home/user')\nimport heavymod\nheavymod.LOAD_SECONDS"
CHECK = "import os, sys\n('heavymod' in sys.modules, len(heavymod.TABLE), os.urandom(8).hex())"


@pytest.fixture
def tdaemons(request):
    """A list holding the test's daemon; a test that restarts it appends the new one."""
    first = start_daemon()
    daemons = [first]
    yield daemons
    d = daemons[-1]
    if d.alive():
        for coll in ("sandboxsets",):
            for s in d.request("GET", f"/warren/v1/{coll}").json() or []:
                d.request("DELETE", f"/warren/v1/{coll}/{s['metadata']['name']}")
        for sid in d.list_ids():
            d.request("DELETE", f"/sandboxes/{sid}")
        wait_until(lambda: d.sandbox_dirs() == [], 15)
        d.stop()
    remove_host_state(first.prefix)
    remove_data_dir(first)
    rep = getattr(request.node, "rep_call", None)
    for x in daemons:
        if (rep is None or not rep.failed) and os.path.exists(x.log_path):
            os.unlink(x.log_path)


@pytest.fixture
def tdaemon(tdaemons):
    return tdaemons[0]


def opts(d) -> dict:
    return dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)


def timed_run(sbx, code):
    t = time.monotonic()
    r = sbx.run_code(code, timeout=30)
    return r, time.monotonic() - t


def test_template_from_a_checkpoint_starts_with_imports_done(tdaemon):
    d = tdaemon
    src = Sandbox.create(timeout=300, **opts(d))
    src.files.write("/home/user/heavymod.py", HEAVY)
    r, took = timed_run(src, IMPORT)
    assert r.error is None, r.error
    assert float(r.text) >= 0.8 and took >= 0.8, (r.text, took)

    ck = {"apiVersion": "warren.dev/v1alpha1", "kind": "Checkpoint",
          "metadata": {"name": "ci-warm"}, "spec": {"sandbox": src.sandbox_id}}
    r = d.request("PUT", "/warren/v1/checkpoints/ci-warm", ck)
    assert r.status == 201, r.body
    r = d.request("POST", "/warren/v1/templates", {"name": "ci-warm", "checkpoint": "ci-warm"})
    assert r.status == 201, r.body
    view = r.json()
    assert view["kind"] == "checkpoint" and view["status"] == "ready", view
    assert view["template"]["source"] == {"kind": "checkpoint", "checkpoint": "ci-warm"}
    listed = {t["name"]: t["kind"] for t in d.request("GET", "/warren/v1/templates").json()}
    assert listed["ci-warm"] == "checkpoint", listed

    # A sandbox of the template: a restore, with its own id, token and address, whose kernel has
    # the module imported. Its first run_code is fast.
    a = Sandbox.create(template="ci-warm", timeout=120, envs={"WHO": "a"}, **opts(d))
    b = Sandbox.create(template="ci-warm", timeout=120, **opts(d))
    assert len({a.sandbox_id, b.sandbox_id, src.sandbox_id}) == 3
    assert a.get_info().template_id == "ci-warm"
    ra, first = timed_run(a, CHECK)
    assert ra.error is None, ra.error
    loaded, size, rand_a = eval(ra.text)
    assert loaded is True and size == 300_000
    assert first < 0.5, f"first run_code took {first:.3f} s: the import was not skipped"
    rb, _ = timed_run(b, CHECK)
    assert eval(rb.text)[0] is True
    # Fresh kernel randomness per sandbox (os.urandom; userspace PRNGs are copied, see the docs).
    assert eval(rb.text)[2] != rand_a
    # Independent: a change in one is not in the other, nor in the source.
    assert timed_run(a, "x_only_in_a = 1")[0].error is None
    assert timed_run(b, "'x_only_in_a' in globals()")[0].text == "False"
    assert timed_run(src, "'x_only_in_a' in globals()")[0].text == "False"
    # New commands get the create's env vars; the hostname is the new id.
    assert a.commands.run("echo $WHO").stdout.strip() == "a"
    assert a.commands.run("hostname").stdout.strip() == a.sandbox_id
    # The source's token does not open the restored envd.
    assert d.request(
        "GET", "/files?path=/etc/hostname", api_key=None,
        headers={"E2b-Sandbox-Id": a.sandbox_id, "E2b-Sandbox-Port": "49983",
                 "X-Access-Token": src._envd_access_token},
    ).status == 401

    # The checkpoint is held by the template: deletes are refused, clearly.
    r = d.request("DELETE", "/warren/v1/checkpoints/ci-warm")
    assert r.status == 409 and "template" in r.body.decode() and "ci-warm" in r.body.decode(), r.body
    with pytest.raises(SandboxException) as e:
        CoreSandbox.delete_snapshot("ci-warm", **opts(d))
    assert "template" in str(e.value)

    # A pool on the template fills with restores; a create claims one, as fast.
    pool = {"apiVersion": "warren.dev/v1alpha1", "kind": "SandboxSet",
            "metadata": {"name": "warm"}, "spec": {"replicas": 2, "template": "ci-warm"}}
    r = d.request("PUT", "/warren/v1/sandboxsets/warm", pool)
    assert r.status == 200, r.body
    status = lambda: d.request("GET", "/warren/v1/sandboxsets/warm").json()["status"]  # noqa: E731
    assert wait_until(lambda: status()["availableReplicas"] == 2, 60), status()
    c = Sandbox.create(template="ci-warm", timeout=120, envs={"WHO": "c"}, **opts(d))
    assert status()["claimedReplicas"] == 1, status()
    rc, first = timed_run(c, CHECK)
    assert rc.error is None and eval(rc.text)[0] is True, rc
    assert first < 0.5, first
    assert c.commands.run("echo $WHO").stdout.strip() == "c"
    assert timed_run(c, "'x_only_in_a' in globals()")[0].text == "False"

    # The template is refused deletion while its pool and sandboxes live.
    r = d.request("DELETE", "/warren/v1/templates/ci-warm")
    assert r.status == 409 and "warm" in r.body.decode(), r.body
    assert d.request("DELETE", "/warren/v1/sandboxsets/warm").status in (200, 204)
    for s in (a, b, c):
        s.kill()
    assert wait_until(lambda: d.request("DELETE", "/warren/v1/templates/ci-warm").status == 204, 15)
    assert d.request("GET", "/warren/v1/templates/ci-warm").status == 404
    # Pool members are removed; then the checkpoint goes.
    assert wait_until(lambda: d.request("DELETE", "/warren/v1/checkpoints/ci-warm").status == 204, 15)
    # The source never noticed.
    assert timed_run(src, "len(heavymod.TABLE)")[0].text == "300000"


def test_bad_input(tdaemon):
    d = tdaemon

    def create(body):
        return d.request("POST", "/warren/v1/templates", body)

    r = create({"name": "t", "checkpoint": "nope"})
    assert r.status == 404 and "nope" in r.body.decode(), r.body
    r = create({"name": "t", "checkpoint": "x", "rootfs": "/"})
    assert r.status == 400 and "exactly one" in r.body.decode(), r.body
    src = CoreSandbox.create(timeout=120, **opts(d))
    snap = src.create_snapshot(name="plain")
    r = create({"name": "../t", "checkpoint": snap.snapshot_id})
    assert r.status == 400, r.body
    r = create({"name": "base", "checkpoint": snap.snapshot_id})
    assert r.status == 409, r.body
    assert create({"name": "t1", "checkpoint": snap.snapshot_id}).status == 201
    r = create({"name": "t1", "checkpoint": snap.snapshot_id})
    assert r.status == 409 and "exists" in r.body.decode(), r.body
    # A template of a core (non-code-interpreter) checkpoint works with the core SDK too.
    s = CoreSandbox.create(template="t1", timeout=60, **opts(d))
    assert s.commands.run("echo ok").stdout.strip() == "ok"
    s.kill()
    assert d.request("DELETE", "/warren/v1/templates/t1").status == 204
    assert d.request("DELETE", "/warren/v1/checkpoints/plain").status == 204
    # A deleted template is gone for creates.
    r = d.request("POST", "/sandboxes", {"templateID": "t1"})
    assert r.status == 404, r.body


def test_template_survives_a_daemon_restart(tdaemons):
    d = tdaemons[0]
    src = Sandbox.create(timeout=300, **opts(d))
    assert src.run_code("kept = 'before restart'").error is None
    snap = src.create_snapshot(name="kept")
    r = d.request("POST", "/warren/v1/templates", {"name": "kept", "checkpoint": snap.snapshot_id})
    assert r.status == 201, r.body
    src.kill()
    assert d.stop(timeout=20) == 0
    d2 = Daemon(
        binary=d.binary, envd=d.envd, port=d.port, api_key=d.api_key,
        data_dir=d.data_dir, log_path=f"{d.log_path}.2",
    )
    tdaemons.append(d2)
    d2.start()
    got = d2.request("GET", "/warren/v1/templates/kept")
    assert got.status == 200 and got.json()["kind"] == "checkpoint", got.body
    s = Sandbox.create(template="kept", timeout=60, **opts(d2))
    assert s.run_code("kept").text == "before restart"
    s.kill()
    assert d2.request("DELETE", "/warren/v1/checkpoints/kept").status == 409


def test_code_interpreter_kernel_state_survives_hibernation(tdaemon):
    """CRIU closes the server's connections to its kernels at a wake too: the server reconnects
    to the live kernel instead of replacing it (which would lose its variables)."""
    d = tdaemon
    s = Sandbox.create(timeout=300, **opts(d))
    assert s.run_code("state = 40 + 2").error is None
    r = d.request("POST", f"/warren/v1/sandboxes/{s.sandbox_id}/hibernate")
    assert r.status in (200, 204), r.body
    s2 = Sandbox.connect(s.sandbox_id, **opts(d))
    r = s2.run_code("state", timeout=30)
    assert r.error is None and r.text == "42", (r.error, r.text)


def _cli(d, *args):
    warren = os.path.join(os.path.dirname(str(d.binary)), "warren")
    return subprocess.run([warren, *args, "--url", d.url, "--api-key", d.api_key],
                          capture_output=True, text=True, timeout=60)


def test_cli_and_apply_kind_template(tdaemon, tmp_path):
    d = tdaemon
    src = CoreSandbox.create(timeout=120, **opts(d))
    src.create_snapshot(name="one")
    src.create_snapshot(name="two")
    r = _cli(d, "template", "create", "from-cli", "--checkpoint", "one")
    assert r.returncode == 0, r.stderr
    r = _cli(d, "template", "list")
    row = next(line.split() for line in r.stdout.splitlines() if line.startswith("from-cli"))
    assert row[1:5] == ["checkpoint", "ready", "checkpoint", "one"], row
    f = tmp_path / "t.yaml"
    f.write_text("apiVersion: warren.dev/v1alpha1\nkind: Template\nmetadata:\n  name: applied\n"
                 "spec:\n  checkpoint: one\n")
    for _ in range(2):  # idempotent
        r = _cli(d, "apply", "-f", str(f))
        assert r.returncode == 0 and "template/applied applied" in r.stdout, r.stderr
    s = CoreSandbox.create(template="applied", timeout=60, **opts(d))
    assert s.commands.run("hostname").stdout.strip() == s.sandbox_id
    s.kill()
    # Another source under the same name is a conflict; bad objects are named.
    obj = {"apiVersion": "warren.dev/v1alpha1", "kind": "Template",
           "metadata": {"name": "applied"}, "spec": {"checkpoint": "two"}}
    r = d.request("PUT", "/warren/v1/templates/applied", obj)
    assert r.status == 409 and "checkpoint one" in r.body.decode(), r.body
    r = d.request("PUT", "/warren/v1/templates/other", obj)
    assert r.status == 400 and "metadata.name" in r.body.decode(), r.body
    r = d.request("PUT", "/warren/v1/templates/applied", {**obj, "kind": "Checkpoint"})
    assert r.status == 400, r.body
    r = d.request("PUT", "/warren/v1/templates/applied", {**obj, "spec": {"checkpont": "one"}})
    assert r.status == 400, r.body
    r = _cli(d, "delete", "-f", str(f))
    assert r.returncode == 0 and "template/applied deleted" in r.stdout, r.stderr
    assert _cli(d, "template", "delete", "from-cli").returncode == 0
    assert d.request("DELETE", "/warren/v1/checkpoints/one").status == 204
