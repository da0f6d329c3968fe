"""Warm pools (SandboxSet), PoolingAutoScaler and the refresher, through the real SDK and API.

Pool members are sandboxes nobody can list, so every test deletes its pools at the end and waits
until their members are gone (the session teardown checks that no sandbox dir is left).
"""

import os
import shutil
import subprocess
import threading
import time

import pytest
from e2b import Sandbox

from warren_helpers import wait_until

API = "warren.dev/v1alpha1"


def sandbox_set(name, replicas, template="base", **spec):
    return {
        "apiVersion": API,
        "kind": "SandboxSet",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "template": template, **spec},
    }


@pytest.fixture
def pools(daemon):
    """`pools.apply(obj)`, `pools.status(name)`, `pools.wait_ready(name, n)`; cleans up after."""

    class Pools:
        def apply(self, obj, expect=200):
            coll = "sandboxsets" if obj["kind"] == "SandboxSet" else "poolingautoscalers"
            r = daemon.request("PUT", f"/warren/v1/{coll}/{obj['metadata']['name']}", obj)
            assert r.status == expect, (r.status, r.body)
            return r.json()

        def status(self, name):
            r = daemon.request("GET", f"/warren/v1/sandboxsets/{name}")
            assert r.status == 200, (r.status, r.body)
            return r.json()["status"]

        def wait_ready(self, name, n, timeout=60):
            ok = wait_until(
                lambda: (lambda s: s["availableReplicas"] == n and s["startingReplicas"] == 0)(self.status(name)),
                timeout,
            )
            assert ok, f"pool {name} not ready with {n}: {self.status(name)}"

        def members(self):
            """Ids of sandboxes that exist on the host but no client can list: pool members."""
            listed = set(daemon.list_ids())
            return set(daemon.sandbox_dirs()) - listed

    p = Pools()
    yield p
    for coll in ("poolingautoscalers", "sandboxsets"):
        for obj in daemon.request("GET", f"/warren/v1/{coll}").json():
            daemon.request("DELETE", f"/warren/v1/{coll}/{obj['metadata']['name']}")
    assert wait_until(lambda: not p.members(), 30), f"pool members left: {p.members()}"


def metric(daemon, name, **labels):
    text = daemon.request("GET", "/metrics", api_key=None).body.decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def test_claim_applies_env_metadata_timeout_and_the_pool_refills(daemon, pools, new_sandbox):
    pools.apply(sandbox_set("claim", 2))
    pools.wait_ready("claim", 2)
    members = pools.members()
    assert len(members) == 2
    claims_before = metric(daemon, "warren_pool_claims_total", pool="claim")

    sbx = new_sandbox(envs={"X": "from-the-request", "Y": "two words"}, metadata={"who": "pool-test"}, timeout=90)
    assert sbx.sandbox_id in members, "served from the pool, not cold"
    status = pools.status("claim")
    assert status["claimedReplicas"] == 1
    # The claim wakes the pool's reconciler, which starts the refill on its own task: the
    # replacement shows up as starting (or already ready) shortly after the create returns.
    refilling = wait_until(
        lambda: (lambda s: s["availableReplicas"] + s["startingReplicas"] == 2)(pools.status("claim")),
        10,
    )
    assert refilling, pools.status("claim")
    assert metric(daemon, "warren_pool_claims_total", pool="claim") == claims_before + 1

    # The request's env vars reach every later process, as if set at create.
    assert sbx.commands.run("echo $X").stdout == "from-the-request\n"
    assert sbx.commands.run('echo "$Y"', user="root").stdout == "two words\n"
    bg = sbx.commands.run("sleep 0.2; echo $X > /tmp/x", background=True)
    bg.wait()
    assert sbx.files.read("/tmp/x") == "from-the-request\n"
    info = sbx.get_info()
    assert info.metadata == {"who": "pool-test"}
    assert 85 <= (info.end_at - info.started_at).total_seconds() <= 95
    assert sbx.sandbox_id in daemon.list_ids(), "visible to its owner once claimed"

    pools.wait_ready("claim", 2)
    assert len(pools.members()) == 2 and sbx.sandbox_id not in pools.members()


