"""Autoscaling decisions: load signals + policy + what happened before -> desired replicas. Pure.

`hpcserve autoscale` (cron, once a minute, or --watch) reads the signals from HAProxy
(hpcserve/control/autoscaler.py), asks
`decide()` for each model with a policy, and applies the result as one reconcile step. The memory
between runs (since when the need has differed, when the last change was) is a small JSON record
in the state directory, so every run is independent and a crashed run loses nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol


class Policy(Protocol):
    """A model's autoscale policy: the deployment file's `autoscale` section (config.Autoscale,
    where each field is validated and documented)."""

    @property
    def min(self) -> int: ...
    @property
    def max(self) -> int: ...
    @property
    def target_utilization(self) -> float: ...
    @property
    def scale_up_delay(self) -> float: ...
    @property
    def scale_down_delay(self) -> float: ...
    @property
    def cooldown(self) -> float: ...
    @property
    def max_step(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Signals:
    """One model's load, from HAProxy and Slurm.

    Attributes:
        sessions: requests being served now (sum of the servers' sessions).
        queued: requests waiting in HAProxy for a slot.
        wakeups: requests answered "starting" since the last run (no backend was running).
        slots_per_replica: llama-server slots of one backend (--parallel).
        pending: jobs of the model waiting in Slurm's queue (counted in the desired replicas,
            so a pending replica is not asked for twice).
    """

    sessions: int
    queued: int
    wakeups: int
    slots_per_replica: int
    pending: int = 0

    def needed(self, target: float) -> int:
        """Replicas this load needs at the target utilization."""
        return math.ceil((self.sessions + self.queued) / (self.slots_per_replica * target))


@dataclasses.dataclass(frozen=True)
class Memory:
    """What a decision remembers for the next run (epoch seconds, None = not so)."""

    above_since: float | None = None
    below_since: float | None = None
    last_change: float | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of one decision: replicas before and after, why, and the memory to keep."""

    before: int
    after: int
    reason: str
    memory: Memory

    @property
    def changed(self) -> bool:
        return self.after != self.before


def decide(policy: Policy, current: int, signals: Signals, memory: Memory, now: float) -> Decision:
    """Desired replicas for one model.

    Args:
        policy: the model's autoscale policy.
        current: desired replicas now (pending jobs included).
        signals: the model's load.
        memory: what the last decision remembered.
        now: epoch seconds.
    Returns:
        The Decision. Rules, in order: requests that found no backend wake a model at zero at
        once; the replicas are kept within [min, max]; no change during the cooldown; the need
        must persist for scale_up_delay (more) or scale_down_delay (fewer); a change moves at
        most max_step replicas toward the need.
    """
    def decision(after: int, reason: str, **mem: float | None) -> Decision:
        fields = {"above_since": memory.above_since, "below_since": memory.below_since,
                  "last_change": memory.last_change, **mem}
        if after != current:
            fields.update(above_since=None, below_since=None, last_change=now)
        return Decision(current, after, reason, Memory(**fields))

    if current == 0 and signals.wakeups > 0 and policy.max > 0:
        return decision(max(1, policy.min), f"{signals.wakeups} request(s) found no backend: waking up")
    if current < policy.min:
        return decision(policy.min, f"below min {policy.min}")
    if current > policy.max:
        return decision(policy.max, f"above max {policy.max}")

    needed = min(policy.max, max(policy.min, signals.needed(policy.target_utilization)))
    load = (f"{signals.sessions} in service + {signals.queued} queued need {needed} replica(s) "
            f"at {policy.target_utilization:.0%}")
    if needed == current:
        return decision(current, f"steady: {load}", above_since=None, below_since=None)
    # The need is tracked through the cooldown too; a change waits for both to pass.
    up = needed > current
    since = (memory.above_since if up else memory.below_since)
    since = now if since is None else since
    track = {"above_since": since, "below_since": None} if up else {"below_since": since, "above_since": None}
    delay = policy.scale_up_delay if up else policy.scale_down_delay
    if memory.last_change is not None and now - memory.last_change < policy.cooldown:
        return decision(current, f"cooldown ({policy.cooldown - (now - memory.last_change):.0f} s left): {load}",
                        **track)
    if now - since < delay:
        return decision(current, f"{'up' if up else 'down'} in {delay - (now - since):.0f} s if it lasts: {load}",
                        **track)
    if up:
        return decision(min(needed, current + policy.max_step), f"scale up: {load}")
    return decision(max(needed, current - policy.max_step), f"scale down: {load}")
