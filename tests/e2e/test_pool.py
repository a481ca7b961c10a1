"""End to end on real parts: the hpcserve CLI, the local Slurm cluster, llama-server with the real
model, HAProxy, and the openai client.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from hpcserve.llama import builds
from tests.conftest import ROOT, llama_server_build

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.haproxy]


def chat(client: openai.OpenAI, model: str, stream: bool = False, max_tokens: int = 16):
    messages = [{"role": "user", "content": "Name three colours."}]
    if not stream:
        return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                 stream=True))
    return chunks


def test_up_chat_scale_down(pool_factory):
    pool = pool_factory(replicas=2)
    pool.raw["batches"] = {"enabled": True, "own_capacity": {"min_rows": 6, "jobs": 2}}
    pool.write(pool.raw)
    up = pool.ok("up", "--timeout", "240")
    assert f"pool is up: http://127.0.0.1:{pool.raw['haproxy']['port']}/v1" in up.stdout

    status = pool.status()
    assert status["models"][pool.model_name] == {"desired": 2, "jobs": 2, "ready": 2} or \
        status["models"][pool.model_name]["jobs"] == 2
    client = pool.client()

    reply = chat(client, pool.model_name)
    assert reply.model == pool.model_name and reply.usage.completion_tokens > 0
    chunks = chat(client, pool.model_name, stream=True)
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    # Wait until HAProxy routes to both, then load both: leastconn with maxconn 2 spreads the work.
    pool.wait_in_rotation(2)
    # A cluster user who finds a backend port cannot use it: no key, 401.
    endpoint = pool.status()["replicas"][0]["endpoint"]
    direct = httpx.post(f"http://{endpoint}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert direct.status_code == 401
    with ThreadPoolExecutor(8) as executor:
        replies = list(executor.map(lambda _: chat(client, pool.model_name, max_tokens=24), range(8)))
    assert all(r.usage.completion_tokens > 0 for r in replies)
    status = pool.status()
    backends = status["replicas"]
    assert status["backends"] == backends     # the name before 2026-12-07, kept one release
    served = {b["job_id"]: b["served"] for b in backends}
    assert len(served) == 2 and all(n and n > 0 for n in served.values()), served
    # status names each backend's llama-server build, read from its /props ("b0-unknown" from a
    # build without git, whose number only its package knows).
    assert len({b["build"] for b in backends}) == 1, backends
    assert builds.parse_build_info(backends[0]["build"]).number in (None, llama_server_build().number), backends

    # The Batch API with the openai client, a batch large enough (own_capacity.min_rows) to bring its
    # own GPUs: a Slurm job array of 2, each element the real llama-server with the real model on
    # its node's loopback and half of the rows; each row answered once; sacct charges the array's
    # GPUs to the key's account.
    rows = "".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": pool.model_name, "max_tokens": 4,
                                        "messages": [{"role": "user", "content": f"Count to {i}."}]}}) + "\n"
                   for i in range(6))
    batch = client.batches.create(input_file_id=client.files.create(file=("q.jsonl", rows.encode()), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
    assert batch.status == "completed" and batch.request_counts.completed == 6, batch
    answers = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(a["custom_id"] for a in answers) == [f"q{i}" for i in range(6)]
    assert all(a["response"]["body"]["usage"]["completion_tokens"] > 0 for a in answers)
    deadline = time.monotonic() + 30       # sacct has the elements once slurmctld told slurmdbd
    while len(elements := subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,Account,AllocTRES,State", "--name",
             f"hpcserve-batch:{pool.name}:{batch.id}"], env=pool.env, capture_output=True, text=True,
            check=True).stdout.split()) < 2:
        assert time.monotonic() < deadline, elements
        time.sleep(0.5)
    assert sorted(e.split("|")[0].split("_")[1] for e in elements) == ["0", "1"], elements
    assert all(e.split("|")[1] == "physics" and "gres/gpu=1" in e.split("|")[2] for e in elements), elements

    # Scale to 1: one job leaves rotation and is cancelled; requests still succeed.
    pool.ok("scale", "1")
    status = pool.status()
    assert status["models"][pool.model_name]["desired"] == 1 and len(pool.active_jobs()) == 1
    assert chat(client, pool.model_name).usage.completion_tokens > 0

    pool.ok("scale", "2", "--wait", "--timeout", "240")
    status = pool.status()
    assert status["models"][pool.model_name]["ready"] == 2 and len(pool.active_jobs()) == 2

    # Repeating a command is harmless: nothing new is submitted.
    again = pool.ok("--json", "up", "--timeout", "60")
    assert json.loads(again.stdout)["submitted"] == []
    assert len(pool.active_jobs()) == 2

    down = pool.ok("down", "--timeout", "60")
    assert "pool is down" in down.stdout
    assert pool.active_jobs() == []
    assert pool.haproxy_processes() == []
    deadline = time.monotonic() + 30
    while pool.llama_processes():
        assert time.monotonic() < deadline, "llama-server left running after down"
        time.sleep(0.5)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line of a failed command: its last stderr line, and no traceback anywhere."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("hpcserve: error: "), result.stderr
    return lines[-1]


def test_failures_leave_jobs_and_haproxy_untouched(pool_factory, tmp_path):
    pool = pool_factory(replicas=1)
    pool.ok("up", "--timeout", "240")
    jobs = pool.active_jobs()
    config = (pool.dir / "state" / "haproxy.cfg").read_text()
    desired = (pool.dir / "state" / "desired.json").read_text()
    haproxy_pid = pool.status()["haproxy"]["pid"]
    client = pool.client()

    def untouched():
        assert pool.active_jobs() == jobs
        assert (pool.dir / "state" / "haproxy.cfg").read_text() == config
        assert (pool.dir / "state" / "desired.json").read_text() == desired
        assert [p.pid for p in pool.haproxy_processes() if p.pid == haproxy_pid] == [haproxy_pid]
        assert chat(client, pool.model_name).usage.completion_tokens > 0

    # A bad deployment file: exit 2, one line naming the field.
    broken = pool.write({**pool.raw, "colour": "blue"}, "broken.yaml")
    result = pool.run("scale", "3", file=broken)
    assert result.returncode == 2 and "colour: unknown key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    untouched()

    # A missing model file: exit 2 before anything is submitted.
    missing = pool.write({**pool.raw, "models": [{**pool.raw["models"][0], "gguf": str(tmp_path / "gone.gguf")}]},
                         "missing.yaml")
    result = pool.run("up", file=missing)
    assert result.returncode == 2 and "models[0].gguf: expected an existing GGUF file" in result.stderr
    untouched()

    # A config HAProxy refuses (a broken site template): exit 4, the running config stays.
    site = pool.dir / "site-templates"
    site.mkdir()
    (site / "haproxy.cfg.j2").write_text("global\n    no-such-keyword\n")
    refused = pool.write({**pool.raw, "templates_dir": str(site)}, "refused.yaml")
    result = pool.run("scale", "2", file=refused)
    assert result.returncode == 4 and "haproxy rejected the new config" in error_line(result)
    untouched()

    # A broken job script template: exit 2 with one line naming it, before HAProxy or Slurm is touched.
    (site / "haproxy.cfg.j2").unlink()
    (site / "llama-server.sbatch.j2").write_text("#!/bin/bash\n{{ model.no_such_field.x }}\n")
    result = pool.run("scale", "2", file=refused)
    assert result.returncode == 2 and f"template {site / 'llama-server.sbatch.j2'}:2:" in error_line(result)
    untouched()

    # The frontend port taken: a second deployment on the same port fails with exit 4 and submits nothing.
    other = pool_factory(replicas=1, subdir="b")
    other.raw["haproxy"]["port"] = pool.raw["haproxy"]["port"]
    other.file = other.write(other.raw)
    result = other.run("up", "--timeout", "30")
    assert result.returncode == 4 and "is not available" in error_line(result)
    assert other.active_jobs() == []
    untouched()

    # slurmctld stopped: commands fail with exit 3 and change nothing; serving goes on.
    script = ROOT / "scripts" / "local-slurm.sh"
    subprocess.run([str(script), "stop-controller"], check=True, capture_output=True)
    try:
        result = pool.run("scale", "2", timeout=120)
        assert result.returncode == 3 and "squeue" in error_line(result)
        assert chat(client, pool.model_name).usage.completion_tokens > 0
        result = pool.run("--json", "status", timeout=120)
        assert result.returncode == 3
        report = json.loads(result.stdout)
        assert report["slurm_error"] and report["haproxy"]["pid"] == haproxy_pid
        assert (pool.dir / "state" / "haproxy.cfg").read_text() == config
    finally:
        subprocess.run([str(script), "start"], check=True, capture_output=True)
    untouched()


def test_two_models_behind_one_url(pool_factory):
    """Routing by the model field: each model's answers come from its own backends."""
    from tests.e2e.conftest import SIMULATOR

    pool = pool_factory(replicas=1, parallel=2, simulator="--sim-load-time 0.3")
    second = {**pool.raw["models"][0], "name": f"{pool.model_name}-b", "command": f"{SIMULATOR} --sim-load-time 0.3"}
    pool.raw["models"].append(second)
    pool.write(pool.raw)
    pool.ok("up", "--timeout", "120")
    client = pool.client()
    listed = [m.id for m in client.models.list().data]
    assert listed == [pool.model_name, second["name"]]
    for name in listed:
        assert chat(client, name).model == name
    unnamed = httpx.post(f"{pool.url}/chat/completions", headers=pool.headers, json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 2}, timeout=60)
    assert unnamed.json()["model"] == pool.model_name          # no model: the first one
    with pytest.raises(openai.NotFoundError, match="Available models"):
        chat(client, "no-such-model")


