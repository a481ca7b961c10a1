"""Serving under load, pool changes and faults: the real HAProxy and Slurm, simulated backends
(hpcserve-llama-sim, checked against llama-server by tests/integration/test_simulator.py) so that
2 cores can run dozens of slots."""

from __future__ import annotations

import collections
import os
import signal
import time

import psutil
import pytest

from hpcserve.haproxy import runtime
from tests.e2e.load import Load

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.haproxy]


def describe_failures(results) -> str:
    def kind(r) -> str:
        return r.body.get("error", {}).get("type", "-") if isinstance(r.body, dict) else "-"
    kinds = collections.Counter((r.status, r.error.split(":")[0], r.done, kind(r)) for r in results if not r.ok)
    return ", ".join(f"{n}x status={s} error={e or '-'} done={d} type={t}" for (s, e, d, t), n in kinds.items())


def reloads(pool) -> int:
    return runtime.show_proc(pool.dir / "state" / "haproxy-master.sock").reloads


SIZES = [5, 3, 6, 4, 2, 5, 3, 6, 4, 2, 5, 3, 6, 4, 3, 5, 2, 4, 6, 4]   # the pool after each change


@pytest.mark.parametrize("affinity", [None, "X-OpenWebUI-Chat-Id"], ids=["leastconn", "affinity"])
def test_200_streams_while_the_pool_changes(pool_factory, affinity):
    """The first 6 of 20 pool changes, the 4th a reload (3 of the changes shrink the pool).
    With the opt-in affinity too: each client is a conversation, whose server keeps leaving. That
    variant takes the first 4 changes (5, 3, 6, 4 replicas: 2 of them shrinking the pool, the third
    a reload): what it adds is the conversations' moves, which 4 show. All 20 changes with 10
    reloads, repeated per release and policy, are the stress harness's (benchmarks/stress.py); this
    test shows each kind of change (growth, shrinking, reload at saturation) under the 200 streams
    at a time that fits the suite: 12 changes until 2026-12-07, then 8, then 6 since 2026-12-08
    (.ci/run at 30.5 minutes; the second reload at saturation is tested in
    tests/integration/test_haproxy.py, and with affinity here). A reload here takes 10-13 s (it
    waits for the old worker's streams and queue), a change at runtime 2-3 s."""
    pool = pool_factory(replicas=4, parallel=8, simulator="--sim-token-rate 20 --sim-load-time 0.5",
                        haproxy={"timeout_queue": 300, "drain_timeout": 120, "affinity_header": affinity})
    pool.ok("up", "--timeout", "120")
    load = Load(pool.url, pool.model_name, api_key=pool.api_key, clients=200, max_tokens=(5, 30), duration=400,
                conversation_header=affinity).start()
    time.sleep(3)
    first_reloads = reloads(pool)
    sizes, reload_every = (SIZES[:4], 3) if affinity else (SIZES[:6], 4)
    try:
        for i, size in enumerate(sizes):
            if i % reload_every == reload_every - 1:  # a structural change: the next command reloads HAProxy
                pool.raw["haproxy"]["timeout_client"] = 600 + i
                pool.write(pool.raw)
            started = time.time()
            pool.ok("scale", str(size), "--wait", "--timeout", "120")
            assert len(pool.active_jobs()) == size
            STEPS.append({"variant": affinity or "leastconn", "step": i, "size": size, "started": round(started, 3),
                          "ended": round(time.time(), 3), "reloads": reloads(pool) - first_reloads})
    finally:
        results = load.stop()
    full_reloads = reloads(pool) - first_reloads
    pool.ok("down", "--timeout", "60")

    assert full_reloads >= len(sizes) // reload_every
    assert len(results) > 400, len(results)
    assert all(r.ok for r in results), describe_failures(results)   # no broken stream, no failure
    assert all(r.tokens >= 5 for r in results)
    stats = pool.simulator_stats()
    started = 4 + sum(max(0, after - before) for before, after in zip([4, *sizes], sizes))
    assert len(stats) == started, stats                  # every job of the test reported its peaks
    assert sum(s["served"] for s in stats.values()) == len(results)
    PEAKS.update(stats)


