"""The workstation launcher (scheduler: local) end to end: no Slurm, real llama-server, the real
model, real HAProxy: up with 2 backends, a chat through HAProxy, a killed backend replaced,
down with nothing left."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.haproxy]


def test_local_pool_up_chat_kill_down(tmp_path, real_model, haproxy_bin):
    from tests.e2e.conftest import Pool

    pool = Pool(tmp_path, real_model, {**os.environ, "SLURM_CONF": "/nonexistent"}, replicas=2)
    pool.raw["scheduler"] = "local"
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
