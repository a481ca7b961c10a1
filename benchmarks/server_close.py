"""What `option http-server-close` in hpcserve's model backends is for: retries and lost requests
with and without it, on the real llama-server.

Without the option HAProxy keeps an idle connection to llama-server for the next request
(`http-reuse safe`); llama-server's HTTP library (cpp-httplib) closes a connection idle for 5 s and
drops a request that arrives on it as it closes. HAProxy then retries (`retry-on empty-response`),
and when the retries run out on a client's reused connection it closes that connection with no
answer and no log line (haproxy/haproxy#3414). This replays the cross-check's traces
(benchmarks/crosscheck.py: open-loop Poisson arrivals at 0.6 requests/s, gaps of several seconds,
so idle server connections reach llama-server's 5 s) through hpcserve's HAProxy with the config as
generated and without that one line, over a fresh llama-server each run (one thread on CPU 1;
loadgen and HAProxy on CPU 0), the two variants alternating which goes first per seed. Per run:
requests completed, failed (by kind), HAProxy's retries (`wretr` of the backend, `show stat`) and
TTFT p50 (benchmarks.crosscheck.one_run makes each run).

    .venv/bin/python -m benchmarks.server_close [--seeds 3] [--count 60] [--rate 0.6] [--out DIR]

About 2 minutes a run, 4 a seed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import stats
from benchmarks.common import dated
from benchmarks.crosscheck import CLIENT_CPUS, one_run, trace, trace_parser, trace_run

VARIANTS = ("as generated", "without http-server-close")


def summary(records: list[dict]) -> dict:
    """{variant: {"runs", "runs_with_loss", "lost": requests, "retries": (median, low, high),
    "ttft_p50": (median, low, high)}} over the seeds (bootstrap 95% intervals, benchmarks.stats)."""
    out = {}
    for variant in VARIANTS:
        runs = [r for r in records if r["variant"] == variant]
        lost = [r["requests"] - r["completed"] for r in runs]
        out[variant] = {"runs": len(runs), "runs_with_loss": sum(1 for n in lost if n), "lost": sum(lost),
                        "retries": stats.median_interval([r["retries"] for r in runs]),
                        "ttft_p50": stats.median_interval([r["ttft_p50"] for r in runs])}
    return out


def write_report(results: dict, out: Path) -> Path:
    """results.json and report.md in `out`; the path of report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    meta = results["meta"]
    lines = ["# HAProxy's connections to llama-server: option http-server-close\n",
             f"{meta['command']} ({meta['started']}, {meta['machine']}); {meta['count']} requests at "
             f"{meta['rate']}/s per trace (benchmarks.crosscheck.trace), seeds {meta['seeds']}. Median over seeds "
             "[bootstrap 95% interval].\n",
             "| hpcserve's HAProxy | runs | runs losing a request | requests lost | retries per run | TTFT p50 s |",
             "|---|---|---|---|---|---|"]
    for variant, s in summary(results["records"]).items():
        lines.append(f"| {variant} | {s['runs']} | {s['runs_with_loss']} | {s['lost']} | "
                     f"{stats.text(s['retries'], 0)} | {stats.text(s['ttft_p50'], 3)} |")
    lines += ["", "| seed | variant | completed | errors | retries | TTFT p50 s | lateness p99 s |", "|---|---|---|---|---|---|---|"]
    for r in results["records"]:
        errors = ", ".join(f"{kind} {n}" for kind, n in r["errors"].items()) or "-"
        lines.append(f"| {r['seed']} | {r['variant']} | {r['completed']}/{r['requests']} | {errors} | {r['retries']} | "
                     f"{r['ttft_p50']} | {r['lateness_p99']} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = trace_parser("server_close", __doc__.split("\n\n")[0], dated("server-close"))
    args, results = trace_run(parser, argv)
    os.sched_setaffinity(0, CLIENT_CPUS)  # loadgen here, HAProxy as its child
    work = Path(tempfile.mkdtemp(prefix="hpcserve-server-close-", dir="/tmp"))
    print(f"configs and logs: {work}", file=sys.stderr)
    for seed in range(1, args.seeds + 1):
        requests = trace(seed, args.count, args.rate)
        for variant in (VARIANTS if seed % 2 else VARIANTS[::-1]):
            started = time.monotonic()
            without = ("server-close",) if variant == VARIANTS[1] else ()
            figures = one_run("hpcserve", "loadgen", requests, work / f"{seed}-{variant.replace(' ', '-')}", seed,
                              without=without)
            results["records"].append({"seed": seed, "variant": variant, **figures})
            print(f"[{time.strftime('%H:%M:%S')}] seed {seed} {variant}: {figures['completed']}/{figures['requests']}, "
                  f"{figures['retries']} retries ({time.monotonic() - started:.0f} s)", file=sys.stderr)
            write_report(results, args.out)
    print(write_report(results, args.out))


if __name__ == "__main__":
    main()
