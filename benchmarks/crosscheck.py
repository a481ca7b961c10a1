"""A standard load generator as a cross-check of benchmarks/loadgen.py: guidellm on the same traces.

Every other figure of these benchmarks comes from our own client (benchmarks/loadgen.py). To show
that its TTFT and inter-token latency are what a well-kept tool measures, this replays the same
open-loop traces with guidellm (PyPI `guidellm`, its `replay` profile with `trace_synthetic` data:
each request sent at the trace's time, with the trace's prompt and answer lengths, streamed) and
with loadgen, against the real llama-server (the real model, 4 slots) reached directly and through
hpcserve's HAProxy. Each run gets a fresh llama-server (no prompt cache carried over); the tools
alternate which goes first per seed. llama-server runs with one thread on CPU 1 and everything else
(the tool, HAProxy) on CPU 0: in a first try with both sharing 2 cores, llama-server took 90% of
them and guidellm's 22 CPU seconds a run (loadgen's: 1.2) slowed the server it measured (its TTFT
p50 1.29x loadgen's), which says what guidellm costs, not whether the two measure alike.

Both tools send prompts of the same length in the server's tokens: guidellm synthesizes a prompt of
the trace's `input_length` tokens with a Hugging Face tokenizer, so the trace gives it the number of
tokens llama-server's own /tokenize counts in loadgen's prompt for that request; its tokenizer is the
model's own, converted from the GGUF file by transformers (`gguf_file=`), since the Hugging Face hub
is out of reach. Both ask for exactly `max_tokens` tokens (guidellm sends `ignore_eos`, loadgen
`ignore_eos` too).

Figures per run, the same definitions for both tools from each request's timestamps: TTFT from the
actual send (guidellm counts from its send, not from the trace's time; loadgen's own figure counts
from the scheduled time and is converted here), its p50 and p90; ITL: decode seconds over
tokens after the first, summed over all requests (guidellm's "ITL mean"); and each tool's send
lateness p99 (guidellm: request_start - targeted_start). guidellm's own summary (its JSON
"metrics") is kept beside the recomputed figures, and so are the CPU seconds of each tool and of
llama-server: on 2 cores a client that takes more CPU slows the server it measures. The report
gives, per system and tool, the median over seeds with a bootstrap 95% interval, and the paired
guidellm/loadgen ratio per seed with its interval: an interval that holds 1 is agreement within the
noise of these runs.

    scripts/setup-bench.sh --guidellm          # .venv-guidellm: guidellm 0.8.1 and its torch (about 6 GB)
    .venv/bin/python -m benchmarks.crosscheck [--seeds 3] [--count 60] [--rate 0.6] [--out DIR]

About 2 minutes a run, 9 a seed (2 systems x 2 tools), 45 for 5 seeds on 2 cores. guidellm starts
GUIDELLM__MAX_WORKER_PROCESSES worker processes (its default 10); here 1, on the client's one core.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from benchmarks import loadgen, stats
from benchmarks.common import KEY, MODEL, ROOT, dated, percentile, start_haproxy, start_llama_server
from benchmarks.workload import Request
from hpcserve.haproxy import runtime

GUIDELLM_VENV = ROOT / ".venv-guidellm"
TOKENIZER = ROOT / ".cache" / "guidellm-tokenizer"
SLOTS = 4
SERVER_CPUS, CLIENT_CPUS = {1}, {0}
SYSTEMS = ("direct", "hpcserve")
TOOLS = ("loadgen", "guidellm")
FIGURES = ("ttft_p50", "ttft_p90", "itl_mean")


def trace(seed: int, count: int, rate: float) -> list[Request]:
    """`count` open-loop arrivals at `rate` per second (Poisson), prompts of 16-200 tokens (as
    loadgen counts them), answers of 16-64 tokens: the shape of the simulator's timing test."""
    rng = random.Random(seed)
    at, requests = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        requests.append(Request(at=round(at, 3), max_tokens=rng.randint(16, 64), prompt_tokens=rng.randint(16, 200)))
    return requests


