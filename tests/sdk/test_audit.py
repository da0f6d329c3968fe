"""The audit log: API calls, processes started through envd (with exit status), file changes,
network rule changes and state changes, queried by sandbox, key, kind and time, over the API and
with `warren audit`, and kept across daemon restarts."""

import json
import subprocess
import time

from e2b import Sandbox


def entries(daemon, **params):
    q = "&".join(f"{k}={v}" for k, v in params.items())
    r = daemon.request("GET", f"/warren/v1/audit?{q}")
    assert r.status == 200, (r.status, r.body)
    return r.json()


def test_a_sandbox_story_is_recorded(daemon, new_sandbox):
    sbx = new_sandbox()
    sid = sbx.sandbox_id
    assert sbx.commands.run("echo hi", envs={"SECRET_TOKEN": "s3cr3t"}).stdout == "hi\n"
    try:
        sbx.commands.run("exit 3")
    except Exception:  # CommandExitException
        pass
    sbx.files.write("/home/user/a.txt", "x")
    sbx.files.rename("/home/user/a.txt", "/home/user/b.txt")
    sbx.files.remove("/home/user/b.txt")
    sbx.update_network({"deny_out": ["10.0.0.0/8"]})
    sbx.pause()
    Sandbox.connect(sid)

    log = entries(daemon, sandbox=sid)
    kinds = {e["kind"] for e in log}
    assert kinds == {"api", "process", "file", "network", "lifecycle"}, kinds
    assert all(e["sandbox"] == sid for e in log)
    assert [e["seq"] for e in log] == sorted(e["seq"] for e in log)

    procs = [e for e in log if e["kind"] == "process"]
    echo = next(p for p in procs if "echo hi" in p["detail"]["args"])
    assert echo["result"] == "0" and echo["detail"]["pid"] > 0 and echo["duration_ms"] > 0
    assert echo["detail"]["env_names"] == ["SECRET_TOKEN"]
    assert "s3cr3t" not in json.dumps(log), "env values are never recorded"
    assert next(p for p in procs if "exit 3" in p["detail"]["args"])["result"] == "3"

    files = [(e["action"], e["detail"].get("path") or e["detail"].get("source")) for e in log if e["kind"] == "file"]
    assert ("write", "/home/user/a.txt") in files
    assert ("move", "/home/user/a.txt") in files
    assert ("remove", "/home/user/b.txt") in files

    net = [e for e in log if e["kind"] == "network"]
    assert net[-1]["detail"]["deny_out"] == ["10.0.0.0/8"]

    life = [e["action"] for e in log if e["kind"] == "lifecycle"]
    for step in ["-> creating", "creating -> running", "running -> pausing", "pausing -> paused", "paused -> resuming", "resuming -> running"]:
        assert step in life, (step, life)

    api = [e["action"] for e in log if e["kind"] == "api"]
    assert "POST /sandboxes/{id}/pause" in api and "PUT /sandboxes/{id}/network" in api
    assert all(e["key_id"] for e in log)


def test_queries_filter_and_refuse_bad_input(daemon, sandbox):
    sid = sandbox.sandbox_id
    sandbox.commands.run("true")
    only = entries(daemon, sandbox=sid, kind="process")
    assert only and all(e["kind"] == "process" for e in only)
    later = entries(daemon, sandbox=sid, since="2999-01-01T00:00:00Z")
    assert later == []
    first = entries(daemon, sandbox=sid, limit=1)
    assert len(first) == 1
    rest = entries(daemon, sandbox=sid, after=first[0]["seq"])
    assert rest and rest[0]["seq"] > first[0]["seq"]
    for bad in ("kind=nope", "since=yesterday", "limit=0", "format=xml"):
        r = daemon.request("GET", f"/warren/v1/audit?{bad}")
        assert r.status == 400, (bad, r.status, r.body)
        r.error_body()
    assert daemon.request("GET", "/warren/v1/audit", api_key="wrong").status == 401
    r = daemon.request("GET", f"/warren/v1/audit?sandbox={sid}&format=jsonl")
    lines = r.body.decode().splitlines()
    assert r.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(x)["seq"] for x in lines] == [e["seq"] for e in entries(daemon, sandbox=sid)]


def test_cli_exports_json_lines(daemon, sandbox):
    sandbox.commands.run("true")
    out = subprocess.run(
        [str(daemon.binary), "audit", "--url", daemon.url, "--api-key", daemon.api_key,
         "--sandbox", sandbox.sandbox_id, "--kind", "process", "--jsonl"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert rows and all(r["kind"] == "process" for r in rows)
    table = subprocess.run(
        [str(daemon.binary), "audit", "--url", daemon.url, "--api-key", daemon.api_key, "--sandbox", sandbox.sandbox_id],
        capture_output=True, text=True, timeout=30,
    )
    assert table.returncode == 0 and table.stdout.startswith("SEQ"), table
    bad = subprocess.run(
        [str(daemon.binary), "audit", "--url", daemon.url, "--api-key", daemon.api_key, "--since", "soon"],
        capture_output=True, text=True, timeout=30,
    )
    assert bad.returncode != 0 and "RFC 3339" in bad.stderr, bad


def test_the_log_survives_a_restart():
    from test_restart import _restart
    from warren_helpers import remove_data_dir, remove_host_state, start_daemon

    daemons = [start_daemon()]
    try:
        d = daemons[0]
        sbx = Sandbox.create(timeout=60, api_key=d.api_key, api_url=d.url, sandbox_url=d.url)
        sbx.commands.run("echo before")
        before = entries(d, sandbox=sbx.sandbox_id)
        d2 = _restart(daemons)
        after = entries(d2, sandbox=sbx.sandbox_id)
        assert after[: len(before)] == before
        Sandbox.kill(sbx.sandbox_id, api_key=d2.api_key, api_url=d2.url)
    finally:
        for x in daemons:
            if x.alive():
                x.stop()
        remove_host_state(daemons[0].prefix)
        remove_data_dir(daemons[0])
