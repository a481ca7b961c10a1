"""Figures of a run from the client's outcomes (benchmarks/loadgen.py) or from a policy model
(benchmarks/policies.py), in one shape so that the report can put them side by side."""

from __future__ import annotations

import collections

from benchmarks.common import percentile
from benchmarks.loadgen import Outcome
from benchmarks.policies import Served

# A client whose sends are later than this (p99) measured itself, not the system: the run is invalid.
MAX_LATENESS_P99 = 0.010


def _pct(values: list[float], q: float) -> float | None:
    return round(percentile(sorted(values), q), 4) if values else None


def summarize(outcomes: list[Outcome], warmup: float = 0.0, slo: tuple[float, float] | None = None) -> dict:
    """Figures of one system's run.

    Args:
        warmup: seconds from the start whose requests (by scheduled send) are left out.
        slo: (TTFT limit s, mean inter-token limit s): a request meets it when it completed within
            both; an error is a miss.
    Returns:
        {"requests", "completed": int, "errors": {kind: count}, "throughput_rps": completed
        requests per second and "tokens_per_s" (both over the span from the first request sent to
        the last answer ended), "ttft_p50", "ttft_p99" (seconds, completed requests),
        "itl_p50", "itl_p99" (seconds between tokens), "itl_p01" (seconds: near 0 when tokens
        arrive clumped), "lateness_p99" (seconds the client sent after the scheduled time),
        "valid" (lateness_p99 <= MAX_LATENESS_P99), and with `slo`: "slo_attainment" (share of
        requests meeting it) and "goodput_rps" (requests meeting it per second of the span)}.
        A percentile with no sample is None.
    """
    outcomes = [o for o in outcomes if o.scheduled >= warmup]
    done = [o for o in outcomes if not o.error]
    errors = collections.Counter(o.error for o in outcomes if o.error)
    span = (max(o.ended for o in outcomes) - min(o.sent for o in outcomes)) if outcomes else 0.0
    gaps = [g for o in done for g in o.gaps]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    lateness = _pct([o.sent - o.scheduled for o in outcomes], 99)
    figures = {"requests": len(outcomes), "completed": len(done), "errors": dict(errors),
               "throughput_rps": round(len(done) / span, 3) if span else 0.0,
               "tokens_per_s": round(sum(o.tokens for o in done) / span, 1) if span else 0.0,
               "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
               "itl_p01": _pct(gaps, 1), "itl_p50": _pct(gaps, 50), "itl_p99": _pct(gaps, 99),
               "lateness_p99": lateness, "valid": lateness is None or lateness <= MAX_LATENESS_P99}
    if slo is not None:
        met = sum(1 for o in done if o.ttft is not None and o.ttft <= slo[0]
                  and (not o.gaps or sum(o.gaps) / len(o.gaps) <= slo[1]))
        figures["slo_attainment"] = round(met / len(outcomes), 4) if outcomes else None
        figures["goodput_rps"] = round(met / span, 3) if span else 0.0
    return figures


def _model_gap(served: Served) -> float:
    """The mean inter-token gap of a request a policy model served, in seconds: (ended - first
    token) / (max_tokens - 1), the mean of a stream's gaps being its span over their count; 0.0 for
    an answer of one token or none."""
    if served.request.max_tokens <= 1:
        return 0.0
    return (served.ended - served.request.at - served.ttft) / (served.request.max_tokens - 1)


def summarize_model(served: list[Served], warmup: float = 0.0, slo: tuple[float, float] | None = None) -> dict:
    """A policy model's figures (policies.simulate), in summarize()'s shape (no errors, no
    inter-token jitter, no lateness; a refused request is an error "refused").

    With `slo` (as summarize's) also "slo_attainment" and "goodput_rps": a served request meets it
    when its first token came within slo[0] s and its mean inter-token gap ((ended - first token) /
    (max_tokens - 1)) within slo[1] s; a refused request is a miss. And "slo_misses", the served
    requests that missed, by kind: {"late_first_token": first token after slo[0],
    "slow_stream": first token in time, mean gap over slo[1]} (counts).
    """
    every = [s for s in served if s.request.at >= warmup]
    refused = sum(1 for s in every if s.refused)
    served = [s for s in every if not s.refused]
    ttfts = [s.ttft for s in served]
    span = max(s.ended for s in served) - min(s.request.at for s in served) if served else 0.0
    figures = {"requests": len(every), "completed": len(served), "errors": {"refused": refused} if refused else {},
               "throughput_rps": round(len(served) / span, 3) if span else 0.0,
               "tokens_per_s": round(sum(s.request.max_tokens for s in served) / span, 1) if span else 0.0,
               "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
               "itl_p01": None, "itl_p50": None, "itl_p99": None}
    if slo is not None:
        late = sum(1 for s in served if s.ttft > slo[0])
        slow = sum(1 for s in served if s.ttft <= slo[0] and _model_gap(s) > slo[1])
        met = len(served) - late - slow
        figures["slo_misses"] = {"late_first_token": late, "slow_stream": slow}
        figures["slo_attainment"] = round(met / len(every), 4) if every else None
        figures["goodput_rps"] = round(met / span, 3) if span else 0.0
    return figures


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base rounded to 2 places, None when either is missing or base is 0."""
    if value is None or not base:
        return None
    return round(value / base, 2)
