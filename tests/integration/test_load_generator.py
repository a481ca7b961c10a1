"""The high-rate load generator of benchmarks/proxy_cost.py: Debian's wrk running
benchmarks/configs/wrk-think.lua against the llama-server simulator: the rate it was asked for,
the key from the environment (not wrk's command line), refusals counted as errors, and the client's
lateness measured."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import proxy_cost, systems
from benchmarks.common import KEY
from benchmarks.workload import Backend

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (scripts/setup.sh)")


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    [backend] = systems.start_simulators([Backend(slots=8, token_rate=1000.0)], tmp_path_factory.mktemp("sim"))
    yield backend.urls[0]
    backend.stop()


def test_wrk_sends_about_the_asked_rate_with_the_key_and_measures_its_lateness(simulator):
    figures = proxy_cost.wrk_run(simulator, {"Authorization": f"Bearer {KEY}"}, rate=100, window=4, seed=1,
                                 connections=20)
    assert figures["errors"] == {}
    assert 250 <= figures["requests"] <= 550                 # 400 expected; Poisson, and each answer's time
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    assert figures["p99.9_ms"] is None                       # too few requests for one
    assert figures["lateness_p99_ms"] is not None and figures["lateness_p99_ms"] < 10


def test_a_refused_request_counts_as_an_error_not_as_an_answer(simulator):
    figures = proxy_cost.wrk_run(simulator, {"Authorization": "Bearer wrong"}, rate=100, window=2, seed=1,
                                 connections=20)
    assert figures["errors"].get("status", 0) > 50
    assert figures["errors"]["status"] == figures["requests"]   # every answer was a 401