def ensure_tokenizer() -> Path:
    """The model's tokenizer as a Hugging Face tokenizer folder (TOKENIZER), converted once from the
    GGUF file by transformers in .venv-guidellm (about 30 s).

    Raises:
        SystemExit: .venv-guidellm is missing (scripts/setup-bench.sh --guidellm makes it).
        subprocess.CalledProcessError: the conversion failed.
    """
    python = GUIDELLM_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} missing: run scripts/setup-bench.sh --guidellm")
    if not (TOKENIZER / "tokenizer.json").exists():
        subprocess.run([str(python), "-c", "import sys; from transformers import AutoTokenizer; "
                        "AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2]).save_pretrained(sys.argv[3])",
                        str(MODEL.parent), MODEL.name, str(TOKENIZER)], check=True)
    return TOKENIZER


def server_tokens(url: str, requests: list[Request]) -> list[int]:
    """Tokens llama-server counts in each request's prompt text (its POST /tokenize), without the
    chat template (both tools' prompts get the same template from the server)."""
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        return [len(client.post(f"{url}/tokenize", json={"content": r.prompt}).raise_for_status().json()["tokens"])
                for r in requests]


def _figures(ttfts: list[float], decode_s: float, gaps: int, lateness: list[float], completed: int,
             requested: int) -> dict:
    ttfts.sort()
    return {"ttft_p50": round(percentile(ttfts, 50), 4) if ttfts else None,
            "ttft_p90": round(percentile(ttfts, 90), 4) if ttfts else None,
            "itl_mean": round(decode_s / gaps, 5) if gaps else None,
            "lateness_p99": round(percentile(sorted(lateness), 99), 4) if lateness else None,
            "completed": completed, "requests": requested}


def loadgen_figures(outcomes: list[loadgen.Outcome], requested: int) -> dict:
    """The figures of a loadgen run (pure): {"ttft_p50", "ttft_p90": seconds from the actual send,
    "itl_mean": seconds per token after the first, over all completed requests, "lateness_p99":
    seconds, "completed", "requests": `requested`, "errors": {kind: count}}; a figure without samples
    is None."""
    done = [o for o in outcomes if not o.error and o.ttft is not None]
    figures = _figures([o.ttft - (o.sent - o.scheduled) for o in done], sum(sum(o.gaps) for o in done),
                       sum(len(o.gaps) for o in done), [o.sent - o.scheduled for o in outcomes], len(done), requested)
    return {**figures, "errors": dict(collections.Counter(o.error for o in outcomes if o.error))}


def guidellm_figures(benchmark: dict, requested: int) -> dict:
    """The same figures as loadgen_figures from one benchmark of guidellm's JSON output (pure),
    recomputed from each successful request's timings (first_token_iteration - request_start,
    (last_token_iteration - first_token_iteration) / (output tokens - 1), request_start -
    targeted_start; epoch seconds), with guidellm's own summary under "guidellm": {"ttft_p50",
    "ttft_p90", "itl_mean"} in seconds, and "errors": {"errored" or "incomplete": count}. Requests
    it did not complete or never sent count against "completed"; guidellm 0.8.1 left a trace's last
    row out in 8 of the 10 runs of benchmarks/results/2026-11-23-crosscheck.

    Raises:
        KeyError: the JSON lacks a field named above (another guidellm version's layout).
    """
    ttfts, lateness, decode_s, gaps = [], [], 0.0, 0
    for request in benchmark["requests"]["successful"]:
        t, n = request["info"]["timings"], request["output_metrics"]["text_tokens"]
        ttfts.append(t["first_token_iteration"] - t["request_start"])
        lateness.append(t["request_start"] - t["targeted_start"])
        if n > 1:
            decode_s, gaps = decode_s + t["last_token_iteration"] - t["first_token_iteration"], gaps + n - 1
    figures = _figures(ttfts, decode_s, gaps, lateness, len(ttfts), requested)
    figures["errors"] = {kind: len(benchmark["requests"][kind]) for kind in ("errored", "incomplete")
                         if benchmark["requests"][kind]}
    metrics = benchmark["metrics"]
    ttft, itl = metrics["time_to_first_token_ms"]["successful"], metrics["inter_token_latency_ms"]["successful"]
    figures["guidellm"] = {"ttft_p50": round(ttft["percentiles"]["p50"] / 1000, 4),
                           "ttft_p90": round(ttft["percentiles"]["p90"] / 1000, 4),
                           "itl_mean": round(itl["mean"] / 1000, 5)}
    return figures


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_loadgen(url: str, requests: list[Request]) -> dict:
    """loadgen's figures of one run (loadgen_figures), with "client_cpu_s": the CPU seconds this
    process spent on it (loadgen runs in it)."""
    before = _cpu_s(resource.RUSAGE_SELF)
    outcomes = loadgen.run([f"{url}/v1"], "m", requests, deadline=requests[-1].at + 300,
                           headers={"Authorization": f"Bearer {KEY}"})
    return {**loadgen_figures(outcomes, len(requests)), "client_cpu_s": round(_cpu_s(resource.RUSAGE_SELF) - before, 2)}


