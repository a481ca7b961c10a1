"""The batch-step model of benchmarks/policies.py keeps the simulator's time: one trace sent to two
hpcserve-llama-sim backends following a batch profile, and given to the model of the same pool.

Scenarios (g) and (h) report each system as measured / model; that ratio means something only if
the model and the backends it stands for agree when nothing is in between. Here nothing is: the
client sends round-robin straight to the simulators, and the model's "round-robin" policy does the
same. Measured on 2026-11-23 (60 requests): the model's TTFT p50 within 3-4% of the simulator's,
its end-to-end p50 within 3-6% (the simulator's steps end ~1.5 ms late on 2 busy cores), per-request
TTFT apart by 24-27 ms at p90. Tolerances: 15% on the medians, 60 ms at p90; the fixed-rate slot
model at the one-slot rate misses the end-to-end median by half, so the test tells the two apart.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks import crosscheck, loadgen, policies, systems
from benchmarks.common import KEY, percentile
from benchmarks.scenarios import PROFILE
from benchmarks.workload import Backend
from hpcserve.llama.simulator import BatchProfile

SLOTS, RATE, COUNT = 4, 2.0, 40   # 40 requests (20 s): 60 until 2026-12-07
MEDIAN_TOLERANCE, TTFT_P90_S = 0.15, 0.060


def test_the_batch_model_serves_a_trace_as_the_simulators_do(tmp_path: Path):
    profile = BatchProfile.load(PROFILE)
    pool = [Backend.batch(SLOTS, profile)] * 2
    requests = crosscheck.trace(seed=7, count=COUNT, rate=RATE)
    sims = systems.start_simulators(pool, tmp_path)
    try:
        outcomes = loadgen.run([s.urls[0] for s in sims], "m", requests, 120, {"Authorization": f"Bearer {KEY}"})
        stats = systems.sim_stats(sims)
    finally:
        for sim in sims:
            sim.stop()
    assert not [o.error for o in outcomes if o.error]
    assert all(s["max_busy"] == SLOTS for s in stats), stats   # the trace fills the batches
    model = policies.simulate("round-robin", requests, pool)
    assert [s.backend for s in model] == [i % 2 for i in range(COUNT)]
    sim_ttft = [o.ttft for o in outcomes if o.ttft is not None]
    sim_total = [o.ended - o.scheduled for o in outcomes]
    model_ttft = [s.ttft for s in model]
    model_total = [s.ended - s.request.at for s in model]
    print(f"\nTTFT p50 model {statistics.median(model_ttft):.3f} s, simulator {statistics.median(sim_ttft):.3f} s; "
          f"end-to-end p50 model {statistics.median(model_total):.3f} s, simulator {statistics.median(sim_total):.3f} s")
    for modelled, measured in ((model_ttft, sim_ttft), (model_total, sim_total)):
        assert abs(statistics.median(modelled) / statistics.median(measured) - 1) <= MEDIAN_TOLERANCE
    assert percentile([abs(m - o) for m, o in zip(model_ttft, sim_ttft)], 90) <= TTFT_P90_S
    # Independent slots at the one-slot rate (the fixed-rate model) finish far sooner than a batch.
    slots = policies.simulate("round-robin", requests, [Backend(SLOTS, 1 / profile.decode_step_s[0],
                                                                profile.prefill_tokens_per_s)] * 2)
    fixed_total = statistics.median(s.ended - s.request.at for s in slots)
    assert fixed_total < (1 - 2 * MEDIAN_TOLERANCE) * statistics.median(sim_total)
