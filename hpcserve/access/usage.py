"""Usage accounting from the access log (pure: records in, report rows out). What one request
costs (its slot-seconds and GPU-seconds) is core/billing.py's, which the quotas count with too.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable

from ..config import Deployment
from ..core.billing import account_of, model_of, slot_seconds

__all__ = ["GROUPINGS", "Row", "account_of", "gpus_per_slot", "kind", "model_of", "slot_seconds", "summarize"]

GROUPINGS = ("key", "account", "model", "user")


def kind(record: dict) -> str:
    """What became of a request: "ok", or an error kind ("client_aborted", "server_aborted",
    "unauthorized", "rate_limited", "timeout", "too_large", "invalid", "unavailable",
    "backend_error", "error_<status>"), from its status and termination state (ts, whose first
    character names who ended the session: C client, S server, - normal end)."""
    status = int(record.get("status", 0) or 0)
    ended_by = str(record.get("ts", "--"))[:1]
    if ended_by == "C":
        return "client_aborted"
    if ended_by == "S":
        return "server_aborted"
    if 0 < status < 400:
        return "ok"
    return {401: "unauthorized", 429: "rate_limited", 408: "timeout", 413: "too_large", 400: "invalid",
            404: "invalid", 405: "invalid", 503: "unavailable", 502: "backend_error",
            504: "backend_error"}.get(status, f"error_{status}")


@dataclasses.dataclass
class Row:
    """Usage of one key, Slurm account, model or user.

    Attributes:
        name: the key name, account, model name or OpenWebUI user ("-": none).
        requests: requests received (answered or not).
        ok: requests answered successfully (status < 400, not cut).
        errors: error kind -> count (see kind()).
        queue_p50_ms, queue_p99_ms: queue wait (Tw) of requests that were queued, ms, over those
            still in the access log (not the ledger's); None if none.
        slot_seconds: busy slot-seconds.
        gpu_hours: GPU-hours (slot-seconds x gpus.count / parallel / 3600, per model).
        bytes_out: response bytes sent to clients.
    """

    name: str
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    queue_p50_ms: float | None = None
    queue_p99_ms: float | None = None
    slot_seconds: float = 0.0
    gpu_hours: float = 0.0
    bytes_out: int = 0


def _percentile(values: list[int], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def gpus_per_slot(deployment: Deployment) -> dict[str, float]:
    """Model name -> GPUs one slot of it holds (gpus.count / parallel): core.billing.gpu_seconds's
    factors for this deployment."""
    return {m.name: m.gpus.count / m.parallel for m in deployment.models}


def summarize(records: Iterable[dict], deployment: Deployment, by: str = "key",
              since: float | None = None, until: float | None = None,
              archived: Iterable[dict] = ()) -> list[Row]:
    """Usage rows grouped `by` "key", "account", "model" or "user", for requests that started in
    [since, until) (epoch seconds; None: unbounded), sorted by GPU-hours then name.

    Args:
        records: access log lines (haproxy/accesslog.py records()).
        archived: the usage ledger's hourly buckets (access/ledger.py buckets()) of lines no
            longer in the access log; a bucket counts when its hour starts in [since, until).
            Queue percentiles are over `records` only.
    Raises:
        ValueError: `by` is not one of GROUPINGS.
    """
    if by not in GROUPINGS:
        raise ValueError(f"expected one of {', '.join(GROUPINGS)}, got {by!r}")
    factors = gpus_per_slot(deployment)
    rows: dict[str, Row] = {}
    waits: dict[str, list[int]] = {}

    def inside(started: float) -> bool:
        return not ((since is not None and started < since) or (until is not None and started >= until))

    def add(group: dict, model: str, requests: int, ok: int, errors: dict[str, int], held: float,
            bytes_out: int) -> Row:
        name = model if by == "model" else account_of(group) if by == "account" else str(group.get(by, "-"))
        row = rows.setdefault(name, Row(name))
        row.requests += requests
        row.ok += ok
        for outcome, count in errors.items():
            row.errors[outcome] = row.errors.get(outcome, 0) + count
        row.slot_seconds += held
        row.gpu_hours += held * factors.get(model, 0.0) / 3600
        row.bytes_out += bytes_out
        return row

    for bucket in archived:
        if inside(float(bucket["hour"])):
            add(bucket, str(bucket["model"]), int(bucket["requests"]), int(bucket["ok"]),
                {str(k): int(v) for k, v in bucket["errors"].items()}, float(bucket["slot_seconds"]),
                int(bucket["bytes_out"]))
    for record in records:
        if not inside(float(record.get("time", 0))):
            continue
        outcome = kind(record)
        row = add(record, model_of(record), 1, int(outcome == "ok"), {} if outcome == "ok" else {outcome: 1},
                  slot_seconds(record), max(0, int(record.get("bytes_out", 0))))
        if int(record.get("Tw", -1)) >= 0:
            waits.setdefault(row.name, []).append(int(record["Tw"]))
    for name, row in rows.items():
        row.queue_p50_ms = _percentile(waits.get(name, []), 50)
        row.queue_p99_ms = _percentile(waits.get(name, []), 99)
    return sorted(rows.values(), key=lambda r: (-r.gpu_hours, r.name))
