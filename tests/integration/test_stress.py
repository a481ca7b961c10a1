"""A short sample of the stress harness (benchmarks/stress.py; the full grid is scripts/stress.sh):
per-key limits over 40 bursts of 8 simultaneous requests, each burst with a fresh key, on the
HAProxy release under test; the count comes from the backend, not from HAProxy. Before hpcserve
made each key's stick-table entry itself, HAProxy 3.0.11 at 2 threads let 1 in 300 such bursts
past max_concurrent and 11 in 300 past the rate."""

from __future__ import annotations

import pytest

from benchmarks import stress

pytestmark = pytest.mark.haproxy

#: Bursts per run (60 until 2026-12-07, to keep .ci/run's time): the sample guards the fix, the
#: harness (1,000 bursts a case) measures the rate of a race.
BURSTS = 40


@pytest.mark.parametrize("kind, threads", [("rate", 1), ("concurrent", 2)])
def test_a_fresh_keys_limit_holds_in_every_burst(haproxy_bin, tmp_path, kind, threads):
    """The rate with the default single thread; max_concurrent with 2 threads too (its check reads
    the tracker count the same rule set, so threads cannot interleave it)."""
    run = stress.limits(tmp_path, bursts=BURSTS, threads=threads, keys="fresh", kind=kind, progress=lambda _: None)
    assert run.bursts == BURSTS and run.other == 0, run
    assert run.violations == 0, run.examples
    assert run.admitted == BURSTS * stress.LIMIT           # exactly the limit: none refused too early
