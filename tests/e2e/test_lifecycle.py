"""Autoscaling and the Slurm lifecycle on the real local cluster, simulated backends."""

from __future__ import annotations

import json
import subprocess
import time

import filelock
import httpx
import pytest

from tests.e2e.load import Load

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.haproxy]

SIM = "--sim-token-rate 20 --sim-load-time 0.5"


def decisions(pool) -> list[dict]:
    path = pool.dir / "state" / "decisions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def desired(pool) -> int:
    return json.loads((pool.dir / "state" / "desired.json").read_text())["replicas"][pool.model_name]


def test_a_load_ramp_grows_the_pool_and_it_shrinks_back_after(pool_factory):
    pool = pool_factory(replicas=1, parallel=4, simulator=SIM, haproxy={"timeout_queue": 120, "drain_timeout": 30})
    pool.raw["models"][0]["autoscale"] = {"min": 1, "max": 3, "target_utilization": 0.75, "scale_up_delay": 2,
                                          "scale_down_delay": 6, "cooldown": 3, "max_step": 2}
    pool.write(pool.raw)
    pool.ok("up", "--timeout", "120")

    load = Load(pool.url, pool.model_name, api_key=pool.api_key, clients=16, max_tokens=(30, 50), duration=120).start()
    deadline = time.monotonic() + 90
    try:
        while desired(pool) < 3 or len([b for b in pool.status()["replicas"] if b["health"] == "ready"]) < 3:
            assert time.monotonic() < deadline, decisions(pool)[-3:]
            pool.ok("autoscale")
            time.sleep(1)
    finally:
        results = load.stop()
    assert all(r.ok for r in results)

    deadline = time.monotonic() + 90
    while desired(pool) > 1 or len(pool.active_jobs()) > 1:
        assert time.monotonic() < deadline, decisions(pool)[-3:]
        pool.ok("autoscale")
        time.sleep(1)

    log = decisions(pool)
    changes = [d for d in log if d["desired_after"] != d["desired_before"]]
    assert [d["desired_after"] for d in changes] == [3, 1] or [d["desired_after"] for d in changes][:1] == [3]
    assert max(d["desired_after"] for d in log) == 3                       # never above max
    assert all(b["time"] - a["time"] >= 3 for a, b in zip(changes, changes[1:]))   # cooldown
    assert all(set(d) >= {"time", "sessions", "queued", "desired_before", "desired_after", "reason",
                          "pending_jobs"} for d in log)
    assert "last autoscale" in pool.ok("status").stdout


def test_two_autoscale_runs_at_once_one_acts(pool_factory):
    pool = pool_factory(replicas=1, parallel=4, simulator=SIM)
    pool.raw["models"][0]["autoscale"] = {"min": 1, "max": 2}
    pool.write(pool.raw)
    pool.ok("up", "--timeout", "120")
    with filelock.FileLock(str(pool.dir / "state" / "lock")):   # another command is acting
        result = pool.ok("autoscale")
    assert "does nothing" in result.stderr and decisions(pool) == []

    runs = [subprocess.Popen([*pool.command(), "autoscale"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=pool.env) for _ in range(2)]
    outputs = [(p.wait(120), *p.communicate()) for p in runs]
    assert [rc for rc, _, _ in outputs] == [0, 0]
    acted = sum(1 for _, _, err in outputs if "does nothing" not in err)
    assert acted >= 1 and len(decisions(pool)) == acted


def test_scale_from_zero(pool_factory):
    pool = pool_factory(replicas=0, parallel=4, simulator=SIM, haproxy={"retry_after": 5})
    pool.raw["models"][0]["autoscale"] = {"min": 0, "max": 2, "scale_down_delay": 600}
    pool.write(pool.raw)
    pool.ok("up", "--no-wait")
    assert pool.active_jobs() == []

    answer = httpx.post(f"{pool.url}/chat/completions", headers=pool.headers, json={"model": pool.model_name, "messages": [
        {"role": "user", "content": "hello"}]})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["type"] == "model_starting"
    assert f"Model {pool.model_name} is starting" in answer.json()["error"]["message"]

    pool.ok("autoscale")
    assert desired(pool) == 1 and len(pool.active_jobs()) == 1
    assert "waking up" in decisions(pool)[-1]["reason"]
    deadline = time.monotonic() + 60
    while True:
        pool.ok("reconcile")
        answer = httpx.post(f"{pool.url}/chat/completions", headers=pool.headers, json={"model": pool.model_name, "messages": [
            {"role": "user", "content": "hello"}], "max_tokens": 4})
        if answer.status_code == 200:
            break
        assert time.monotonic() < deadline, answer.text
        time.sleep(1)


def test_a_job_near_its_time_limit_is_renewed_under_load(pool_factory):
    """A 2-minute job with a 115 s renewal lead: its successor takes over after ~5 s, with no
    failed request."""
    pool = pool_factory(replicas=1, parallel=4, simulator=SIM, haproxy={"drain_timeout": 60})
    pool.raw["slurm"].update({"time_limit": "00:02:00", "renew_before": 115, "signal_before": 0})
    pool.write(pool.raw)
    pool.ok("up", "--timeout", "120")
    first = pool.active_jobs()
    assert len(first) == 1
    load = Load(pool.url, pool.model_name, api_key=pool.api_key, clients=4, max_tokens=(10, 20), duration=120).start()
    deadline = time.monotonic() + 90
    try:
        while first[0] in pool.active_jobs() or len(pool.active_jobs()) != 1:
            assert time.monotonic() < deadline, pool.status()
            pool.ok("reconcile")
            time.sleep(1)
    finally:
        results = load.stop()
    assert pool.active_jobs() != first
    assert len(results) > 20 and all(r.ok for r in results), [r for r in results if not r.ok][:3]


def test_a_warned_job_leaves_rotation_before_it_ends(pool_factory):
    pool = pool_factory(replicas=2, parallel=4, simulator=SIM, haproxy={"drain_timeout": 60})
    pool.ok("up", "--timeout", "120")
    pool.wait_in_rotation(2)
    victim = pool.active_jobs()[0]
    subprocess.run(["scancel", "--batch", "--signal=USR1", victim], check=True, env=pool.env)
    deadline = time.monotonic() + 30
    while "leaving" not in subprocess.run(["squeue", "-h", "-j", victim, "-o", "%k"], capture_output=True,
                                          text=True, env=pool.env).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)

    pool.ok("reconcile")   # drains the warned server and submits its successor
    rows = {b["job_id"]: b for b in pool.status()["replicas"]}
    assert rows[victim]["haproxy_status"].startswith("DRAIN") and len(pool.active_jobs()) == 3

    deadline = time.monotonic() + 60
    while victim in pool.active_jobs():
        assert time.monotonic() < deadline, pool.status()
        pool.ok("reconcile")
        time.sleep(1)
    assert len(pool.active_jobs()) == 2
