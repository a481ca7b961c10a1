"""The report of a benchmark run: results.json -> report.md (tables) and PNG plots (matplotlib).

Tables give, per scenario and case, each system's throughput, TTFT and inter-token percentiles,
errors by kind, and ratios: TTFT to its own policy's model (benchmarks/policies.py: the part of
the latency its implementation adds), to the greedy central-queue model, and to hpcserve (below
1.0 = better than hpcserve). Where a case ran over several seeds (scenario a), each figure is the
median over the valid runs with a bootstrap 95% interval (benchmarks/stats.py); a ratio is taken
per seed (the same arrivals for both) before the median.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks import stats
from benchmarks.metrics import ratio
from benchmarks.systems import POLICY, policy_label

REFERENCE = "greedy central-queue model"
TITLES = {"a": "(a) Heterogeneous pool, Poisson arrivals", "b": "(b) Overload at 5x for a bounded time",
          "c": "(c) 200 streams while the pool changes 20 times, drained", "d": "(d) Streaming fidelity",
          "e": "(e) Control plane at scale", "f": "(f) Two real llama-server backends, real model",
          "g": "(g) Long prompts (1k-32k tokens), short answers, calibrated batch-step backends",
          "h": "(h) Scenario (a) on calibrated batch-step backends"}


def _f(value, digits: int = 2, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _errors(errors: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def traffic_table(records: list[dict]) -> list[str]:
    """Markdown lines: one row per (case, system) of a traffic scenario."""
    lines = ["| case | system | done/sent | req/s | tokens/s | TTFT p50 s | TTFT p99 s | p50 x ref | p99 x ref "
             "| p99 x hpcserve | ITL p01 ms | ITL p50 ms | ITL p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    hp = {r["case"]: r["summary"] for r in records if r["system"] == "hpcserve"}
    cases = list(dict.fromkeys(r["case"] for r in records))
    for case in cases:
        rows = [r for r in records if r["case"] == case]
        ref = next((r["reference"] for r in rows if r.get("reference")), None)
        if ref:
            lines.append(f"| {case} | {REFERENCE} | {ref['completed']}/{ref['requests']} | "
                         f"{_f(ref['throughput_rps'])} | {_f(ref['tokens_per_s'], 0)} | {_f(ref['ttft_p50'])} | "
                         f"{_f(ref['ttft_p99'])} | 1.00 | 1.00 | - | - | - | - | - |")
        for r in rows:
            s = r["summary"]
            base = hp.get(case)
            lines.append(
                f"| {case} | {r['system']} | {s['completed']}/{s['requests']} | {_f(s['throughput_rps'])} | "
                f"{_f(s['tokens_per_s'], 0)} | {_f(s['ttft_p50'])} | {_f(s['ttft_p99'])} | "
                f"{_f(ratio(s['ttft_p50'], ref and ref['ttft_p50']))} | {_f(ratio(s['ttft_p99'], ref and ref['ttft_p99']))} | "
                f"{_f(ratio(s['ttft_p99'], base and base['ttft_p99']))} | {_f(s['itl_p01'], 1, 1000)} | {_f(s['itl_p50'], 1, 1000)} | "
                f"{_f(s['itl_p99'], 1, 1000)} | {_errors(s['errors'])} |")
    return lines


def _summed_errors(rows: list[dict]) -> dict[str, int]:
    """Error kind -> count over every record of `rows`."""
    errors: dict[str, int] = {}
    for r in rows:
        for kind, n in r["summary"]["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    return errors


def _per_seed(rows: list[dict], key) -> dict[int, float | None]:
    return {r["seed"]: key(r) for r in rows}


def _in_policy_order(rows: list[dict]) -> list[str]:
    """The systems of `rows`, in the order of systems.POLICY (others last, as they came)."""
    order = {name: i for i, name in enumerate(POLICY)}
    return sorted(dict.fromkeys(r["system"] for r in rows), key=lambda n: order.get(n, len(order)))


def seeded_table(records: list[dict]) -> list[str]:
    """Markdown lines for a scenario run over seeds: per (case, system) the median over the valid
    runs (client lateness p99 within metrics.MAX_LATENESS_P99) with its bootstrap 95% interval."""
    lines = ["| load | system (policy) | valid runs | TTFT p50 s | TTFT p99 s | p99 / own policy's model "
             "| p99 / greedy model | p99 / hpcserve | SLO attainment | goodput req/s | ITL p99 ms | errors (all runs) "
             "| lateness p99 ms, worst |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in records):
        rows = [r for r in records if r["case"] == case]
        valid = [r for r in rows if r["summary"].get("valid", True)]
        hp = _per_seed([r for r in valid if r["system"] == "hpcserve"], lambda r: r["summary"]["ttft_p99"])
        refs = {r["seed"]: r["reference"] for r in rows if r.get("reference")}
        if refs:
            ref_p99 = stats.median_interval([v["ttft_p99"] for v in refs.values()])
            ref_p50 = stats.median_interval([v["ttft_p50"] for v in refs.values()])
            lines.append(f"| {case} | {REFERENCE} | {len(refs)} | {stats.text(ref_p50)} | {stats.text(ref_p99)} "
                         "| - | 1.00 | - | - | - | - | - | - |")
        for system in _in_policy_order(rows):
            mine = [r for r in valid if r["system"] == system]
            every = [r for r in rows if r["system"] == system]
            p99 = _per_seed(mine, lambda r: r["summary"]["ttft_p99"])
            errors = _summed_errors(every)
            late = [r["summary"].get("lateness_p99") for r in every if r["summary"].get("lateness_p99") is not None]
            lines.append(
                f"| {case} | {system} ({policy_label(system)}) | {len(mine)}/{len(every)} "
                f"| {stats.text(stats.median_interval([r['summary']['ttft_p50'] for r in mine]))} "
                f"| {stats.text(stats.median_interval(list(p99.values())))} "
                f"| {stats.text(stats.median_interval(stats.paired_ratios(p99, _per_seed(mine, lambda r: r.get('model', {}).get('ttft_p99')))))} "
                f"| {stats.text(stats.median_interval(stats.paired_ratios(p99, {s: v['ttft_p99'] for s, v in refs.items()})))} "
                f"| {stats.text(stats.median_interval(stats.paired_ratios(p99, hp)))} "
                f"| {stats.text(stats.median_interval([r['summary'].get('slo_attainment') for r in mine]), 3)} "
                f"| {stats.text(stats.median_interval([r['summary'].get('goodput_rps') for r in mine]))} "
                f"| {stats.text(stats.median_interval([r['summary']['itl_p99'] for r in mine]), 1, 1000)} "
                f"| {_errors(errors)} | {_f(max(late, default=None), 1, 1000)} |")
    return lines


def seeded_traffic_table(records: list[dict]) -> list[str]:
    """Markdown lines for a traffic scenario without an SLO run over seeds ((b), (d), (f)): per
    (case, system) what was completed of what was sent over every run, and the median over the
    valid runs [bootstrap 95% interval] of TTFT p50 and p99, TTFT p99 / hpcserve's (paired by
    seed) and the inter-token gaps' p01, p50 and p99."""
    lines = ["| case | system (policy) | valid runs | completed / sent (all runs) | TTFT p50 s | TTFT p99 s "
             "| p99 / hpcserve | ITL p01 ms | ITL p50 ms | ITL p99 ms | errors (all runs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in records):
        rows = [r for r in records if r["case"] == case]
        valid = [r for r in rows if r["summary"].get("valid", True)]
        hp = _per_seed([r for r in valid if r["system"] == "hpcserve"], lambda r: r["summary"]["ttft_p99"])
        refs = [r["reference"] for r in rows if r.get("reference") and r["system"] == rows[0]["system"]]
        if refs:
            lines.append(f"| {case} | {REFERENCE} | {len(refs)} | {sum(x['completed'] for x in refs)} / "
                         f"{sum(x['requests'] for x in refs)} "
                         f"| {stats.text(stats.median_interval([x['ttft_p50'] for x in refs]))} "
                         f"| {stats.text(stats.median_interval([x['ttft_p99'] for x in refs]))} | - | - | - | - | - |")
        for system in _in_policy_order(rows):
            mine = [r for r in valid if r["system"] == system]
            every = [r for r in rows if r["system"] == system]
            p99 = _per_seed(mine, lambda r: r["summary"]["ttft_p99"])

            def over(key: str, digits: int = 2, scale: float = 1.0, runs: list[dict] = mine) -> str:
                return stats.text(stats.median_interval([r["summary"][key] for r in runs]), digits, scale)
            lines.append(
                f"| {case} | {system} ({policy_label(system)}) | {len(mine)}/{len(every)} "
                f"| {sum(r['summary']['completed'] for r in every)} / {sum(r['summary']['requests'] for r in every)} "
                f"| {over('ttft_p50')} | {over('ttft_p99')} "
                f"| {stats.text(stats.median_interval(stats.paired_ratios(p99, hp)))} "
                f"| {over('itl_p01', 1, 1000)} | {over('itl_p50', 1, 1000)} | {over('itl_p99', 1, 1000)} "
                f"| {_errors(_summed_errors(every))} |")
    return lines


def churn_table(records: list[dict]) -> list[str]:
    """Markdown lines for scenario (c) (benchmarks/churn.py): per system the median over its runs
    [bootstrap 95% interval] of the share of requests lost, requests/s and TTFT p99, and over
    every leaving backend of every run the drain time (median and longest)."""
    lines = ["| system (policy) | runs | completed / sent (all runs) | lost % | errors (all runs) | req/s "
             "| TTFT p99 s | drain s, median / longest | forced stops | reloads per run "
             "| most requests waiting inside one backend |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for system in dict.fromkeys(r["system"] for r in records):
        rows = [r for r in records if r["system"] == system]
        errors = _summed_errors(rows)
        lost = [100 * (r["summary"]["requests"] - r["summary"]["completed"]) / r["summary"]["requests"]
                for r in rows if r["summary"]["requests"]]
        drains = sorted(d for r in rows for d in r.get("drain_s", []))
        drain = f"{_f(statistics.median(drains), 1)} / {_f(drains[-1], 1)}" if drains else "-"
        waiting = max((r.get("max_waiting") or 0 for r in rows), default=0)
        lines.append(
            f"| {system} ({policy_label(system)}) | {len(rows)} "
            f"| {sum(r['summary']['completed'] for r in rows)} / {sum(r['summary']['requests'] for r in rows)} "
            f"| {stats.text(stats.median_interval(lost))} | {_errors(errors)} "
            f"| {stats.text(stats.median_interval([r['summary']['throughput_rps'] for r in rows]), 1)} "
            f"| {stats.text(stats.median_interval([r['summary']['ttft_p99'] for r in rows]))} "
            f"| {drain} | {sum(r.get('forced_stops', 0) for r in rows)} "
            f"| {stats.text(stats.median_interval([r.get('reloads', 0) for r in rows]), 0)} | {waiting} |")
    return lines


def extra_table(records: list[dict], keys: list[str]) -> list[str]:
    """Markdown lines for records carrying other figures (scenario c's peaks, e's timings)."""
    lines = ["| " + " | ".join(["case", "system", *keys]) + " |", "|" + "---|" * (len(keys) + 2)]
    for r in records:
        lines.append("| " + " | ".join([r["case"], r["system"], *(str(r.get(k, "-")) for k in keys)]) + " |")
    return lines


def markdown(results: dict, plots: list[str]) -> str:
    """The whole report as Markdown."""
    meta = results["meta"]
    out = ["# hpcserve benchmark report", "",
           f"Run {meta['started']} on {meta['machine']}; command: `{meta['command']}`.", "",
           *([meta["note"], ""] if meta.get("note") else []),
           "Ratios: `x ref` and `/ greedy model` divide a system's TTFT by that of the greedy central-queue "
           "model (benchmarks/policies.py: one FIFO queue handing each request to the fastest free slot; a "
           "heuristic, not a bound) for the same arrivals and service times; `/ own policy's model` by "
           "the model of the system's own policy (what its implementation adds); `x hpcserve` and "
           "`/ hpcserve` by hpcserve's (below 1.00: that system was faster). TTFT counts from the "
           "scheduled send and is over completed requests. Seeded runs: median over seeds "
           "[bootstrap 95% interval]; a run whose client sent more than 10 ms late (p99) is invalid and "
           "left out of the medians. In (a), (g) and (h) the first 10% of each window is warm-up, left out, "
           "and errors are SLO misses. SLO in (a) and (h): first token within 2 s and mean inter-token gap within 1.5x the "
           "slower backends' (in (h), a slot's in a full batch); in (g): first token within 10 s (twice a 32k prompt's own prefill) and mean "
           "inter-token gap within 100 ms.", ""]
    for scenario in sorted({r["scenario"] for r in results["records"]}):
        records = [r for r in results["records"] if r["scenario"] == scenario]
        out += [f"## {TITLES.get(scenario, scenario)}", ""]
        if scenario == "e":
            out += extra_table(records, ["seconds", "detail"])
        elif scenario == "c":
            out += churn_table(records)
        elif any("seed" in r for r in records):
            out += seeded_traffic_table(records) if scenario in ("b", "d", "f") else seeded_table(records)
        else:
            out += traffic_table(records)
        out += [""] + [f"![{p}]({p})" for p in plots if p.startswith(f"{scenario}-")] + [""]
    return "\n".join(out)


def plots(results: dict, folder: Path) -> list[str]:
    """Draw the PNGs into `folder`; return their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    a = [r for r in results["records"] if r["scenario"] == "a"]
    if a:
        systems = list(dict.fromkeys(r["system"] for r in a))
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))

        def curve(axis, rows_of, figure, label, style="-o"):
            loads = sorted({r["offered_rps"] for r in a})
            points = [(x, stats.median_interval([figure(r) for r in rows_of(x)])) for x in loads]
            points = [(x, i) for x, i in points if i is not None]
            if points:
                axis.errorbar([x for x, _ in points], [i[0] for _, i in points], fmt=style, label=label, capsize=3,
                              yerr=[[i[0] - i[1] for _, i in points], [i[2] - i[0] for _, i in points]])

        for system in systems:
            def rows_of(x, system=system):
                return [r for r in a if r["system"] == system and r["offered_rps"] == x and r["summary"].get("valid", True)]
            curve(left, rows_of, lambda r: r["summary"]["ttft_p99"], system)
            curve(right, rows_of, lambda r: r["summary"].get("slo_attainment"), system)
        first = {}
        for r in a:
            first.setdefault((r["offered_rps"], r.get("seed")), r)
        curve(left, lambda x: [r for (o, _), r in first.items() if o == x], lambda r: r["reference"]["ttft_p99"],
              REFERENCE, "k--")
        left.set(xlabel="offered load (requests/s)", ylabel="TTFT p99 (s), median over seeds", yscale="log",
                 title="Time to first token (95% interval)")
        right.set(xlabel="offered load (requests/s)", ylabel="share of requests within the SLO",
                  title="SLO attainment (TTFT <= 2 s, mean ITL <= 1.5x nominal)")
        left.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "a-ttft-slo.png", dpi=110)
        plt.close(fig)
        names.append("a-ttft-slo.png")
        seeds = [r.get("seed") for r in a]
        a = [r for r in a if r.get("seed") == min(seeds, key=lambda s: s or 0)]   # one run per system below
        loaded = [r for r in a if r["case"] == "95%" and r.get("per_backend")]
        if loaded:
            fig, ax = plt.subplots(figsize=(11, 3.5))
            width = 0.8 / len(loaded)
            for i, r in enumerate(loaded):
                ax.bar([k + i * width for k in range(len(r["per_backend"]))], r["per_backend"], width, label=r["system"])
            ax.set(xlabel="backend (0-7 fast, 8-15 half as fast)", ylabel="requests served",
                   title="Per-backend load at 95% of capacity")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(folder / "a-per-backend.png", dpi=110)
            plt.close(fig)
            names.append("a-per-backend.png")
    for scenario in ("b", "c"):
        rows = [r for r in results["records"] if r["scenario"] == scenario]
        if rows:
            # every run of a system in one bar (scenario c runs each system once per seed)
            totals: dict[str, dict[str, int]] = {}
            for r in rows:
                total = totals.setdefault(r["system"], {})
                for kind, n in [("completed", r["summary"]["completed"]), *r["summary"]["errors"].items()]:
                    total[kind] = total.get(kind, 0) + n
            kinds = sorted({k for total in totals.values() for k in total})
            fig, ax = plt.subplots(figsize=(8, 3.5))
            bottom = [0] * len(totals)
            for kind in kinds:
                values = [total.get(kind, 0) for total in totals.values()]
                ax.bar(list(totals), values, bottom=bottom, label=kind)
                bottom = [b + v for b, v in zip(bottom, values)]
            ax.set(ylabel="requests (all runs)", title=f"{TITLES[scenario]}: how requests ended")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(folder / f"{scenario}-outcomes.png", dpi=110)
            plt.close(fig)
            names.append(f"{scenario}-outcomes.png")
    return names


def write(results: dict, folder: Path) -> Path:
    """Write results.json, the PNGs and report.md into `folder`; return report.md's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    names = plots(results, folder)
    path = folder / "report.md"
    path.write_text(markdown(results, names))
    return path
