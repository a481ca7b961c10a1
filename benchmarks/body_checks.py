"""What the request-body checks cost an ordinary chat: the time to the first token through
hpcserve's HAProxy with and without them (the patterns that refuse n, n_cmpl, id_slot, escaped
field names and cache_prompt in the raw body; docs/security.md).

    python -m benchmarks.body_checks [--requests 200] [--rounds 5] [--out DIR]   # about 2 minutes here

One simulated llama-server (4 slots, prefill at 1G tokens/s so that the server adds little) behind
two HAProxies rendered from hpcserve's template, one with the checks and one without
(start_haproxy(without=("body-checks",))). In each round, each HAProxy gets `requests` streamed chat
completions, one at a time, of three body sizes (1 KB, a typical chat turn; 64 KB, a long
conversation; 1 MB, a document), the two HAProxies alternating request by request so that both see
the same machine. TTFT is the time from sending the request to the first content chunk (seconds).
Writes body-checks.json (commit, versions, machine; per size and HAProxy the p50 and p99 of every
round) and prints the medians over rounds with their range.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

from benchmarks.common import KEY, dated, percentile, provenance, start_haproxy
from tests.conftest import simulator

SIZES = {"1 KB": 1 << 10, "64 KB": 64 << 10, "1 MB": 1 << 20}


def ttft(client: httpx.Client, url: str, body: bytes) -> float:
    started = time.perf_counter()
    with client.stream("POST", url, content=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status_code == 200, response.read()[:200]
        for line in response.iter_lines():
            if '"content":"' in line:
                return time.perf_counter() - started
    raise AssertionError("no content chunk")


@click.command()
@click.option("--requests", "count", type=click.IntRange(min=10), default=200, show_default=True,
              help="Requests per body size, HAProxy and round.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=dated("body-checks"), show_default=True)
def main(count: int, rounds: int, out: Path) -> None:
    """TTFT with and without the body checks (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hpcserve-body-checks-"))   # HAProxy's sockets need a short path
    click.echo(f"HAProxy and simulator files: {work}", err=True)
    results: dict[str, dict[str, list[dict]]] = {size: {"with": [], "without": []} for size in SIZES}
    with simulator(work / "sim.log", 4, 1000, KEY, prefill_rate=1e9) as port:
        proxies = {}
        try:
            for name, without in (("with", ()), ("without", ("body-checks",))):
                proxies[name] = start_haproxy(work / f"haproxy-{name}", [port], parallel=4, without=without,
                                              max_request_body=4 << 20)
            with httpx.Client(timeout=60) as client:
                for r in range(rounds):
                    for size, length in SIZES.items():
                        content = "w" * max(0, length - 120)
                        body = json.dumps({"model": "m", "max_tokens": 2, "stream": True,
                                           "messages": [{"role": "user", "content": content}]}).encode()
                        times: dict[str, list[float]] = {"with": [], "without": []}
                        for i in range(count):
                            order = ("with", "without") if (i + r) % 2 == 0 else ("without", "with")
                            for name in order:
                                url = f"http://127.0.0.1:{proxies[name][1]}/v1/chat/completions"
                                times[name].append(ttft(client, url, body))
                        for name, values in times.items():
                            results[size][name].append({"p50_ms": round(1000 * percentile(values, 50), 3),
                                                        "p99_ms": round(1000 * percentile(values, 99), 3)})
                        click.echo(f"round {r + 1} {size}: with p50 {results[size]['with'][-1]['p50_ms']} ms, "
                                   f"without {results[size]['without'][-1]['p50_ms']} ms", err=True)
        finally:
            for proxy, _ in proxies.values():
                proxy.stop(timeout=5)
    (out / "body-checks.json").write_text(json.dumps({"meta": {**provenance(), "requests": count, "rounds": rounds,
                                                               "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
                                                      "results": results}, indent=1) + "\n")
    click.echo(f"{'body':>6} {'p50 with ms':>22} {'p50 without ms':>22} {'p99 with ms':>22} {'p99 without ms':>22}")
    for size, by in results.items():
        cells = []
        for q in ("p50_ms", "p99_ms"):
            for name in ("with", "without"):
                v = [x[q] for x in by[name]]
                cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
        click.echo(f"{size:>6} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22} {cells[3]:>22}")
    click.echo(f"wrote {out / 'body-checks.json'}")


if __name__ == "__main__":
    sys.exit(main())
