"""The benchmark entry point end to end, small, over simulated backends (real HAProxy): scenario (d)
over two seeds against hpcserve's HAProxy and the hand-written HAProxy (round-robin), the two ways
a system starts (hpcserve's config; a hand-written one), and scenario (a) with its policy model
over one seed against hpcserve alone. The hand-written least-connections variant is the same code
with another template branch and `direct` no proxy at all; each system or seed added to (a) costs
about 25 s here (its requests run to their end: up to 30 s). The rotation of systems over seeds is
(d)'s here and tests/unit/test_benchmarks.py's; the reports and figures are covered there too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.haproxy]


def benchmarks_run(out, *args: str) -> dict:
    """`python -m benchmarks run ARGS --out OUT`, checked; its results.json, and the stderr as "log"."""
    run = subprocess.run([sys.executable, "-m", "benchmarks", "run", *args, "--window", "3", "--loads", "0.5",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    work = re.search(r"configs and logs of this run: (\S+)", run.stderr)
    if work:
        shutil.rmtree(work.group(1), ignore_errors=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return {**json.loads((out / "results.json").read_text()), "log": run.stderr}


def test_a_small_run_writes_results_a_report_and_ratios(tmp_path):
    results = benchmarks_run(tmp_path / "d", "--scenario", "d", "--seeds", "2", "--systems", "hpcserve,haproxy-rr")
    assert "d 50%: haproxy-rr" in results["log"]                 # progress on long waits
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
    d_report = (tmp_path / "d" / "report.md").read_text().split("## (d)")[1].split("\n## ")[0]
    assert re.search(r"\| 50% \| haproxy-rr \(round-robin\) \| 2/2 \| (\d+) / \1 \|", d_report)   # over both seeds
    # Scenario (a): the system measured on the arrivals its policy's model was given.
    results = benchmarks_run(tmp_path / "a", "--scenario", "a", "--seeds", "1", "--systems", "hpcserve")
    seeded = [r for r in results["records"] if r["scenario"] == "a"]
    assert [(r["seed"], r["system"]) for r in seeded] == [(1, "hpcserve")]
    assert all(r["model"]["requests"] == r["reference"]["requests"] for r in seeded)
    assert all("slo_attainment" in r["summary"] and "lateness_p99" in r["summary"] for r in seeded)
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| 50% | greedy central-queue model |" in report
    assert "| 50% | hpcserve (least-connections + slot cap) |" in report


def test_bad_options_are_named(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--systems", "hpcserve,envoy"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--systems" in run.stderr and "envoy" in run.stderr
    run = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--loads", "0.5,lots"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--loads" in run.stderr and "lots" in run.stderr