def test_empty_pool_falls_back_to_a_cold_create(daemon, pools, new_sandbox):
    pools.apply(sandbox_set("empty", 0))
    misses = metric(daemon, "warren_pool_misses_total", template="base")
    sbx = new_sandbox(envs={"X": "cold"})
    assert sbx.commands.run("echo $X").stdout == "cold\n"
    assert metric(daemon, "warren_pool_misses_total", template="base") == misses + 1


def test_fifty_concurrent_creates_never_share_a_sandbox(daemon, pools):
    pools.apply(sandbox_set("burst", 20))
    pools.wait_ready("burst", 20, timeout=120)
    members = pools.members()
    results, errors = [None] * 50, []

    def create(i):
        try:
            s = Sandbox.create(envs={"N": str(i)}, timeout=120)
            daemon.register(s.sandbox_id)
            results[i] = s
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        ids = [s.sandbox_id for s in results]
        assert len(set(ids)) == 50, "two creates got the same sandbox"
        assert len(set(ids) & members) == 20, "every member was handed out exactly once"
        for i, s in enumerate(results):
            assert s.commands.run("echo $N").stdout == f"{i}\n"
    finally:
        for s in results:
            if s is not None:
                Sandbox.kill(s.sandbox_id)


def test_template_change_rolls_every_unclaimed_member(daemon, pools, new_sandbox, request):
    pools.apply(sandbox_set("roll", 3, updateStrategy={"maxUnavailable": 1}))
    pools.wait_ready("roll", 3)
    claimed = new_sandbox()
    pools.wait_ready("roll", 3)
    old = pools.members()
    assert len(old) == 3

    # Replace the template on disk the way the daemon itself does: build beside, rename in place.
    # `cp -a` keeps owners and modes (the layer has the user's home); the original comes back
    # at the end so later tests see the template they expect.
    tdir = os.path.join(daemon.data_dir, "templates", "base")
    current, new, saved = (os.path.join(tdir, n) for n in ("rootfs", "rootfs.new", f"rootfs.saved.{os.getpid()}"))
    subprocess.run(["cp", "-a", current, new], check=True)
    os.makedirs(os.path.join(new, "etc"), exist_ok=True)
    with open(os.path.join(new, "etc", "pool-generation"), "w") as f:
        f.write("2\n")
    os.rename(current, saved)
    os.rename(new, current)
    request.addfinalizer(lambda: (os.rename(current, new), os.rename(saved, current)))

    worst = 3
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = pools.status("roll")
        worst = min(worst, s["availableReplicas"] + s["staleReplicas"])
        if s["staleReplicas"] == 0 and s["availableReplicas"] == 3 and not (pools.members() & old):
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"rolling update did not finish: {pools.status('roll')}")
    assert worst >= 2, "maxUnavailable 1 of 3: never fewer than 2 ready members"
    assert not (pools.members() & old), "every old member was replaced"

    fresh = new_sandbox()
    assert fresh.sandbox_id in pools.members() | {fresh.sandbox_id}
    assert fresh.commands.run("cat /etc/pool-generation").stdout == "2\n"
    # The sandbox claimed before the change is its owner's and untouched.
    assert claimed.commands.run("test -e /etc/pool-generation; echo $?").stdout == "1\n"


