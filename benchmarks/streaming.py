"""Streaming fidelity: do tokens reach the client through hpcserve's HAProxy as they would directly?

Starts one real llama-server (the real model) and two HAProxy instances rendered from hpcserve's
own template (as generated, and the same without `option http-no-delay`), then sends the same
streamed chat completions directly and through each, and prints time to first token (TTFT) and
inter-token gaps (ITL) as percentiles and as ratios to the direct connection.

    .venv/bin/python -m benchmarks.streaming [--requests 20] [--tokens 64]

No Slurm needed. Figures depend on the machine; compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import KEY, MODEL, percentile, start_haproxy, start_llama_server


def measure(port: int, tokens: int, key: str | None) -> tuple[float, list[float]]:
    """One streamed request: (TTFT in s, inter-token gaps in s)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "m", "messages": [{"role": "user", "content": "Write a long story about a cluster."}],
            "max_tokens": tokens, "stream": True}
    start = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers,
                      timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line:
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise SystemExit("no token arrived")
    return arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="streamed requests per path (default 20)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--model", type=Path, default=MODEL)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server, backend = start_llama_server(args.model, folder / "llama-server.log")
        proxies = []
        try:
            tuned, tuned_port = start_haproxy(folder / "tuned", [backend], no_delay=True)
            proxies.append(tuned)
            plain, plain_port = start_haproxy(folder / "plain", [backend], no_delay=False)
            proxies.append(plain)
            paths = {"direct": (backend, KEY), "hpcserve HAProxy": (tuned_port, None),
                     "same without http-no-delay": (plain_port, None)}
            results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in paths}
            measure(backend, 8, KEY)  # warm up
            for i in range(args.requests):  # interleaved, so drift in machine load hits every path alike
                for name, (port, key) in paths.items():
                    ttft, gaps = measure(port, args.tokens, key)
                    results[name][0].append(ttft)
                    results[name][1].extend(gaps)
                print(f"\rrequest {i + 1}/{args.requests}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
        finally:
            for proxy in proxies:
                proxy.stop(timeout=5)
            server.terminate()
            server.wait(10)

    direct_itl = statistics.median(results["direct"][1])
    direct_ttft = statistics.median(results["direct"][0])
    print(f"{args.requests} streamed chat completions of {args.tokens} tokens per path, real llama-server, "
          f"{os.cpu_count()} CPUs")
    print("| path | TTFT p50 ms | ITL p50 ms | ITL p99 ms | ITL max ms | TTFT p50 / direct | ITL p50 / direct |")
    print("|---|---|---|---|---|---|---|")
    for name, (ttfts, gaps) in results.items():
        print(f"| {name} | {statistics.median(ttfts) * 1000:.1f} | {statistics.median(gaps) * 1000:.1f} | "
              f"{percentile(gaps, 99) * 1000:.1f} | {max(gaps) * 1000:.1f} | "
              f"{statistics.median(ttfts) / direct_ttft:.2f} | {statistics.median(gaps) / direct_itl:.2f} |")


if __name__ == "__main__":
    main()
