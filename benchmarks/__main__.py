"""hpcserve's benchmarks: the pool against the alternatives, side by side.

    python -m benchmarks run [--scenario a --scenario b ...] [--window 30] [--seeds 5] [--loads 0.5,0.95] [--out DIR]
    python -m benchmarks report [--out DIR]          # redraw report.md and plots from results.json
    python -m benchmarks load --url URL --model M --rate R --duration S   # your own pool
    python -m benchmarks calibrate [--parallel 4] [--out FILE]  # the simulator's profile from llama-server
    python -m benchmarks stress [--bursts 1000] [--threads 1,2,4] [--runs 30] [--flood 20000] [--out FILE]  # exact guarantees
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import click

from benchmarks import calibrate, loadgen, metrics, report, scenarios, stress, systems
from benchmarks.common import KEY, MODEL, ROOT, dated, provenance, start_llama_server
from benchmarks.workload import poisson

SCENARIOS = {"a": scenarios.scenario_a, "b": scenarios.scenario_b, "c": scenarios.scenario_c,
             "d": scenarios.scenario_d, "e": scenarios.scenario_e, "f": scenarios.scenario_f,
             "g": scenarios.scenario_g, "h": scenarios.scenario_h}
DEFAULT_OUT = dated("run")


def _say(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


@click.group()
def main() -> None:
    """Benchmarks of hpcserve's pool against plain HAProxy, nginx, LiteLLM and direct access."""


@main.command()
@click.option("--scenario", "chosen", multiple=True, type=click.Choice(sorted(SCENARIOS)),
              help="Scenario to run (repeatable) [default: all].")
@click.option("--systems", "system_list", default=",".join(systems.SYSTEMS), show_default=True,
              help="Comma-separated systems to compare.")
@click.option("--window", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds of arrivals per case (5 for a smoke run; figures need 30 or more).")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Seeds per case of every scenario but (e) (medians and intervals over them).")
@click.option("--loads", default="0.5,0.8,0.95,1.2", show_default=True,
              help="Scenarios (a) and (h): comma-separated shares of the pool's capacity.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Folder for results.json, report.md and the PNG plots.")
def run(chosen: tuple[str, ...], system_list: str, window: float, seeds: int, loads: str, out: Path) -> None:
    """Start everything the scenarios need, run them, write the report."""
    try:
        shares = tuple(float(x) for x in loads.split(",") if x.strip())
    except ValueError:
        shares = ()
    if not shares or not all(0 < x <= 5 for x in shares):
        raise click.BadParameter(f"expected comma-separated numbers in (0, 5], got {loads!r}", param_hint="--loads")
    names = tuple(s.strip() for s in system_list.split(",") if s.strip())
    unknown = [n for n in names if n not in systems.SYSTEMS]
    if unknown:
        raise click.BadParameter(f"expected some of {', '.join(systems.SYSTEMS)}, got {', '.join(unknown)}",
                                 param_hint="--systems")
    out = out.resolve()
    # Configs, logs and HAProxy's sockets: in /tmp, since a UNIX socket path has at most 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="hpcserve-bench-", dir="/tmp"))
    _say(f"configs and logs of this run: {work}")
    settings = scenarios.Settings(window=window, systems=names, folder=work, progress=_say, seeds=seeds, loads=shares)
    results = {"meta": {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}",
                        "command": "python -m benchmarks " + shlex.join(sys.argv[1:]),
                        "window_s": window, "seeds": seeds, "loads": list(shares), "systems": list(names)},
               "records": []}
    for name in chosen or sorted(SCENARIOS):
        _say(f"scenario {name}: {scenarios_doc(name)}")
        results["records"] += SCENARIOS[name](settings)
        report.write(results, out)  # a partial report survives a later failure
    path = report.write(results, out)
    _say(f"report: {path}")


def scenarios_doc(name: str) -> str:
    return " ".join((SCENARIOS[name].__doc__ or "").split()).split(": ")[0].split(". ")[0]


@main.command("report")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
def report_command(out: Path) -> None:
    """Redraw report.md and the plots from OUT/results.json."""
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {out / 'results.json'}: {exc}") from None
    click.echo(report.write(results, out))


