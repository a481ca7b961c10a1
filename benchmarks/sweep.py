"""Scenario (a) or (h) swept over load: each system's SLO attainment at each load, and the highest
load it serves with 99% of its requests within the SLO, measured and as its policy's model predicts.

Measured: the seeded records of one scenario, (a) or (h) (benchmarks/scenarios.py), from one or
more results.json files, e.g. a sweep over some loads and the 95% run beside it: the same seeds are
the same arrival sequences, scaled in time per load (common random numbers), so runs of one seed at
different loads are comparable. Only valid runs count (client lateness p99 within
metrics.MAX_LATENESS_P99), and only systems measured at every load of the union.

Modelled: benchmarks/policies.py's discrete-event model of each policy on the same pool and
arrivals (the seed's trace for the run's window, its warm-up left out), at finer load steps, since
a model run takes milliseconds, against the same SLO (metrics.summarize_model). On (a)'s fixed-rate
slots the model's inter-token gap is the backend's nominal one, which the ITL limit (1.5x the
slower backends' gap) always admits, so only the TTFT limit misses; on (h)'s batch-step backends a
neighbour's prefill lengthens a step, and the ITL limit misses too.

The highest load with 99% attainment is taken per seed: the highest load of the sweep at which
that seed's run attained at least 99%, every lower load of the sweep attaining it too (None when
the lowest does not); the report gives its median over seeds with the bootstrap 95% interval
(benchmarks/stats.py). A measured figure is one of the loads measured: 0.95 reads "at least
0.95 of capacity, less than the next load measured".

    python -m benchmarks.sweep --results benchmarks/results/2026-11-23-a-sweep/results.json \\
        --results benchmarks/results/2026-11-22-a/results.json --out benchmarks/results/2026-11-23-a-sweep
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from benchmarks import metrics, policies, stats
from benchmarks.systems import POLICY, policy_label
from benchmarks.scenarios import WARMUP_SHARE, seeded_pool, seeded_slo
from benchmarks.workload import Backend, capacity, mean_tokens, poisson

SCENARIOS = ("a", "h")   # the scenarios with seeded loads

TARGET = 0.99   # share of requests within the SLO

MISSES_AT = 0.95   # the load (share of capacity) at which the report breaks the models' misses down


def highest_load(attainment: dict[float, float | None], target: float = TARGET) -> float | None:
    """The highest load (share of capacity) up to which every load in `attainment` (load -> share of
    requests within the SLO; None: no valid run, skipped) attains `target`; None when the lowest
    load with a figure misses it or there is none."""
    best = None
    for load in sorted(attainment):
        value = attainment[load]
        if value is None:
            continue
        if value < target:
            break
        best = load
    return best


def share_of(case: str) -> float:
    """A scenario (a) or (h) case name ("95%") as a share of capacity (0.95).

    Raises:
        ValueError: not a percentage.
    """
    if not case.endswith("%"):
        raise ValueError(f"case: expected a load such as '95%', got {case!r}")
    return int(case[:-1]) / 100


def scenario_of(records: list[dict]) -> str | None:
    """The one scenario of SCENARIOS that the seeded records are of; None when there is none.

    Raises:
        ValueError: records of more than one.
    """
    found = {r.get("scenario") for r in records if r.get("scenario") in SCENARIOS and "seed" in r}
    if len(found) > 1:
        raise ValueError(f"expected runs of one scenario, got {', '.join(sorted(found))}")
    return found.pop() if found else None


def measured(records: list[dict], scenario: str = "a") -> dict[str, dict[int, dict[float, float | None]]]:
    """system -> seed -> load share -> SLO attainment of that valid run, over the `scenario`
    records with seeds; systems missing a load that another system has are left out."""
    out: dict[str, dict[int, dict[float, float | None]]] = {}
    for r in records:
        if r.get("scenario") != scenario or "seed" not in r:
            continue
        valid = r["summary"].get("valid", True)
        out.setdefault(r["system"], {}).setdefault(r["seed"], {})[share_of(r["case"])] = (
            r["summary"].get("slo_attainment") if valid else None)
    loads = {load for seeds in out.values() for runs in seeds.values() for load in runs}
    return {system: seeds for system, seeds in out.items()
            if {load for runs in seeds.values() for load in runs} == loads}


def _model_setting(scenario: str) -> tuple[list[Backend], float, tuple[float, float]]:
    """(pool, its capacity in requests/s, SLO) of `scenario` (scenarios.seeded_pool, seeded_slo).

    Raises:
        ValueError: a scenario other than "a" or "h".
    """
    pool = seeded_pool(scenario)
    return pool, capacity(pool, mean_tokens()), seeded_slo(pool)


def modelled(policy: str, shares: list[float], seeds: list[int], window: float,
             scenario: str = "a") -> dict[int, dict[float, float]]:
    """seed -> load share -> SLO attainment of `policy`'s model (policies.POLICIES) on the pool,
    arrivals and SLO of `scenario` (scenarios.seeded_pool, seeded_slo): the share of requests after
    the warm-up that were not refused and met the SLO (metrics.summarize_model).

    Raises:
        ValueError: a scenario other than "a" or "h", or an unknown policy.
    """
    pool, full, slo = _model_setting(scenario)
    out: dict[int, dict[float, float]] = {}
    for seed in seeds:
        for share in shares:
            served = policies.simulate(policy, poisson(full * share, window, seed), pool)
            attainment = metrics.summarize_model(served, WARMUP_SHARE * window, slo)["slo_attainment"]
            out.setdefault(seed, {})[share] = attainment or 0.0
    return out


def misses(policy: str, share: float, seeds: list[int], window: float,
           scenario: str = "a") -> dict[int, dict[str, float | None]]:
    """seed -> where `policy`'s model misses the SLO at load `share`, on modelled()'s pool, arrivals
    and SLO, as shares of the requests after the warm-up: "late_first_token" (first token after the
    TTFT limit), "slow_stream" (first token in time, mean inter-token gap over its limit),
    "refused" (answered at once with an error); and "ttft_p50", "ttft_p99" (seconds, over the
    requests served; None when none was). The three shares and the attainment (rounded to 4
    places) sum to 1. A seed without a request after the warm-up is left out.

    Raises:
        ValueError: a scenario other than "a" or "h", or an unknown policy.
    """
    pool, full, slo = _model_setting(scenario)
    warmup = WARMUP_SHARE * window
    out: dict[int, dict[str, float | None]] = {}
    for seed in seeds:
        served = policies.simulate(policy, poisson(full * share, window, seed), pool)
        figures = metrics.summarize_model(served, warmup, slo)
        requests, kinds = figures["requests"], figures["slo_misses"]
        if not requests:
            continue
        out[seed] = {"late_first_token": kinds["late_first_token"] / requests,
                     "slow_stream": kinds["slow_stream"] / requests,
                     "refused": figures["errors"].get("refused", 0) / requests,
                     "ttft_p50": figures["ttft_p50"], "ttft_p99": figures["ttft_p99"]}
    return out


def _highest(per_seed: dict[int, dict[float, float | None]], digits: int = 2) -> str:
    """The median over seeds [interval] of highest_load, a seed whose lowest load misses counted
    as below it ("<0.70")."""
    lowest = min(load for runs in per_seed.values() for load in runs)
    interval = stats.median_interval([highest_load(runs) or 0.0 for runs in per_seed.values()])
    if interval is None:
        return "-"
    m, lo, hi = (f"{x:.{digits}f}" if x else f"<{lowest:.{digits}f}" for x in interval)
    return f"{m} [{lo}-{hi}]"


def table(found: dict[str, dict[int, dict[float, float | None]]],
          models: dict[str, dict[int, dict[float, float]]]) -> list[str]:
    """Markdown lines: per system its attainment at each measured load (median over seeds
    [interval]), its highest load with TARGET attainment measured, and its policy model's."""
    loads = sorted({load for seeds in found.values() for runs in seeds.values() for load in runs})
    lines = ["| system (policy) | " + " | ".join(f"{load:.0%}" for load in loads)
             + f" | highest load with {TARGET:.0%}, measured | same, own policy's model |",
             "|---|" + "---|" * (len(loads) + 2)]
    order = list(POLICY)
    for system in sorted(found, key=lambda s: order.index(s) if s in order else len(order)):
        seeds = found[system]
        cells = [stats.text(stats.median_interval([runs.get(load) for runs in seeds.values()]), 3) for load in loads]
        model = models.get(POLICY.get(system, ""))
        lines.append(f"| {system} ({policy_label(system)}) | " + " | ".join(cells)
                     + f" | {_highest(seeds)} | {_highest(model, 3) if model else '-'} |")
    return lines


