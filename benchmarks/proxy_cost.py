"""What the balancer itself costs: CPU and memory per request and per streamed token, and the
latency it adds at high request rates.

    .venv/bin/python -m benchmarks.proxy_cost [--part cost|latency|both]
        [--systems hpcserve,haproxy-lc,nginx-lc,litellm] [--latency-systems hpcserve,haproxy-lc,nginx-lc]
        [--rates 100,300,1000,2000,5000] [--seeds 5] [--window 20] [--out benchmarks/results/YYYY-MM-DD-proxy-cost.json]

The proxy under test (every process of it: HAProxy's master and worker, nginx's master and workers,
LiteLLM's workers) is pinned to CPU 1 with sched_setaffinity (what `taskset -p` does); this
process, the load generator and the backends run on CPU 0. Two parts:

- **Cost under the LLM workload** (--systems). Four hpcserve-llama-sim backends (4 slots, 50
  tokens/s each) get scenario (a)'s heavy-tailed Poisson workload at 60% of their capacity,
  streamed, for the window, each system once per seed (the seed's arrivals, systems interleaved,
  their order rotated by seed). Requests an overloaded proxy fails are counted, not priced: CPU
  per request is over the completed ones. The proxy's CPU time (user + system, psutil, over its
  processes) and its memory (sum of RSS, sampled every 0.25 s) give CPU-ms per request, CPU-ms
  per 1,000 streamed tokens and peak RSS; the table gives their medians over seeds [bootstrap 95%
  interval], and each system's CPU-ms per request over hpcserve's, paired by seed.
- **Added latency at high request rates** (--latency-systems). A fast non-LLM mock (nginx
  answering every chat completion at once with a fixed OpenAI-shaped body, on 4 ports as 4
  servers) gets non-streamed chat completions from wrk (wrk_run: 200 connections with exponential
  think times, the client's lateness measured) at each rate, directly and through each proxy, each
  system once per seed; p50/p99/p99.9 of wrk's latency, and what each proxy adds to direct
  access's, paired by seed. A run whose client lateness p99 exceeds 10 ms
  (metrics.MAX_LATENESS_P99) is invalid and left out of the medians. (This part's earlier Python
  client measured mostly itself, direct access's p50 about 1.1 ms, and went late above 600/s.)

Figures depend on the machine; compare systems within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil

from benchmarks import loadgen, metrics, stats, systems
from benchmarks.common import ROOT, dated, free_port, rotated
from benchmarks.workload import Backend, capacity, mean_tokens, poisson

PROXY_CPU, CLIENT_CPU = {1}, {0}
BACKENDS = [Backend(slots=4, token_rate=50.0)] * 4
MOCK_BODY = json.dumps({"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "m",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "ok"}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


class Tree:
    """The processes of the server listening on `port`, found again at each use: from each listener
    up to the process this benchmark started (or a daemon's, whose parent is init), and down to all
    its children (nginx's and LiteLLM's workers share one socket, which lists one of them)."""

    def __init__(self, port: int):
        self.roots: dict[int, psutil.Process] = {}
        for connection in psutil.net_connections("tcp"):
            if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN \
                    and connection.pid:
                process = psutil.Process(connection.pid)
                while (parent := process.parent()) is not None and parent.pid not in (1, os.getpid()):
                    process = parent
                self.roots[process.pid] = process

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for root in self.roots.values():
            with contextlib.suppress(psutil.Error):
                for process in [root, *root.children(recursive=True)]:
                    found[process.pid] = process
        return list(found.values())

    def pin(self, cpus: set[int]) -> None:
        """Pin every process (children forked later inherit it)."""
        pin(self.processes(), cpus)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the tree so far: the roots' own and their reaped children's,
        and every live descendant's."""
        total = 0.0
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
                if process.pid in self.roots:
                    total += times.children_user + times.children_system
        return total


def pin(processes: list[psutil.Process], cpus: set[int]) -> None:
    """Pin every thread of `processes` to `cpus` (`taskset -a -p`: sched_setaffinity on a pid sets
    only the thread whose id it is, so a proxy's other threads would stay where they were)."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            for thread in process.threads():
                with contextlib.suppress(OSError):   # a thread that ended meanwhile
                    os.sched_setaffinity(thread.id, cpus)


class PeakRSS:
    """Samples the summed RSS (bytes) of a Tree's processes every 0.25 s in a thread; the peak is
    returned by stop()."""

    def __init__(self, tree: Tree | None):
        self.tree, self.peak, self._stop = tree, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for process in self.tree.processes() if self.tree else []:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(0.25)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def start_mock(folder: Path, servers: int = 4) -> tuple[subprocess.Popen, list[int]]:
    """nginx answering /health and every chat completion at once (MOCK_BODY), on `servers` ports."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise SystemExit("nginx is not installed: apt-get install nginx-light (scripts/setup-bench.sh)")
    folder.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(servers)]
    listens = "\n".join(f"        listen 127.0.0.1:{p};" for p in ports)
    body = MOCK_BODY.replace("\\", "\\\\").replace("'", "\\'")
    (folder / "mock.conf").write_text(f"""daemon off;
worker_processes 1;
pid {folder}/mock.pid;
error_log {folder}/mock-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {folder}/client_body;
    keepalive_requests 1000000;
    server {{
{listens}
        default_type application/json;
        location = /health {{ return 200 '{{"status":"ok"}}'; }}
        location / {{ return 200 '{body}'; }}
    }}
}}
""")
    process = subprocess.Popen([binary, "-p", str(folder), "-c", str(folder / "mock.conf")],
                               stdout=subprocess.DEVNULL, stderr=(folder / "mock.log").open("w"))
    systems._wait_http(f"http://127.0.0.1:{ports[0]}/health", what="the nginx mock", process=process)
    return process, ports


