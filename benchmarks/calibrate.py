"""Calibrating the simulator: a real llama-server's batch-step timing, measured and fitted.

llama-server runs one batch step at a time (tools/server/server.cpp, update_slots): every slot that
is generating adds one token, prompts waiting for prefill fill the rest of the batch, and one
llama_decode runs it. So a slot's token rate falls as more slots generate, and a long prompt slows
the slots beside it. This module measures that on a real server and fits the model
hpcserve-llama-sim follows with --sim-profile (hpcserve.llama.simulator.BatchProfile):

    step seconds = decode_step_s[generating slots - 1]
                   + (prefill_base_s + prompt tokens / prefill_tokens_per_s when the step carries a prompt)

The decode steps are kept as measured, not fitted to a line: on the test model on 2 cores a step
with 3 generating slots took longer than one with 4 (ggml's kernels favour some batch sizes).

    python -m benchmarks calibrate [--parallel 4] [--out benchmarks/results/profile.json]

Measurements use llama-server's own `timings` of each answer (predicted_per_second: a slot's
tokens per second while generating; prompt_n and prompt_ms: its prefill), with prompts of distinct
random words so that its prompt cache does not skip the prefill.
"""

from __future__ import annotations

import concurrent.futures
import random
import statistics

import httpx

from benchmarks.workload import CHAT_TEMPLATE_TOKENS, text
from hpcserve.llama.simulator import BatchProfile


def _completion(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    response = client.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "ignore_eos": True, "cache_prompt": False})
    response.raise_for_status()
    return response.json()["timings"]


def measure_decode(url: str, key: str, slots: int, tokens: int = 96, repeats: int = 2,
                   seed: int = 1) -> dict[int, float]:
    """Seconds per token of a generating slot with 1..`slots` slots generating at once.

    Sends k concurrent chat completions of `tokens` tokens (short prompts) for each k, `repeats`
    times; a slot's step time is 1 / its predicted_per_second.

    Returns:
        {k: median seconds per token of a slot while k slots generate}.
    Raises:
        httpx.HTTPError: the server did not answer 200.
    """
    rng = random.Random(seed)
    steps: dict[int, float] = {}
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}) as client, \
            concurrent.futures.ThreadPoolExecutor(slots) as pool:
        for k in range(1, slots + 1):
            samples = []
            for _ in range(repeats):
                prompts = [text(8, rng) for _ in range(k)]
                timings = list(pool.map(lambda p: _completion(client, url, p, tokens), prompts))
                samples += [1.0 / t["predicted_per_second"] for t in timings]
            steps[k] = statistics.median(samples)
    return steps


def measure_prefill(url: str, key: str, lengths: tuple[int, ...] = (64, 256, 1024),
                    seed: int = 2) -> list[tuple[int, int, float]]:
    """Prefill seconds of chat completions with prompts of `lengths` tokens as the simulator counts
    them, one at a time.

    Returns:
        [(prompt tokens as the simulator counts them, as llama-server counted them (prompt_n),
        seconds (prompt_ms / 1000))].
    """
    rng = random.Random(seed)
    points = []
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}) as client:
        for n in lengths:
            timings = _completion(client, url, text(n, rng), 1)
            points.append((CHAT_TEMPLATE_TOKENS + n, int(timings["prompt_n"]), timings["prompt_ms"] / 1000))
    return points


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def fit(decode: dict[int, float], prefill: list[tuple[int, int, float]], n_batch: int = 2048,
        source: dict | None = None) -> BatchProfile:
    """The batch-step profile of the measurements (pure).

    Args:
        decode: {generating slots: seconds per token of one slot} for 1, 2, ... slots
            (measure_decode); a step with k generating slots lasts that long.
        prefill: [(prompt tokens as the simulator counts them, as llama-server counted them,
            prefill seconds)] (measure_prefill): one step of base + n / rate.
        n_batch: llama-server's --batch-size.
        source: recorded in the profile.
    Returns:
        decode_step_s as measured; prefill_base_s and prefill_tokens_per_s: intercept (clipped at
        0) and 1 / slope of the least-squares line of prefill seconds over the simulator's count of
        the prompt's tokens, so that the simulator takes the real server's time over the same text
        whatever the two count (the real counts are kept in `source`).
    Raises:
        ValueError: decode not measured for 1, 2, ... slots, fewer than two prefill points, or
            prefill that does not grow with the prompt.
    """
    if sorted(decode) != list(range(1, len(decode) + 1)) or len(prefill) < 2:
        raise ValueError(f"need decode steps for 1, 2, ... slots and two prefill points, got {sorted(decode)} "
                         f"and {len(prefill)}")
    base, per_token = _line([float(n) for n, _, _ in prefill], [s for _, _, s in prefill])
    if per_token <= 0:
        raise ValueError(f"prefill time does not grow with the prompt: {prefill}")
    return BatchProfile(decode_step_s=tuple(round(decode[k], 6) for k in sorted(decode)),
                        prefill_base_s=round(max(0.0, base), 6), prefill_tokens_per_s=round(1.0 / per_token, 1),
                        n_batch=n_batch, source={**(source or {}), "prefill_counted_real_s": [
                            [n, real, round(s, 6)] for n, real, s in prefill]})


def calibrate(url: str, key: str, slots: int, source: dict | None = None) -> BatchProfile:
    """Measure a running llama-server (base URL without /v1, started with --parallel >= `slots`)
    and fit its profile. About 10-30 s on the test model on 2 cores.

    Raises:
        httpx.HTTPError: the server did not answer 200.
        ValueError: the measurements do not fit the model (see fit).
    """
    decode = measure_decode(url, key, slots)
    prefill = measure_prefill(url, key)
    return fit(decode, prefill, source={**(source or {}), "slots": slots})
