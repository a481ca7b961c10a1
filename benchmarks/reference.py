"""The best any balancer can do: a discrete-event model of one central first-come-first-served
queue over every slot of the pool.

A request waits in the one queue until a slot is free and is served by the free slot that finishes
it soonest (the fastest backend with a free slot). A balancer that starts requests in arrival order
cannot start any of them earlier, so each system's TTFT percentiles are reported as a ratio to this
model's: the limit for that load in the model's terms. Network, parsing and proxy costs are zero
here and arrivals are exactly on time; a real run can come out slightly below it when its client
sends late in a burst (TTFT is measured from the actual send).
"""

from __future__ import annotations

import dataclasses

from benchmarks.workload import Backend, Request


@dataclasses.dataclass(frozen=True)
class Served:
    """A request as the model served it (seconds from the start of the run)."""

    request: Request
    started: float
    ttft: float   # seconds from arrival to the first token
    ended: float
    backend: int  # index into the backends list


def fcfs(requests: list[Request], backends: list[Backend]) -> list[Served]:
    """Serve `requests` (sorted by arrival or not) through one central FCFS queue over `backends`.

    Returns:
        one Served per request, in arrival order.
    Raises:
        ValueError: the pool has no slot.
    """
    slots = [(i, b) for i, b in enumerate(backends) for _ in range(b.slots)]
    if not slots:
        raise ValueError("the pool has no slot")
    free_at = [0.0] * len(slots)          # when each slot is next free
    served = []
    for request in sorted(requests, key=lambda r: r.at):
        # The earliest moment any slot is free; among slots free by then, the fastest backend.
        ready = max(request.at, min(free_at))
        candidates = [k for k, t in enumerate(free_at) if t <= ready]
        k = min(candidates, key=lambda k: slots[k][1].service_time(request))
        index, backend = slots[k]
        start = ready
        free_at[k] = start + backend.service_time(request)
        served.append(Served(request, start, start - request.at + backend.first_token(request),
                             free_at[k], index))
    return served
