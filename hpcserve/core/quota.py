"""GPU-hour quotas per Slurm account (pure): periods, the running count of what each account
used in them, and HAProxy's quota map.

A quota is GPU-seconds per calendar period in UTC: a day from 00:00, a week from Monday 00:00, a
month from the 1st 00:00. What an account used is counted from the access log's billed lines with
core.billing's formula (the one `hpcserve usage` reports by), each line counting in the period
its request started in (as `usage --since`). The count keeps slot-seconds per account and model,
so that GPU-seconds follow the deployment's models as they are now.

HAProxy's quota map holds, for each account with a quota, "OVER|RESET|REMAINING|RESET_ISO": OVER 1
when the account used its quota (its requests are refused with 429 insufficient_quota until RESET,
epoch seconds; RESET_ISO the same in ISO 8601, UTC), REMAINING the GPU-hours left (the response
header X-Quota-Remaining-GPU-Hours).
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .billing import Record, account_of, model_of, slot_seconds

PERIODS = ("day", "week", "month")
#: The largest quota accepted: 10 million GPU-hours.
MAX_GPU_SECONDS = 10_000_000 * 3600


def period_start(now: float, period: str) -> float:
    """Epoch seconds of the start (UTC) of the `period` ("day", "week", "month") that holds `now`.

    Raises:
        ValueError: `period` is not one of PERIODS.
    """
    day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(hour=0, minute=0, second=0,
                                                                               microsecond=0)
    if period == "day":
        return day.timestamp()
    if period == "week":
        return (day - datetime.timedelta(days=day.weekday())).timestamp()
    if period == "month":
        return day.replace(day=1).timestamp()
    raise ValueError(f"expected one of {', '.join(PERIODS)}, got {period!r}")


def next_reset(now: float, period: str) -> float:
    """Epoch seconds (UTC) at which the `period` holding `now` ends and a new one starts."""
    start = datetime.datetime.fromtimestamp(period_start(now, period), datetime.timezone.utc)
    if period == "day":
        return (start + datetime.timedelta(days=1)).timestamp()
    if period == "week":
        return (start + datetime.timedelta(days=7)).timestamp()
    days = calendar.monthrange(start.year, start.month)[1]
    return (start + datetime.timedelta(days=days)).timestamp()


def parse_gpu_time(text: str) -> float:
    """GPU-seconds from "200h", "200 GPU-h", "90m", "30s" or "1.5h" (a bare number is hours).

    Raises:
        ValueError: anything else, a negative amount, or more than MAX_GPU_SECONDS.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(h|gpu-?h|hours?|m|min|minutes?|s|sec|seconds?)?\s*", text, re.I)
    if not match:
        raise ValueError(f"expected GPU time such as 200h, 90m or 30s, got {text!r}")
    unit = (match.group(2) or "h").lower()
    seconds = float(match.group(1)) * (3600 if unit.startswith(("h", "gpu")) else 60 if unit.startswith("m") else 1)
    if seconds > MAX_GPU_SECONDS:
        raise ValueError(f"expected at most {MAX_GPU_SECONDS // 3600} GPU-hours, got {text!r}")
    return seconds


@dataclasses.dataclass(frozen=True)
class Quota:
    """An account's quota: `gpu_seconds` per `period` (one of PERIODS)."""

    account: str
    gpu_seconds: float
    period: str


@dataclasses.dataclass
class Counts:
    """Slot-seconds used per account and model in the current day, week and month.

    Attributes:
        starts: period -> epoch seconds its current instance started.
        used: period -> account -> model -> slot-seconds.
    """

    starts: dict[str, float] = dataclasses.field(default_factory=dict)
    used: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)

    def roll(self, now: float) -> None:
        """Start a new count for each period that ended by `now` (or was never started)."""
        for period in PERIODS:
            start = period_start(now, period)
            if self.starts.get(period, -1.0) < start:
                self.starts[period] = start
                self.used[period] = {}

    def add(self, record: Record, now: float) -> str | None:
        """Count one access log line (core.billing): returns its account when it held a slot,
        else None. A line whose request started before a period's current start is not counted
        in that period (it belongs to the one before)."""
        held = slot_seconds(record)
        if not held:
            return None
        account = account_of(record)
        self.add_held(account, model_of(record), float(record.get("time", now)), held, now)
        return account

    def add_bucket(self, bucket: Mapping[str, Any], now: float) -> None:
        """Count one hourly bucket of the usage ledger (access/ledger.py: "hour", "account",
        "model", "slot_seconds"). An hour lies inside a UTC day, week or month or outside it."""
        self.add_held(str(bucket["account"]), str(bucket["model"]), float(bucket["hour"]),
                      float(bucket["slot_seconds"]), now)

    def add_held(self, account: str, model: str, started: float, held: float, now: float) -> None:
        """Count `held` slot-seconds of `account` on `model` for a request that started at
        `started` (epoch seconds) in each current period it started in."""
        if held <= 0:
            return
        self.roll(now)
        for period in PERIODS:
            if started >= self.starts[period]:
                models = self.used[period].setdefault(account, {})
                models[model] = models.get(model, 0.0) + held

    def gpu_seconds(self, account: str, period: str, gpus_per_slot: Mapping[str, float]) -> float:
        """GPU-seconds `account` used in the current `period` (0 when it is not counted yet)."""
        models = self.used.get(period, {}).get(account, {})
        return sum(held * gpus_per_slot.get(model, 0.0) for model, held in models.items())

    def to_json(self) -> dict[str, Any]:
        return {"starts": self.starts, "used": self.used}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Counts:
        """The counts of to_json().

        Raises:
            ValueError, KeyError, TypeError, AttributeError: not what to_json() writes.
        """
        return cls({str(p): float(t) for p, t in data["starts"].items()},
                   {str(p): {str(a): {str(m): float(s) for m, s in models.items()} for a, models in accounts.items()}
                    for p, accounts in data["used"].items()})


def quota_map(quotas: Iterable[Quota], counts: Counts, gpus_per_slot: Mapping[str, float],
              now: float) -> dict[str, str]:
    """HAProxy's quota map (module docstring): account -> "OVER|RESET|REMAINING|RESET_ISO" for each
    quota, REMAINING in GPU-hours with 4 decimals (0 when over)."""
    counts.roll(now)
    entries = {}
    for quota in quotas:
        left = quota.gpu_seconds - counts.gpu_seconds(quota.account, quota.period, gpus_per_slot)
        reset = next_reset(now, quota.period)
        iso = datetime.datetime.fromtimestamp(reset, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        entries[quota.account] = f"{int(left <= 0)}|{int(reset)}|{max(0.0, left) / 3600:.4f}|{iso}"
    return entries
