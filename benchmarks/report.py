"""The report of a benchmark run: results.json -> report.md (tables) and PNG plots (matplotlib).

Tables give, per scenario and case, each system's throughput, TTFT and inter-token percentiles,
errors by kind, and ratios: TTFT to the central-FCFS reference (1.0 = as good as the model) and to
hpcserve (below 1.0 = better than hpcserve).
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.metrics import ratio

TITLES = {"a": "(a) Heterogeneous pool, Poisson arrivals", "b": "(b) Overload at 5x for a bounded time",
          "c": "(c) 200 streams while the pool changes 20 times", "d": "(d) Streaming fidelity",
          "e": "(e) Control plane at scale", "f": "(f) Two real llama-server backends, real model"}


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
            lines.append(f"| {case} | reference (central FCFS model) | {ref['completed']}/{ref['requests']} | "
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
           "Ratios: `x ref` divides a system's TTFT by the central-FCFS reference model's for the same "
           "arrivals and service times (1.00: as good as the model); `x hpcserve` divides by hpcserve's "
           "(below 1.00: that system was faster). TTFT and ITL are over completed requests.", ""]
    for scenario in sorted({r["scenario"] for r in results["records"]}):
        records = [r for r in results["records"] if r["scenario"] == scenario]
        out += [f"## {TITLES.get(scenario, scenario)}", ""]
        if scenario == "e":
            out += extra_table(records, ["seconds", "detail"])
        else:
            out += traffic_table(records)
            if scenario == "c":
                out += [""] + extra_table(records, ["pool_changes", "reloads", "max_busy", "max_waiting"])
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
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for system in systems:
            rows = [r for r in a if r["system"] == system]
            x = [r["offered_rps"] for r in rows]
            left.plot(x, [r["summary"]["ttft_p99"] for r in rows], marker="o", label=system)
            right.plot(x, [r["summary"]["throughput_rps"] for r in rows], marker="o", label=system)
        refs = {r["offered_rps"]: r["reference"] for r in a}
        left.plot(list(refs), [v["ttft_p99"] for v in refs.values()], "k--", label="reference (FCFS model)")
        right.plot(list(refs), [v["throughput_rps"] for v in refs.values()], "k--", label="reference (FCFS model)")
        left.set(xlabel="offered load (requests/s)", ylabel="TTFT p99 (s)", yscale="log", title="Time to first token")
        right.set(xlabel="offered load (requests/s)", ylabel="completed requests/s", title="Throughput")
        left.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "a-ttft-throughput.png", dpi=110)
        plt.close(fig)
        names.append("a-ttft-throughput.png")
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
            kinds = sorted({k for r in rows for k in r["summary"]["errors"]} | {"completed"})
            fig, ax = plt.subplots(figsize=(8, 3.5))
            bottom = [0] * len(rows)
            for kind in kinds:
                values = [r["summary"]["completed"] if kind == "completed" else r["summary"]["errors"].get(kind, 0)
                          for r in rows]
                ax.bar([r["system"] for r in rows], values, bottom=bottom, label=kind)
                bottom = [b + v for b, v in zip(bottom, values)]
            ax.set(ylabel="requests", title=f"{TITLES[scenario]}: how requests ended")
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