WRK_SCRIPT = ROOT / "benchmarks" / "configs" / "wrk-think.lua"
WRK_CONNECTIONS = 200


def wrk_run(url: str, headers: dict, rate: float, window: float, seed: int,
            connections: int = WRK_CONNECTIONS) -> dict:
    """Non-streamed chat completions to `url` (an OpenAI base URL, ".../v1") from wrk (Debian's
    wrk 4.1, one thread on this process's CPUs) for `window` seconds at about `rate` requests/s:
    `connections` keep-alive connections, each sending after an exponential think time of mean
    connections/rate seconds (whole milliseconds, wrk's timer resolution) from its previous
    answer (configs/wrk-think.lua, seeded by `seed`).

    That is not a strict open loop: a connection waiting on an answer sends its next request
    late. While answers take about a millisecond, a few of the 200 connections wait at any time and
    the others keep sending on their own clocks, so a stall of the proxy is still met by most of
    the arrivals it would have met. Latency is wrk's, from the request's write to the answer's
    end; the client's lateness (a write after its think time ended) is measured by the script.

    Returns {"requests" (completed), "errors" {kind: n}, "achieved_rate" (per s), "p50_ms",
    "p99_ms", "p99.9_ms" (None below 10,000 requests), "mean_ms", "max_ms", "lateness_p99_ms"}.

    Raises:
        SystemExit: wrk is not installed, or it printed no results.
    """
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (scripts/setup.sh)")
    env = dict(os.environ, BENCH_SEED=str(seed), BENCH_THINK_MS=f"{1000 * connections / rate:.3f}",
               BENCH_AUTHORIZATION=headers.get("Authorization", ""))
    done = subprocess.run([binary, "-t1", f"-c{connections}", f"-d{window:g}s", "--timeout", "30s",
                           "-s", str(WRK_SCRIPT), f"{url}/chat/completions"],
                          env=env, capture_output=True, text=True, timeout=window + 120)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("wrk-json: ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no results (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return parse_wrk(json.loads(line.removeprefix("wrk-json: ")))


def parse_wrk(raw: dict) -> dict:
    """The figures of one wrk run from the script's JSON line (microseconds; see wrk_run)."""
    errors = {kind: raw[f"{kind}_errors" if kind != "timeouts" else kind]
              for kind in ("connect", "read", "write", "status", "timeouts")}

    def ms(key: str) -> float | None:
        return round(raw[key] / 1000, 3) if raw[key] >= 0 else None
    return {"requests": raw["requests"], "errors": {k: v for k, v in errors.items() if v},
            "achieved_rate": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
            "p50_ms": ms("p50_us"), "p99_ms": ms("p99_us"),
            "p99.9_ms": ms("p99.9_us") if raw["requests"] >= 10_000 else None,
            "mean_ms": round(raw["mean_us"] / 1000, 3), "max_ms": ms("max_us"),
            "lateness_p99_ms": ms("lateness_p99_us")}


def added_latency(running: systems.Running, rates: list[float], window: float, seed: int) -> list[dict]:
    """One wrk run (wrk_run) at each rate through `running`, after 2 s at that rate whose figures
    are dropped (connections opened, caches warm); a run whose client lateness p99 exceeds
    metrics.MAX_LATENESS_P99 is marked invalid."""
    rows = []
    for rate in rates:
        wrk_run(running.urls[0], running.headers, rate, 2, seed + 1000)
        row = {"rate": rate, "seed": seed, **wrk_run(running.urls[0], running.headers, rate, window, seed)}
        late = row["lateness_p99_ms"]
        row["valid"] = late is not None and late <= 1000 * metrics.MAX_LATENESS_P99
        rows.append(row)
        print(f"    {running.name:>10} {rate:>6g}/s seed {seed}: " + ", ".join(
            f"{k} {v}" for k, v in row.items() if k not in ("rate", "seed")), file=sys.stderr, flush=True)
    return rows


def llm_cost(name: str, window: float, folder: Path, seed: int = 1) -> dict:
    """CPU-ms per request and per 1,000 streamed tokens, and peak RSS (MiB), of system `name` in
    front of simulated backends under scenario (a)'s workload at 60% of capacity, for `window`
    seconds of the arrivals of `seed`. Returns one row (a dict, "seed" among its keys)."""
    backends = systems.start_simulators(BACKENDS, folder / f"{name}-sims")
    try:
        pin([psutil.Process(b.process.pid) for b in backends if b.process], CLIENT_CPU)
        running = systems.start(name, [b.urls[0] for b in backends], 4, folder)
        try:
            tree = None if name == "direct" else Tree(systems.port_of(running.urls[0]))
            if tree:
                tree.pin(PROXY_CPU)
            rate = 0.6 * capacity(BACKENDS, mean_tokens())
            requests = poisson(rate, window, seed)
            rss = PeakRSS(tree)
            cpu_before = tree.cpu_seconds() if tree else 0.0
            outcomes = loadgen.run(running.urls, "m", requests, window + 120, running.headers)
            cpu = (tree.cpu_seconds() if tree else 0.0) - cpu_before
            peak = rss.stop()
            processes = len(tree.processes()) if tree else 0
        finally:
            running.stop()
    finally:
        for backend in backends:
            backend.stop()
    done = [o for o in outcomes if not o.error]
    tokens = sum(o.tokens for o in done)
    figures = metrics.summarize(outcomes)
    return {"system": name, "seed": seed, "processes": processes, "requests": len(outcomes), "completed": len(done),
            "tokens": tokens, "cpu_s": round(cpu, 3),
            "cpu_ms_per_request": round(1000 * cpu / len(done), 3) if done else None,
            "cpu_ms_per_1000_tokens": round(1e6 * cpu / tokens, 2) if tokens else None,
            "peak_rss_mib": round(peak / 2**20, 1), "ttft_p99": figures["ttft_p99"], "valid": figures["valid"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("cost", "latency", "both"), default="both",
                        help="the cost under the LLM workload, the added latency, or both")
    parser.add_argument("--systems", default="hpcserve,haproxy-lc,nginx-lc,litellm",
                        help="systems of the cost part")
    parser.add_argument("--latency-systems", default="hpcserve,haproxy-lc,nginx-lc",
                        help="systems of the latency part (each measured against direct access)")
    parser.add_argument("--rates", default="100,300,1000,2000,5000", help="request rates of the latency part (per s)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of each part (each system once per seed)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of each run")
    parser.add_argument("--out", type=Path, default=dated("proxy-cost.json"))
    args = parser.parse_args(argv)
    if os.cpu_count() is None or os.cpu_count() < 2:
        raise SystemExit("needs 2 CPUs: the proxy is pinned to CPU 1, everything else to CPU 0")
    names = [n for n in args.systems.split(",") if n] if args.part != "latency" else []
    latency_names = [n for n in args.latency_systems.split(",") if n] if args.part != "cost" else []
    for option, listed in (("--systems", names), ("--latency-systems", latency_names)):
        unknown = [n for n in listed if n not in systems.SYSTEMS]
        if unknown:
            raise SystemExit(f"{option}: unknown {', '.join(unknown)}; expected some of {', '.join(systems.SYSTEMS)}")
    try:
        rates = [float(r) for r in args.rates.split(",") if r]
    except ValueError:
        raise SystemExit(f"--rates: expected numbers separated by commas, got {args.rates!r}") from None
    if args.seeds < 1 or any(r <= 0 for r in rates):
        raise SystemExit("--seeds and every --rates value must be positive")
    os.sched_setaffinity(0, CLIENT_CPU)
    results: dict = {"meta": {"cpus": {"proxy": sorted(PROXY_CPU), "client_and_backends": sorted(CLIENT_CPU)},
                              "window_s": args.window, "command": "python -m benchmarks.proxy_cost " + " ".join(
                                  sys.argv[1:] if argv is None else argv)},
                     "llm_cost": [], "added_latency": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seed in range(1, args.seeds + 1):   # systems interleaved: each once per seed
            for name in rotated(names, seed):
                print(f"cost under the LLM workload: {name}, seed {seed}", file=sys.stderr, flush=True)
                results["llm_cost"].append(llm_cost(name, args.window, folder / f"cost-{name}-{seed}", seed))
                print(f"    {results['llm_cost'][-1]}", file=sys.stderr, flush=True)
        if latency_names:
            version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()
            results["meta"]["latency_client"] = {"tool": version[0] if version else "wrk",
                                                 "connections": WRK_CONNECTIONS, "threads": 1}
            mock, ports = start_mock(folder / "mock")
            try:
                Tree(ports[0]).pin(CLIENT_CPU)
                for seed in range(1, args.seeds + 1):   # systems interleaved: each once per seed
                    for name in ["direct", *latency_names]:
                        print(f"added latency: {name}, seed {seed}", file=sys.stderr, flush=True)
                        urls = [f"http://127.0.0.1:{p}/v1" for p in ports]
                        running = systems.start(name, urls[:1] if name == "direct" else urls, 8,
                                                folder / f"lat-{name}-{seed}")
                        try:
                            if name != "direct":
                                Tree(systems.port_of(running.urls[0])).pin(PROXY_CPU)
                            results["added_latency"].setdefault(name, []).extend(
                                added_latency(running, rates, args.window, seed))
                        finally:
                            running.stop()
            finally:
                mock.terminate()
                mock.wait(10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def table(results: dict) -> str:
    """The figures as Markdown tables, over valid runs only: for the cost part, per system the
    requests completed out of those sent (summed over its valid runs; CPU per request counts the
    completed ones), the median over seeds [bootstrap 95% interval] of CPU-ms per request, CPU-ms
    per 1,000 tokens and peak RSS (MiB), and its CPU-ms per request over hpcserve's, paired by seed (rows of an older
    results file without "seed" count as seed 1); for the latency part, per system and rate, the
    same medians of p50, p99 and p99.9 (ms), and of the p50 and p99 added to direct access's
    (paired by seed)."""
    lines = []
    if results["llm_cost"]:
        lines += cost_table(results["llm_cost"]) + [""]
    if results["added_latency"]:
        lines += latency_table(results["added_latency"])
    return "\n".join(lines)


def cost_table(rows: list[dict]) -> list[str]:
    """Markdown lines of the cost part's figures (see table)."""
    lines = ["| system | runs valid | completed | CPU-ms / request | / hpcserve's | CPU-ms / 1,000 tokens "
             "| peak RSS MiB | processes |",
             "|---|---:|---:|---|---|---|---|---:|"]
    valid = [r for r in rows if r.get("valid", True)]
    base = {r.get("seed", 1): r["cpu_ms_per_request"] for r in valid if r["system"] == "hpcserve"}
    for name in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in valid if r["system"] == name]

        def over(key: str, digits: int) -> str:
            return stats.text(stats.median_interval([r[key] for r in mine]), digits=digits)

        ratio = stats.paired_ratios({r.get("seed", 1): r["cpu_ms_per_request"] for r in mine}, base)
        processes = sorted({r["processes"] for r in mine})
        spread = f"{processes[0]}" if processes else "-"
        if len(processes) > 1:
            spread += f"-{processes[-1]}"
        completed = sum(r.get("completed", 0) for r in mine)
        sent = sum(r.get("requests", 0) for r in mine)
        lines.append(f"| {name} | {len(mine)}/{sum(r['system'] == name for r in rows)} "
                     f"| {f'{completed:,} / {sent:,}' if sent else '-'} | {over('cpu_ms_per_request', 3)} "
                     f"| {stats.text(stats.median_interval(ratio))} | {over('cpu_ms_per_1000_tokens', 1)} "
                     f"| {over('peak_rss_mib', 1)} | {spread} |")
    return lines


def latency_table(added_latency: dict[str, list[dict]]) -> list[str]:
    """Markdown lines of the latency part's figures (see table)."""
    lines = []
    direct = {(r["rate"], r["seed"]): r for r in added_latency.get("direct", []) if r["valid"]}
    lines += ["| system | rate/s | runs valid | requests/s | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms "
              "| errors | client lateness p99 ms (max) |",
              "|---|---:|---:|---:|---|---|---|---|---|---:|---:|"]
    for name, rows in added_latency.items():
        for rate in sorted({r["rate"] for r in rows}):
            runs = [r for r in rows if r["rate"] == rate]
            valid = [r for r in runs if r["valid"]]

            def over(key: str, runs: list[dict] = valid, digits: int = 3) -> str:
                return stats.text(stats.median_interval([r[key] for r in runs]), digits=digits)

            def added(key: str, runs: list[dict] = valid) -> str:
                pairs = [r[key] - direct[(rate, r["seed"])][key] for r in runs
                         if (rate, r["seed"]) in direct and r[key] is not None]
                return "-" if name == "direct" else stats.text(stats.median_interval(pairs), digits=3)

            errors = sum(sum(r["errors"].values()) for r in runs)
            lateness = max((r["lateness_p99_ms"] or 0) for r in runs)
            lines.append(f"| {name} | {rate:g} | {len(valid)}/{len(runs)} | {over('achieved_rate', digits=0).split(' ')[0]} | "
                         f"{over('p50_ms')} | {over('p99_ms')} | {over('p99.9_ms')} | {added('p50_ms')} | "
                         f"{added('p99_ms')} | {errors} | {lateness} |")
    return lines


if __name__ == "__main__":
    main()
