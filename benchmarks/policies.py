"""Balancing policies in one discrete-event model, so that each measured system can be reported as
measured / model: how much of its latency is its policy, and how much its implementation.

The model's backends are those of the simulator (hpcserve/llama/simulator.py) and of
workload.Backend: `slots` slots, each serving one request at a time for a fixed service time
(prefill, then one token every 1/token_rate s, whatever the other slots do); requests beyond the
slots wait in the backend's own FIFO queue, as llama-server's do. Network and proxy costs are zero
and every request arrives exactly on time.

Policies (what each system in benchmarks/systems.py does, from its documentation):

- "round-robin": request i goes to backend i mod n at its arrival and waits there (nginx's and
  HAProxy's default; direct access by a client that spreads its requests).
- "least-connections": at its arrival a request goes to the backend with the fewest outstanding
  requests (in service or waiting there), ties in turn; it waits there (nginx `least_conn`,
  HAProxy `balance leastconn` without maxconn, LiteLLM "least-busy").
- "least-connections + slot cap": the balancer holds a request in its own FIFO queue until a
  backend has a free slot (HAProxy `maxconn` = slots): at arrival with a free slot anywhere, the
  backend with the fewest requests in service (ties in turn); otherwise the backend whose slot
  frees first takes the head of the queue (HAProxy: a server that ends a request takes the next
  one from the backend's queue). hpcserve's configuration, and the hand-tuned HAProxy.
- "least-connections + slot cap, no queue": the same choice, but a request that finds every slot
  busy is refused at once (nginx `least_conn` with `max_conns` = slots: open-source nginx has no
  upstream queue and answers 502).
- "round-robin + slot cap": the same queue, but at arrival the next backend in turn that has a
  free slot (HAProxy `balance roundrobin` with `maxconn`).
- "greedy central queue": the balancer's FIFO queue hands each request to the free slot that
  finishes it soonest (the fastest backend with a free slot). A heuristic, not a lower bound: on
  some traces another assignment does better.
"""

from __future__ import annotations

import dataclasses

from benchmarks.workload import Backend, Request

POLICIES = ("round-robin", "least-connections", "least-connections + slot cap",
            "least-connections + slot cap, no queue", "round-robin + slot cap", "greedy central queue")


@dataclasses.dataclass(frozen=True)
class Served:
    """A request as the model served it (seconds from the start of the run)."""

    request: Request
    started: float
    ttft: float   # seconds from arrival to the first token
    ended: float
    backend: int  # index into the backends list; -1 when refused
    refused: bool = False  # no slot and no queue: the balancer answered an error at once


def simulate(policy: str, requests: list[Request], backends: list[Backend]) -> list[Served]:
    """Serve `requests` over `backends` with `policy` (one of POLICIES).

    Returns:
        one Served per request, in arrival order.
    Raises:
        ValueError: an unknown policy, or a pool without a slot.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    if not any(b.slots for b in backends):
        raise ValueError("the pool has no slot")
    # free_at[b][s]: when slot s of backend b is next free (the requests queued on b included).
    free_at = [[0.0] * b.slots for b in backends]
    ends: list[list[float]] = [[] for _ in backends]   # end times of the requests given to each backend
    turn = 0
    served = []
    for i, request in enumerate(sorted(requests, key=lambda r: r.at)):
        t = request.at
        usable = [b for b, bk in enumerate(backends) if bk.slots]
        if policy == "round-robin":
            b = usable[i % len(usable)]
        elif policy == "least-connections":
            outstanding = [sum(1 for e in ends[b] if e > t) for b in usable]
            b = _in_turn(usable, outstanding, turn)
            turn += 1
        else:
            # A central queue: the request starts when the first slot anywhere is free (FIFO).
            ready = max(t, min(min(f) for f in free_at if f))
            free = [b for b in usable if min(free_at[b]) <= ready]
            if policy == "least-connections + slot cap, no queue" and ready > t:
                served.append(Served(request, t, 0.0, t, -1, refused=True))
                continue
            if policy == "greedy central queue":
                b = min(free, key=lambda b: backends[b].service_time(request))
            elif ready > t:   # it waited: the backend whose slot freed first takes it
                b = min(usable, key=lambda b: min(free_at[b]))
            elif policy == "round-robin + slot cap":
                b = next(usable[(turn + k) % len(usable)] for k in range(len(usable))
                         if usable[(turn + k) % len(usable)] in free)
                turn = usable.index(b) + 1
            else:
                busy = [sum(1 for f in free_at[b] if f > t) for b in free]
                b = _in_turn(free, busy, turn)
                turn += 1
        slot = min(range(len(free_at[b])), key=lambda s: free_at[b][s])
        start = max(t, free_at[b][slot])
        free_at[b][slot] = start + backends[b].service_time(request)
        ends[b].append(free_at[b][slot])
        served.append(Served(request, start, start - t + backends[b].first_token(request), free_at[b][slot], b))
    return served


def _in_turn(candidates: list[int], load: list[int], turn: int) -> int:
    """The candidate with the least load; among equals, the first at or after position `turn`."""
    least = min(load)
    n = len(candidates)
    return next(candidates[(turn + k) % n] for k in range(n) if load[(turn + k) % n] == least)
