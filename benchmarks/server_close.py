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
TTFT p50.

    .venv/bin/python -m benchmarks.server_close [--seeds 3] [--count 60] [--rate 0.6] [--out DIR]

About 2 minutes a run, 4 a seed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import stats
from benchmarks.common import MODEL, ROOT, start_haproxy, start_llama_server
from benchmarks.crosscheck import CLIENT_CPUS, SERVER_CPUS, SLOTS, run_loadgen, trace
from benchmarks.workload import Request
from hpcserve.haproxy import runtime

VARIANTS = ("as generated", "without http-server-close")


def backend_retries(show_stat: str, backend: str = "model_m") -> int:
    """The `wretr` (retries) counter of `backend`'s BACKEND row in a `show stat` CSV answer (pure).

    Raises:
        KeyError: no such backend row.
    """
    for row in csv.DictReader(io.StringIO(show_stat.lstrip("# "))):
        if row.get("pxname") == backend and row.get("svname") == "BACKEND":
            return int(row.get("wretr") or 0)
    raise KeyError(backend)


def one_run(variant: str, requests: list[Request], folder: Path) -> dict:
    """A fresh llama-server behind hpcserve's HAProxy (`variant`: one of VARIANTS) and one loadgen
    replay of `requests`: loadgen's figures (crosscheck.loadgen_figures) with "retries"."""
    folder.mkdir(parents=True, exist_ok=True)
    server, port = start_llama_server(MODEL, folder / "llama-server.log", parallel=SLOTS, ctx=2048 * SLOTS,
                                      threads=1, cpus=SERVER_CPUS)
    proxy = None
    try:
        without = ("server-close",) if variant == VARIANTS[1] else ()
        proxy, proxy_port = start_haproxy(folder / "haproxy", [port], parallel=SLOTS, without=without)
        figures = run_loadgen(f"http://127.0.0.1:{proxy_port}", requests)
        retries = backend_retries(runtime.command(proxy.paths.admin_socket, "show stat"))
        return {**figures, "retries": retries}
    finally:
        if proxy:
            proxy.stop(timeout=10)
        server.terminate()
        server.wait(10)


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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_close", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="traces (seeds 1..N) [default: 3]")
    parser.add_argument("--count", type=int, default=60, help="requests per trace [default: 60]")
    parser.add_argument("--rate", type=float, default=0.6, help="requests per second [default: 0.6]")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server-close")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.count < 2 or not args.rate > 0:
        parser.error("--seeds must be >= 1, --count >= 2 and --rate > 0")
    os.sched_setaffinity(0, CLIENT_CPUS)  # loadgen here, HAProxy as its child
    work = Path(tempfile.mkdtemp(prefix="hpcserve-server-close-", dir="/tmp"))
    results: dict = {"meta": {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}",
                              "command": "python -m benchmarks.server_close " + " ".join(
                                  argv if argv is not None else sys.argv[1:]),
                              "count": args.count, "rate": args.rate, "seeds": args.seeds}, "records": []}
    print(f"configs and logs: {work}", file=sys.stderr)
    for seed in range(1, args.seeds + 1):
        requests = trace(seed, args.count, args.rate)
        for variant in (VARIANTS if seed % 2 else VARIANTS[::-1]):
            started = time.monotonic()
            figures = one_run(variant, requests, work / f"{seed}-{variant.replace(' ', '-')}")
            results["records"].append({"seed": seed, "variant": variant, **figures})
            print(f"[{time.strftime('%H:%M:%S')}] seed {seed} {variant}: {figures['completed']}/{figures['requests']}, "
                  f"{figures['retries']} retries ({time.monotonic() - started:.0f} s)", file=sys.stderr)
            write_report(results, args.out)
    print(write_report(results, args.out))


if __name__ == "__main__":
    main()
