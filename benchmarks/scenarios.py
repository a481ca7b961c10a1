"""The benchmark scenarios of the comparison (issue #6): each starts what it needs, runs the same
workload against every system, and returns result records for the report.

A record: {"scenario", "case", "system", "summary" (benchmarks.metrics.summarize), and where they
apply "seed", "offered_rps", "model" (metrics.summarize_model of the system's policy,
benchmarks/policies.py, on the same requests), "reference" (the greedy central-queue model's),
"per_backend" (requests each backend served), "peaks" (each simulated backend's most busy slots
and most requests waiting inside it)}.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path


from benchmarks import loadgen, metrics, policies, systems
from benchmarks.common import MODEL, rotated, start_llama_server
from benchmarks.workload import Backend, Request, capacity, mean_tokens, poisson, prefill_heavy
from hpcserve.llama.simulator import BatchProfile


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long and how hard: `window` seconds of arrivals per case (quick runs are for smoke
    tests, not figures), `systems` to compare, `folder` for configs and logs, `progress` a
    callable(str) for long waits; `seeds` arrival sequences (1..seeds) of every scenario but (e);
    for scenarios (a) and (h) `loads` (shares of the pool's capacity)."""

    window: float
    systems: tuple[str, ...]
    folder: Path
    progress: object = print
    seeds: int = 5
    loads: tuple[float, ...] = (0.5, 0.8, 0.95, 1.2)


WARMUP_SHARE = 0.1   # the first 10% of a window's arrivals are left out of its figures
TTFT_SLO = 2.0       # seconds: the SLO of goodput (time to first token)
# (g)'s SLO, seconds: first token within twice a 32k-token prompt's own prefill on an idle
# backend (~4.9 s with the 10x profile) and a mean inter-token gap a reader still reads as
# fluent (10 tokens/s); (a)'s 2 s cannot be met by a long prompt however it is balanced.
LONG_PROMPT_SLO = (10.0, 0.1)


def _idle(backends: list[systems.Running], timeout: float = 60) -> None:
    """Wait until no simulated backend has a request in service or waiting (abandoned requests
    of the previous run finish first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s["busy"] == 0 and s["waiting"] == 0 for s in systems.sim_stats(backends)):
            return
        time.sleep(0.5)


def _against_all(settings: Settings, scenario: str, cases: list[tuple[str, float, list[Request], float]],
                  pool: list[Backend] | None, backends: list[systems.Running], slots: int,
                  simulated: bool = True, hpcserve_settings: dict | None = None) -> list[dict]:
    """Run each case (name, offered req/s, requests, deadline s) against each system over
    `backends`. With `pool` (the backends' model) each record carries the reference model's
    figures; with `simulated` backends, the requests each served."""
    records = []
    urls = [b.urls[0] for b in backends]
    for name in settings.systems:
        system = systems.start(name, urls, slots, settings.folder / scenario, hpcserve_settings)
        try:
            for case, offered, requests, deadline in cases:
                _idle(backends) if simulated else time.sleep(2)
                before = systems.served_counts(backends) if simulated else []
                settings.progress(f"{scenario} {case}: {name}, {len(requests)} requests")
                outcomes = loadgen.run(system.urls, "m", requests, deadline, system.headers,
                                       progress=throttled(settings.progress, f"{scenario} {case} {name}"))
                record = {"scenario": scenario, "case": case, "system": name, "offered_rps": round(offered, 2),
                          "summary": metrics.summarize(outcomes)}
                if pool:
                    record["model"] = metrics.summarize_model(policies.simulate(systems.POLICY[name], requests, pool))
                    record["reference"] = metrics.summarize_model(
                        policies.simulate("greedy central queue", requests, pool))
                if simulated:
                    record["per_backend"] = [a - b for a, b in zip(systems.served_counts(backends), before)]
                records.append(record)
        finally:
            system.stop()
    return records


def _over_seeds(settings: Settings, scenario: str, cases_of, pool: list[Backend] | None,
                backends: list[systems.Running], slots: int, hpcserve_settings: dict | None = None) -> list[dict]:
    """_against_all once per seed 1..settings.seeds, with that seed's cases (`cases_of(seed)`: the
    arrival sequence of the seed, the same for every system) and the systems in the seed's order
    (common.rotated); each record carries its "seed"."""
    records = []
    for seed in range(1, settings.seeds + 1):
        settings.progress(f"{scenario} seed {seed}")
        ordered = dataclasses.replace(settings, systems=tuple(rotated(settings.systems, seed)))
        records += [{**r, "seed": seed} for r in _against_all(ordered, scenario, cases_of(seed), pool, backends,
                                                             slots, hpcserve_settings=hpcserve_settings)]
    return records


def throttled(say, label: str):
    """A loadgen progress callback that calls say(str) every 10 s and at the end."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        if time.monotonic() - last[0] >= 10 or done == total:
            last[0] = time.monotonic()
            say(f"  {label}: {done}/{total} answered")
    return report