def run_guidellm(url: str, requests: list[Request], tokens: list[int], folder: Path, seed: int) -> dict:
    """guidellm's figures of one run (guidellm_figures), with "client_cpu_s": the CPU seconds of
    guidellm and its workers; `tokens`: each prompt's length in the server's tokens (server_tokens).

    Raises:
        subprocess.CalledProcessError: guidellm failed (its output is in folder/guidellm.log).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "trace.jsonl").open("w") as f:
        for r, n in zip(requests, tokens):
            f.write(json.dumps({"timestamp": r.at, "input_length": n, "output_length": r.max_tokens}) + "\n")
    out = folder / "guidellm.json"
    (folder / "scenario.json").write_text(json.dumps({"spec": {
        "backend": {"kind": "openai_http", "target": url, "model": "m", "api_key": KEY,
                    "request_format": "/v1/chat/completions",
                    # Its check asks for GET /health, which hpcserve's frontend does not serve (only the API).
                    "validate_backend": False},
        "profile": {"kind": "replay", "schedule_turn": "timestamp"},
        "data": [{"kind": "trace_synthetic", "source": {"kind": "json_file", "path": str(folder / "trace.jsonl")}}],
        "tokenizer": {"kind": "hf_auto", "model": str(TOKENIZER)},
        "seed": {"kind": "static", "value": seed},
        "outputs": [{"kind": "json", "path": str(out)}]}}))
    before = _cpu_s(resource.RUSAGE_CHILDREN)
    with (folder / "guidellm.log").open("w") as log:
        subprocess.run([str(GUIDELLM_VENV / "bin" / "guidellm"), "run", "-c", str(folder / "scenario.json"),
                        "--disable-progress"], stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "GUIDELLM__MAX_WORKER_PROCESSES": "1"})
    # guidellm and its worker processes, waited for: the CPU seconds the client took from the server.
    client_cpu_s = round(_cpu_s(resource.RUSAGE_CHILDREN) - before, 2)
    return {**guidellm_figures(json.loads(out.read_text())["benchmarks"][0], len(requests)),
            "client_cpu_s": client_cpu_s}


def backend_retries(show_stat: str, backend: str = "model_m") -> int:
    """The retries (`wretr`) of `backend`'s BACKEND row in a `show stat` CSV answer (pure;
    runtime.parse_stat reads it).

    Raises:
        KeyError: no such backend row.
    """
    return {s.backend: s for s in runtime.parse_stat(show_stat, rows="BACKEND")}[backend].retries


def one_run(system: str, tool: str, requests: list[Request], folder: Path, seed: int,
            without: tuple[str, ...] = ()) -> dict:
    """A fresh llama-server, reached directly or through hpcserve's HAProxy (with the ablations
    `without` names, common.start_haproxy), and one tool's run: the tool's figures with
    "server_cpu_s", and through HAProxy "retries" (its backend's `wretr`)."""
    folder.mkdir(parents=True, exist_ok=True)
    server, port = start_llama_server(MODEL, folder / "llama-server.log", parallel=SLOTS, ctx=2048 * SLOTS,
                                      threads=1, cpus=SERVER_CPUS)
    proxy = None
    try:
        direct = f"http://127.0.0.1:{port}"
        tokens = server_tokens(direct, requests) if tool == "guidellm" else []
        url = direct
        if system == "hpcserve":
            proxy, proxy_port = start_haproxy(folder / "haproxy", [port], parallel=SLOTS, without=without)
            url = f"http://127.0.0.1:{proxy_port}"
        figures = run_loadgen(url, requests) if tool == "loadgen" else run_guidellm(url, requests, tokens, folder, seed)
        if proxy:
            figures["retries"] = backend_retries(runtime.command(proxy.paths.admin_socket, "show stat"))
        times = psutil.Process(server.pid).cpu_times()
        return {**figures, "server_cpu_s": round(times.user + times.system, 2)}
    finally:
        if proxy:
            proxy.stop(timeout=10)
        server.terminate()
        server.wait(10)


def summary(records: list[dict]) -> dict:
    """{system: {tool: {figure: (median, low, high)}, "ratio": {figure: (median, low, high)}}}: the
    median over seeds with its bootstrap 95% interval, and guidellm/loadgen paired by seed."""
    out: dict = {}
    for system in SYSTEMS:
        runs = {tool: {r["seed"]: r for r in records if r["system"] == system and r["tool"] == tool} for tool in TOOLS}
        out[system] = {tool: {f: stats.median_interval([r[f] for r in runs[tool].values()]) for f in FIGURES}
                       for tool in TOOLS}
        out[system]["ratio"] = {f: stats.median_interval(stats.paired_ratios(
            {s: r[f] for s, r in runs["guidellm"].items()}, {s: r[f] for s, r in runs["loadgen"].items()}))
            for f in FIGURES}
    return out


def write_report(results: dict, out: Path) -> Path:
    """results.json and report.md (a table per system) in `out`; the path of report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    s = summary(results["records"])
    lines = ["# Cross-check: guidellm and loadgen on the same traces\n",
             f"{results['meta']['command']} (started {results['meta']['started']}"
             + "".join(f", resumed {at}" for at in results["meta"].get("resumed", []))
             + f", {results['meta']['machine']}); "
             f"{results['meta']['count']} requests at {results['meta']['rate']}/s per trace, seeds "
             f"{results['meta']['seeds']}. Median over seeds [bootstrap 95% interval]; TTFT from the actual send, "
             f"seconds; ITL mean in ms; ratio guidellm/loadgen paired by seed.\n",
             "| system | figure | loadgen | guidellm | guidellm / loadgen |", "|---|---|---|---|---|"]
    for system in SYSTEMS:
        for f in FIGURES:
            scale = 1000 if f == "itl_mean" else 1
            lines.append(f"| {system} | {f} | {stats.text(s[system]['loadgen'][f], 1 if scale > 1 else 3, scale)} | "
                         f"{stats.text(s[system]['guidellm'][f], 1 if scale > 1 else 3, scale)} | "
                         f"{stats.text(s[system]['ratio'][f])} |")
    lines += ["", "Per run: completed/requests (with errors by kind), send lateness p99 (s), CPU seconds of the "
              "client (the tool, on CPU 0) and of llama-server (one thread on CPU 1), and guidellm's own summary.", "",
              "| seed | system | tool | completed | lateness p99 | TTFT p50 | TTFT p90 | ITL mean ms | client / server CPU s "
              "| guidellm's own p50 / p90 / ITL |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["records"]:
        own = r.get("guidellm")
        own_text = f"{own['ttft_p50']} / {own['ttft_p90']} / {own['itl_mean'] * 1000:.1f}" if own else "-"
        itl = f"{r['itl_mean'] * 1000:.1f}" if r["itl_mean"] else "-"
        errors = "".join(f" ({kind} {n})" for kind, n in r.get("errors", {}).items())
        lines.append(f"| {r['seed']} | {r['system']} | {r['tool']} | {r['completed']}/{r['requests']}{errors} | "
                     f"{r['lateness_p99']} | {r['ttft_p50']} | {r['ttft_p90']} | {itl} | "
                     f"{r.get('client_cpu_s', '-')} / {r.get('server_cpu_s', '-')} | {own_text} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def trace_parser(module: str, description: str, out: Path) -> argparse.ArgumentParser:
    """The options of a benchmark that replays trace() per seed: --seeds, --count, --rate, --out
    (default `out`); `module` is its name under benchmarks."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=description)
    parser.add_argument("--seeds", type=int, default=3, help="traces (seeds 1..N) [default: 3]")
    parser.add_argument("--count", type=int, default=60, help="requests per trace [default: 60]")
    parser.add_argument("--rate", type=float, default=0.6, help="requests per second [default: 0.6: the real "
                        "model on one thread here answers in 0.6 s (TTFT p50), 1.6 s at p90]")
    parser.add_argument("--out", type=Path, default=out)
    return parser


def trace_run(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """The checked options of trace_parser()'s `parser` (it exits with a usage error otherwise) and
    the results to fill: {"meta": {"started", "machine", "command", "count", "rate", "seeds"},
    "records": []} (main() adds "resumed": the start of each run that resumed it)."""
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.count < 2 or not args.rate > 0:
        parser.error("--seeds must be >= 1, --count >= 2 and --rate > 0")
    command = f"{parser.prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    return args, {"meta": {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                           "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}",
                           "command": command, "count": args.count, "rate": args.rate, "seeds": args.seeds},
                  "records": []}


