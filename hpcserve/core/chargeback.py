"""The chargeback (pure): the GPU-seconds Slurm charged for the pool's own jobs, split across the
Slurm accounts whose requests held their slots, with the time no request held a slot on a line of
its own ("(idle)"), so that the lines add up to what sacct charged.

A job of G GPUs and P slots, running in the window [since, until) from S to E, is charged
G x (min(E, until) - max(S, since)) GPU-seconds (sacct's AllocTRES gres/gpu and its Start, End).
A request that held one of its slots from a to b (the access log: started at `time`, held the
slot after TR + Tw + Tc and until Ta, HAProxy 2.6 configuration manual 8.4) is charged to its
account G / P x the part of [a, b) inside both the window and the job's run. Lines the usage
ledger has folded (access/ledger.py) count by their hour, whole, when that hour starts in the
window. Whatever part of a job no request held is idle: the job's charge minus its requests'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .billing import Record, account_of, slot_seconds

IDLE = "(idle)"


@dataclasses.dataclass(frozen=True)
class JobCharge:
    """One job of the pool as sacct reports it.

    Attributes:
        job_id: Slurm's job id.
        account: the account Slurm charged (the pool's).
        start, end: epoch seconds it ran from and to (end: now, for a running job).
        gpus: GPUs allocated (AllocTRES gres/gpu).
        slots: its llama-server's slots (the model's `parallel`).
    """

    job_id: str
    account: str
    start: float
    end: float
    gpus: int
    slots: int


def _overlap(a: float, b: float, c: float, d: float) -> float:
    return max(0.0, min(b, d) - max(a, c))


def held_interval(record: Record) -> tuple[float, float] | None:
    """Epoch seconds [from, to) the request held its slot, or None when it held none."""
    if not slot_seconds(record):
        return None
    started = float(record["time"])
    begin = started + (int(record["TR"]) + int(record["Tw"]) + int(record["Tc"])) / 1000
    return begin, started + int(record["Ta"]) / 1000


def split(jobs: Iterable[JobCharge], records: Iterable[Record], buckets: Iterable[Mapping[str, Any]],
          since: float, until: float) -> dict[str, dict[str, float]]:
    """GPU-seconds of each job in [since, until), by account (module docstring).

    Args:
        jobs: the pool's jobs (those outside the window count 0).
        records: access log lines (server "job<ID>" names the job).
        buckets: usage ledger buckets (hour, account, server, slot_seconds).
    Returns:
        job id -> {account or IDLE -> GPU-seconds}; each job's values sum to its charge.
    """
    by_id = {job.job_id: job for job in jobs}
    charged: dict[str, dict[str, float]] = {job_id: {} for job_id in by_id}

    def add(job_id: str, account: str, gpu_seconds: float) -> None:
        lines = charged[job_id]
        lines[account] = lines.get(account, 0.0) + gpu_seconds

    for record in records:
        job = by_id.get(str(record.get("server", ""))[len("job"):])
        held = held_interval(record) if job else None
        if job and held:
            inside = _overlap(held[0], held[1], max(since, job.start), min(until, job.end))
            if inside:
                add(job.job_id, account_of(record), inside * job.gpus / job.slots)
    for bucket in buckets:
        job = by_id.get(str(bucket.get("server", ""))[len("job"):])
        if job and since <= float(bucket["hour"]) < until:
            add(job.job_id, account_of(dict(bucket)), float(bucket["slot_seconds"]) * job.gpus / job.slots)
    for job in by_id.values():
        total = job.gpus * _overlap(job.start, job.end, since, until)
        used = sum(charged[job.job_id].values())
        charged[job.job_id][IDLE] = total - used
    return charged


def by_account(charges: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Sum split()'s per-job lines by account (IDLE among them)."""
    totals: dict[str, float] = {}
    for lines in charges.values():
        for account, seconds in lines.items():
            totals[account] = totals.get(account, 0.0) + seconds
    return totals
