"""The OpenAI Batch API with the official `openai` client, through the real HAProxy and keys, each
batch a real Slurm job on the local cluster's CPU partition, over simulated replicas."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time

import httpx
import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.haproxy]

ROWS = 1500   # about 10 s of the job: time to requeue it midway


def requests_file(model: str, rows: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "max_tokens": 4,
                                        "messages": [{"role": "user", "content": f"row {i}"}]}}) + "\n"
                   for i in range(rows)).encode()


def requeue(pool, job_id: str) -> None:
    """`scontrol requeue` the job (as after a node failure or a preemption), and wait until Slurm
    has ended its run: the job is PENDING again."""
    subprocess.run(["scontrol", "requeue", job_id], env=pool.env, check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=pool.env, capture_output=True,
                         text=True).stdout.strip() != "PENDING":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def start_elsewhere(pool, job_id: str, node: str) -> None:
    """Let a requeued job start at once on another node than `node`. Slurm holds a requeued job back
    for AuthInfo's cred_expire (120 s): the node it ran on refuses the job id until then ("Job
    credential revoked"; slurm.conf(5)). As after a node failure, it moves to another node."""
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={node}", "StartTime=now"],
                   env=pool.env, check=True, capture_output=True)


def test_a_batch_runs_as_a_slurm_job_and_each_key_sees_only_its_own(pool_factory):
    pool = pool_factory(replicas=1, parallel=4, simulator="--sim-token-rate 200 --sim-load-time 0")
    pool.raw["batches"] = {"enabled": True, "partition": "cpu", "memory": "300M", "concurrency": 4,
                           "own_capacity": {"min_rows": ROWS + 1, "jobs": 2}}
    pool.write(pool.raw)
    pool.ok("up", "--timeout", "120")
    keys = {name: json.loads(pool.ok("keys", "add", name, "--account", "chemistry", "--json").stdout)["key"]
            for name in ("alice", "bob")}
    alice = openai.OpenAI(base_url=pool.url, api_key=keys["alice"], max_retries=0, timeout=60)
    bob = openai.OpenAI(base_url=pool.url, api_key=keys["bob"], max_retries=0, timeout=60)

    uploaded = alice.files.create(file=("rows.jsonl", io.BytesIO(requests_file(pool.model_name, ROWS))),
                                  purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"dataset": "test"})
    assert batch.status == "in_progress" and batch.request_counts.total == ROWS
    assert pool.status()["batches"]["pid"]
    # The service killed (kill -9) mid-batch: the next reconcile step starts it again, and the
    # batch, a Slurm job with its state on disk, goes on.
    pid_file = pool.dir / "state" / "batches" / "service.pid"
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert "Batch API service started" in pool.ok("reconcile").stderr
    # The job is Slurm's, on the CPU partition, under a name the pool's reconcile leaves alone.
    # Charged to alice's Slurm account (keys add --account), not the pool's.
    jobs = subprocess.run(["squeue", "--me", "-h", "-t", "all", "-o", "%i %j %P %T %N %a"], capture_output=True,
                          text=True, env=pool.env, check=True).stdout.splitlines()
    [job] = [line.split() for line in jobs if f" hpcserve-batch:{pool.name}:{batch.id} " in line]
    assert job[2] == "cpu" and job[3] in ("PENDING", "RUNNING") and job[-1] == "chemistry", job
    # `down` would fail the batch's rows: it refuses, naming it, and leaves the pool as it was.
    refused = pool.run("down")
    assert refused.returncode == 1 and batch.id in refused.stderr and "--cancel-batches" in refused.stderr
    assert pool.haproxy_processes() and len(pool.active_jobs()) == 1
    # Killed and requeued midway (as after a node failure or preemption): the job starts again and
    # sends only the rows that have no line yet.
    deadline = time.monotonic() + 60
    while (running := subprocess.run(["squeue", "-h", "-j", job[0], "-o", "%T %N"], env=pool.env, capture_output=True,
                                     text=True).stdout.split())[:1] != ["RUNNING"] \
            or alice.batches.retrieve(batch.id).request_counts.completed < 100:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    requeue(pool, job[0])
    start_elsewhere(pool, job[0], running[1])

    # Another key: no sight of alice's file or batch, no cancel.
    for call in (lambda: bob.batches.retrieve(batch.id), lambda: bob.files.retrieve(uploaded.id),
                 lambda: bob.files.content(uploaded.id), lambda: bob.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert bob.batches.list().data == [] and bob.files.list().data == []

    deadline = time.monotonic() + 180
    while (batch := alice.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(1)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (ROWS, 0)
    assert batch.error_file_id is None and batch.metadata == {"dataset": "test"}
    lines = [json.loads(line) for line in alice.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"row-{i}" for i in range(ROWS))  # each once
    job_out = (pool.dir / "state" / "batches" / "runs" / batch.id / f"job-{job[0]}.out").read_text()
    assert job_out.count("hpcserve-batch start") == 2, job_out     # ran twice: before and after the requeue
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in lines)
    assert {line["response"]["body"]["model"] for line in lines} == {pool.model_name}
    # The owner key sees every batch; the rows were alice's requests, at batch priority.
    owner = openai.OpenAI(base_url=pool.url, api_key=pool.api_key, max_retries=0, timeout=60)
    assert [b.id for b in owner.batches.list().data] == [batch.id]
    listed = json.loads(pool.ok("batches", "list", "--json").stdout)        # and the admin's command
    assert [(b["id"], b["key"], b["status"]) for b in listed] == [(batch.id, "alice", "completed")]
    ended = pool.run("batches", "cancel", batch.id)
    assert ended.returncode == 1 and "is completed: it cannot be cancelled" in ended.stderr
    usage = {r["name"]: r for r in json.loads(pool.ok("usage", "--json").stdout)["rows"]}
    assert usage["alice"]["ok"] >= ROWS and usage["bob"]["requests"] == 6     # bob's own 6 calls above
    served = [json.loads(line) for line in (pool.dir / "state" / "logs" / "access.log").read_text().splitlines()]
    assert {(r["key"], r["class"]) for r in served} == {("alice", "batch")}   # the rows: alice's, queued as batch
    # The batch's token is gone from HAProxy's key map with the batch.
    token = (pool.dir / "state" / "batches" / "runs" / batch.id / "token").read_text().strip()
    assert httpx.get(f"{pool.url}/models", headers={"Authorization": f"Bearer {token}"}).status_code == 401


    # A larger batch (own_capacity.min_rows or more) brings its own GPUs: a job array on the GPU
    # partition, each element a llama-server (here the simulator) on its node's loopback and a
    # shard of the rows; nothing of it goes through HAProxy.
    logged = len(served)
    big = alice.files.create(file=("big.jsonl", io.BytesIO(requests_file(pool.model_name, ROWS + 100))), purpose="batch",
                             expires_after={"anchor": "created_at", "seconds": 3600})
    assert big.expires_at == big.created_at + 3600        # as the openai client sends it (a form field)
    batch = alice.batches.create(input_file_id=big.id, endpoint="/v1/chat/completions", completion_window="24h")
    run_dir = pool.dir / "state" / "batches" / "runs" / batch.id
    # Element 1 requeued midway (a node failure, a preemption): it starts its llama-server again,
    # on another node, and sends only the rows of its shard that have no line yet.
    shard_output = run_dir / "output-1.jsonl"
    deadline = time.monotonic() + 60
    while not shard_output.exists() or shard_output.read_bytes().count(b"\n") < 50:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [element] = [line.split() for line in subprocess.run(
        ["squeue", "--me", "-h", "-o", "%i %j %T %N"], capture_output=True, text=True, env=pool.env,
        check=True).stdout.splitlines() if line.split()[0].endswith("_1") and batch.id in line]
    assert element[2] == "RUNNING", element
    requeue(pool, element[0])
    lines_before = shard_output.read_bytes().count(b"\n")    # whole lines: a cut last one is not a row's
    assert lines_before < (ROWS + 100) // 2            # midway
    start_elsewhere(pool, element[0], element[3])
    elements: set[tuple] = set()
    deadline = time.monotonic() + 120
    while (batch := alice.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        jobs = subprocess.run(["squeue", "--me", "-h", "-t", "all", "-o", "%i %j %P %a %b"], capture_output=True,
                              text=True, env=pool.env, check=True).stdout.splitlines()
        elements |= {tuple(line.split()) for line in jobs if f" hpcserve-batch:{pool.name}:{batch.id} " in line}
        time.sleep(0.5)
    assert batch.status == "completed" and batch.request_counts.completed == ROWS + 100, batch
    shown = json.loads(pool.ok("batches", "show", batch.id, "--json").stdout)
    assert shown["own_gpus"] == 2 and shown["key"] == "alice"
    running = {e for e in elements if "[" not in e[0]}          # not the pending "ID_[0-1]"
    assert {e[0].split("_")[1] for e in running} == {"0", "1"} and len({e[0].split("_")[0] for e in running}) == 1
    assert {e[2:] for e in running} == {("gpu", "chemistry", "gres:gpu:a100:1")}, running
    lines = [json.loads(line) for line in alice.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"row-{i}" for i in range(ROWS + 100))
    assert all(line["response"]["status_code"] == 200 for line in lines)
    logs = sorted(run_dir.glob("job-*-llama-server.log"))
    assert len(logs) == 2 and all("listening on http://127.0.0.1:" in log.read_text() for log in logs)
    stats = [json.loads(line.split("simulator stats: ", 1)[1]) for log in logs
             for line in log.read_text().splitlines() if line.startswith("simulator stats: ")]
    # Element 0 served its whole shard; element 1's second server exactly the rows that had no line
    # when it was killed (its log starts anew), and each row has one line in the output (above).
    served = sorted(s["served"] for s in stats)
    assert served == sorted([(ROWS + 100) // 2, (ROWS + 100) // 2 - lines_before]), (served, lines_before)
    since = (pool.dir / "state" / "logs" / "access.log").read_text().splitlines()[logged:]
    assert not [line for line in since if json.loads(line)["server"].startswith("job")]   # no row

    # down --cancel-batches: a batch through the pool is cancelled (its job ended), then the pool stops.
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    stopped = pool.ok("down", "--cancel-batches")
    assert f"batch {batch.id} of key alice cancelled" in stopped.stderr + stopped.stdout
    deadline = time.monotonic() + 30       # cancelling until Slurm has ended its job
    while (status := json.loads(pool.ok("batches", "show", batch.id, "--json").stdout)["status"]) != "cancelled":
        assert status == "cancelling" and time.monotonic() < deadline, status
        time.sleep(0.5)
    assert not [j for j in subprocess.run(["squeue", "--me", "-h", "-o", "%j"], capture_output=True, text=True,
                                          env=pool.env, check=True).stdout.split() if batch.id in j]
