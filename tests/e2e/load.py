"""A bounded load generator for the serving tests: N concurrent clients, each sending OpenAI chat
completions one after another until told to stop, recording how every request ended."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time

import httpx


@dataclasses.dataclass
class Result:
    """How one request ended.

    Attributes:
        started, ended: time.monotonic() seconds.
        status: the HTTP status, 0 when no response came (connection error).
        done: a stream ended with "data: [DONE]" (or a non-streamed answer parsed).
        tokens: content chunks received.
        error: what went wrong, "" when nothing did.
        body: the body of a non-200 answer (parsed JSON when possible).
        retry_after: the Retry-After header of a non-200 answer.
    """

    started: float
    ended: float = 0.0
    status: int = 0
    done: bool = False
    tokens: int = 0
    error: str = ""
    body: object = None
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error


async def one_request(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, stream: bool,
                      headers: dict[str, str] | None = None) -> Result:
    result = Result(started=time.monotonic())
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about clusters."}],
            "max_tokens": max_tokens, "stream": stream}
    try:
        async with client.stream("POST", f"{url}/chat/completions", json=body, headers=headers) as response:
            result.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.retry_after = response.headers.get("retry-after")
                try:
                    result.body = json.loads(text)
                except ValueError:
                    result.body = text
            elif stream:
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        result.done = True
                    elif line.startswith("data: "):
                        result.tokens += 1
            else:
                json.loads(await response.aread())
                result.done = True
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.ended = time.monotonic()
    return result


class Load:
    """`clients` concurrent clients against `url` in a background thread, until stop().

    Args:
        url: the OpenAI base URL (…/v1).
        model: the model id.
        clients: concurrent clients; each sends its next request when the last one ended.
        max_tokens: (low, high): each request asks for a random number in this range.
        stream: streamed chat completions (SSE) or plain ones.
        duration: stop by itself after this many seconds (a bound on every test's traffic).
        conversation_header: a header each client sends with its own value ("conversation-N"),
            as OpenWebUI sends its chat id: the key of hpcserve's opt-in prompt-cache affinity.
        api_key: the frontend API key every request presents (Bearer), or None.
    """

    def __init__(self, url: str, model: str, clients: int, max_tokens: tuple[int, int] = (10, 30),
                 stream: bool = True, duration: float = 300.0, conversation_header: str | None = None,
                 api_key: str | None = None):
        self.url, self.model, self.clients = url, model, clients
        self.api_key = api_key
        self.max_tokens, self.stream, self.duration = max_tokens, stream, duration
        self.conversation_header = conversation_header
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def join(self) -> list[Result]:
        """Wait for the run to end by its duration; return every result."""
        self._thread.join(timeout=self.duration + 600)
        assert not self._thread.is_alive(), "load did not end"
        return self.results

    def stop(self) -> list[Result]:
        """Stop sending; wait for the requests in flight to end; return every result."""
        self._stop.set()
        self._thread.join(timeout=600)
        assert not self._thread.is_alive(), "load did not stop"
        return self.results

    async def _main(self) -> None:
        deadline = time.monotonic() + self.duration
        limits = httpx.Limits(max_connections=self.clients + 10, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits, trust_env=False) as client:
            async def worker(n: int) -> None:
                headers = {self.conversation_header: f"conversation-{n}"} if self.conversation_header else {}
                if self.api_key:
                    headers["Authorization"] = f"Bearer {self.api_key}"
                while not self._stop.is_set() and time.monotonic() < deadline:
                    self.results.append(await one_request(client, self.url, self.model,
                                                          random.randint(*self.max_tokens), self.stream, headers))
            await asyncio.gather(*(worker(n) for n in range(self.clients)))
