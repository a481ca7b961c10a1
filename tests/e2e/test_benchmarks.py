"""The benchmark entry point end to end, small: scenarios (a) (over two seeds) and (d) against
hpcserve's HAProxy and the hand-written HAProxy (round-robin) over simulated backends (real
HAProxy). Two systems, the two ways a system starts (hpcserve's config; a hand-written one): the
hand-written least-connections variant is the same code with another template branch and `direct`
no proxy at all, and each system added costs about a minute here (its requests run to their end:
up to 30 s in (a)). Their reports and figures are covered by tests/unit/test_benchmarks.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.haproxy]


def test_a_small_run_writes_results_a_report_and_ratios(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--scenario", "d", "--scenario", "a",
                          "--window", "3", "--seeds", "2", "--loads", "0.5",
                          "--systems", "hpcserve,haproxy-rr", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    work = re.search(r"configs and logs of this run: (\S+)", run.stderr)
    if work:
        shutil.rmtree(work.group(1), ignore_errors=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "d 50%: haproxy-rr" in run.stderr                       # progress on long waits
    results = json.loads((out / "results.json").read_text())
    # Scenario (d): every system ran every seed, each seed its own arrivals, the same for every system.
    d_runs = [r for r in results["records"] if r["scenario"] == "d"]
    assert sorted((r["seed"], r["system"]) for r in d_runs) == sorted(
        (seed, name) for seed in (1, 2) for name in ("hpcserve", "haproxy-rr"))
    for seed in (1, 2):
        assert len({r["summary"]["requests"] for r in d_runs if r["seed"] == seed}) == 1
    for record in d_runs:
        summary = record["summary"]
        assert summary["requests"] > 2 and summary["completed"] == summary["requests"], summary
        assert sum(record["per_backend"]) == summary["requests"]     # every answer counted once
        if record["system"] == "hpcserve":                           # 20 tokens/s per slot
            assert summary["itl_p50"] == pytest.approx(0.05, abs=0.02)
    # Scenario (a): every system ran every seed, in a rotated order, with its own policy's model.
    seeded = [r for r in results["records"] if r["scenario"] == "a"]
    assert sorted((r["seed"], r["system"]) for r in seeded) == sorted(
        (seed, name) for seed in (1, 2) for name in ("hpcserve", "haproxy-rr"))
    assert all(r["model"]["requests"] == r["reference"]["requests"] for r in seeded)
    assert all("slo_attainment" in r["summary"] and "lateness_p99" in r["summary"] for r in seeded)
    report = (out / "report.md").read_text()
    d_report = report.split("## (d)")[1].split("\n## ")[0]
    assert re.search(r"\| 50% \| haproxy-rr \(round-robin\) \| 2/2 \| (\d+) / \1 \|", d_report)   # over both seeds
    assert "| 50% | greedy central-queue model |" in report
    assert "| 50% | hpcserve (least-connections + slot cap) |" in report


def test_bad_options_are_named(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--systems", "hpcserve,envoy"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--systems" in run.stderr and "envoy" in run.stderr
    run = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--loads", "0.5,lots"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--loads" in run.stderr and "lots" in run.stderr
