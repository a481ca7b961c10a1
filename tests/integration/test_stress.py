"""A short sample of the stress harness (benchmarks/stress.py; the full grid is scripts/stress.sh):
the per-key rate limit over 100 bursts of 8 simultaneous requests, each burst with a fresh key, on
the HAProxy release under test with 2 threads. Before hpcserve made each key's stick-table entry
itself, HAProxy 3.0.11 let 11 of 300 such bursts past the limit (so this sample failed about 97
times in 100 there); the count comes from the backend, not from HAProxy."""

from __future__ import annotations

import pytest

from benchmarks import stress

pytestmark = pytest.mark.haproxy


def test_a_fresh_keys_rate_limit_holds_in_every_burst(haproxy_bin, tmp_path):
    run = stress.limits(tmp_path, bursts=100, threads=2, keys="fresh", kind="rate", progress=lambda _: None)
    assert run.bursts == 100 and run.other == 0, run
    assert run.violations == 0, run.examples
    assert run.admitted == 100 * stress.LIMIT           # exactly the limit: none refused too early
