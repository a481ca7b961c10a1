"""An open-loop load generator: sends a workload's requests at their arrival times, whatever the
answers do, and records for each what a client saw.

Open loop (arrivals do not wait for answers) is what a pool meets when many researchers and batch
jobs share it; a closed loop would slow its own arrivals down exactly when a balancer is bad.
aiohttp is used for the client: on 2 cores it parses server-sent events several times faster than
httpx, so the client is not what is measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import aiohttp

from benchmarks.workload import Request


@dataclasses.dataclass
class Outcome:
    """What the client saw of one request (times in seconds from the start of the run).

    Attributes:
        sent: when it was sent.
        scheduled: when the workload said to send it (open loop); `sent` - `scheduled` is the
            client's lateness, which a valid run keeps small (metrics.summarize).
        status: HTTP status, 0 when no response came.
        ttft: seconds from the scheduled send (open loop; the actual send in a closed loop) to the
            first content token, None when none came: a client that sends late does not hide the
            delay from the figure.
        ended: when the answer ended (or failed).
        tokens: content tokens received.
        gaps: seconds between consecutive content tokens.
        error: "" for a complete answer, else its kind: http_<status>, connect, broken_stream,
            unfinished (still running when the run's deadline came).
        url: where it was sent.
    """

    sent: float
    scheduled: float = 0.0
    status: int = 0
    ttft: float | None = None
    ended: float = 0.0
    tokens: int = 0
    gaps: list[float] = dataclasses.field(default_factory=list)
    error: str = "unfinished"
    url: str = ""


async def _one(session: aiohttp.ClientSession, url: str, model: str, request: Request, start: float,
               headers: dict[str, str], outcome: Outcome, open_loop: bool = True) -> None:
    await asyncio.sleep(max(0.0, start + request.at - time.perf_counter()))
    now = time.perf_counter()
    outcome.sent = now - start
    outcome.scheduled = request.at if open_loop else outcome.sent
    outcome.url = url
    body = {"model": model, "messages": [{"role": "user", "content": request.prompt}],
            "max_tokens": request.max_tokens, "ignore_eos": True, "stream": True}
    t0 = start + outcome.scheduled
    last = None
    done = False
    try:
        async with session.post(f"{url}/chat/completions", json=body, headers=headers) as response:
            outcome.status = response.status
            if response.status != 200:
                await response.read()
                outcome.error = f"http_{response.status}"
                return
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        outcome.ttft = now - t0
                    else:
                        outcome.gaps.append(now - last)
                    last = now
                    outcome.tokens += 1
        outcome.error = "" if done else "broken_stream"
    except aiohttp.ClientError:  # refused, reset, or a chunked body cut short
        outcome.error = "broken_stream" if outcome.status == 200 else "connect"
    except ValueError:  # an event that is not JSON: the stream is not what llama-server sends
        outcome.error = "broken_stream"
    finally:
        outcome.ended = time.perf_counter() - start


async def _run(urls: list[str], model: str, requests: list[Request], headers: dict[str, str],
               deadline: float, progress) -> list[Outcome]:
    outcomes = [Outcome(sent=r.at, scheduled=r.at) for r in requests]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tasks = [asyncio.create_task(_one(session, urls[i % len(urls)], model, r, start, headers, o))
                 for i, (r, o) in enumerate(zip(requests, outcomes))]
        pending = set(tasks)
        end = start + deadline
        while pending and time.perf_counter() < end:
            _, pending = await asyncio.wait(pending, timeout=min(1.0, max(0.01, end - time.perf_counter())))
            if progress:
                progress(len(tasks) - len(pending), len(tasks))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return outcomes


def run(urls: list[str], model: str, requests: list[Request], deadline: float,
        headers: dict[str, str] | None = None, progress=None) -> list[Outcome]:
    """Send `requests` (streamed chat completions) at their arrival times and wait for the answers.

    Args:
        urls: OpenAI base URLs (ending in /v1); request i goes to urls[i % len(urls)] (one URL for a
            balancer, every backend for the no-balancer reference).
        model: the model field of each request.
        requests: the workload.
        deadline: seconds after the start when requests still running are abandoned ("unfinished").
        headers: extra headers (the backend key, for direct access).
        progress: called with (finished, total) about once a second.
    Returns:
        one Outcome per request, in the workload's order.
    """
    return asyncio.run(_run(urls, model, requests, headers or {}, deadline, progress))


async def _closed(urls: list[str], model: str, clients: int, tokens: tuple[int, int], until, seed: int,
                  headers: dict[str, str], conversation_header: str | None) -> list[Outcome]:
    import random
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:
        start = time.perf_counter()

        async def client(i: int) -> None:
            while not until():
                outcome = Outcome(sent=0.0)
                outcomes.append(outcome)
                request = Request(at=0.0, max_tokens=rng.randint(*tokens))
                own = {**headers, conversation_header: f"conversation-{i}"} if conversation_header else headers
                await _one(session, urls[i % len(urls)], model, request, start, own, outcome,
                           open_loop=False)
        await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes


def run_closed(urls: list[str], model: str, clients: int, tokens: tuple[int, int], until,
               seed: int = 1, headers: dict[str, str] | None = None,
               conversation_header: str | None = None) -> list[Outcome]:
    """`clients` concurrent clients, each sending streamed chat completions one after another
    (answers of tokens[0]..tokens[1] tokens) until `until()` is true; every request started is
    awaited to its end. With `conversation_header`, client i sends it with the value
    "conversation-i" (one conversation per client, as OpenWebUI's chat id).

    Returns:
        one Outcome per request sent.
    """
    return asyncio.run(_closed(urls, model, clients, tokens, until, seed, headers or {}, conversation_header))
