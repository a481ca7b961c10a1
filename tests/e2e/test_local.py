"""The workstation launcher (scheduler: local) end to end: no Slurm, real llama-server, the real
model, real HAProxy: up with 2 backends, a chat through HAProxy, a batch of the Batch API as a
local job, a killed backend replaced, down with nothing left."""

from __future__ import annotations

import io
import json
import os
import signal
import time

import psutil
import pytest

from tests.e2e.test_batches import requests_file

pytestmark = [pytest.mark.e2e, pytest.mark.haproxy]


def test_local_pool_up_chat_kill_down(tmp_path, real_model, haproxy_bin):
    from tests.e2e.conftest import Pool

    pool = Pool(tmp_path, real_model, {**os.environ, "SLURM_CONF": "/nonexistent"}, replicas=2)
    pool.raw["scheduler"] = "local"
    pool.raw["batches"] = {"enabled": True}
    pool.write(pool.raw)
    try:
        pool.ok("up", "--timeout", "120")
        pool.wait_in_rotation(2, timeout=120)
        status = pool.status()
        assert status["models"][pool.model_name]["ready"] == 2
        assert {b["node"] for b in status["replicas"]} == {"local"}
        reply = pool.client().chat.completions.create(model=pool.model_name, max_tokens=8,
                                                      messages=[{"role": "user", "content": "Hello"}])
        assert reply.usage.completion_tokens > 0
        # The Batch API without Slurm: the batch's job is a local process sending through the pool.
        rows = requests_file(pool.model_name, 6)
        uploaded = pool.client().files.create(file=("rows.jsonl", io.BytesIO(rows)), purpose="batch")
        batch = pool.client().batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                             completion_window="24h")
        deadline = time.monotonic() + 120
        while (batch := pool.client().batches.retrieve(batch.id)).status not in ("completed", "failed"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.5)
        assert batch.status == "completed" and batch.request_counts.completed == 6, batch
        lines = pool.client().files.content(batch.output_file_id).text.splitlines()
        assert sorted(json.loads(line)["custom_id"] for line in lines) == sorted(f"row-{i}" for i in range(6))

        victim = status["replicas"][0]
        server = next(p for p in pool.llama_processes()
                      if any(c.laddr.port == int(victim["endpoint"].rsplit(":", 1)[1]) for c in p.net_connections()))
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:
            pool.ok("reconcile")
            ready = {b["job_id"] for b in pool.status()["replicas"] if b["health"] == "ready"}
            if len(ready) == 2 and victim["job_id"] not in ready:
                break
            assert time.monotonic() < deadline, pool.status()
            time.sleep(1)
        assert pool.client().chat.completions.create(
            model=pool.model_name, max_tokens=4, messages=[{"role": "user", "content": "Hi"}]).usage.completion_tokens > 0
    finally:
        pool.run("down", "--timeout", "60")
    assert pool.haproxy_processes() == []
    deadline = time.monotonic() + 20
    while pool.llama_processes() or any(str(tmp_path) in " ".join(p.info["cmdline"] or [])
                                        for p in psutil.process_iter(["cmdline"])):
        assert time.monotonic() < deadline, "something of the local pool is left running"
        time.sleep(0.5)