def test_recommitting_a_pools_image_rolls_the_pool_and_frees_the_old_layers(daemon, pools, new_sandbox):
    """A pool on an image that is committed (or built) again rolls to the new image; the old
    image's layers live while a member or a claimed sandbox stacks them, then go."""
    from test_commit import commit, wait_done

    layers = os.path.join(daemon.data_dir, "images/layers")
    src = new_sandbox()
    src.commands.run("echo 1 > /home/user/generation", user="root")
    c1 = wait_done(daemon, commit(daemon, src.sandbox_id, "local/pooled:v1")["metadata"]["name"])
    assert c1["status"]["phase"] == "Succeeded", c1
    pools.apply(sandbox_set("committed", 2, template="local/pooled:v1", updateStrategy={"maxUnavailable": 1}))
    pools.wait_ready("committed", 2)
    claimed = new_sandbox(template="local/pooled:v1")
    pools.wait_ready("committed", 2)
    old = pools.members()
    assert claimed.files.read("/home/user/generation") == "1\n"

    src.commands.run("echo 2 > /home/user/generation", user="root")
    c2 = wait_done(daemon, commit(daemon, src.sandbox_id, "local/pooled:v1")["metadata"]["name"])
    assert c2["status"]["phase"] == "Succeeded", c2
    assert daemon.request("DELETE", f"/warren/v1/commits/{c1['metadata']['name']}").status == 204
    with_old = set(os.listdir(layers))

    def rolled():
        st = pools.status("committed")
        return st["staleReplicas"] == 0 and st["availableReplicas"] == 2 and not (pools.members() & old)

    assert wait_until(rolled, 60), pools.status("committed")
    fresh = new_sandbox(template="local/pooled:v1")
    assert fresh.files.read("/home/user/generation") == "2\n"
    # The claimed sandbox still stacks the old layers: they stay until it ends.
    assert set(os.listdir(layers)) == with_old
    assert claimed.files.read("/home/user/generation") == "1\n"
    claimed.kill()
    assert wait_until(lambda: set(os.listdir(layers)) < with_old, 15), sorted(with_old)
    assert fresh.files.read("/home/user/generation") == "2\n"
    pools.apply(sandbox_set("committed", 0, template="local/pooled:v1"))
    assert wait_until(lambda: not pools.members(), 30)
    assert daemon.request("DELETE", f"/warren/v1/commits/{c2['metadata']['name']}").status == 204


def test_a_killed_claimed_sandbox_leaves_nothing_for_the_next_owner(daemon, pools):
    pools.apply(sandbox_set("reuse", 1, reusePolicy="Recycle"))
    pools.wait_ready("reuse", 1)
    first = Sandbox.create(timeout=60)
    daemon.register(first.sandbox_id)
    first.files.write("/home/user/secret.txt", "previous owner")
    first.commands.run("sleep 1000", background=True)
    Sandbox.kill(first.sandbox_id)
    assert wait_until(lambda: first.sandbox_id not in daemon.sandbox_dirs(), 10)
    assert wait_until(lambda: not [c for c in daemon.cgroup_leaks() if first.sandbox_id in c], 10)

    pools.wait_ready("reuse", 1)
    second = Sandbox.create(timeout=60)
    daemon.register(second.sandbox_id)
    try:
        assert second.sandbox_id != first.sandbox_id
        assert not second.files.exists("/home/user/secret.txt")
        ps = second.commands.run("ps -eo args", user="root").stdout
        assert "sleep 1000" not in ps
    finally:
        Sandbox.kill(second.sandbox_id)


def test_autoscaler_raises_the_pool_to_its_minimum(daemon, pools):
    pools.apply(sandbox_set("scaled", 1))
    view = pools.apply(
        {
            "apiVersion": API,
            "kind": "PoolingAutoScaler",
            "metadata": {"name": "scaled-as"},
            "spec": {
                "scaleTargetRef": {"kind": "SandboxSet", "name": "scaled"},
                "minReplicas": 3,
                "maxReplicas": 5,
                "minAvailableRatio": "20%",
                "maxAvailableRatio": "90%",
            },
        }
    )
    assert view["spec"]["maxReplicas"] == 5
    pools.wait_ready("scaled", 3)
    st = daemon.request("GET", "/warren/v1/poolingautoscalers/scaled-as").json()["status"]
    assert st["desiredReplicas"] == 3 and st.get("lastScaleTime"), st
    assert metric(daemon, "warren_autoscaler_decisions_total", autoscaler="scaled-as", decision="scale_up") >= 1


