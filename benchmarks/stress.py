"""The stress harness: the pool's exact guarantees, repeated until a rare violation shows.

Two guarantees, each counted from inside the backends (the simulator's own counters, GET
/sim/stats), never from HAProxy's:

- slots: no backend ever has more requests than its slots, nor one waiting inside it (the queue
  lives in HAProxy, where interactive goes before batch and timeout queue holds). Each run is
  benchmarks/churn.py's hpcserve case: 200 streaming clients while the pool changes 20 times, every
  `reload_every`-th change (default 2: 10 reloads) reloading HAProxy, with the leastconn policy or
  with conversation affinity (`affinity`). Each change is HAProxy.update() as a reconcile step
  calls it (it settles the old workers' slots for up to 30 s); a leaving backend stops once idle.
  Every failed request is counted too. A violation is reported with the backend, its peaks and
  the pool change (and whether it reloaded) that came last before the backend's first overfill.
- limits: a key with max_concurrent 3 never has more than 3 requests in service at once, and a key
  with a rate of 3 per minute never more than 3 admitted in its minute. Bursts of 8 simultaneous
  requests (8 new connections, so HAProxy's threads share them), each held 0.15 s by one simulated
  backend of 16 slots (so the backend never limits): a burst violates the concurrency limit when
  the backend had more than 3 of them in service at once (its busy-slot peak over the burst), the
  rate limit when it served more than 3. Keys are "long-lived" (one key for every burst, its
  stick-table entry made once) or "fresh" (a new key for each burst, made at its first request).

And one count, exact rather than rare:

- accounting: every request with a key has its access log line, also under a flood without a key at
  the same moment on a full pool. `flood` requests without a key (401 each, counted per source, not
  logged) and `authenticated` chat completions with one, all at once, against one simulated backend
  of 4 slots (so most of the authenticated ones queue in HAProxy): the access log must hold exactly
  `authenticated` lines of the key, HAProxy must have dropped none (DroppedLogs), and its table of
  unauthenticated sources must count exactly `flood`.

The HAProxy is the one on PATH: `python -m benchmarks stress` here, scripts/stress.sh for the
full grid on every release (through the Debian roots of scripts/release-root.sh).

Found with it (2026-12-07): on HAProxy 3.0.11 with 2 and 4 threads, fresh keys let 1 in 300
bursts past max_concurrent and 11 in 300 past the rate; with each key's stick-table entry made
by hpcserve before its first request (HAProxy.sync_keys), max_concurrent held in every burst
(5,200 at 2 and 4 threads, 2.6.12 and 3.0.11), the rate did not quite: 1 in 300 bursts at 2
threads on 2.6.12, 1 in 1,000 at 4 on 3.0.11 (its check and its count are two rules that two
threads can interleave), none at 1 thread, hpcserve's default (haproxy.threads).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import httpx

from benchmarks import churn, systems
from benchmarks.common import start_haproxy
from benchmarks.scenarios import Settings
from benchmarks.workload import Backend

LIMIT = 3           # max_concurrent, and requests per minute, of a stressed key
BURST = 8           # simultaneous requests of one burst
HOLD_TOKENS = 3     # tokens of each request: 0.15 s at 20 tokens/s
TOKEN_RATE = 20.0
BACKEND_SLOTS = 16  # more than a burst: the backend never limits


@dataclasses.dataclass
class LimitsRun:
    """One configuration's bursts: `bursts` sent, `requests` in all, `violations` (bursts over the
    limit by the backend's count), `admitted` (200 answers), `refused` (429 answers), `other`
    (any other answer or error), and the first few violating bursts (`examples`)."""

    kind: str
    keys: str
    threads: int
    release: str
    bursts: int = 0
    requests: int = 0
    admitted: int = 0
    refused: int = 0
    other: int = 0
    violations: int = 0
    examples: list = dataclasses.field(default_factory=list)

    def add(self, index: int, codes: list[int], in_backend: int) -> None:
        self.bursts += 1
        self.requests += len(codes)
        self.admitted += codes.count(200)
        self.refused += codes.count(429)
        self.other += sum(1 for c in codes if c not in (200, 429))
        if in_backend > LIMIT:
            self.violations += 1
            if len(self.examples) < 10:
                self.examples.append({"burst": index, "codes": sorted(codes), "in_backend": in_backend})


def haproxy_release() -> str:
    """The release of the haproxy on PATH ("2.6.12", ...)."""
    from hpcserve import releases
    return releases.text(releases.haproxy("haproxy")) or "unknown"


async def _burst(client: httpx.AsyncClient, url: str, key: str) -> list[int]:
    """BURST simultaneous chat completions with `key` (`client` keeps no idle connection, so each
    opens its own); their codes (0 for a transport error)."""
    async def one() -> int:
        try:
            r = await client.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "m", "max_tokens": HOLD_TOKENS,
                                        "messages": [{"role": "user", "content": "x"}]})
            return r.status_code
        except httpx.HTTPError:
            return 0
    return list(await asyncio.gather(*(one() for _ in range(BURST))))


def limits(folder: Path, bursts: int, threads: int, keys: str, kind: str, progress=print) -> LimitsRun:
    """`bursts` bursts against keys limited by `kind` ("concurrent" or "rate") to LIMIT, `keys`
    "fresh" or "long-lived", HAProxy with nbthread `threads`; the counts (LimitsRun)."""
    from hpcserve.access.keys import KeyRegistry
    if kind == "rate" and keys == "long-lived":
        raise ValueError("the rate limit is stressed with fresh keys only (a long-lived key's minute is spent)")
    run = LimitsRun(kind, keys, threads, haproxy_release())
    backend = systems.start_simulators([Backend(BACKEND_SLOTS, TOKEN_RATE)], folder / "sims")[0]
    proxy, port = start_haproxy(folder / "haproxy", [systems.port_of(backend.urls[0])], parallel=BACKEND_SLOTS,
                                auth="keys", threads=threads, access_log=False)
    url = f"http://127.0.0.1:{port}"
    stats = backend.urls[0].removesuffix("/v1") + "/sim/stats"

    async def all_bursts(secrets: list[str]) -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client, \
                httpx.AsyncClient(timeout=10) as monitor:
            served = (await monitor.get(stats)).json()["served"]
            for i in range(bursts):
                await monitor.get(stats, params={"reset": 1})
                codes = await _burst(client, url, secrets[i if keys == "fresh" else 0])
                after = (await monitor.get(stats)).json()
                in_backend = after["max_busy"] if kind == "concurrent" else after["served"] - served
                served = after["served"]
                run.add(i, codes, in_backend)
                if (i + 1) % 100 == 0 or i + 1 == bursts:
                    progress(f"  limits {kind} {keys} nbthread {threads}: {i + 1}/{bursts} bursts, "
                             f"{run.violations} violations")

    try:
        registry = KeyRegistry(proxy.deployment)
        limit = {"max_concurrent": LIMIT} if kind == "concurrent" else {"rate_per_minute": LIMIT}
        count = bursts if keys == "fresh" else 1
        secrets = [registry.add(f"stress-{i}", **limit)[1] for i in range(count)]
        proxy.sync_keys()
        asyncio.run(all_bursts(secrets))
    finally:
        proxy.stop(timeout=5)
        backend.stop()
    return run


def accounting(folder: Path, flood: int, authenticated: int, threads: int = 1) -> dict:
    """One accounting run (module docstring): {"release", "threads", "flood", "authenticated",
    "statuses" (answers to the authenticated requests by code), "flood_statuses", "logged" (access
    log lines of the key), "unauthenticated_counted" (the table's count), "dropped" (DroppedLogs),
    "exact" (logged == authenticated, dropped 0, the flood counted whole), "seconds"}."""
    from hpcserve.access.keys import KeyRegistry
    from hpcserve.haproxy import accesslog, runtime
    backend = systems.start_simulators([Backend(4, TOKEN_RATE)], folder / "sims")[0]
    proxy, port = start_haproxy(folder / "haproxy", [systems.port_of(backend.urls[0])], parallel=4,
                                auth="keys", threads=threads, access_log=True, timeout_queue=120)
    accesslog.ensure_writer(proxy.deployment)       # as each reconcile step keeps it running
    url = f"http://127.0.0.1:{port}"

    async def send(key: str | None, count: int, concurrency: int) -> dict[int, int]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        codes: dict[int, int] = {}
        pending = iter(range(count))
        async with httpx.AsyncClient(headers=headers, timeout=180,
                                     limits=httpx.Limits(max_connections=concurrency)) as client:
            async def worker() -> None:
                for _ in pending:
                    try:
                        r = await client.post(f"{url}/v1/chat/completions", json={
                            "model": "m", "max_tokens": HOLD_TOKENS, "messages": [{"role": "user", "content": "x"}]})
                        code = r.status_code
                    except httpx.HTTPError:
                        code = 0
                    codes[code] = codes.get(code, 0) + 1
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return codes

    async def both(key: str) -> tuple[dict[int, int], dict[int, int]]:
        flooded, served = await asyncio.gather(send(None, flood, 64), send(key, authenticated, authenticated))
        return served, flooded

    started = time.monotonic()
    try:
        key = KeyRegistry(proxy.deployment).add("stress", max_concurrent=authenticated)[1]
        proxy.sync_keys()
        statuses, flood_statuses = asyncio.run(both(key))
        seconds = time.monotonic() - started
        deadline = time.monotonic() + 60    # the writer appends what the pipe holds
        while True:
            logged = sum(1 for r in accesslog.records(proxy.deployment) if r.get("key") == "stress")
            if logged >= authenticated or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        dropped = proxy.dropped_log_lines()
        table = runtime.show_table(proxy.paths.admin_socket, "unauthenticated")
        counted = sum(c.get("http_req_cnt", 0) for c in table.values())
    finally:
        proxy.stop(timeout=5)
        backend.stop()
    return {"release": haproxy_release(), "threads": threads, "flood": flood, "authenticated": authenticated,
            "statuses": statuses, "flood_statuses": flood_statuses, "logged": logged,
            "unauthenticated_counted": counted, "dropped": dropped, "seconds": round(seconds, 1),
            "exact": logged == authenticated and dropped == 0 and counted == flood}


def slots(folder: Path, runs: int, policy: str, reload_every: int = 2, progress=print) -> list[dict]:
    """`runs` runs of the slots scenario (see the module docstring) with `policy` ("leastconn" or
    "affinity"); one record per run: churn's record plus "release", "policy" and "violations" (each
    {"backend", "max_busy", "max_waiting", "first_over", "after_change", "after_reload"}, the
    latest change and the latest reloading change that began before the first overfill)."""
    release = haproxy_release()
    records = []
    for seed in range(1, runs + 1):
        settings = Settings(window=0, systems=("hpcserve",), folder=folder / policy, progress=lambda _m: None)
        record = churn._one_run(settings, "hpcserve", seed, reload_every=reload_every, settle_timeout=30,
                                affinity_header="X-OpenWebUI-Chat-Id" if policy == "affinity" else None)
        record.update(release=release, policy=policy, violations=overfills(record))
        records.append(record)
        summary = record["summary"]
        failed = summary["requests"] - summary["completed"]
        progress(f"  slots {policy} run {seed}/{runs}: {summary['requests']} requests, {failed} failed, "
                 f"{record['reloads']} reloads, {len(record['violations'])} overfilled backends")
    return records


def overfills(record: dict) -> list[dict]:
    """The backends of a churn record that had more than their slots busy or a request waiting,
    each with the change (index) and the reloading change that came last before its first overfill."""
    found = []
    for b in record["backends"]:
        if b["max_busy"] <= churn.SHAPE.slots and b["max_waiting"] == 0:
            continue
        before = [s for s in record["steps"] if b["first_over"] is not None and s[1] <= b["first_over"]]
        reloads = [s for s in before if s[2] in ("reloaded", "started")]
        found.append({**b, "after_change": before[-1][0] if before else None,
                      "after_reload": reloads[-1][0] if reloads else None})
    return found


def summarize(limits_runs: list[LimitsRun], slot_records: list[dict], accounting_runs: list[dict] = ()) -> list[str]:
    """One line per configuration: runs or bursts, requests, violations."""
    lines = [f"logs    {r['release']:8} nbthread {r['threads']}: {r['authenticated']} requests with a key "
             f"({r['statuses']}) beside {r['flood']} without ({r['flood_statuses']}) in {r['seconds']} s: "
             f"{r['logged']} logged, {r['dropped']} dropped, {r['unauthenticated_counted']} counted without a key"
             + ("" if r["exact"] else " NOT EXACT") for r in accounting_runs]
    lines += [f"limits  {r.release:8} {r.kind:10} {r.keys:10} nbthread {r.threads}: {r.bursts} bursts, "
             f"{r.requests} requests ({r.admitted} admitted, {r.refused} refused, {r.other} other), "
             f"{r.violations} violations" for r in limits_runs]
    by: dict[tuple[str, str], list[dict]] = {}
    for record in slot_records:
        by.setdefault((record["release"], record["policy"]), []).append(record)
    for (release, policy), records in by.items():
        requests = sum(r["summary"]["requests"] for r in records)
        failed = sum(r["summary"]["requests"] - r["summary"]["completed"] for r in records)
        violations = sum(len(r["violations"]) for r in records)
        lines.append(f"slots   {release:8} {policy:10} {len(records)} runs, {requests} requests ({failed} failed), "
                     f"{sum(r['reloads'] for r in records)} reloads, {violations} overfilled backends")
    return lines


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