def heterogeneous_pool(fast_rate: float = 10.0, count: int = 16, slots: int = 4) -> list[Backend]:
    """`count` backends of `slots` slots, half at `fast_rate` tokens/s per slot, half at half that."""
    return [Backend(slots, fast_rate if i < count // 2 else fast_rate / 2) for i in range(count)]


def scenario_a(settings: Settings) -> list[dict]:
    """(a) A heterogeneous pool (16 backends x 4 slots, half twice as slow), heavy-tailed answer
    lengths, Poisson arrivals at shares of the pool's capacity (Settings.loads), each seed's
    arrival sequence scaled to each load (common random numbers); every system runs every (seed,
    load), in an order rotated per seed, all started once over the same simulators."""
    return _seeded_loads(settings, "a")


def batch_pool(profile: BatchProfile, fast_rate: float = 10.0, count: int = 16, slots: int = 4) -> list[Backend]:
    """heterogeneous_pool() on backends following `profile` (batch steps shared by the slots),
    scaled so that a slot of a full batch gets `fast_rate` tokens/s on half of them and half that
    on the other half: the same nominal capacity as heterogeneous_pool's, but one busy slot runs
    faster than in a full batch and a prefill stalls the slots beside it."""
    fast = profile.step_seconds(slots, 0) * fast_rate
    return [Backend.batch(slots, scaled(profile, fast if i < count // 2 else fast / 2)) for i in range(count)]


def scenario_h(settings: Settings) -> list[dict]:
    """(h) Scenario (a) on backends that follow the calibrated batch profile (inputs/profile.json,
    batch_pool): the same workload, loads and seeds, but busy slots share each backend's steps, as
    on a real llama-server. Checks whether (a)'s ranking holds where the simulator is not
    independent slots, which favours a slot cap."""
    return _seeded_loads(settings, "h")


def seeded_pool(scenario: str) -> list[Backend]:
    """The pool of a seeded-load scenario: "a" heterogeneous_pool(), "h" batch_pool() on the
    calibrated profile (inputs/profile.json).

    Raises:
        ValueError: another scenario.
    """
    if scenario == "a":
        return heterogeneous_pool()
    if scenario == "h":
        return batch_pool(BatchProfile.load(PROFILE))
    raise ValueError(f"scenario: expected 'a' or 'h', got {scenario!r}")


def seeded_slo(pool: list[Backend]) -> tuple[float, float]:
    """(a)'s and (h)'s SLO over `pool`, in seconds: (first token within TTFT_SLO, mean inter-token
    gap within 1.5x the slower backends' nominal gap)."""
    return TTFT_SLO, 1.5 / min(b.token_rate for b in pool)


def _models(names: tuple[str, ...], requests: list[Request], pool: list[Backend], warmup: float) -> dict[str, dict]:
    """policy -> metrics.summarize_model of that policy serving `requests` over `pool`, for the
    policies of systems `names` and the greedy central-queue reference."""
    return {p: metrics.summarize_model(policies.simulate(p, requests, pool), warmup)
            for p in {*(systems.POLICY[n] for n in names), "greedy central queue"}}


def _seeded_loads(settings: Settings, scenario: str) -> list[dict]:
    """Every system against the scenario's pool (seeded_pool) at every (seed, load) of `settings`
    (scenarios a and h)."""
    pool = seeded_pool(scenario)
    full = capacity(pool, mean_tokens())
    slo = seeded_slo(pool)
    warmup = WARMUP_SHARE * settings.window
    sims = systems.start_simulators(pool, settings.folder / scenario / "sims")
    running: dict[str, systems.Running] = {}
    records = []
    try:
        for name in settings.systems:
            running[name] = systems.start(name, [s.urls[0] for s in sims], 4, settings.folder / scenario)
        for seed in range(1, settings.seeds + 1):
            for share in settings.loads:
                requests = poisson(full * share, settings.window, seed=seed)
                case = f"{int(round(share * 100))}%"
                models = _models(settings.systems, requests, pool, warmup)
                for name in rotated(settings.systems, seed):
                    _idle(sims)
                    before = systems.served_counts(sims)
                    label = f"{scenario} {case} seed {seed}"
                    settings.progress(f"{label}: {name}, {len(requests)} requests")
                    system = running[name]
                    outcomes = loadgen.run(system.urls, "m", requests, settings.window + 120, system.headers,
                                           progress=throttled(settings.progress, f"{label} {name}"))
                    records.append({"scenario": scenario, "case": case, "system": name, "seed": seed,
                                    "offered_rps": round(full * share, 2),
                                    "summary": metrics.summarize(outcomes, warmup, slo),
                                    "model": models[systems.POLICY[name]],
                                    "reference": models["greedy central queue"],
                                    "per_backend": [a - b for a, b in zip(systems.served_counts(sims), before)]})
    finally:
        for system in running.values():
            system.stop()
        for sim in sims:
            sim.stop()
    return records


def scenario_b(settings: Settings) -> list[dict]:
    """(b) Overload: arrivals at 5x the capacity of a small pool (4 backends x 4 slots) for 10 s
    (or the window, if shorter). hpcserve's queue timeout is 10 s here, so its clear 503 shows
    within the run."""
    pool = [Backend(4, 10.0) for _ in range(4)]
    full = capacity(pool, mean_tokens())
    sims = systems.start_simulators(pool, settings.folder / "b" / "sims")
    try:
        return _over_seeds(settings, "b", lambda seed: [
            ("5x", full * 5, poisson(full * 5, min(10.0, settings.window), seed=seed), settings.window + 150)],
            pool, sims, slots=4, hpcserve_settings={"timeout_queue": 10})
    finally:
        for sim in sims:
            sim.stop()


def scenario_d(settings: Settings) -> list[dict]:
    """(d) Streaming fidelity: 64-token answers at 20 tokens/s per slot (a token every 50 ms) at
    half the capacity of 4 backends x 4 slots; inter-token gaps through each system vs direct."""
    pool = [Backend(4, 20.0) for _ in range(4)]
    full = capacity(pool, 64)
    sims = systems.start_simulators(pool, settings.folder / "d" / "sims")
    try:
        return _over_seeds(settings, "d", lambda seed: [
            ("50%", full * 0.5, poisson(full * 0.5, settings.window, seed=seed, tokens=lambda rng: 64),
             settings.window + 60)], pool, sims, slots=4)
    finally:
        for sim in sims:
            sim.stop()


def scenario_f(settings: Settings) -> list[dict]:
    """(f) Two real llama-server backends with the real model (2 slots, 1 thread each): the cost
    of each system on real traffic, as ratios to direct access. 32-token answers at 0.5 req/s
    for 60 s (or the window, if longer). Every system gets freshly started llama-servers: the
    same prompts sent again would hit the slots' prompt cache, which favoured the systems run
    later (measured: direct's TTFT p50 was 0.07 s run last and 0.18 s run first)."""
    folder = settings.folder / "f"
    folder.mkdir(parents=True, exist_ok=True)
    window = max(settings.window, 60)
    records = []
    for seed in range(1, settings.seeds + 1):
        requests = poisson(0.5, window, seed=seed, tokens=lambda rng: 32)
        settings.progress(f"f seed {seed}")
        for name in rotated(settings.systems, seed):
            servers = []
            try:
                for i in range(2):
                    process, port = start_llama_server(MODEL, folder / f"llama-server-{name}-{i}.log", parallel=2,
                                                       ctx=2048, threads=1)
                    servers.append(systems.Running("llama-server", [f"http://127.0.0.1:{port}/v1"], process))
                records += [{**r, "seed": seed} for r in _against_all(
                    dataclasses.replace(settings, systems=(name,)), "f", [("real", 0.5, requests, window + 120)],
                    None, servers, slots=2, simulated=False)]
            finally:
                for server in servers:
                    server.stop()
    return records


def scenario_c(settings: Settings) -> list[dict]:
    """(c) 200 streams in flight (closed loop, 5-30 tokens each) while the pool changes 20 times on
    a fixed clock; every system drains a leaving backend before it stops (benchmarks/churn.py)."""
    from benchmarks import churn
    return churn.run(settings)


PROFILE = Path(__file__).parent / "inputs" / "profile.json"  # python -m benchmarks calibrate
SPEEDUP = 10.0   # scenario (g)'s backends: the calibrated llama-server, 10 times faster in every step


def scaled(profile: BatchProfile, speedup: float) -> BatchProfile:
    """`profile` with every step `speedup` times shorter (decode steps and prefill base divided,
    prefill throughput multiplied): the same machine's shape, faster (or slower, below 1)."""
    return dataclasses.replace(
        profile, decode_step_s=tuple(s / speedup for s in profile.decode_step_s),
        prefill_base_s=profile.prefill_base_s / speedup,
        prefill_tokens_per_s=profile.prefill_tokens_per_s * speedup,
        source={**profile.source, "scaled": f"every step divided by {speedup:g}"})


def prefill_capacity(requests: list[Request], profile: BatchProfile, servers: int) -> float:
    """Requests/s `servers` backends following `profile` prefill when they do nothing else:
    servers / the mean prefill time of `requests`' prompts (BatchProfile.prefill_seconds). Decode is left
    out: with 16-64 token answers it is a few percent of a request's time (a nominal capacity)."""
    seconds = [profile.prefill_seconds(r.counted_prompt_tokens) for r in requests]
    return servers * len(seconds) / sum(seconds)


def scenario_g(settings: Settings) -> list[dict]:
    """(g) Long prompts, short answers: prompts of 1k-32k tokens (log-uniform), answers of 16-64,
    at 80% of the nominal prefill capacity of 8 backends x 4 slots following the calibrated batch
    profile (inputs/profile.json) made SPEEDUP times faster. A long prompt takes its backend's
    batch for many steps and stalls the slots generating beside it; every balancer here counts
    requests, not tokens. Seeds as in (a); hpcserve's frontend accepts 512 KiB bodies (what it
    derives for a 32k context)."""
    folder = settings.folder / "g"
    profile = scaled(BatchProfile.load(PROFILE), SPEEDUP)
    servers, share = 8, 0.8
    full = prefill_capacity(prefill_heavy(1.0, 2000, seed=0), profile, servers)
    warmup = WARMUP_SHARE * settings.window
    pool = [Backend.batch(4, profile)] * servers
    sims = systems.start_simulators(pool, folder / "sims")
    running: dict[str, systems.Running] = {}
    records = []
    try:
        for name in settings.systems:
            running[name] = systems.start(name, [s.urls[0] for s in sims], 4, folder,
                                          {"max_request_body": 16 * 32768})
        for seed in range(1, settings.seeds + 1):
            requests = prefill_heavy(full * share, settings.window, seed=seed)
            _ = [r.prompt for r in requests]  # made now, not at the send time
            models = _models(settings.systems, requests, pool, warmup)
            for name in rotated(settings.systems, seed):
                _idle(sims)
                settings.progress(f"g seed {seed}: {name}, {len(requests)} requests")
                system = running[name]
                outcomes = loadgen.run(system.urls, "m", requests, settings.window + 180, system.headers,
                                       progress=throttled(settings.progress, f"g seed {seed} {name}"))
                records.append({"scenario": "g", "case": f"{int(round(share * 100))}%", "system": name,
                                "seed": seed, "offered_rps": round(full * share, 3),
                                "summary": metrics.summarize(outcomes, warmup, LONG_PROMPT_SLO),
                                "model": models[systems.POLICY[name]],
                                "reference": models["greedy central queue"]})
    finally:
        for system in running.values():
            system.stop()
        for sim in sims:
            sim.stop()
    return records


def scenario_e(settings: Settings) -> list[dict]:
    """(e) Control plane at scale: render, HAProxy start and runtime changes with 512 backends,
    squeue with 2,000 jobs in the queue, status probes of 512 endpoints."""
    from benchmarks import control_plane
    return control_plane.run(settings)
