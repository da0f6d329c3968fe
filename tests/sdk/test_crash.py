"""Crash safety: the daemon is SIGKILLed at random moments while creates, pauses, resumes,
hibernations, commits and kills are in flight, then restarted on the same data dir. After
recovery every sandbox is either usable or fully gone: the API, the sandbox dirs, the mounts,
the cgroups, the veths, the nft egress entries and the processes agree; no sandbox whose create
or resume was acknowledged is lost, and no accepted commit is lost (it finished, or says that
the restart interrupted it) and a finished one is a usable template.

WARREN_CRASH_ITERATIONS sets the number of kills (CI: 10; the benchmark tier runs 100 with
`bench/crash.sh`)."""

import concurrent.futures
import glob
import json
import os
import random
import subprocess
import threading
import time

from test_restart import _restart
from warren_helpers import (mounts_under, remove_data_dir, remove_host_state, start_daemon,
                            wait_until)

ITERATIONS = int(os.environ.get("WARREN_CRASH_ITERATIONS", "10"))


class Ledger:
    """What the API acknowledged, so the test knows what must survive."""

    def __init__(self):
        self.lock = threading.Lock()
        self.alive = set()  # acknowledged creates, not acknowledged kills
        self.killed = set()
        self.commits = set()  # accepted commits (202)
        self.usable_commits = set()  # succeeded ones already started from
        self.serial = 0

    def next_serial(self):
        with self.lock:
            self.serial += 1
            return self.serial

    def created(self, sid):
        with self.lock:
            self.alive.add(sid)

    def killing(self, sid):
        """A kill is on its way: whether it completes is up to the crash."""
        with self.lock:
            self.alive.discard(sid)

    def gone(self, sid):
        with self.lock:
            self.alive.discard(sid)
            self.killed.add(sid)


def worker(d, ledger, stop, rng):
    """Random operations against the daemon until `stop` or the daemon dies."""
    while not stop.is_set():
        with ledger.lock:
            known = sorted(ledger.alive)
        ops = ["create", "create", "pause", "resume", "hibernate", "commit", "kill"]
        op = rng.choice(ops if known else ["create"])
        try:
            if op == "create":
                r = d.request("POST", "/v2/sandboxes", {"templateID": "base", "timeout": 600}, timeout=10)
                if r.status == 201:
                    ledger.created(r.json()["sandboxID"])
            else:
                sid = rng.choice(known)
                if op == "pause":
                    d.request("POST", f"/sandboxes/{sid}/pause", timeout=10)
                elif op == "resume":
                    d.request("POST", f"/sandboxes/{sid}/connect", {"timeout": 600}, timeout=10)
                elif op == "hibernate":
                    d.request("POST", f"/warren/v1/sandboxes/{sid}/hibernate", timeout=30)
                elif op == "commit":
                    name = f"crash-{ledger.next_serial()}"
                    body = {"kind": "Commit", "metadata": {"name": name},
                            "spec": {"sandbox": sid, "image": f"local/{name}:v1"}}
                    r = d.request("POST", "/warren/v1/commits", body, timeout=30)
                    if r.status == 202:
                        with ledger.lock:
                            ledger.commits.add(name)
                else:
                    ledger.killing(sid)
                    r = d.request("DELETE", f"/sandboxes/{sid}", timeout=10)
                    if r.status in (204, 404):
                        ledger.gone(sid)
        except OSError:
            return  # the daemon was killed under us


def envd_answers(d, sid):
    try:
        r = d.request(
            "POST",
            "/process.Process/List",
            raw=b"{}",
            api_key=None,
            headers={
                "E2b-Sandbox-Id": sid,
                "E2b-Sandbox-Port": "49983",
                "X-Access-Token": d.request("GET", f"/sandboxes/{sid}").json()["envdAccessToken"],
            },
            timeout=10,
        )
    except OSError:
        return False  # e.g. a sandbox left frozen: the request hangs
    return r.status == 200