@main.command()
@click.option("--url", required=True, help="OpenAI base URL of the pool, e.g. http://login1:8000/v1.")
@click.option("--model", required=True, help="Model field of the requests.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), required=True, help="Requests per second (Poisson).")
@click.option("--duration", type=click.FloatRange(min=1), default=60, show_default=True, help="Seconds of arrivals.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def load(url: str, model: str, rate: float, duration: float, seed: int, as_json: bool) -> None:
    """Send the heavy-tailed Poisson workload of scenario (a) to your own pool and print its figures.
    A frontend API key is read from $OPENAI_API_KEY."""
    requests = poisson(rate, duration, seed)
    headers = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"} if os.environ.get("OPENAI_API_KEY") else {}
    _say(f"{len(requests)} requests over {duration:g} s to {url}")
    outcomes = loadgen.run([url.rstrip("/")], model, requests, duration + 600, headers,
                           progress=scenarios.throttled(_say, "load"))
    summary = metrics.summarize(outcomes)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        for key, value in summary.items():
            click.echo(f"{key:>15}: {value}")
    sys.exit(0 if not summary["errors"] else 1)


@main.command("calibrate")
@click.option("--parallel", type=click.IntRange(min=2), default=4, show_default=True,
              help="Slots of the measured llama-server (--parallel).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="llama-server --threads (its default if unset).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "benchmarks" / "inputs" / "profile.json",
              show_default=True)
def calibrate_command(parallel: int, threads: int | None, out: Path) -> None:
    """Measure the real llama-server with the test model and write the simulator's batch-step
    profile (hpcserve-llama-sim --sim-profile FILE). About a minute."""
    with tempfile.TemporaryDirectory() as folder:
        _say(f"starting llama-server --parallel {parallel} with {MODEL.name}")
        server, port = start_llama_server(MODEL, Path(folder) / "llama-server.log", parallel=parallel,
                                          ctx=2048 * parallel, threads=threads)
        try:
            _say("measuring decode steps and prefill")
            profile = calibrate.calibrate(f"http://127.0.0.1:{port}", KEY, parallel, source={
                "model": MODEL.name, "threads": threads, "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "date": datetime.date.today().isoformat()})
        finally:
            server.terminate()
            server.wait(10)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile.to_json())
    steps = ", ".join(f"{s * 1000:.1f}" for s in profile.decode_step_s)
    click.echo(f"{out}: decode steps of 1..{parallel} generating slots {steps} ms; prefill "
               f"{profile.prefill_base_s * 1000:.0f} ms + {profile.prefill_tokens_per_s:.0f} tokens/s")


def _numbers(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or not all(1 <= x <= 64 for x in values):
        raise click.BadParameter(f"expected comma-separated integers in 1..64, got {text!r}", param_hint=name)
    return values


@main.command("stress")
@click.option("--bursts", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bursts of 8 simultaneous requests per limits configuration (0: no limits runs).")
@click.option("--threads", default="1,2,4", show_default=True, help="HAProxy nbthread values to stress the limits with.")
@click.option("--keys", "key_kinds", default="fresh,long-lived", show_default=True,
              help="Keys of the concurrency bursts: fresh (a new key each burst), long-lived, or both.")
@click.option("--runs", type=click.IntRange(min=0), default=30, show_default=True,
              help="Runs of the slots scenario per policy (0: none); about 70 s each.")
@click.option("--policies", default="leastconn,affinity", show_default=True, help="Balance policies of the slots runs.")
@click.option("--flood", type=click.IntRange(min=0), default=20000, show_default=True,
              help="Requests without a key sent beside --authenticated ones with a key, per nbthread value, for "
                   "the access log's count (0: no accounting run).")
@click.option("--authenticated", type=click.IntRange(min=1), default=300, show_default=True,
              help="Requests with a key of the accounting run.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every run's record as JSON here.")
def stress_command(bursts: int, threads: str, key_kinds: str, runs: int, policies: str, flood: int,
                   authenticated: int, out: Path | None) -> None:
    """Repeat the pool's exact guarantees (slots, per-key limits) with the HAProxy on PATH and count
    violations from inside the backends (benchmarks/stress.py). Exit status 1 if any."""
    thread_counts = _numbers(threads, "--threads")
    kinds = [k.strip() for k in key_kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"fresh", "long-lived"}:
        raise click.BadParameter(f"expected fresh, long-lived or both, got {key_kinds!r}", param_hint="--keys")
    chosen = [p.strip() for p in policies.split(",") if p.strip()]
    if not chosen or set(chosen) - {"leastconn", "affinity"}:
        raise click.BadParameter(f"expected leastconn, affinity or both, got {policies!r}", param_hint="--policies")
    work = Path(tempfile.mkdtemp(prefix="hpcserve-stress-", dir="/tmp"))
    _say(f"configs and logs of this run: {work}; HAProxy {stress.haproxy_release()}")
    limit_runs: list[stress.LimitsRun] = []
    slot_records: list[dict] = []
    if bursts:
        for n in thread_counts:
            cases = [("concurrent", k) for k in kinds] + [("rate", "fresh")]
            for kind, keys in cases:
                folder = work / f"limits-{kind}-{keys}-{n}"
                limit_runs.append(stress.limits(folder, bursts, n, keys, kind, progress=_say))
    for policy in chosen if runs else ():
        slot_records += stress.slots(work / "slots", runs, policy, progress=_say)
    accounting_runs = [stress.accounting(work / f"accounting-{n}", flood, authenticated, n)
                       for n in (thread_counts if flood else ())]
    lines = stress.summarize(limit_runs, slot_records, accounting_runs)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": {"started": stress.timestamp(), "machine": f"{platform.node()}: "
                                            f"{os.cpu_count()} CPUs", "command": "python -m benchmarks "
                                            + shlex.join(sys.argv[1:]), **provenance()},
                                   "limits": [dataclasses.asdict(r) for r in limit_runs],
                                   "slots": slot_records, "accounting": accounting_runs, "summary": lines},
                                  indent=1) + "\n")
    for line in lines:
        click.echo(line)
    violations = sum(r.violations for r in limit_runs) + sum(len(r["violations"]) for r in slot_records)
    failed = sum(r["summary"]["requests"] - r["summary"]["completed"] for r in slot_records)
    inexact = sum(not r["exact"] for r in accounting_runs)
    sys.exit(1 if violations or failed or inexact or any(r.other for r in limit_runs) else 0)


if __name__ == "__main__":
    main()