def test_a_llama_server_that_does_not_enforce_the_key_never_serves(pool_factory):
    """A site wrapper that drops LLAMA_API_KEY (`env -u`), as an old build that does not read it
    would: the job runs and answers /health, but /props answers without the key, so the server never
    enters HAProxy; `up` fails naming the job and the reason, `status` shows it refused, and the
    pool's URL answers 503 rather than routing to a server every user of the node could use."""
    pool = pool_factory(replicas=1, parallel=2, simulator="--sim-load-time 0")
    model = pool.raw["models"][0]
    model["command"] = f"env -u LLAMA_API_KEY {model['command']}"
    pool.write(pool.raw)
    up = pool.run("up", "--timeout", "120")
    assert up.returncode != 0
    line = error_line(up)
    assert "is not put in rotation" in line and "without the backend key" in line, line
    [row] = pool.status()["replicas"]
    assert row["health"] == "refused" and "LLAMA_API_KEY" in row["refusal"] and row["haproxy_status"] is None
    text = pool.run("status")
    assert f"job {row['job_id']} refused:" in text.stderr
    answer = httpx.post(f"{pool.url}/chat/completions", headers=pool.headers, timeout=30,
                        json={"model": pool.model_name, "messages": [{"role": "user", "content": "x"}]})
    assert answer.status_code == 503
    assert len(pool.active_jobs()) == 1           # kept (no resubmission loop) until the pool is fixed or down
