"""Balancing policies in one discrete-event model, so that each measured system can be reported as
measured / model: how much of its latency is its policy, and how much its implementation.

The model's backends are those of the simulator (hpcserve/llama/simulator.py) and of
workload.Backend, in either of the simulator's timings: `slots` slots each serving one request at
a time for a fixed service time (prefill, then one token every 1/token_rate s, whatever the other
slots do); or, for backends with a batch profile (Backend.profile, hpcserve-llama-sim
--sim-profile), llama-server's update loop as the simulator's BatchTiming runs it: one step at a
time, each generating slot a token per step, prompts in the rest of the batch, a step as long as
profile.step_seconds says, a request that takes a slot during a step joining the next one.
Requests beyond the slots wait in the backend's own FIFO queue, as llama-server's do. Network and
proxy costs are zero and every request arrives exactly on time.

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
  finishes it soonest (the fastest backend with a free slot; with batch profiles, the backend whose
  batch with this request added steps fastest). A heuristic, not a lower bound: on some traces
  another assignment does better.
"""

from __future__ import annotations

import collections
import dataclasses
import math

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
        ValueError: an unknown policy, a pool without a slot, or one that mixes backends with and
            without a batch profile.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    if not any(b.slots for b in backends):
        raise ValueError("the pool has no slot")
    if any(b.profile for b in backends):
        if not all(b.profile for b in backends):
            raise ValueError("backends: expected all or none with a batch profile")
        return _simulate_batches(policy, requests, backends)
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


@dataclasses.dataclass(eq=False)
class _Sequence:
    """A request (`index` in arrival order) in a slot of a batch-step backend."""

    index: int
    request: Request
    started: float
    prompt_left: int
    tokens_left: int
    first: float = math.nan


class _BatchServer:
    """One backend following its batch profile (the simulator's BatchTiming, as events): the
    requests in its slots, those waiting inside it, and the step in progress (None when idle)."""

    def __init__(self, backend: Backend):
        assert backend.profile is not None
        self.profile, self.slots = backend.profile, backend.slots
        self.active: list[_Sequence] = []
        self.waiting: collections.deque[tuple[int, Request]] = collections.deque()
        self.step: tuple[list[_Sequence], list[tuple[_Sequence, int]]] | None = None
        self.step_end = math.inf

    def outstanding(self) -> int:
        return len(self.active) + len(self.waiting)

    def estimate(self, request: Request) -> float:
        """Seconds `request` would take here if the batch stayed as it is: its prefill alone, then
        its tokens in steps of the requests already here and itself."""
        steps = self.profile.step_seconds(min(self.slots, self.outstanding() + 1), 0)
        return self.profile.prefill_seconds(request.counted_prompt_tokens) + request.max_tokens * steps

    def admit(self, index: int, request: Request, t: float) -> None:
        """`request` arrives at `t`: into a free slot (joining the next step; starting one if idle),
        else into the backend's own queue."""
        if len(self.active) < self.slots:
            self._take_slot(index, request, t)
        else:
            self.waiting.append((index, request))
        if self.step is None:
            self._compose(t)

    def _take_slot(self, index: int, request: Request, t: float) -> None:
        self.active.append(_Sequence(index, request, t, max(1, request.counted_prompt_tokens), request.max_tokens))

    def _compose(self, t: float) -> None:
        generating = [s for s in self.active if not s.prompt_left]
        prompts = [s for s in self.active if s.prompt_left]
        prefill = [(s, n) for s, n in zip(prompts, self.profile.batch_prompts(
            len(generating), [s.prompt_left for s in prompts])) if n]
        self.step = (generating, prefill) if self.active else None
        self.step_end = t + self.profile.step_seconds(len(generating), sum(n for _, n in prefill)) \
            if self.active else math.inf

    def end_step(self) -> list[_Sequence]:
        """Ends the step in progress (at step_end) and starts the next; returns the requests it
        completed. Requests that take a freed slot now join the step after the next, as in the
        simulator, whose step loop composes the next step before a waiting handler runs."""
        assert self.step is not None
        t, (generating, prefill) = self.step_end, self.step
        for s in generating:
            s.tokens_left -= 1
        for s, n in prefill:
            s.prompt_left -= n
            if not s.prompt_left:
                s.first = t
                s.tokens_left = max(0, s.tokens_left - 1)
        done = [s for s in self.active if not s.prompt_left and not s.tokens_left]
        self.active = [s for s in self.active if s.prompt_left or s.tokens_left]
        self._compose(t)
        while self.waiting and len(self.active) < self.slots:
            self._take_slot(*self.waiting.popleft(), t)
        if self.step is None and self.active:
            self._compose(t)
        return done


def _simulate_batches(policy: str, requests: list[Request], backends: list[Backend]) -> list[Served]:
    """simulate() over batch-step backends: events are arrivals and the ends of steps (a step
    ending at an arrival's time is taken first)."""
    servers = [_BatchServer(b) for b in backends]
    usable = [b for b, bk in enumerate(backends) if bk.slots]
    capped = "slot cap" in policy or policy == "greedy central queue"
    ordered = sorted(requests, key=lambda r: r.at)
    served: list[Served | None] = [None] * len(ordered)
    queue: collections.deque[tuple[int, Request]] = collections.deque()  # the balancer's (slot-capped policies)
    turn, i = 0, 0
    while True:
        arrival = ordered[i].at if i < len(ordered) else math.inf
        b = min(usable, key=lambda b: servers[b].step_end)
        t = servers[b].step_end
        if t == math.inf and arrival == math.inf:
            break
        if t <= arrival:
            for s in servers[b].end_step():
                served[s.index] = Served(s.request, s.started, s.first - s.request.at, t, b)
            while capped and queue and servers[b].outstanding() < servers[b].slots:
                servers[b].admit(*queue.popleft(), t)
            continue
        request, t = ordered[i], arrival
        i += 1
        if policy == "round-robin":
            b = usable[(i - 1) % len(usable)]
        elif policy == "least-connections":
            b = _in_turn(usable, [servers[b].outstanding() for b in usable], turn)
            turn += 1
        else:
            free = [b for b in usable if servers[b].outstanding() < servers[b].slots]
            if not free or queue:
                if policy == "least-connections + slot cap, no queue":
                    served[i - 1] = Served(request, t, 0.0, t, -1, refused=True)
                else:
                    queue.append((i - 1, request))
                continue
            if policy == "greedy central queue":   # where it would end soonest in the batch it joins
                b = min(free, key=lambda b: servers[b].estimate(request))
            elif policy == "round-robin + slot cap":
                b = next(usable[(turn + k) % len(usable)] for k in range(len(usable))
                         if usable[(turn + k) % len(usable)] in free)
                turn = usable.index(b) + 1
            else:
                b = _in_turn(free, [servers[b].outstanding() for b in free], turn)
                turn += 1
        servers[b].admit(i - 1, request, t)
    assert all(s is not None for s in served)
    return [s for s in served if s is not None]
