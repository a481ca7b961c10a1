"""A Batch API batch at a researcher's scale beside people chatting (marked `long`: minutes of
load, so not in `.ci/run`; run it with `scripts/test.sh -m long tests/e2e/test_batch_scale.py`).

10,000 rows through a pool of 2 simulated replicas of 16 slots, the batch job sending 32 at once
(every slot), while 20 interactive clients chat without a pause (52 requests for 32 slots: every
chat finds the slots full and waits for one to free, ahead of the batch's queue); the job is killed with SIGKILL
midway and requeued (as after a node failure). The parts are in the CI's suite (a 1,500-row batch
requeued midway, tests/e2e/test_batches.py; chats before a batch flood,
tests/integration/test_institute.py); this is them together, at size."""

from __future__ import annotations

import io
import json
import os
import signal
import statistics
import subprocess
import time

import openai
import psutil
import pytest

from tests.e2e.load import Load
from tests.e2e.test_batches import requests_file

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.haproxy, pytest.mark.long]

ROWS = 10_000
CHATS = 20


def test_10000_rows_beside_20_chats_killed_midway(pool_factory):
    pool = pool_factory(replicas=2, parallel=16, simulator="--sim-token-rate 100 --sim-load-time 0",
                        haproxy={"timeout_queue": 120})
    pool.raw["batches"] = {"enabled": True, "partition": "cpu", "memory": "500M", "concurrency": 32}
    pool.write(pool.raw)
    pool.ok("up", "--timeout", "120")
    pool.wait_in_rotation(2)
    key = json.loads(pool.ok("keys", "add", "researcher", "--max-concurrent", "64", "--json").stdout)["key"]
    researcher = openai.OpenAI(base_url=pool.url, api_key=key, max_retries=0, timeout=120)
    rows = researcher.files.create(file=("rows.jsonl", io.BytesIO(requests_file(pool.model_name, ROWS))),
                                   purpose="batch")
    batch = researcher.batches.create(input_file_id=rows.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
    chats = Load(pool.url, pool.model_name, api_key=pool.api_key, clients=CHATS, max_tokens=(10, 30),
                 duration=900).start()
    started = time.monotonic()
    try:
        # Midway: the job's runner killed with SIGKILL, the job requeued (it starts again, on
        # another node: Slurm holds the job id back on the old one for cred_expire).
        deadline = time.monotonic() + 300
        while researcher.batches.retrieve(batch.id).request_counts.completed < ROWS // 3:
            assert time.monotonic() < deadline
            time.sleep(1)
        [runner] = [p for p in psutil.process_iter(["cmdline"])
                    if "hpcserve.batches.runner" in " ".join(p.info["cmdline"] or []) and batch.id in " ".join(p.info["cmdline"] or [])]
        job = subprocess.run(["squeue", "--me", "-h", "-o", "%i %j %N"], capture_output=True, text=True, env=pool.env,
                             check=True).stdout.split("\n")
        [(job_id, node)] = [(line.split()[0], line.split()[2]) for line in job if batch.id in line]
        os.kill(runner.pid, signal.SIGKILL)
        killed_at = researcher.batches.retrieve(batch.id).request_counts.completed
        deadline = time.monotonic() + 60
        while subprocess.run(["scontrol", "requeue", job_id], env=pool.env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={node}", "StartTime=now"],
                       env=pool.env, check=True, capture_output=True)
        deadline = time.monotonic() + 900
        while (batch := researcher.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired",
                                                                             "cancelled"):
            assert time.monotonic() < deadline, batch
            time.sleep(2)
        took = time.monotonic() - started
    finally:
        results = chats.stop()
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (ROWS, 0)
    lines = [json.loads(line) for line in researcher.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"row-{i}" for i in range(ROWS))   # each once
    assert all(r.ok for r in results) and len(results) > CHATS

    # The chats' queue wait (HAProxy's Tw) against the longest time any request held a slot: a
    # chat waits at most about one turnover, never behind the batch's queue.
    records = [json.loads(line) for line in (pool.dir / "state" / "logs" / "access.log").read_text().splitlines()]
    chat_waits = sorted(r["Tw"] / 1000 for r in records if r["class"] == "interactive" and r["Tw"] >= 0
                        and r["key"] == "owner")
    batch_waits = sorted(r["Tw"] / 1000 for r in records if r["class"] == "batch" and r["Tw"] >= 0)
    turnover = max((r["Ta"] - r["TR"] - r["Tw"] - r["Tc"]) / 1000 for r in records if r["Tw"] >= 0 and r["Tc"] >= 0)
    p99 = chat_waits[int(0.99 * (len(chat_waits) - 1))]
    print(f"\n{ROWS} rows in {took:.0f} s beside {CHATS} chat clients ({len(results)} chats), killed at "
          f"{killed_at} rows: chat queue wait p50 {statistics.median(chat_waits):.3f} s, p99 {p99:.3f} s, max "
          f"{chat_waits[-1]:.3f} s; batch queue wait p50 {statistics.median(batch_waits):.3f} s; slot turnover "
          f"{turnover:.3f} s")
    assert chat_waits[-1] <= turnover + 0.5, (chat_waits[-1], turnover)
