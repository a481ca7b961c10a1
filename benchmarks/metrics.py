"""Figures of a run from the client's outcomes (benchmarks/loadgen.py) or from the reference model
(benchmarks/reference.py), in one shape so that the report can put them side by side."""

from __future__ import annotations

import collections

from benchmarks.common import percentile
from benchmarks.loadgen import Outcome
from benchmarks.reference import Served


def _pct(values: list[float], q: float) -> float | None:
    return round(percentile(sorted(values), q), 4) if values else None


def summarize(outcomes: list[Outcome]) -> dict:
    """Figures of one system's run.

    Returns:
        {"requests", "completed": int, "errors": {kind: count}, "throughput_rps": completed
        requests per second and "tokens_per_s" (both over the span from the first request sent to
        the last answer ended), "ttft_p50", "ttft_p99" (seconds, completed requests),
        "itl_p50", "itl_p99" (seconds between tokens), "itl_p01" (seconds: near 0 when tokens
        arrive clumped)}. A percentile with no sample is None.
    """
    done = [o for o in outcomes if not o.error]
    errors = collections.Counter(o.error for o in outcomes if o.error)
    span = (max(o.ended for o in outcomes) - min(o.sent for o in outcomes)) if outcomes else 0.0
    gaps = [g for o in done for g in o.gaps]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    return {"requests": len(outcomes), "completed": len(done), "errors": dict(errors),
            "throughput_rps": round(len(done) / span, 3) if span else 0.0,
            "tokens_per_s": round(sum(o.tokens for o in done) / span, 1) if span else 0.0,
            "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
            "itl_p01": _pct(gaps, 1), "itl_p50": _pct(gaps, 50), "itl_p99": _pct(gaps, 99)}


def summarize_reference(served: list[Served]) -> dict:
    """The reference model's figures, in summarize()'s shape (no errors, no inter-token jitter)."""
    ttfts = [s.ttft for s in served]
    span = max(s.ended for s in served) - min(s.request.at for s in served) if served else 0.0
    return {"requests": len(served), "completed": len(served), "errors": {},
            "throughput_rps": round(len(served) / span, 3) if span else 0.0,
            "tokens_per_s": round(sum(s.request.max_tokens for s in served) / span, 1) if span else 0.0,
            "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
            "itl_p01": None, "itl_p50": None, "itl_p99": None}


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base rounded to 2 places, None when either is missing or base is 0."""
    if value is None or not base:
        return None
    return round(value / base, 2)
