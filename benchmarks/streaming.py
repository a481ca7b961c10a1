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
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from hpcserve import config
from hpcserve.haproxy import config as haproxy_config
from hpcserve.haproxy.process import HAProxy

ROOT = Path(__file__).resolve().parent.parent
KEY = "benchmark-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(model: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [str(Path(sys.executable).parent / "llama-server-vulkan"), "--model", str(model), "--alias", "m",
            "--host", "127.0.0.1", "--port", str(port), "--parallel", "1", "--ctx-size", "1024"]
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "LLAMA_API_KEY": KEY})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process, port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"llama-server did not start; see {log}")


def start_haproxy(folder: Path, backend_port: int, no_delay: bool) -> tuple[HAProxy, int]:
    port = free_port()
    deployment = config.parse({"name": "bench", "state_dir": str(folder),
                               "models": [{"name": "m", "gguf": str(folder / "unused.gguf"), "parallel": 1}],
                               "haproxy": {"port": port, "stats_port": free_port()}},
                              base=folder, check_files=False)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    text = haproxy_config.render(deployment, [haproxy_config.Server("m", "1", "127.0.0.1", backend_port)])
    if not no_delay:
        text = re.sub(r"^\s*option http-no-delay\n", "", text, flags=re.MULTILINE)
    proxy = HAProxy(deployment, KEY)
    proxy.apply(text)
    deadline = time.monotonic() + 30
    while "UP" not in httpx.get(f"http://127.0.0.1:{deployment.haproxy.stats_port}/stats;csv").text:
        if time.monotonic() > deadline:
            raise SystemExit("HAProxy did not mark llama-server UP")
        time.sleep(0.2)
    return proxy, port


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


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="streamed requests per path (default 20)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--model", type=Path, default=ROOT / ".cache/models/gemma3-270m-q4_k_m.gguf")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server, backend = start_llama_server(args.model, folder / "llama-server.log")
        proxies = []
        try:
            tuned, tuned_port = start_haproxy(folder / "tuned", backend, no_delay=True)
            proxies.append(tuned)
            plain, plain_port = start_haproxy(folder / "plain", backend, no_delay=False)
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
