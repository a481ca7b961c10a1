"""The pure autoscaling decision: delays, cooldown, step, bounds, scale to zero, no flapping."""

from __future__ import annotations

import random

from hpcserve.core.autoscale import Memory, Signals, decide
from hpcserve.config import Autoscale

POLICY = Autoscale(min=1, max=6, target_utilization=0.75, scale_up_delay=30, scale_down_delay=120,
                   cooldown=60, max_step=2)


def load(busy: int, queued: int = 0, wakeups: int = 0) -> Signals:
    return Signals(sessions=busy, queued=queued, wakeups=wakeups, slots_per_replica=4)


def run(policy, current, signals_at, until, every=10.0):
    """Decide every `every` seconds from t=0 to `until`; return (time, replicas) at each change."""
    memory, changes = Memory(), []
    t = 0.0
    while t <= until:
        d = decide(policy, current, signals_at(t), memory, now=t)
        if d.changed:
            changes.append((t, d.after))
        current, memory = d.after, d.memory
        t += every
    return current, changes


def test_scale_up_waits_for_the_delay_then_steps():
    current, changes = run(POLICY, 1, lambda t: load(4, 20), until=200)
    # need = ceil(24 / 3) = 8 -> max 6; +2 after 30 s, then +2 after each 60 s cooldown
    assert changes == [(30, 3), (90, 5), (150, 6)] and current == 6


def test_a_short_spike_changes_nothing():
    current, changes = run(POLICY, 1, lambda t: load(4, 20) if 50 <= t < 70 else load(1), until=300)
    assert changes == [] and current == 1


def test_scale_down_waits_longer_and_respects_min():
    current, changes = run(POLICY, 5, lambda t: load(0), until=600)
    assert changes == [(120, 3), (250, 1)] and current == 1   # the delay restarts at the next look


def test_steady_load_at_the_threshold_does_not_flap():
    """Load wobbling around exactly what 3 replicas give at 75% (9 requests) never moves them."""
    rng = random.Random(7)
    current, changes = run(POLICY, 3, lambda t: load(rng.choice([8, 9, 9, 9])), until=3600)
    assert changes == [] and current == 3


def test_noise_just_above_the_threshold_does_not_flap_either():
    rng = random.Random(3)
    current, changes = run(POLICY, 3, lambda t: load(rng.choice([9, 10])), until=3600)
    assert len(changes) <= 1 and current in (3, 4)


def test_scale_to_zero_and_wake_up():
    policy = Autoscale(min=0, max=2, scale_down_delay=60, cooldown=0)
    current, changes = run(policy, 1, lambda t: load(0), until=120)
    assert current == 0 and changes == [(60, 0)]
    d = decide(policy, 0, load(0, wakeups=3), Memory(), now=500)
    assert d.after == 1 and "waking up" in d.reason
    assert decide(policy, 0, load(0), Memory(), now=500).after == 0


def test_bounds_are_enforced_at_once():
    assert decide(POLICY, 0, load(0), Memory(), now=0).after == 1
    assert decide(POLICY, 9, load(100), Memory(last_change=0), now=1).after == 6


def test_pending_replicas_are_not_asked_for_twice():
    """The need is compared with the desired replicas, pending ones included, not the ready ones."""
    d = decide(POLICY, 3, Signals(sessions=4, queued=5, wakeups=0, slots_per_replica=4, pending=2),
               Memory(above_since=0), now=100)
    assert d.after == 3 and d.reason.startswith("steady")