PEAKS: dict[str, dict] = {}
STEPS: list[dict] = []   # when each pool change of the test above ran (epoch s), to place a backend's first_over


def test_no_backend_ever_got_more_than_its_slots():
    """Reads the peaks the simulated backends of the test above reported when they stopped: no
    backend ever served more than its slots, and none had a request waiting inside it (the queue
    lives in HAProxy), through runtime additions and reloads at saturation alike."""
    assert PEAKS, "run with test_200_streams_while_the_pool_changes"
    over = {job: s for job, s in PEAKS.items() if s["max_busy"] > 8 or s["max_waiting"] > 0}
    assert not over, (over, STEPS)


def test_overload_gets_complete_answers_or_a_clear_503(pool_factory):
    """5x the pool's slots for a bounded time: each request completes or waits timeout queue
    (3 s) and gets the 503 in the OpenAI error shape with Retry-After; nothing else."""
    pool = pool_factory(replicas=2, parallel=4, simulator="--sim-token-rate 20 --sim-load-time 0.5",
                        haproxy={"timeout_queue": 3, "retry_after": 7})
    pool.ok("up", "--timeout", "120")
    pool.wait_in_rotation(2)
    load = Load(pool.url, pool.model_name, api_key=pool.api_key, clients=40, max_tokens=(30, 50), stream=False, duration=12).start()
    results = load.join()
    pool.ok("down", "--now")

    statuses = collections.Counter(r.status for r in results)
    assert set(statuses) <= {200, 503} and statuses[200] > 0 and statuses[503] > 0, statuses
    assert all(not r.error for r in results), describe_failures(results)
    for r in results:
        if r.status == 503:
            assert r.body["error"]["type"] == "server_unavailable" and r.retry_after == "7"
            assert r.ended - r.started >= 2.9


def test_kill_9_of_a_backend_under_load(pool_factory):
    """Only the streams on the killed backend fail; no request started after HAProxy noticed goes
    to it; the next reconcile replaces the job."""
    pool = pool_factory(replicas=3, parallel=4, simulator="--sim-token-rate 20 --sim-load-time 0.5",
                        haproxy={"timeout_queue": 60})
    pool.ok("up", "--timeout", "120")
    pool.wait_in_rotation(3)
    victim = pool.status()["replicas"][0]
    port = int(victim["endpoint"].rsplit(":", 1)[1])
    process = next(p for p in pool.llama_processes()
                   if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in p.net_connections()))

    load = Load(pool.url, pool.model_name, api_key=pool.api_key, clients=12, max_tokens=(20, 40), duration=60).start()
    time.sleep(4)
    killed_at = time.monotonic()
    os.kill(process.pid, signal.SIGKILL)
    detected = killed_at + 3 * 1 + 1                            # fall 3 x check_interval 1 s, and a margin
    # The load runs on until HAProxy has marked the victim DOWN and a request started after that
    # time was served (or 30 s).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
            any(s.server == f"job{victim['job_id']}" and s.status.startswith("DOWN")
                for s in runtime.show_stat(pool.dir / "state" / "haproxy.sock"))
            and any(r.started > detected and r.ok for r in list(load.results))):
        time.sleep(0.2)
    results = load.stop()

    failed = [r for r in results if not r.ok]
    stat = [(s.server, s.status) for s in runtime.show_stat(pool.dir / "state" / "haproxy.sock")]
    first_503 = min((r.started - killed_at for r in failed if r.status == 503), default=None)
    assert len(failed) <= 4, f"{describe_failures(results)}; HAProxy: {stat}; first 503 at kill{first_503:+.1f} s"        # at most the victim's 4 slots
    assert all(r.started < killed_at for r in failed)           # nothing that started later failed
    assert [r for r in results if r.started > detected and r.ok], "no request served after the kill"

    deadline = time.monotonic() + 90
    while True:
        pool.ok("reconcile")
        status = pool.status()
        ids = {b["job_id"] for b in status["replicas"] if b["health"] == "ready"}
        if len(ids) == 3 and victim["job_id"] not in ids:
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert victim["job_id"] not in {s.server[3:] for s in runtime.show_stat(pool.dir / "state" / "haproxy.sock")}
    pool.ok("down", "--now")