def check_consistent(d, ledger):
    """Every listed sandbox works; nothing of an unlisted one remains on the host."""
    listed = {}
    for state in ("running", "paused"):
        r = d.request("GET", f"/v2/sandboxes?state={state}")
        assert r.status == 200, r
        for s in r.json():
            listed[s["sandboxID"]] = s["state"]
    problems = []
    lost = ledger.alive - set(listed)
    if lost:
        problems.append(f"acknowledged sandboxes lost: {sorted(lost)}")
    zombies = ledger.killed & set(listed)
    if zombies:
        problems.append(f"killed sandboxes listed again: {sorted(zombies)}")
    for sid, state in listed.items():
        if state == "paused":
            r = d.request("POST", f"/sandboxes/{sid}/connect", {"timeout": 600})
            if r.status not in (200, 201):
                problems.append(f"{sid}: resume after restart -> {r.status} {r.body[:200]!r}")
                continue
        if not envd_answers(d, sid):
            problems.append(f"{sid}: envd does not answer after restart")
    problems += check_commits(d, ledger)
    # Host state: only listed sandboxes have dirs, mounts, cgroups and processes.
    dirs = set(os.listdir(os.path.join(d.data_dir, "sandboxes")))
    if dirs - set(listed):
        problems.append(f"sandbox dirs without a sandbox: {sorted(dirs - set(listed))}")
    sandboxes_dir = os.path.join(d.data_dir, "sandboxes") + "/"
    stray = sorted({m for m in mounts_under(d.data_dir)
                    if m.startswith(sandboxes_dir)
                    and m[len(sandboxes_dir):].split("/")[0] not in listed})
    if stray:
        problems.append(f"mounts without a sandbox: {stray}")
    for parent in glob.glob(f"/sys/fs/cgroup/*/{d.cgroup_name}"):
        cgs = {c for c in os.listdir(parent) if os.path.isdir(os.path.join(parent, c))}
        if cgs - set(listed):
            problems.append(f"cgroups without a sandbox in {parent}: {sorted(cgs - set(listed))}")
    if len(d.veths()) > len(listed) + 4:
        problems.append(f"veths: {len(d.veths())} for {len(listed)} sandboxes")
    table = subprocess.run(["nft", "-j", "list", "map", "inet", f"warren_{d.prefix}", "egress"],
                           capture_output=True, text=True).stdout
    if table:
        elems = json.loads(table)["nftables"][1]["map"].get("elem", [])
        if len(elems) > len(listed):
            problems.append(f"egress map entries without a sandbox: {elems}")
    return listed, problems


def check_commits(d, ledger):
    """Every accepted commit is still there: finished, or failed saying why; a finished one's
    image is a template a sandbox can start from."""
    problems = []
    for name in sorted(ledger.commits):
        ok = wait_until(lambda: d.request("GET", f"/warren/v1/commits/{name}").json()
                        .get("status", {}).get("phase") in ("Succeeded", "Failed"), 30)
        r = d.request("GET", f"/warren/v1/commits/{name}")
        if r.status != 200:
            problems.append(f"accepted commit {name} lost: {r.status} {r.body[:200]!r}")
            continue
        status = r.json().get("status", {})
        if not ok:
            problems.append(f"commit {name} never finished: {status}")
        elif status["phase"] == "Failed" and not status.get("message"):
            problems.append(f"commit {name} failed without a message")
        elif status["phase"] == "Succeeded" and name not in ledger.usable_commits:
            t = d.request("POST", "/sandboxes", {"templateID": f"local/{name}:v1", "timeout": 60})
            if t.status != 201:
                problems.append(f"commit {name} succeeded but its image does not start: "
                                f"{t.status} {t.body[:200]!r}")
            else:
                d.request("DELETE", f"/sandboxes/{t.json()['sandboxID']}")
                ledger.usable_commits.add(name)
    return problems


def test_sigkill_at_random_points_leaves_nothing_inconsistent():
    seed = int(os.environ.get("WARREN_CRASH_SEED", time.time()))
    print(f"WARREN_CRASH_SEED={seed}")
    rng = random.Random(seed)
    daemons = [start_daemon()]
    ledger = Ledger()
    try:
        for i in range(ITERATIONS):
            d = daemons[-1]
            stop = threading.Event()
            with concurrent.futures.ThreadPoolExecutor(4) as ex:
                for w in range(4):
                    ex.submit(worker, d, ledger, stop, random.Random(rng.random()))
                time.sleep(rng.uniform(0.2, 1.5))
                d.proc.kill()  # SIGKILL, mid-operation
                d.proc.wait()
                stop.set()
            d2 = _restart(daemons, stop=False)
            listed, problems = check_consistent(d2, ledger)
            assert not problems, f"seed {seed}, iteration {i}:\n- " + "\n- ".join(problems) + f"\n{d2.log_tail(40)}"
            # Keep the machine's load bounded: trim to at most 6 sandboxes.
            for sid in sorted(listed)[6:]:
                if d2.request("DELETE", f"/sandboxes/{sid}").status == 204:
                    ledger.gone(sid)
    finally:
        last = daemons[-1]
        if last.alive():
            for sid in last.list_ids():
                last.request("DELETE", f"/sandboxes/{sid}")
            wait_until(lambda: last.sandbox_dirs() == [], 15)
            last.stop()
        remove_host_state(daemons[0].prefix)
        remove_data_dir(daemons[0])