def model_table(models: dict[str, dict[int, dict[float, float]]], step: float) -> list[str]:
    """Markdown lines: every policy's highest load with TARGET attainment in the model."""
    lines = [f"| policy (model) | highest load with {TARGET:.0%} (steps of {step:.3f}) | attainment at 95% | at 105% |",
             "|---|---|---|---|"]
    for policy, per_seed in models.items():
        def at(load: float) -> str:
            return stats.text(stats.median_interval([runs.get(load) for runs in per_seed.values()]), 3)
        lines.append(f"| {policy} | {_highest(per_seed, 3)} | {at(0.95)} | {at(1.05)} |")
    return lines


def misses_table(found: dict[str, dict[int, dict[str, float | None]]]) -> list[str]:
    """Markdown lines: per policy (found: policy -> misses()) the median over seeds [interval] of
    each kind of miss and of the TTFT percentiles."""
    kinds = (("late_first_token", "first token late", 3), ("slow_stream", "stream too slow only", 3),
             ("refused", "refused", 3), ("ttft_p50", "TTFT p50 s", 2), ("ttft_p99", "TTFT p99 s", 2))
    lines = ["| policy (model) | " + " | ".join(label for _, label, _ in kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for policy, per_seed in found.items():
        lines.append(f"| {policy} | " + " | ".join(
            stats.text(stats.median_interval([runs[key] for runs in per_seed.values()]), digits)
            for key, _, digits in kinds) + " |")
    return lines


def plot(found: dict[str, dict[int, dict[float, float | None]]], models: dict[str, dict[int, dict[float, float]]],
         path: Path, scenario: str = "a") -> None:
    """Attainment against load: measured medians with their intervals, models as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for system, seeds in found.items():
        loads = sorted({load for runs in seeds.values() for load in runs})
        points = [(x, stats.median_interval([runs.get(x) for runs in seeds.values()])) for x in loads]
        points = [(x, i) for x, i in points if i]
        ax.errorbar([x for x, _ in points], [i[0] for _, i in points], capsize=3, fmt="-o", label=system,
                    yerr=[[i[0] - i[1] for _, i in points], [i[2] - i[0] for _, i in points]])
    for policy, per_seed in models.items():
        loads = sorted({load for runs in per_seed.values() for load in runs})
        medians = [stats.median_interval([runs[x] for runs in per_seed.values()]) for x in loads]
        ax.plot(loads, [m[0] for m in medians if m], ":", label=f"model: {policy}")
    ax.axhline(TARGET, color="grey", linewidth=0.8)
    ax.set(xlabel="offered load (share of the pool's capacity)", ylabel="share of requests within the SLO",
           title=f"Scenario ({scenario}): SLO attainment (TTFT <= 2 s, mean ITL <= 1.5x nominal)", ylim=(0.3, 1.005))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.option("--results", "paths", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A results.json with scenario (a) or (h) runs (repeatable: runs of other loads, same seeds).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for sweep.md and a-sweep.png (h-sweep.png for scenario h).")
@click.option("--step", type=click.FloatRange(min=0.005), default=0.025, show_default=True,
              help="Load step of the models' sweep (share of capacity).")
def main(paths: tuple[Path, ...], out: Path, step: float) -> None:
    """Attainment over load and the highest load with 99% attainment, from scenario (a)'s or (h)'s
    results."""
    records, windows, sources = [], set(), []
    for path in paths:
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot read {path}: {exc}") from None
        records += results["records"]
        windows.add(results["meta"]["window_s"])
        sources.append(f"`{path}` ({results['meta']['started']}: `{results['meta']['command']}`)")
    if len(windows) != 1:
        raise click.BadParameter(f"expected runs of one window, got {sorted(windows)} s", param_hint="--results")
    try:
        scenario = scenario_of(records)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--results") from None
    found = measured(records, scenario) if scenario else {}
    if not found:
        raise click.ClickException("no scenario (a) or (h) runs with seeds in these results")
    window = windows.pop()
    seeds = sorted({seed for runs in found.values() for seed in runs})
    shares = [round(0.5 + k * step, 4) for k in range(int(round(0.7 / step)) + 1)]   # 0.5 .. 1.2
    models = {p: modelled(p, shares, seeds, window, scenario)
              for p in dict.fromkeys(POLICY[s] for s in found if s in POLICY)}
    for extra in ("round-robin", "greedy central queue"):
        models.setdefault(extra, modelled(extra, shares, seeds, window, scenario))
    out.mkdir(parents=True, exist_ok=True)
    plot(found, models, out / f"{scenario}-sweep.png", scenario)
    text = [f"# Scenario ({scenario}) over load: SLO attainment and the highest load with 99% attainment", "",
            "From " + "; ".join(sources) + f". {len(seeds)} seeds, {window:g} s windows.", "",
            *(" ".join(part.split()) + "\n" for part in (__doc__ or "").split("\n\n")[1:4]),
            *table(found, models), "", f"The models alone, every policy (seeds {seeds[0]}-{seeds[-1]}):", "",
            *model_table(models, step), "",
            f"Where the models miss at {MISSES_AT:.0%}: shares of the requests after the warm-up whose first token came "
            "after the TTFT limit, whose first token came in time but whose stream's mean inter-token gap was over "
            "its limit, and that were refused (these and the attainment sum to 1); TTFT percentiles of the "
            f"requests served (seeds {seeds[0]}-{seeds[-1]}):", "",
            *misses_table({p: misses(p, MISSES_AT, seeds, window, scenario) for p in models}), "",
            f"![attainment over load]({scenario}-sweep.png)", ""]
    (out / "sweep.md").write_text("\n".join(text))
    click.echo(out / "sweep.md")


if __name__ == "__main__":
    main()
