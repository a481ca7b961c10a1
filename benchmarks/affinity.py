"""Prompt-cache affinity: TTFT of the later turns of multi-turn conversations, with and without.

Starts two real llama-servers (the real model, 2 slots each) and two HAProxy instances rendered
from hpcserve's template, one with affinity on the X-OpenWebUI-Chat-Id header (the default) and
one without. The same conversations (a long system prompt, then several short turns, each answer
appended to the history) run through each, several at once; it prints TTFT of the first and of
the later turns, the prompt tokens llama-server found in its cache, and the requests per server.

    .venv/bin/python -m benchmarks.affinity [--conversations 4] [--turns 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.common import MODEL, percentile, start_haproxy, start_llama_server
from hpcserve.haproxy import runtime

HEADER = "X-OpenWebUI-Chat-Id"
SYSTEM = ("You are an assistant for accountants. " + " ".join(
    f"Rule {i}: expenses of category {i % 7} with amounts above {i * 13} need a receipt and approval." for i in range(40)))


def turn(port: int, conversation: str, messages: list[dict]) -> tuple[float, int, str]:
    """One streamed turn: (TTFT s, prompt tokens served from cache, answer text)."""
    start = time.perf_counter()
    ttft, cached, text = None, 0, []
    body = {"model": "m", "messages": messages, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                      headers={HEADER: conversation}, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if content:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                text.append(content)
            cached = chunk.get("timings", {}).get("cache_n", cached)
    return (ttft if ttft is not None else time.perf_counter() - start), cached, "".join(text)


def conversation(port: int, name: str, turns: int) -> list[tuple[int, float, int]]:
    # The conversation's own name opens its prompt: no two conversations share a cached prefix.
    messages = [{"role": "system", "content": f"Conversation {name}. {SYSTEM}"}]
    results = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i + 1} of {name}: is a taxi of {i * 9} allowed?"})
        ttft, cached, answer = turn(port, name, messages)
        messages.append({"role": "assistant", "content": answer})
        results.append((i, ttft, cached))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=4, help="conversations at once (default 4)")
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation (default 5)")
    parser.add_argument("--model", type=Path, default=MODEL)
    args = parser.parse_args()

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for mode, settings in (("affinity", {"affinity_header": HEADER}), ("no affinity", {})):
            # Fresh servers for each mode: nothing cached by the other mode's run.
            servers = [start_llama_server(args.model, folder / f"llama-{mode[:2]}{i}.log", parallel=2, ctx=4096,
                                          threads=1) for i in range(2)]
            ports = [port for _, port in servers]
            try:
                proxy, port = start_haproxy(folder / mode.replace(" ", "-"), ports, parallel=2, **settings)
                try:
                    with ThreadPoolExecutor(args.conversations) as pool:
                        runs = list(pool.map(lambda c: conversation(port, f"{mode}-{c}", args.turns),
                                             range(args.conversations)))
                    per_server = {s.server: s.total for s in runtime.show_stat(proxy.paths.admin_socket)}
                finally:
                    proxy.stop(timeout=5)
            finally:
                for process, _ in servers:
                    process.terminate()
                    process.wait(10)
            firsts = [ttft for run in runs for i, ttft, _ in run if i == 0]
            laters = [ttft for run in runs for i, ttft, _ in run if i > 0]
            cached = [c for run in runs for i, _, c in run if i > 0]
            report[mode] = (statistics.median(firsts), statistics.median(laters), percentile(laters, 90),
                            statistics.mean(cached), per_server)
            print(f"{mode}: done", file=sys.stderr)

    print(f"{args.conversations} conversations at once x {args.turns} turns, system prompt of ~{len(SYSTEM) // 4} "
          "tokens, 2 real llama-servers (2 slots, 1 thread each)")
    print("| routing | TTFT turn 1 p50 ms | TTFT later turns p50 ms | p90 ms | cached prompt tokens, later turns | requests per server |")
    print("|---|---|---|---|---|---|")
    for mode, (first, later, later90, cached, per_server) in report.items():
        spread = ", ".join(f"{k} {v}" for k, v in sorted(per_server.items()))
        print(f"| {mode} | {first * 1000:.0f} | {later * 1000:.0f} | {later90 * 1000:.0f} | {cached:.0f} | {spread} |")


if __name__ == "__main__":
    main()
