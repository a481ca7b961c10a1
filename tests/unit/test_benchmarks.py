"""The pure parts of the comparison benchmarks: workload, policy models, figures, statistics, report."""

from __future__ import annotations

import json
import os
import time

import pytest

from benchmarks import crosscheck, metrics, policies, report, scenarios, server_close, stats, sweep
from benchmarks.loadgen import Outcome
from benchmarks.workload import Backend, Request, capacity, mean_tokens, poisson
from hpcserve.llama.simulator import BatchProfile


def test_the_workload_is_the_same_for_the_same_seed_and_has_the_asked_rate():
    a, b = poisson(20, 100, seed=3), poisson(20, 100, seed=3)
    assert a == b and a != poisson(20, 100, seed=4)
    assert 1800 < len(a) < 2200                          # 20/s over 100 s
    assert all(x.at < y.at for x, y in zip(a, a[1:]))
    lengths = sorted(r.max_tokens for r in a)
    assert lengths[len(lengths) // 2] < 25 and lengths[-1] > 100   # heavy tail: median small, some long
    with pytest.raises(ValueError, match="positive"):
        poisson(0, 10, seed=1)


def test_one_seed_is_one_trace_at_every_load():
    slow, fast = poisson(10, 50, seed=7), poisson(20, 25, seed=7)   # common random numbers
    assert [r.max_tokens for r in slow] == [r.max_tokens for r in fast]
    assert [r.at for r in slow] == pytest.approx([2 * r.at for r in fast])


def test_capacity_counts_every_slot_at_its_own_speed():
    pool = [Backend(4, 10.0, prefill_rate=1e9), Backend(4, 5.0, prefill_rate=1e9)]
    assert capacity(pool, 10) == pytest.approx(4 * 1.0 + 4 * 0.5)
    assert 15 < mean_tokens() < 35


def test_the_greedy_model_queues_first_come_first_served_on_the_fastest_free_slot():
    slow, fast = Backend(1, 1.0, prefill_rate=1e9), Backend(1, 2.0, prefill_rate=1e9)
    requests = [Request(0.0, 2), Request(0.0, 2), Request(0.1, 2)]
    served = policies.simulate("greedy central queue", requests, [slow, fast])
    assert served[0].backend == 1 and served[0].ended == pytest.approx(1.0)       # fast: 2 tokens in 1 s
    assert served[1].backend == 0 and served[1].ended == pytest.approx(2.0)       # slow one is free too
    assert served[2].started == pytest.approx(1.0) and served[2].backend == 1     # waits for the first slot
    assert served[2].ttft == pytest.approx(0.9 + 0.5)                              # wait + first token at 2/s
    with pytest.raises(ValueError, match="no slot"):
        policies.simulate("greedy central queue", requests, [])
    with pytest.raises(ValueError, match="policy: expected one of"):
        policies.simulate("random", requests, [slow])


def test_more_slots_never_make_the_greedy_model_slower():
    requests = poisson(30, 20, seed=2)
    small = policies.simulate("greedy central queue", requests, [Backend(4, 10.0)] * 8)
    large = policies.simulate("greedy central queue", requests, [Backend(4, 10.0)] * 16)
    assert all(b.ttft <= a.ttft + 1e-9 for a, b in zip(small, large))


def test_each_policy_places_requests_as_its_balancer_does():
    one = [Backend(1, 1.0, prefill_rate=1e9)] * 2   # two backends of one slot, a token a second
    # Backend 0 gets a long answer (until 10 s); short ones arrive while it is busy.
    trace = [Request(0.0, 10), Request(0.5, 1), Request(1.6, 1), Request(1.7, 1)]

    def placed(policy):
        return [(s.backend, round(s.started, 2)) for s in policies.simulate(policy, trace, one)]
    # Round-robin sends the third request behind the long answer.
    assert placed("round-robin") == [(0, 0.0), (1, 0.5), (0, 10.0), (1, 1.7)]
    # Least connections at arrival: backend 1 is idle again at 1.6, so the third goes there; the
    # fourth finds one request on each and, a tie, waits inside a backend.
    assert placed("least-connections")[2] == (1, 1.6)
    # The slot cap holds the fourth in the balancer's queue until the first slot frees (2.6 s).
    assert placed("least-connections + slot cap") == [(0, 0.0), (1, 0.5), (1, 1.6), (1, 2.6)]
    assert placed("round-robin + slot cap") == [(0, 0.0), (1, 0.5), (1, 1.6), (1, 2.6)]
    # Without a queue (nginx max_conns) the fourth is refused at once.
    refused = policies.simulate("least-connections + slot cap, no queue", trace, one)
    assert [s.refused for s in refused] == [False, False, False, True]
    model = metrics.summarize_model(refused)
    assert model["errors"] == {"refused": 1} and model["completed"] == 3 and model["requests"] == 4


def test_a_model_request_meets_the_slo_only_with_its_first_token_and_its_mean_gap_in_time():
    def served(ttft, gap, refused=False):   # 11 tokens: 10 gaps of `gap` s after the first token
        return policies.Served(Request(0.0, 11), 0.0, ttft, ttft + 10 * gap, -1 if refused else 0, refused)
    model = metrics.summarize_model([served(1.0, 0.1), served(1.0, 0.2), served(2.5, 0.1),
                                     served(0.0, 0.0, refused=True)], slo=(2.0, 0.15))
    assert model["slo_attainment"] == 0.25   # the slow stream, the late first token, the refusal miss
    assert model["slo_misses"] == {"late_first_token": 1, "slow_stream": 1}   # the refusal is an error
    assert "slo_attainment" not in metrics.summarize_model([served(1.0, 0.1)])


def test_the_slot_cap_never_puts_more_requests_on_a_backend_than_its_slots():
    pool = [Backend(2, 10.0), Backend(2, 5.0)]
    served = policies.simulate("least-connections + slot cap", poisson(8, 30, seed=1), pool)
    for b in range(2):
        spans = [(s.started, s.ended) for s in served if s.backend == b]
        for t, _ in spans:
            assert sum(1 for start, end in spans if start <= t < end) <= 2


def test_the_model_counts_the_chat_template_as_the_simulator_does():
    request = Request(0.0, 10, prompt_tokens=8)
    assert request.counted_prompt_tokens == 28
    assert Backend(1, 10.0, prefill_rate=28.0).service_time(request) == pytest.approx(1.0 + 1.0)


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


def test_ttft_counts_from_the_schedule_and_a_late_client_makes_the_run_invalid():
    def outcome(scheduled, late, ttft, gaps=(0.1,)):
        return Outcome(sent=scheduled + late, scheduled=scheduled, status=200, ttft=ttft, ended=scheduled + 2,
                       tokens=len(gaps) + 1, gaps=list(gaps), error="")
    on_time = [outcome(i * 0.1, 0.001, 0.5) for i in range(100)]
    s = metrics.summarize(on_time, slo=(1.0, 0.15))
    assert s["valid"] and s["lateness_p99"] == pytest.approx(0.001) and s["slo_attainment"] == 1.0
    late = on_time[:90] + [outcome(9 + i * 0.1, 0.05, 1.5) for i in range(10)]
    s = metrics.summarize(late, slo=(1.0, 0.15))
    assert not s["valid"] and s["slo_attainment"] == 0.9
    # Slow tokens miss the SLO too, errors count as misses, and warm-up requests are left out.
    s = metrics.summarize(on_time[:50] + [outcome(6, 0, 0.5, gaps=(0.3,)), Outcome(sent=7, scheduled=7, error="http_502")],
                          warmup=1.0, slo=(1.0, 0.15))
    assert s["requests"] == 42 and s["slo_attainment"] == pytest.approx(40 / 42, abs=1e-4)


def test_the_interval_of_a_median_holds_it_and_narrows_with_agreement():
    m, lo, hi = stats.median_interval([1.0, 1.2, 0.9, 1.1, 3.0])
    assert m == 1.1 and lo <= m <= hi and hi <= 3.0
    assert stats.median_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert stats.median_interval([None]) is None and stats.text(None) == "-"
    assert stats.paired_ratios({1: 2.0, 2: 3.0, 3: None}, {1: 1.0, 2: 0, 3: 1.0}) == [2.0]
    assert stats.text((1.0, 0.5, 1.5)) == "1.00 [0.50-1.50]"


def test_the_report_has_medians_intervals_and_paired_ratios_and_plots(tmp_path):
    pool = [Backend(4, 10.0)] * 2
    def record(system, seed, ttft, late=0.0):
        requests = poisson(5, 10, seed=seed)
        outcomes = [Outcome(sent=r.at + late, scheduled=r.at, status=200, ttft=ttft * seed, ended=r.at + 1, tokens=5,
                            gaps=[0.1] * 4, error="") for r in requests]
        return {"scenario": "a", "case": "50%", "system": system, "seed": seed, "offered_rps": 5.0,
                "summary": metrics.summarize(outcomes, slo=(2.0, 0.3)),
                "model": metrics.summarize_model(policies.simulate("least-connections", requests, pool)),
                "reference": metrics.summarize_model(policies.simulate("greedy central queue", requests, pool)),
                "per_backend": [3, 4]}
    records = [record("hpcserve", seed, 0.2) for seed in (1, 2, 3)]
    records += [record("nginx-lc", seed, 0.4) for seed in (1, 2)] + [record("nginx-lc", 3, 0.4, late=0.05)]
    results = {"meta": {"started": "now", "machine": "test", "command": "python -m benchmarks run", "window_s": 10,
                        "systems": ["hpcserve", "nginx-lc"]}, "records": records}
    path = report.write(results, tmp_path)
    text = path.read_text()
    nginx_row = next(line for line in text.splitlines() if "| nginx-lc (least-connections) |" in line)
    cells = [c.strip() for c in nginx_row.split("|")]
    assert cells[3] == "2/3"                               # the late client's run is left out
    assert cells[8] == "2.00 [2.00-2.00]"                  # p99 TTFT twice hpcserve's, seed by seed
    assert "greedy central-queue model" in text
    assert (tmp_path / "a-ttft-slo.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_the_calibration_keeps_the_decode_steps_and_fits_the_prefill_line():
    from benchmarks.calibrate import fit
    profile = fit({1: 0.012, 2: 0.024, 3: 0.040, 4: 0.034}, [(64, 40, 0.05), (256, 170, 0.14), (1024, 690, 0.50)])
    assert profile.decode_step_s == (0.012, 0.024, 0.040, 0.034)
    assert profile.prefill_tokens_per_s == pytest.approx(2133.3)               # 1 / slope of seconds per token
    assert profile.prefill_base_s == pytest.approx(0.0199, abs=0.001)
    assert profile.source["prefill_counted_real_s"][2] == [1024, 690, 0.5]
    assert profile.step_seconds(2, 0) == 0.024 and profile.step_seconds(8, 0) == pytest.approx(0.068)
    assert profile.step_seconds(1, 2133) == pytest.approx(0.012 + 0.0199 + 1.0, abs=0.002)
    with pytest.raises(ValueError, match="does not grow"):
        fit({1: 0.01, 2: 0.02}, [(64, 40, 0.2), (256, 170, 0.1)])
    with pytest.raises(ValueError, match="1, 2, ... slots"):
        fit({1: 0.01, 3: 0.03}, [(64, 40, 0.2), (256, 170, 0.3)])


def test_the_calibration_counts_the_steps_a_cut_prompt_takes_in_its_prefill_line():
    from benchmarks.calibrate import CHECKPOINT_OFFSETS, fit
    truth = BatchProfile(decode_step_s=(0.02,), prefill_base_s=0.03, prefill_tokens_per_s=500.0,
                         checkpoint_offsets=CHECKPOINT_OFFSETS)
    points = [(n, n, truth.prefill_seconds(n)) for n in (84, 276, 1044, 84, 276, 1044)]
    assert [len(truth.prompt_steps(n)) for n, _, _ in points[:3]] == [2, 2, 3]
    profile = fit({1: 0.02}, points, checkpoint_offsets=CHECKPOINT_OFFSETS)
    assert (profile.prefill_base_s, profile.prefill_tokens_per_s) == pytest.approx((0.03, 500.0))
    assert profile.checkpoint_offsets == CHECKPOINT_OFFSETS
    uncut = fit({1: 0.02}, points)                  # the same seconds read as one step a prompt
    assert uncut.prefill_base_s > 0.05 and uncut.checkpoint_offsets == ()


def test_two_calibrations_pool_and_say_how_much_the_machine_changed_between_them():
    from benchmarks.calibrate import Measurements, pooled, speed_change
    before = Measurements({1: 0.010, 2: 0.020}, [(84, 71, 0.2), (276, 197, 0.6)])
    after = Measurements({1: 0.012, 2: 0.024}, [(84, 71, 0.2), (276, 197, 0.6)])
    assert speed_change(before, after) == pytest.approx(0.2)
    assert speed_change(before, Measurements(before.decode, [(84, 71, 0.1), (276, 197, 0.3)])) == pytest.approx(0.5)
    both = pooled([before, after])
    assert both.decode == pytest.approx({1: 0.011, 2: 0.022}) and len(both.prefill) == 4
    with pytest.raises(ValueError, match="different slots"):
        speed_change(before, Measurements({1: 0.01}, before.prefill))


def test_prompts_are_distinct_text_of_the_counted_length():
    a, b = Request(0.5, 10, prompt_tokens=40), Request(0.7, 10, prompt_tokens=40)
    assert len(a.prompt) == len(b.prompt) == 160 and a.prompt != b.prompt and a.prompt == Request(0.5, 10, 40).prompt


def test_long_prompts_are_log_uniform_with_short_answers_on_poissons_arrivals():
    from benchmarks.workload import CHAT_TEMPLATE_TOKENS, prefill_heavy
    requests = prefill_heavy(2.0, 500, seed=3)
    counted = [r.counted_prompt_tokens for r in requests]
    assert [r.at for r in requests] == [r.at for r in poisson(2.0, 500, seed=3)]
    assert min(counted) >= 1024 and max(counted) <= 32768
    assert all(16 <= r.max_tokens <= 64 for r in requests)
    # log-uniform: as many prompts of 1-2k tokens as of 16-32k (5 doublings in all, a fifth each)
    low, high = (sum(1 for c in counted if a <= c < 2 * a) / len(counted) for a in (1024, 16384))
    assert 0.14 < low < 0.26 and 0.14 < high < 0.26
    assert prefill_heavy(2.0, 500, seed=3) == requests
    assert requests[0].prompt_tokens == requests[0].counted_prompt_tokens - CHAT_TEMPLATE_TOKENS
    with pytest.raises(ValueError, match="prompt and answer ranges"):
        prefill_heavy(1.0, 10, seed=1, prompt=(10, 20))


def test_a_scaled_profile_is_every_step_faster_and_the_prefill_capacity_follows():
    from benchmarks.calibrate import fit
    from benchmarks.scenarios import prefill_capacity, scaled
    measured = fit({1: 0.012, 2: 0.024}, [(64, 40, 0.05), (256, 170, 0.14), (1024, 690, 0.50)])
    fast = scaled(measured, 10)
    assert fast.decode_step_s == pytest.approx((0.0012, 0.0024))
    assert fast.prefill_tokens_per_s == pytest.approx(10 * measured.prefill_tokens_per_s)
    assert fast.step_seconds(1, 2000) == pytest.approx(measured.step_seconds(1, 2000) / 10)
    requests = [Request(0.0, 10, prompt_tokens=2048 - 20), Request(1.0, 10, prompt_tokens=4096 - 20)]
    one = 1 / fast.prefill_tokens_per_s
    mean = (fast.prefill_base_s + 2048 * one + 2 * fast.prefill_base_s + 4096 * one) / 2   # 1 and 2 batches
    assert prefill_capacity(requests, fast, servers=4) == pytest.approx(4 / mean)


PROFILE = BatchProfile(decode_step_s=(0.1, 0.15), prefill_base_s=0.05, prefill_tokens_per_s=100.0)


def test_in_the_batch_model_busy_slots_share_each_step_and_a_prompt_stalls_them():
    one = [Backend.batch(2, PROFILE)]
    # Alone: a 30-token prompt (10 + 20 template) in one step of 0.05 + 0.3 s that also gives the
    # first token, then 4 steps of one generating slot.
    alone = policies.simulate("round-robin", [Request(0.0, 5, prompt_tokens=10)], one)[0]
    assert alone.ttft == pytest.approx(0.35) and alone.ended == pytest.approx(0.35 + 4 * 0.1)
    # A second request arriving during the first's first decode step joins the next step: its
    # prefill step (0.35 s) carries the first's token too, the steps after take 0.15 s for both.
    pair = policies.simulate("round-robin", [Request(0.0, 5, prompt_tokens=10), Request(0.4, 3, prompt_tokens=10)], one)
    assert pair[1].started == pytest.approx(0.4) and pair[1].ttft == pytest.approx(0.45 + 0.1 + 0.35 - 0.4)
    assert pair[0].ended == pytest.approx(0.35 + 0.1 + 0.45 + 2 * 0.15)   # prefill, 1, 1 stalled, 2 shared
    assert pair[1].ended == pair[0].ended
    # A third request beyond the slots waits inside the backend until one is free.
    three = policies.simulate("round-robin", [Request(0.0, 5, prompt_tokens=10)] * 3, one)
    assert three[2].started == pytest.approx(three[0].ended)


def test_in_the_batch_model_each_policy_places_requests_as_its_balancer_does():
    from benchmarks.scenarios import scaled
    pool = [Backend.batch(1, PROFILE), Backend.batch(1, scaled(PROFILE, 0.5))]
    trace = [Request(0.0, 10), Request(0.1, 10), Request(0.2, 10)]

    def placed(policy):
        return [s.backend for s in policies.simulate(policy, trace, pool)]
    assert placed("round-robin") == [0, 1, 0]
    assert placed("least-connections") == [0, 1, 0]
    capped = policies.simulate("least-connections + slot cap", trace, pool)
    assert capped[2].started == pytest.approx(capped[0].ended)   # waited in the balancer for backend 0
    refused = policies.simulate("least-connections + slot cap, no queue", trace, pool)
    assert [s.refused for s in refused] == [False, False, True]
    # The greedy model sends the first to the faster backend, the second to the slower one.
    assert placed("greedy central queue")[:2] == [0, 1]
    with pytest.raises(ValueError, match="all or none with a batch profile"):
        policies.simulate("round-robin", trace, [Backend.batch(1, PROFILE), Backend(1, 10.0)])


def test_in_the_batch_model_a_slot_cap_holds_at_most_slots_per_backend_and_the_capacity_is_nominal():
    from benchmarks.scenarios import batch_pool
    pool = batch_pool(PROFILE, fast_rate=10.0, count=4, slots=2)
    assert [b.token_rate for b in pool] == pytest.approx([10.0, 10.0, 5.0, 5.0])
    full = capacity(pool, mean_tokens())
    served = policies.simulate("least-connections + slot cap", poisson(full * 0.9, 60, seed=1), pool)
    for b in range(4):
        spans = [(s.started, s.ended) for s in served if s.backend == b]
        assert max(sum(1 for start, end in spans if start <= t < end) for t, _ in spans) == 2
    # At 90% of the nominal capacity the model keeps up: the last request ends soon after the window.
    assert max(s.ended for s in served) < 60 + 30


def test_the_churn_report_gives_loss_drain_and_reloads_per_system(tmp_path):
    def record(system, seed, failed, drains, reloads):
        outcomes = [Outcome(sent=i * 0.1, status=200, ttft=0.5, ended=i * 0.1 + 1, tokens=5, gaps=[0.05] * 4,
                            error="broken_stream" if i < failed else "") for i in range(100)]
        return {"scenario": "c", "case": "20 changes", "system": system, "seed": seed,
                "summary": metrics.summarize(outcomes), "window_s": 71.0, "pool_changes": 20, "reloads": reloads,
                "drain_s": drains, "forced_stops": 0, "change_s": [0.01] * 20, "max_busy": 8, "max_waiting": 3}
    records = [record("hpcserve", s, 0, [0.4, 1.2], 5) for s in (1, 2, 3)]
    records += [record("nginx-lc", s, 2 * s, [0.6, 3.0], 20) for s in (1, 2, 3)]
    results = {"meta": {"started": "now", "machine": "test", "command": "c"}, "records": records}
    text = report.write(results, tmp_path).read_text()
    nginx = [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| nginx-lc")).split("|")]
    assert nginx[2:6] == ["3", "288 / 300", "4.00 [2.00-6.00]", "broken_stream 12"]
    assert nginx[8:11] == ["1.8 / 3.0", "0", "20 [20-20]"]
    hp = [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| hpcserve")).split("|")]
    assert hp[4] == "0.00 [0.00-0.00]" and hp[8] == "0.8 / 1.2"
    assert (tmp_path / "c-outcomes.png").stat().st_size > 1000


def test_a_seeded_scenario_without_policy_models_reports_measured_figures_only(tmp_path):
    requests = poisson(5, 10, seed=1)
    outcomes = [Outcome(sent=r.at, scheduled=r.at, status=200, ttft=1.0, ended=r.at + 2, tokens=5, gaps=[0.2] * 4,
                        error="") for r in requests]
    records = [{"scenario": "g", "case": "80%", "system": "hpcserve", "seed": 1, "offered_rps": 5.0,
                "summary": metrics.summarize(outcomes)}]
    text = report.write({"meta": {"started": "now", "machine": "test", "command": "g"}, "records": records},
                        tmp_path).read_text()
    row = [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| 80% | hpcserve")).split("|")]
    assert row[5] == "1.00 [1.00-1.00]" and row[6] == "-" and row[11] == "200.0 [200.0-200.0]"


def test_both_tools_figures_count_ttft_from_the_send_and_itl_over_the_tokens_after_the_first():
    # loadgen: TTFT counted from the schedule, converted to the send; a failed request is not completed.
    outcomes = [Outcome(sent=i + 0.2, scheduled=float(i), status=200, ttft=0.7, ended=i + 2.0, tokens=5,
                        gaps=[0.1] * 4, error="") for i in range(4)]
    outcomes.append(Outcome(sent=9.0, scheduled=9.0, error="http_502"))
    ours = crosscheck.loadgen_figures(outcomes, requested=5)
    assert ours["ttft_p50"] == pytest.approx(0.5) and ours["itl_mean"] == pytest.approx(0.1)
    assert ours["completed"] == 4 and ours["requests"] == 5 and ours["lateness_p99"] == pytest.approx(0.2, abs=0.01)
    assert ours["errors"] == {"http_502": 1}

    # guidellm's JSON (the fields of 0.8.1's output): the same definitions from its epoch timestamps;
    # a row it never sent counts against completed.
    def request(start, tokens):
        return {"info": {"timings": {"targeted_start": start - 0.2, "request_start": start,
                                     "first_token_iteration": start + 0.5,
                                     "last_token_iteration": start + 0.5 + 0.1 * (tokens - 1)}},
                "output_metrics": {"text_tokens": tokens}}
    benchmark = {"requests": {"successful": [request(1000.0 + i, 5) for i in range(3)] + [request(1010.0, 1)],
                              "errored": [], "incomplete": []},
                 "metrics": {"time_to_first_token_ms": {"successful": {"percentiles": {"p50": 500.0, "p90": 520.0}}},
                             "inter_token_latency_ms": {"successful": {"mean": 100.0}}}}
    theirs = crosscheck.guidellm_figures(benchmark, requested=5)
    assert theirs["ttft_p50"] == pytest.approx(0.5) and theirs["itl_mean"] == pytest.approx(0.1)
    assert theirs["completed"] == 4 and theirs["requests"] == 5 and theirs["errors"] == {}
    assert theirs["guidellm"] == {"ttft_p50": 0.5, "ttft_p90": 0.52, "itl_mean": 0.1}


def test_the_cross_check_pairs_the_tools_by_seed_and_reports_the_ratio(tmp_path):
    def record(seed, system, tool, ttft):
        return {"seed": seed, "system": system, "tool": tool, "ttft_p50": ttft, "ttft_p90": 2 * ttft,
                "itl_mean": 0.05, "lateness_p99": 0.001, "completed": 100, "requests": 100}
    records = [record(s, system, tool, s * (1.1 if tool == "guidellm" else 1.0))
               for s in (1, 2, 3) for system in crosscheck.SYSTEMS for tool in crosscheck.TOOLS]
    s = crosscheck.summary(records)
    assert s["direct"]["ratio"]["ttft_p50"] == pytest.approx((1.1, 1.1, 1.1))
    assert s["hpcserve"]["loadgen"]["ttft_p50"][0] == 2.0 and s["hpcserve"]["ratio"]["itl_mean"] == (1.0, 1.0, 1.0)
    meta = {"started": "now", "machine": "test", "command": "crosscheck", "count": 100, "rate": 0.9, "seeds": 3}
    text = crosscheck.write_report({"meta": meta, "records": records}, tmp_path).read_text()
    row = [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| direct | ttft_p50")).split("|")]
    assert row[3:6] == ["2.000 [1.000-3.000]", "2.200 [1.100-3.300]", "1.10 [1.10-1.10]"]
    assert "(started now, test)" in text
    records[0]["errors"] = {"connect": 1}
    text = crosscheck.write_report({"meta": {**meta, "resumed": ["later"]}, "records": records}, tmp_path).read_text()
    assert "| 1 | direct | loadgen | 100/100 (connect 1) |" in text and "(started now, resumed later, test)" in text


def test_the_server_close_report_counts_retries_from_show_stat_and_lost_requests(tmp_path):
    from pathlib import Path
    captured = (Path(__file__).parent.parent / "replay" / "haproxy-2.6.12" / "show-stat.txt").read_text()
    assert crosscheck.backend_retries(captured) == 0          # a real `show stat`: its BACKEND row
    assert crosscheck.backend_retries(captured.replace("model_m,BACKEND,0,0,0,0,998,0,0,0,0,0,,0,0,0,",
                                                         "model_m,BACKEND,0,0,0,0,998,0,0,0,0,0,,0,0,17,")) == 17
    with pytest.raises(KeyError):
        crosscheck.backend_retries(captured, backend="model_x")

    def record(seed, variant, completed, retries):
        return {"seed": seed, "variant": variant, "completed": completed, "requests": 60, "retries": retries,
                "errors": {} if completed == 60 else {"ServerDisconnectedError": 60 - completed},
                "ttft_p50": 0.6, "lateness_p99": 0.001}
    kept, reused = server_close.VARIANTS
    records = [record(1, kept, 60, 0), record(1, reused, 59, 12), record(2, kept, 60, 0), record(2, reused, 60, 30)]
    s = server_close.summary(records)
    assert (s[kept]["runs_with_loss"], s[kept]["lost"]) == (0, 0)
    assert (s[reused]["runs_with_loss"], s[reused]["lost"], s[reused]["retries"][0]) == (1, 1, 21)
    meta = {"started": "now", "machine": "test", "command": "server_close", "count": 60, "rate": 0.6, "seeds": 2}
    text = server_close.write_report({"meta": meta, "records": records}, tmp_path).read_text()
    assert "| 1 | without http-server-close | 59/60 | ServerDisconnectedError 1 | 12 |" in text


def test_the_highest_load_with_99_percent_attainment_stops_at_the_first_load_that_misses():
    assert sweep.highest_load({0.7: 1.0, 0.85: 0.995, 0.95: 0.98, 1.05: 0.999}) == 0.85
    assert sweep.highest_load({0.7: 0.98, 0.85: 1.0}) is None
    assert sweep.highest_load({0.7: 1.0, 0.85: None, 0.95: 0.99}) == 0.95   # no valid run at 85%: skipped


def test_in_the_model_a_slot_cap_holds_the_slo_at_a_load_where_round_robin_misses():
    model = {p: sweep.modelled(p, [0.5, 0.95], [1], 30.0) for p in ("round-robin", "least-connections + slot cap")}
    assert model["least-connections + slot cap"][1][0.95] >= 0.99
    assert model["round-robin"][1][0.95] < 0.9 and model["round-robin"][1][0.5] > model["round-robin"][1][0.95]


def test_the_models_misses_are_told_apart_and_sum_with_the_attainment_to_one():
    policies_ = ("round-robin", "least-connections + slot cap, no queue")
    attainment = {p: sweep.modelled(p, [0.95], [1], 30.0)[1][0.95] for p in policies_}
    found = {p: sweep.misses(p, 0.95, [1], 30.0)[1] for p in policies_}
    for policy, kinds in found.items():
        total = kinds["late_first_token"] + kinds["slow_stream"] + kinds["refused"] + attainment[policy]
        assert abs(total - 1) < 1e-4, policy   # the attainment is rounded to 4 places
    no_queue = found["least-connections + slot cap, no queue"]
    assert no_queue["refused"] > 0 and no_queue["late_first_token"] == 0   # it refuses instead of queueing
    assert found["round-robin"]["late_first_token"] > 0.1 and found["round-robin"]["refused"] == 0
    assert found["round-robin"]["ttft_p99"] > 2.0 > no_queue["ttft_p99"]
    assert sweep.misses("round-robin", 0.95, [1], 0.001) == {}   # no request in the window: no figures, no error


def test_the_sweep_report_takes_valid_runs_of_systems_measured_at_every_load(tmp_path):
    def record(system, seed, case, attainment, valid=True):
        return {"scenario": "a", "case": case, "system": system, "seed": seed, "offered_rps": 1.0,
                "summary": {"slo_attainment": attainment, "valid": valid}}
    sweep_run = [record("hpcserve", s, "70%", 1.0) for s in (1, 2, 3)]
    sweep_run += [record("nginx-lc", s, "70%", 0.995) for s in (1, 2, 3)]
    point = [record("hpcserve", s, "95%", 0.999) for s in (1, 2, 3)]
    point += [record("nginx-lc", 1, "95%", 0.95), record("nginx-lc", 2, "95%", 0.999, valid=False),
              record("nginx-lc", 3, "95%", 0.97), record("litellm", 1, "95%", 0.9)]   # litellm: 95% only
    for name, records in (("sweep", sweep_run), ("point", point)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"meta": {"started": "now", "command": name, "window_s": 10.0}, "records": records}))
    from click.testing import CliRunner
    result = CliRunner().invoke(sweep.main, ["--results", str(tmp_path / "sweep" / "results.json"), "--results",
                                             str(tmp_path / "point" / "results.json"), "--out", str(tmp_path / "out"),
                                             "--step", "0.35"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "sweep.md").read_text()
    rows = {line.split(" (")[0][2:]: [c.strip() for c in line.split("|")] for line in text.splitlines()
            if line.startswith("| hpcserve") or line.startswith("| nginx-lc") or line.startswith("| litellm")}
    assert set(rows) == {"hpcserve", "nginx-lc"}
    assert rows["hpcserve"][2:5] == ["1.000 [1.000-1.000]", "0.999 [0.999-0.999]", "0.95 [0.95-0.95]"]
    assert rows["nginx-lc"][3] == "0.960 [0.950-0.970]"   # the invalid run left out
    assert rows["nginx-lc"][4] == "0.70 [0.70-0.70]"
    assert (tmp_path / "out" / "a-sweep.png").stat().st_size > 1000
    mixed = tmp_path / "point" / "results.json"
    mixed.write_text(mixed.read_text().replace('"window_s": 10.0', '"window_s": 20.0'))
    result = CliRunner().invoke(sweep.main, ["--results", str(tmp_path / "sweep" / "results.json"),
                                             "--results", str(mixed), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "expected runs of one window" in result.output


def test_in_the_model_of_h_a_neighbours_prefill_misses_the_itl_limit_where_every_first_token_is_in_time():
    pool = scenarios.seeded_pool("h")
    requests = poisson(0.85 * capacity(pool, mean_tokens()), 80.0, seed=1)
    served = [s for s in policies.simulate("least-connections + slot cap", requests, pool) if s.request.at >= 8.0]
    assert max(s.ttft for s in served) <= 2.0
    assert 0.9 < sweep.modelled("least-connections + slot cap", [0.85], [1], 80.0, "h")[1][0.85] < 0.99


def test_the_sweep_takes_runs_of_one_seeded_scenario(tmp_path):
    def results(scenario, case):
        records = [{"scenario": scenario, "case": case, "system": "hpcserve", "seed": s, "offered_rps": 1.0,
                    "summary": {"slo_attainment": 1.0, "valid": True}} for s in (1, 2)]
        return json.dumps({"meta": {"started": "now", "command": scenario, "window_s": 10.0}, "records": records})
    for name, scenario, case in (("h70", "h", "70%"), ("h95", "h", "95%"), ("a95", "a", "95%")):
        (tmp_path / f"{name}.json").write_text(results(scenario, case))
    from click.testing import CliRunner
    result = CliRunner().invoke(sweep.main, ["--results", str(tmp_path / "h70.json"), "--results",
                                             str(tmp_path / "h95.json"), "--out", str(tmp_path / "out"),
                                             "--step", "0.35"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "sweep.md").read_text()
    assert text.startswith("# Scenario (h) over load") and "| 0.95 [0.95-0.95] |" in text
    assert (tmp_path / "out" / "h-sweep.png").stat().st_size > 1000
    result = CliRunner().invoke(sweep.main, ["--results", str(tmp_path / "h70.json"), "--results",
                                             str(tmp_path / "a95.json"), "--out", str(tmp_path / "mixed")])
    assert result.exit_code == 2 and "expected runs of one scenario, got a, h" in result.output
    assert not (tmp_path / "mixed").exists()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell a pinned thread from another")
def test_pinning_a_proxy_moves_every_thread_of_it_not_only_the_first():
    import subprocess
    import sys

    import psutil

    from benchmarks import proxy_cost
    code = "import threading, time; [threading.Thread(target=time.sleep, args=(30,), daemon=True).start() for _ in range(2)]; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        process = psutil.Process(child.pid)
        deadline = time.monotonic() + 10
        while len(process.threads()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu = min(os.sched_getaffinity(0))
        proxy_cost.pin([process], {cpu})
        assert len(process.threads()) == 3
        assert all(os.sched_getaffinity(t.id) == {cpu} for t in process.threads())
    finally:
        child.kill()
        child.wait()


def test_a_wrk_run_reads_in_milliseconds_and_gives_a_p99_9_only_over_10000_requests():
    from benchmarks import proxy_cost
    raw = {"duration_us": 20_000_000, "requests": 9_999, "connect_errors": 0, "read_errors": 2, "write_errors": 0,
           "status_errors": 5, "timeouts": 1, "p50_us": 180, "p99_us": 1_250, "p99.9_us": 4_000, "max_us": 9_000,
           "mean_us": 210.4, "lateness_p99_us": 1_030, "lateness_max_us": 4_000}
    figures = proxy_cost.parse_wrk(raw)
    assert figures["p50_ms"] == 0.18 and figures["p99_ms"] == 1.25 and figures["lateness_p99_ms"] == 1.03
    assert figures["achieved_rate"] == pytest.approx(499.95, abs=0.1)
    assert figures["errors"] == {"read": 2, "status": 5, "timeouts": 1}
    assert figures["p99.9_ms"] is None                  # the 10th largest of 10,000 at least
    assert proxy_cost.parse_wrk({**raw, "requests": 10_000})["p99.9_ms"] == 4.0
    assert proxy_cost.parse_wrk({**raw, "lateness_p99_us": -1})["lateness_p99_ms"] is None   # no request sent


def test_the_latency_table_pairs_each_system_with_direct_access_by_rate_and_seed_over_valid_runs():
    from benchmarks import proxy_cost

    def row(rate, seed, p50, p99, valid=True):
        return {"rate": rate, "seed": seed, "achieved_rate": rate, "p50_ms": p50, "p99_ms": p99, "p99.9_ms": None,
                "errors": {}, "lateness_p99_ms": 1.0 if valid else 12.0, "valid": valid}
    results = {"llm_cost": [], "added_latency": {
        "direct": [row(1000, 1, 0.1, 0.3), row(1000, 2, 0.2, 0.5)],
        "hpcserve": [row(1000, 1, 0.4, 1.3), row(1000, 2, 0.5, 1.5), row(1000, 3, 9.0, 90.0, valid=False)]}}
    text = proxy_cost.table(results)
    line = next(ln for ln in text.splitlines() if ln.startswith("| hpcserve |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2] == "2/3"                            # the late run is counted, not used
    assert cells[7] == "0.300 [0.300-0.300]"            # added p50: 0.4-0.1 and 0.5-0.2, paired by seed
    assert cells[8] == "1.000 [1.000-1.000]"            # added p99
    assert cells[10] == "12.0"                          # the worst client lateness is shown


def test_a_seeded_traffic_scenario_reports_completions_over_every_run_and_medians_over_valid_ones(tmp_path):
    def record(system, seed, ttft, completed=10, late=0.0):
        requests = poisson(5, 4, seed=seed)[:12]
        outcomes = [Outcome(sent=r.at + late, scheduled=r.at, status=200 if i < completed else 503,
                            ttft=ttft * seed if i < completed else None, ended=r.at + 1, tokens=5 if i < completed else 0,
                            gaps=[0.05] * 4 if i < completed else [], error="" if i < completed else "http_503")
                    for i, r in enumerate(requests)]
        return {"scenario": "b", "case": "5x", "system": system, "seed": seed, "offered_rps": 5.0,
                "summary": metrics.summarize(outcomes)}
    records = [record("hpcserve", seed, 0.2) for seed in (1, 2)] + [record("nginx-lc", 1, 0.6, completed=12),
                                                                     record("nginx-lc", 2, 0.6, completed=12),
                                                                     record("nginx-lc", 3, 0.6, late=0.05)]
    results = {"meta": {"started": "now", "machine": "test", "command": "python -m benchmarks run", "window_s": 4,
                        "systems": ["hpcserve", "nginx-lc"]}, "records": records}
    text = report.write(results, tmp_path).read_text()
    cells = [c.strip() for c in next(ln for ln in text.splitlines() if "| nginx-lc (" in ln).split("|")]
    assert cells[3] == "2/3"                               # the late client's run is left out of the medians...
    assert cells[4] == "34 / 36"                           # ...not out of what was completed and sent
    assert cells[7] == "3.00 [3.00-3.00]"                  # TTFT p99 / hpcserve's, paired by seed
    assert cells[9] == "50.0 [50.0-50.0]"                  # ITL p50 ms
    assert cells[11] == "http_503 2"


def test_the_cost_table_gives_medians_over_valid_seeds_and_the_cpu_ratio_to_hpcserve_paired_by_seed():
    from benchmarks import proxy_cost

    def row(system, seed, cpu_ms, valid=True, processes=2):
        return {"system": system, "seed": seed, "processes": processes, "requests": 1200, "completed": 1000 + seed,
                "cpu_ms_per_request": cpu_ms, "cpu_ms_per_1000_tokens": 40 * cpu_ms, "peak_rss_mib": 20.0,
                "valid": valid}
    rows = [row("hpcserve", 1, 1.0), row("nginx-lc", 1, 0.5, processes=3),
            row("hpcserve", 2, 2.0), row("nginx-lc", 2, 1.8, processes=4),
            row("hpcserve", 3, 4.0), row("nginx-lc", 3, 100.0, valid=False)]
    lines = proxy_cost.cost_table(rows)
    hpcserve = next(line for line in lines if line.startswith("| hpcserve |"))
    nginx = next(line for line in lines if line.startswith("| nginx-lc |"))
    assert "| 3/3 | 3,006 / 3,600 | 2.000 [" in hpcserve and "| 1.00 [1.00-1.00] |" in hpcserve
    # seed 3's run of nginx-lc is invalid: out of the median and of the ratio, counted in "runs valid"
    assert "| 2/3 | 2,003 / 2,400 | 1.150 [" in nginx and "| 0.70 [" in nginx and nginx.endswith("| 3-4 |")
    # an older results file, one run per system without "seed", still reads
    assert "| 1/1 | 1,001 / 1,200 | 0.500 [0.500-0.500] |" in proxy_cost.table(
        {"llm_cost": [{k: v for k, v in row("nginx-lc", 1, 0.5).items() if k != "seed"}], "added_latency": {}})


def test_runs_rotate_the_order_of_systems_by_seed():
    from benchmarks.common import rotated
    names = ["hpcserve", "haproxy-lc", "nginx-lc", "litellm"]
    orders = [rotated(names, seed) for seed in range(1, 5)]
    assert orders[0] == ["haproxy-lc", "nginx-lc", "litellm", "hpcserve"]
    assert {order[0] for order in orders} == set(names)     # each system first once in 4 seeds
    assert rotated(tuple(names), 4) == names and rotated([], 3) == []


def test_the_stress_summary_says_when_the_access_log_count_is_not_exact():
    from benchmarks import stress
    run = {"release": "2.6.12", "threads": 2, "flood": 20000, "authenticated": 300, "statuses": {200: 300},
           "flood_statuses": {401: 20000}, "logged": 300, "unauthenticated_counted": 20000, "dropped": 0,
           "seconds": 17.3, "exact": True}
    [line] = stress.summarize([], [], [run])
    assert line.startswith("logs    2.6.12   nbthread 2: 300 requests with a key") and "300 logged, 0 dropped" in line
    [short] = stress.summarize([], [], [{**run, "logged": 299, "dropped": 1, "exact": False}])
    assert short.endswith("NOT EXACT")


def test_the_fair_share_benchmark_names_a_bad_account_list_and_reports_an_account_never_served():
    from click.testing import CliRunner

    from benchmarks import fairshare
    result = CliRunner().invoke(fairshare.main, ["--accounts", "physics"])
    assert result.exit_code == 2 and "--accounts" in result.output and "two accounts" in result.output
    assert fairshare._figures([]) == {"served": 0, "ttft_p50": None, "ttft_p99": None, "ttft_max": None}
    assert fairshare._figures([1.0, 3.0])["ttft_max"] == 3.0
    assert fairshare._cell([1.0, None]) == "-" and fairshare._cell([1.0, 2.0, 4.0]) == "2.00 [1.00-4.00]"
    assert fairshare._cell([93, 91, 93], 0) == "93 [91-93]"