@pytest.mark.parametrize(
    "obj, message",
    [
        (sandbox_set("nope", 1, template="no-such-template"), "template 'no-such-template' not found"),
        (sandbox_set("neg", -1), "invalid SandboxSet"),
        (
            {"apiVersion": API, "kind": "PoolingAutoScaler", "metadata": {"name": "a"},
             "spec": {"scaleTargetRef": {"kind": "SandboxSet", "name": "x"}, "minReplicas": 9, "maxReplicas": 2}},
            "minReplicas (9) is greater than maxReplicas (2)",
        ),
        (
            {"apiVersion": API, "kind": "PoolingAutoScaler", "metadata": {"name": "a"},
             "spec": {"scaleTargetRef": {"kind": "SandboxSet", "name": "x"}, "maxReplicas": 2,
                      "maxAvailableRatio": "150%"}},
            "outside 0%–100%",
        ),
        (
            {"apiVersion": API, "kind": "PoolingAutoScaler", "metadata": {"name": "a"},
             "spec": {"scaleTargetRef": {"kind": "SandboxSet", "name": "x"}, "maxReplicas": 2,
                      "schedule": [{"bounds": [{"cron": "every monday", "minReplicas": 1, "maxReplicas": 2}]}]}},
            "cron \"every monday\" is invalid",
        ),
    ],
)
def test_bad_objects_are_clear_400s(daemon, pools, obj, message):
    body = pools.apply(obj, expect=400)
    assert body["code"] == 400
    assert message in body["message"], body


def _cli(daemon, *args, stdin=None):
    warren = os.path.join(os.path.dirname(str(daemon.binary)), "warren")
    return subprocess.run(
        [warren, *args, "--url", daemon.url, "--api-key", daemon.api_key],
        input=stdin, capture_output=True, text=True, timeout=60,
    )


def test_cli_apply_pool_list_and_delete(daemon, pools, tmp_path):
    f = tmp_path / "pool.yaml"
    f.write_text(
        """apiVersion: agents.kruise.io/v1alpha1
kind: SandboxSet
metadata:
  name: cli-pool
spec:
  replicas: 1
  template: base
---
apiVersion: agents.kruise.io/v1alpha1
kind: PoolingAutoScaler
metadata:
  name: cli-autoscaler
spec:
  scaleTargetRef:
    apiVersion: agents.kruise.io/v1alpha1
    kind: sandboxset
    name: cli-pool
  observeWindowSeconds: 600
  minReplicas: 1
  maxReplicas: 3
  minAvailableRatio: 20%
  maxAvailableRatio: 90%
  schedule:
    - startTime: "2025-12-1 00:00:00"
      endTime: "2031-12-12 00:00:00"
      bounds:
        - cron: "* 0-8 ? * MON-FRI"
          minReplicas: 2
          maxReplicas: 3
"""
    )
    r = _cli(daemon, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert "sandboxset/cli-pool applied" in r.stdout
    assert "poolingautoscaler/cli-autoscaler applied" in r.stdout
    assert wait_until(lambda: pools.status("cli-pool")["availableReplicas"] >= 1, 30)
    r = _cli(daemon, "pool", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:6] == ["NAME", "TEMPLATE", "DESIRED", "READY", "STARTING", "CLAIMED"]
    row = next(line.split() for line in lines[1:] if line.startswith("cli-pool"))
    assert row[1] == "base" and row[-1] == "cli-autoscaler"

    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Deployment\nmetadata:\n  name: x\n")
    r = _cli(daemon, "apply", "-f", str(bad))
    assert r.returncode != 0
    assert 'unknown kind "Deployment"' in r.stderr
    bad.write_text(f.read_text().replace("maxReplicas: 3\n  minAvailable", "maxReplicas: 0\n  minAvailable"))
    r = _cli(daemon, "apply", "-f", str(bad))
    assert r.returncode != 0
    assert "minReplicas (1) is greater than maxReplicas (0)" in r.stderr

    r = _cli(daemon, "delete", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert "sandboxset/cli-pool deleted" in r.stdout
    assert daemon.request("GET", "/warren/v1/sandboxsets/cli-pool").status == 404
