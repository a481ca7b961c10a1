"""Calibrating the simulator: a real llama-server's batch-step timing, measured and fitted.

llama-server runs one batch step at a time (tools/server/server.cpp, update_slots): every slot that
is generating adds one token, prompts waiting for prefill fill the rest of the batch, and one
llama_decode runs it. So a slot's token rate falls as more slots generate, and a long prompt slows
the slots beside it. This module measures that on a real server and fits the model
hpcserve-llama-sim follows with --sim-profile (hpcserve.llama.simulator.BatchProfile):

    step seconds = decode_step_s[generating slots - 1]
                   + (prefill_base_s + prompt tokens / prefill_tokens_per_s when the step carries a prompt)

A prompt's prefill takes more than one step where the server saves context checkpoints before its
end (BatchProfile.checkpoint_offsets: two or three steps on the test model), each step with its
generating slots' tokens and its own prefill_base_s.

The decode steps are kept as measured, not fitted to a line: on the test model on 2 cores a step
with 3 generating slots took longer than one with 4 (ggml's kernels favour some batch sizes).

    python -m benchmarks calibrate [--parallel 4] [--out benchmarks/inputs/profile.json]

Measurements use llama-server's own `timings` of each answer (predicted_per_second: a slot's
tokens per second while generating; prompt_n and prompt_ms: its prefill), with prompts of distinct
random words so that its prompt cache does not skip the prefill.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
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


# Where llama-server (build 7e4c0a9, the one setup installs) ends a prefill step before a prompt's
# end for a model with sliding-window attention such as the test model gemma3: 4 + n_ubatch (512 by
# default) and 4 tokens (tools/server/server-context.cpp, `checkpoint_offsets`, llama.cpp PR #20288).
CHECKPOINT_OFFSETS = (4 + 512, 4)


def fit(decode: dict[int, float], prefill: list[tuple[int, int, float]], n_batch: int = 2048,
        checkpoint_offsets: tuple[int, ...] = (), source: dict | None = None) -> BatchProfile:
    """The batch-step profile of the measurements (pure).

    Args:
        decode: {generating slots: seconds per token of one slot} for 1, 2, ... slots
            (measure_decode); a step with k generating slots lasts that long.
        prefill: [(prompt tokens as the simulator counts them, as llama-server counted them,
            prefill seconds)] (measure_prefill).
        n_batch: llama-server's --batch-size.
        checkpoint_offsets: where the server ends a prefill step before a prompt's end
            (BatchProfile.checkpoint_offsets; CHECKPOINT_OFFSETS for the test model).
        source: recorded in the profile.
    Returns:
        decode_step_s as measured; prefill_base_s and prefill_tokens_per_s fitted by least
        squares to seconds = steps x prefill_base_s + tokens / prefill_tokens_per_s, with tokens
        as the simulator counts them and steps the number the profile cuts the prompt into
        (BatchProfile.prompt_steps), so that the simulator takes the real server's time over the
        same text whatever the two count (the real counts are kept in `source`). A negative base
        is taken as 0 and the rate refitted.
    Raises:
        ValueError: decode not measured for 1, 2, ... slots, fewer than two prompt lengths, or
            prefill that does not grow with the prompt.
    """
    if sorted(decode) != list(range(1, len(decode) + 1)) or len({n for n, _, _ in prefill}) < 2:
        raise ValueError(f"need decode steps for 1, 2, ... slots and two prompt lengths, got {sorted(decode)} "
                         f"and {sorted({n for n, _, _ in prefill})}")
    shape = BatchProfile(decode_step_s=(1.0,), prefill_base_s=0.0, prefill_tokens_per_s=1.0, n_batch=n_batch,
                         checkpoint_offsets=checkpoint_offsets)
    steps = [float(len(shape.prompt_steps(n))) for n, _, _ in prefill]
    tokens = [float(n) for n, _, _ in prefill]
    seconds = [s for _, _, s in prefill]
    cc, ct, tt = (sum(a * b for a, b in zip(x, y)) for x, y in ((steps, steps), (steps, tokens), (tokens, tokens)))
    cs, ts = sum(c * s for c, s in zip(steps, seconds)), sum(t * s for t, s in zip(tokens, seconds))
    det = cc * tt - ct * ct
    base, per_token = ((tt * cs - ct * ts) / det, (cc * ts - ct * cs) / det) if det else (0.0, ts / tt)
    if base < 0:
        base, per_token = 0.0, ts / tt
    if per_token <= 0:
        raise ValueError(f"prefill time does not grow with the prompt: {prefill}")
    return BatchProfile(decode_step_s=tuple(round(decode[k], 6) for k in sorted(decode)),
                        prefill_base_s=round(base, 6), prefill_tokens_per_s=round(1.0 / per_token, 1),
                        n_batch=n_batch, checkpoint_offsets=tuple(checkpoint_offsets),
                        source={**(source or {}), "prefill_counted_real_s": [
                            [n, real, round(s, 6)] for n, real, s in prefill]})


@dataclasses.dataclass(frozen=True)
class Measurements:
    """One calibration's raw figures, before fitting.

    Attributes:
        decode: {generating slots: seconds per token of one slot} (measure_decode).
        prefill: [(prompt tokens as the simulator counts them, as llama-server counted them,
            prefill seconds)] (measure_prefill).
    """

    decode: dict[int, float]
    prefill: list[tuple[int, int, float]]


def measure(url: str, key: str, slots: int, tokens: int = 96) -> Measurements:
    """The decode steps for 1..`slots` generating slots (answers of `tokens` tokens) and the prefill
    points of a running llama-server (base URL without /v1). About 10-30 s on the test model on 2
    cores with 96 tokens.

    Raises:
        httpx.HTTPError: the server did not answer 200.
    """
    return Measurements(measure_decode(url, key, slots, tokens), measure_prefill(url, key))


def speed_change(before: Measurements, after: Measurements) -> float:
    """How much the machine's speed changed between two calibrations of one server (pure): the
    larger of |after / before - 1| of the summed decode steps and of the summed prefill seconds.
    A VM shared with other tenants drifts: the one-slot step of the test model measured 12 ms and
    19 ms an hour apart on 2026-11-23.

    Raises:
        ValueError: the two measured different slot counts or prompt lengths.
    """
    if sorted(before.decode) != sorted(after.decode) or [n for n, _, _ in before.prefill] != [n for n, _, _ in after.prefill]:
        raise ValueError("the two calibrations measured different slots or prompts")
    decode = sum(after.decode.values()) / sum(before.decode.values())
    prefill = sum(s for _, _, s in after.prefill) / sum(s for _, _, s in before.prefill)
    return max(abs(decode - 1), abs(prefill - 1))


def pooled(measurements: list[Measurements]) -> Measurements:
    """Several calibrations of one server as one (pure): each decode step the mean of theirs, every
    prefill point kept (fit draws its line through all).

    Raises:
        ValueError: no measurements, or they measured different slot counts.
    """
    if not measurements or any(sorted(m.decode) != sorted(measurements[0].decode) for m in measurements):
        raise ValueError("need one or more calibrations of the same slots")
    return Measurements({k: statistics.fmean(m.decode[k] for m in measurements) for k in measurements[0].decode},
                        [point for m in measurements for point in m.prefill])


def fitted(measured: Measurements, slots: int, source: dict | None = None) -> BatchProfile:
    """The profile of a calibration of the test model's llama-server (pure): fit with its checkpoint
    offsets (CHECKPOINT_OFFSETS), `slots` recorded in the source.

    Raises:
        ValueError: the measurements do not fit the model (see fit).
    """
    return fit(measured.decode, measured.prefill, checkpoint_offsets=CHECKPOINT_OFFSETS,
               source={**(source or {}), "slots": slots})


def calibrate(url: str, key: str, slots: int, source: dict | None = None) -> BatchProfile:
    """Measure a running llama-server (base URL without /v1, started with --parallel >= `slots`)
    and fit its profile. About 10-30 s on the test model on 2 cores.

    Raises:
        httpx.HTTPError: the server did not answer 200.
        ValueError: the measurements do not fit the model (see fit).
    """
    return fitted(measure(url, key, slots), slots, source)
