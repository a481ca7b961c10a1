"""hpcserve batch through a pool on the real cluster (simulated backends): killed and resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.haproxy]


def test_batch_killed_halfway_resumes_and_writes_every_row_exactly_once(pool_factory, tmp_path):
    pool = pool_factory(replicas=2, parallel=4, simulator="--sim-token-rate 100 --sim-load-time 0.5")
    pool.ok("up", "--timeout", "120")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"row-{i}", "description": f"expense {i}"}) + "\n" for i in range(3000)))
    output = tmp_path / "results.jsonl"
    args = ["batch", "--input", str(rows), "--output", str(output), "--template", "Classify: {description}",
            "--max-tokens", "4"]

    first = subprocess.Popen([*pool.command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pool.env)
    deadline = time.monotonic() + 120
    while not output.exists() or output.read_text().count("\n") < 1200:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = output.read_text().count("\n")
    assert 1200 <= done_before < 3000

    resumed = pool.ok("--json", *args, timeout=300)
    summary = json.loads(resumed.stdout)
    assert summary["already_done"] >= 1200 and summary["failed"] == 0
    results = [json.loads(line) for line in output.read_text().splitlines()]
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(3000))       # every row, exactly once
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in results)
    assert all(r["response"]["body"]["model"] == pool.model_name for r in results)
    # The owner key is interactive, but hpcserve batch asks to be queued as batch; the access log
    # accounts every served row to the owner key (a killed run's cut requests count too).
    usage = json.loads(pool.ok("usage", "--json").stdout)["rows"]
    owner = [r for r in usage if r["name"] == "owner"][0]
    assert owner["ok"] >= 3000 and owner["gpu_hours"] > 0
    log = [json.loads(line) for line in (pool.dir / "state" / "logs" / "access.log").read_text().splitlines()]
    assert {r["class"] for r in log if r["status"] == 200 and r["server"].startswith("job")} == {"batch"}


def test_batch_in_openai_format_and_bad_input(pool_factory, tmp_path):
    pool = pool_factory(replicas=1, parallel=4, simulator="--sim-token-rate 100 --sim-load-time 0.5")
    pool.ok("up", "--timeout", "120")
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                            "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}})
                                + "\n" for i in range(20)))
    output = tmp_path / "out.jsonl"
    pool.ok("batch", "--input", str(requests), "--output", str(output))
    assert len(output.read_text().splitlines()) == 20

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "body": {}}\n{oops\n')
    result = pool.run("batch", "--input", str(bad), "--output", str(tmp_path / "never.jsonl"))
    assert result.returncode == 2 and "bad.jsonl:2: not JSON" in result.stderr
    assert not (tmp_path / "never.jsonl").exists()                     # nothing was sent

    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"custom_id": "z", "body": {"model": "no-such-model", "messages": []}}) + "\n")
    result = pool.run("batch", "--input", str(unknown), "--output", str(tmp_path / "u.jsonl"), "--retries", "0")
    assert result.returncode == 1 and "1 row(s) failed" in result.stderr
    (record,) = [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert record["response"]["status_code"] == 404 and record["error"]["code"] == "404"
