"""The pure parts of the comparison benchmarks: workload, reference model, figures, report."""

from __future__ import annotations

import json

import pytest

from benchmarks import metrics, reference, report
from benchmarks.loadgen import Outcome
from benchmarks.workload import Backend, Request, capacity, mean_tokens, poisson


def test_the_workload_is_the_same_for_the_same_seed_and_has_the_asked_rate():
    a, b = poisson(20, 100, seed=3), poisson(20, 100, seed=3)
    assert a == b and a != poisson(20, 100, seed=4)
    assert 1800 < len(a) < 2200                          # 20/s over 100 s
    assert all(x.at < y.at for x, y in zip(a, a[1:]))
    lengths = sorted(r.max_tokens for r in a)
    assert lengths[len(lengths) // 2] < 25 and lengths[-1] > 100   # heavy tail: median small, some long
    with pytest.raises(ValueError, match="positive"):
        poisson(0, 10, seed=1)


def test_capacity_counts_every_slot_at_its_own_speed():
    pool = [Backend(4, 10.0, prefill_rate=1e9), Backend(4, 5.0, prefill_rate=1e9)]
    assert capacity(pool, 10) == pytest.approx(4 * 1.0 + 4 * 0.5)
    assert 15 < mean_tokens() < 35


def test_the_reference_queues_first_come_first_served_on_the_fastest_free_slot():
    slow, fast = Backend(1, 1.0, prefill_rate=1e9), Backend(1, 2.0, prefill_rate=1e9)
    requests = [Request(0.0, 2), Request(0.0, 2), Request(0.1, 2)]
    served = reference.fcfs(requests, [slow, fast])
    assert served[0].backend == 1 and served[0].ended == pytest.approx(1.0)       # fast: 2 tokens in 1 s
    assert served[1].backend == 0 and served[1].ended == pytest.approx(2.0)       # slow one is free too
    assert served[2].started == pytest.approx(1.0) and served[2].backend == 1     # waits for the first slot
    assert served[2].ttft == pytest.approx(0.9 + 0.5)                              # wait + first token at 2/s
    with pytest.raises(ValueError, match="no slot"):
        reference.fcfs(requests, [])


def test_more_slots_never_make_the_reference_slower():
    requests = poisson(30, 20, seed=2)
    small = reference.fcfs(requests, [Backend(4, 10.0)] * 8)
    large = reference.fcfs(requests, [Backend(4, 10.0)] * 16)
    assert all(b.ttft <= a.ttft + 1e-9 for a, b in zip(small, large))


def test_figures_count_errors_by_kind_and_take_percentiles_of_completed_requests():
    outcomes = [Outcome(sent=0.0, status=200, ttft=0.1 * i, ended=2.0, tokens=10, gaps=[0.05] * 9, error="")
                for i in range(1, 11)]
    outcomes += [Outcome(sent=1.0, status=503, ended=1.5, error="http_503"),
                 Outcome(sent=1.0, status=200, ttft=0.1, ended=1.2, tokens=3, error="broken_stream")]
    s = metrics.summarize(outcomes)
    assert s["requests"] == 12 and s["completed"] == 10
    assert s["errors"] == {"http_503": 1, "broken_stream": 1}
    assert s["throughput_rps"] == 5.0 and s["tokens_per_s"] == 50.0
    assert s["ttft_p50"] == pytest.approx(0.55) and s["itl_p50"] == pytest.approx(0.05)
    assert metrics.ratio(2.0, 0.5) == 4.0 and metrics.ratio(None, 1) is None and metrics.ratio(1, 0) is None


def test_the_report_has_ratios_to_the_reference_and_to_hpcserve_and_plots(tmp_path):
    requests = poisson(5, 10, seed=1)
    ref = metrics.summarize_reference(reference.fcfs(requests, [Backend(4, 10.0)] * 2))
    def record(system, ttft):
        outcomes = [Outcome(sent=r.at, status=200, ttft=ttft, ended=r.at + 1, tokens=5, gaps=[0.1] * 4, error="")
                    for r in requests]
        return {"scenario": "a", "case": "50%", "system": system, "offered_rps": 5.0,
                "summary": metrics.summarize(outcomes), "reference": ref, "per_backend": [3, 4]}
    results = {"meta": {"started": "now", "machine": "test", "command": "python -m benchmarks run", "window_s": 10,
                        "systems": ["hpcserve", "nginx"]},
               "records": [record("hpcserve", 0.2), record("nginx", 0.4)]}
    path = report.write(results, tmp_path)
    text = path.read_text()
    nginx_row = next(line for line in text.splitlines() if "| nginx |" in line)
    assert "| 2.00 |" in nginx_row                         # p99 TTFT twice hpcserve's
    assert "reference (central FCFS model)" in text
    assert (tmp_path / "a-ttft-throughput.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text()) == results