def main(argv: list[str] | None = None) -> None:
    parser = trace_parser("crosscheck", __doc__.split("\n\n")[0], dated("crosscheck"))
    parser.add_argument("--resume", action="store_true", help="keep the runs in OUT/results.json made with the "
                        "same --count and --rate and make only the missing ones (more seeds, or after a failure)")
    args, results = trace_run(parser, argv)
    ensure_tokenizer()
    os.sched_setaffinity(0, CLIENT_CPUS)  # loadgen here, guidellm and HAProxy as its children
    work = Path(tempfile.mkdtemp(prefix="hpcserve-crosscheck-", dir="/tmp"))
    if args.resume and (args.out / "results.json").exists():
        previous = json.loads((args.out / "results.json").read_text())
        if (previous["meta"]["count"], previous["meta"]["rate"]) != (args.count, args.rate):
            parser.error(f"--resume: {args.out / 'results.json'} has --count {previous['meta']['count']} "
                         f"--rate {previous['meta']['rate']}, not {args.count} and {args.rate}")
        results["meta"]["resumed"] = [*previous["meta"].get("resumed", []), results["meta"]["started"]]
        results["meta"]["started"] = previous["meta"]["started"]
        results["records"] = [r for r in previous["records"] if r["seed"] <= args.seeds]
    done = {(r["seed"], r["system"], r["tool"]) for r in results["records"]}
    print(f"configs and logs: {work}", file=sys.stderr)
    for seed in range(1, args.seeds + 1):
        requests = trace(seed, args.count, args.rate)
        tools = TOOLS if seed % 2 else TOOLS[::-1]
        for system in SYSTEMS:
            for tool in tools:
                if (seed, system, tool) in done:
                    continue
                started = time.monotonic()
                figures = one_run(system, tool, requests, work / f"{seed}-{system}-{tool}", seed)
                results["records"].append({"seed": seed, "system": system, "tool": tool, **figures})
                print(f"[{time.strftime('%H:%M:%S')}] seed {seed} {system} {tool}: TTFT p50 {figures['ttft_p50']} s, "
                      f"ITL {figures['itl_mean']} s, {figures['completed']}/{figures['requests']} "
                      f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
                write_report(results, args.out)
    print(write_report(results, args.out))


if __name__ == "__main__":
    main()
