"""Scenario (c): streams in flight while the pool changes, every system given the same changes at
the same times and a drain before any backend it loses is stopped.

The pool starts with 4 simulated backends (8 slots at 20 tokens/s, like Slurm jobs of one GPU) and
changes size 20 times (CHANGES), one change every EVERY seconds on a fixed clock; 200 clients in a
closed loop send streamed chat completions of 5-30 tokens for the same window on every system. A
backend that leaves is stopped only once it is idle (GET /sim/stats: no request in service or
waiting inside it, twice 0.2 s apart) or after DRAIN_TIMEOUT seconds (a forced stop, counted): the
drain time is that wait. How each system is told of a change:

- hpcserve: `HAProxy.update()` with the leaving servers draining (runtime API), then without them
  once they are idle; every fourth change also changes the config's structure, so that hpcserve
  reloads HAProxy under load as it does when a deployment file changes.
- hand-written HAProxy (haproxy-lc, haproxy-rr): what its admin does by hand. A change that only
  removes servers: `set server pool/NAME state drain` on the admin socket, `state maint` once idle;
  a change that adds servers: a new config and a seamless reload (`haproxy -x SOCKET -sf PID`: the
  listening sockets pass to the new process, the old one finishes its streams; HAProxy 2.6
  management guide).
- nginx (nginx-lc, nginx-rr): a new config and `nginx -s reload` (SIGHUP); the old workers finish
  their requests and exit (nginx docs, "Controlling nginx"); the reload is waited for (new workers
  up) before the leaving backends are watched.

nginx-maxconns, LiteLLM and direct access take no part: nginx with `max_conns` answers 502 to what
does not fit at once (200 clients over 32-48 slots would measure that, not the changes; (a) and (b)
show it), LiteLLM changes membership through its database and direct access has none.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import psutil

from benchmarks import loadgen, metrics, systems
from benchmarks.common import rotated
from benchmarks.workload import Backend

CHANGES = [5, 3, 6, 4, 2, 5, 3, 6, 4, 2, 5, 3, 6, 4, 3, 5, 2, 4, 6, 4]  # pool sizes, from 4 backends
SHAPE = Backend(8, 20.0)  # slots, tokens/s per slot
LEAD = 3.0                # seconds of traffic before the first change
EVERY = 3.0               # seconds between changes
TAIL = 8.0                # seconds of traffic after the last change
WINDOW = LEAD + EVERY * (len(CHANGES) - 1) + TAIL
CLIENTS = 200
TOKENS = (5, 30)
DRAIN_TIMEOUT = 60.0
TAKING_PART = ("hpcserve", "haproxy-lc", "haproxy-rr", "nginx-lc", "nginx-rr")


def run(settings) -> list[dict]:
    """Every taking part system of `settings.systems` (scenarios.Settings), `settings.seeds`
    times (the closed loop's seed: answer lengths), in an order rotated per seed. One record per
    run: {"scenario": "c", "case", "system", "seed", "summary" (metrics.summarize), "window_s",
    "pool_changes", "reloads", "drain_s" (seconds from each change to each leaving backend idle),
    "drains" ([change index, how it was applied, backend, drain seconds] of each leaving backend),
    "forced_stops", "change_s" (seconds each change took to apply), "max_busy", "max_waiting"
    (most slots busy and most requests waiting inside any one backend)}."""
    names = [n for n in settings.systems if n in TAKING_PART]
    records = []
    for seed in range(1, settings.seeds + 1):
        for name in rotated(names, seed):
            records.append(_one_run(settings, name, seed))
    return records


class _Hpcserve:
    """Membership changes through hpcserve's own HAProxy.update()."""

    def __init__(self, system: systems.Running, reload_every: int = 4, settle_timeout: float = 0) -> None:
        self.proxy = system.proxy
        self.reload_every = reload_every
        self.settle_timeout = settle_timeout
        self.lock = threading.Lock()
        self.active: list[systems.Running] = []
        self.draining: list[systems.Running] = []

    def _servers(self):
        from hpcserve.core.pool import Server
        return ([Server("m", m.name, "127.0.0.1", systems.port_of(m.urls[0])) for m in self.active]
                + [Server("m", m.name, "127.0.0.1", systems.port_of(m.urls[0]), draining=True)
                   for m in self.draining])

    def change(self, index: int, active: list, leaving: list) -> str:
        from hpcserve.haproxy.process import HAProxy
        with self.lock:
            if index % self.reload_every == 0:  # a structural change: this update reloads HAProxy
                d = self.proxy.deployment
                self.proxy = HAProxy(d.model_copy(update={"haproxy": d.haproxy.model_copy(
                    update={"timeout_client": d.haproxy.timeout_client + 1})}), systems.KEY)
            self.active = list(active)
            self.draining += leaving
            return self.proxy.update(self._servers(), settle_timeout=self.settle_timeout)

    def drained(self, member: systems.Running) -> None:
        with self.lock:
            self.draining.remove(member)
            self.proxy.update(self._servers(), settle_timeout=0)


class _HAProxyStatic:
    """The hand-written HAProxy's admin: drain on the admin socket, a seamless reload to add."""

    def __init__(self, system: systems.Running, folder: Path) -> None:
        self.system, self.folder = system, folder
        self.serving: set[str] = set()
        self.lock = threading.Lock()

    def change(self, index: int, active: list, leaving: list) -> str:
        from hpcserve.haproxy import runtime
        with self.lock:
            names = {m.name for m in active}
            if names - self.serving:
                systems.reload_haproxy_static(self.system, self.folder,
                                              [(f"b{m.name}", systems.port_of(m.urls[0])) for m in active], SHAPE.slots)
                result = "reloaded"
            else:
                for m in leaving:
                    answer = runtime.command(systems.haproxy_static_socket(self.system, self.folder),
                                             f"set server pool/b{m.name} state drain").strip()
                    if answer:
                        raise RuntimeError(f"set server pool/b{m.name} state drain: {answer}")
                result = "runtime"
            self.serving = names
            return result

    def drained(self, member: systems.Running) -> None:
        from hpcserve.haproxy import runtime
        from hpcserve.errors import HAProxyError
        with self.lock, contextlib.suppress(HAProxyError):  # gone from the config after a reload
            runtime.command(systems.haproxy_static_socket(self.system, self.folder),
                            f"set server pool/b{member.name} state maint")


class _Nginx:
    """nginx's admin: a new config and a reload, waited for."""

    def __init__(self, system: systems.Running, folder: Path) -> None:
        self.system, self.folder = system, folder

    def change(self, index: int, active: list, leaving: list) -> str:
        master = psutil.Process(self.system.process.pid)
        before = {p.pid for p in master.children()}
        systems.reload_nginx(self.system, self.folder, [systems.port_of(m.urls[0]) for m in active], SHAPE.slots)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ({p.pid for p in master.children()} - before):
            time.sleep(0.02)  # the new workers are up: the old ones have been told to finish
        return "reloaded"

    def drained(self, member: systems.Running) -> None:
        pass


def _one_run(settings, name: str, seed: int, reload_every: int = 4, affinity_header: str | None = None,
             settle_timeout: float = 0) -> dict:
    """One run of system `name` (see run()); for hpcserve, every `reload_every`-th change reloads
    HAProxy, with `affinity_header` the pool keeps each client's conversation on its server (the
    client's header value) and the clients send it, and a change waits up to `settle_timeout`
    seconds for the slots of old workers after a reload (HAProxy.update; 0 for the fixed clock of
    the comparison, reconcile's 30 s for benchmarks/stress.py). A change that takes longer than
    its turn delays the next; the clients go on until TAIL seconds after the last."""
    folder = settings.folder / "c" / f"{name}-{seed}"
    made = [0]
    every: list[systems.Running] = []  # each backend started, stopped at the end whatever happens

    def new_backends(count: int) -> list[systems.Running]:
        started = systems.start_simulators([SHAPE] * count, folder / "sims", first=made[0])
        for i, sim in enumerate(started):
            sim.name = str(made[0] + i + 1)  # the "job id"
        made[0] += count
        every.extend(started)
        return started

    members = new_backends(4)
    system = systems.start(name, [m.urls[0] for m in members], SHAPE.slots, folder,
                           {"affinity_header": affinity_header} if affinity_header else None)
    if name == "hpcserve":
        changer: object = _Hpcserve(system, reload_every, settle_timeout)
    elif name.startswith("haproxy-"):
        changer = _HAProxyStatic(system, folder / name)
        changer.serving = {m.name for m in members}
    else:
        changer = _Nginx(system, folder / name)
    results: list[str] = []
    change_s: list[float] = []
    steps: list[tuple[int, float, str]] = []  # (change index, when it began in epoch seconds, how applied)
    drain_s: list[float] = []
    drains: list[tuple[int, str, str, float]] = []
    forced = [0]
    peaks: list[dict] = []
    drainers: list[threading.Thread] = []
    start = time.monotonic()

    def drain(member: systems.Running, since: float, change: int) -> None:
        idle_once = False
        while time.monotonic() - since < DRAIN_TIMEOUT:
            time.sleep(0.2)
            stats = systems.sim_stats([member])[0]
            idle = stats["busy"] == 0 and stats["waiting"] == 0
            if idle and idle_once:
                break
            idle_once = idle
        else:
            forced[0] += 1
        drain_s.append(time.monotonic() - since)
        drains.append((change, results[change], member.name, round(drain_s[-1], 2)))
        try:
            peaks.append({**systems.sim_stats([member])[0], "backend": member.name})
            changer.drained(member)
        finally:
            member.stop()

    failures: list[BaseException] = []

    changed = [0.0]  # when the last change was made (monotonic s), 0 until then

    def change_pool() -> None:
        try:
            changes()
        except BaseException as e:  # raised again once the run is over
            failures.append(e)
        finally:
            changed[0] = time.monotonic()

    def changes() -> None:
        nonlocal members
        upcoming = new_backends(max(0, CHANGES[0] - len(members)))
        for i, size in enumerate(CHANGES):
            time.sleep(max(0.0, start + LEAD + i * EVERY - time.monotonic()))
            keep, leaving = members[:size], members[size:]
            active = keep + upcoming
            began, wall = time.monotonic(), time.time()
            results.append(changer.change(i, active, leaving))
            steps.append((i, round(wall, 3), results[-1]))
            change_s.append(time.monotonic() - began)
            for m in leaving:
                drainers.append(threading.Thread(target=drain, args=(m, began, i), daemon=True))
                drainers[-1].start()
            members = active
            settings.progress(f"  c {name} seed {seed}: change {i + 1}/{len(CHANGES)}: {size} backends")
            if i + 1 < len(CHANGES):  # the next change's new jobs start while this one serves
                upcoming = new_backends(max(0, CHANGES[i + 1] - len(members)))

    driver = threading.Thread(target=change_pool, daemon=True)
    settings.progress(f"c: {name} seed {seed}, {CLIENTS} clients, {len(CHANGES)} pool changes, {WINDOW:g} s")
    driver.start()
    try:
        outcomes = loadgen.run_closed(system.urls, "m", CLIENTS, TOKENS,
                                      lambda: (time.monotonic() - start >= WINDOW
                                               and 0 < changed[0] <= time.monotonic() - TAIL),
                                      seed=seed, headers=system.headers,
                                      conversation_header=affinity_header)
    finally:
        driver.join()
        for thread in drainers:
            thread.join(DRAIN_TIMEOUT + 10)
        peaks += [{**stats, "backend": m.name} for m, stats in zip(members, systems.sim_stats(members))]
        system.stop()
        for m in every:
            m.stop()
    if failures:
        raise failures[0]
    return {"scenario": "c", "case": f"{len(CHANGES)} changes", "system": name, "seed": seed,
            "summary": metrics.summarize(outcomes), "window_s": round(time.monotonic() - start, 1),
            "pool_changes": len(CHANGES),
            "reloads": sum(1 for x in results if x in ("reloaded", "started")),
            "drain_s": [round(x, 2) for x in sorted(drain_s)], "forced_stops": forced[0],
            "drains": sorted(drains),
            "change_s": [round(x, 3) for x in change_s],
            "max_busy": max((p["max_busy"] for p in peaks), default=None),
            "max_waiting": max((p["max_waiting"] for p in peaks), default=None),
            "backends": [{k: p[k] for k in ("backend", "served", "max_busy", "max_waiting", "first_over")}
                         for p in peaks],
            "steps": steps}
