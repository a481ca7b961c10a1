"""A person's chats beside a batch flood: time to first token with and without priority classes.

Two simulated llama-servers of 8 slots (16 in all, 10 tokens at 20 tokens/s per slot: a request
holds a slot 0.5 s) behind hpcserve's HAProxy with API keys. A person sends a streamed chat every
0.5 s (open loop, 20 chats); meanwhile 300 batch clients each keep one request in flight (the
queue holds about 284). Three cases: no flood; a flood from a key of class interactive (no
priority: FIFO); a flood from a key of class batch (hpcserve's priority offset). Each case runs
--repeats times (interleaved); printed: the chats' TTFT p50 and p99 (median over repeats, with
the range), and the batch requests answered per second while the chats ran (16 slots of 0.5 s
allow 32). Figures, not assertions.

    .venv/bin/python -m benchmarks.priority [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import dated, percentile, start_haproxy
from benchmarks.systems import port_of, start_simulators
from benchmarks.workload import Backend
from hpcserve.access.keys import KeyRegistry

BODY = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}


async def run_case(url: str, person: str, batch: str | None, chats: int, flood: int) -> dict:
    """TTFTs (s) of `chats` streamed chats sent every 0.5 s, with `flood` batch clients running."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=flood + chats + 10)) as client:
        done = asyncio.Event()
        finished = 0

        async def batch_client():
            nonlocal finished
            while not done.is_set():
                r = await client.post(url, json=BODY, headers={"Authorization": f"Bearer {batch}"})
                finished += r.status_code == 200

        async def chat() -> float:
            started = time.perf_counter()
            async with client.stream("POST", url, json={**BODY, "stream": True},
                                     headers={"Authorization": f"Bearer {person}"}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and '"content"' in line:
                        return time.perf_counter() - started
            raise RuntimeError(f"no token in the answer ({response.status_code})")

        workers = [asyncio.create_task(batch_client()) for _ in range(flood if batch else 0)]
        if workers:
            await asyncio.sleep(3)   # the queue fills
        began, finished_before = time.perf_counter(), finished
        tasks = []
        for _ in range(chats):
            tasks.append(asyncio.create_task(chat()))
            await asyncio.sleep(0.5)
        ttft = await asyncio.gather(*tasks)
        elapsed, batch_done = time.perf_counter() - began, finished - finished_before
        done.set()
        await asyncio.gather(*workers)
        return {"ttft": ttft, "batch_per_s": batch_done / elapsed if workers else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chats", type=int, default=20)
    parser.add_argument("--flood", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sims = start_simulators([Backend(8, 20.0, prefill_rate=1e6)] * 2, folder / "sims")
        proxy, port = start_haproxy(folder / "haproxy", [port_of(s.urls[0]) for s in sims], parallel=8,
                                    auth="keys", batch_delay=30, timeout_queue=120, max_requests_per_client=1000)
        try:
            registry = KeyRegistry(proxy.deployment)
            person = registry.add("person")[1]
            as_interactive = registry.add("flood-interactive", max_concurrent=1000)[1]
            as_batch = registry.add("flood-batch", "batch", max_concurrent=1000)[1]
            proxy.sync_keys()
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            cases = {"no flood": None, "flood, no priority": as_interactive, "flood, batch class": as_batch}
            results: dict[str, list[dict]] = {name: [] for name in cases}
            for _ in range(args.repeats):
                for name, flood_key in cases.items():
                    results[name].append(asyncio.run(run_case(url, person, flood_key, args.chats, args.flood)))
        finally:
            proxy.stop(timeout=5)
            for sim in sims:
                sim.stop()
    print(f"{args.chats} chats (one every 0.5 s) beside {args.flood} batch clients, 16 slots of 0.5 s; "
          f"median over {args.repeats} runs [min-max]")
    print(f"{'case':<22} {'TTFT p50 (s)':>22} {'TTFT p99 (s)':>22} {'batch req/s':>12}")
    report = {}
    for name, runs in results.items():
        p50 = [percentile(r["ttft"], 50) for r in runs]
        p99 = [percentile(r["ttft"], 99) for r in runs]
        rate = [r["batch_per_s"] for r in runs]
        report[name] = {"ttft_p50": p50, "ttft_p99": p99, "batch_per_s": rate}
        print(f"{name:<22} {_cell(p50):>22} {_cell(p99):>22} {statistics.median(rate):>12.1f}")
    out = dated("priority.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"(written to {out})")


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


if __name__ == "__main__":
    main()
