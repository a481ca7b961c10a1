"""Workloads for the comparison benchmarks: when each request arrives and how long its answer is.

Pure and seeded: the same arguments give the same requests, so every system in a run, and the
discrete-event reference (benchmarks/reference.py), see exactly the same load.
"""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of a workload.

    Attributes:
        at: seconds after the start of the run when it is sent.
        max_tokens: tokens the answer has (the simulator and `ignore_eos` produce exactly this many).
        prompt_tokens: the prompt's length in tokens (the simulator counts 4 characters a token).
    """

    at: float
    max_tokens: int
    prompt_tokens: int = 8

    @property
    def prompt(self) -> str:
        """A prompt of `prompt_tokens` tokens as the simulator counts them."""
        return ("word " * self.prompt_tokens)[: 4 * self.prompt_tokens]


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend of the pool as the reference model sees it.

    Attributes:
        slots: concurrent requests it serves (llama-server --parallel).
        token_rate: tokens per second per slot while decoding.
        prefill_rate: prompt tokens per second.
    """

    slots: int
    token_rate: float
    prefill_rate: float = 2000.0

    def service_time(self, request: Request) -> float:
        """Seconds a slot is busy with `request`: prefill, then one token every 1/token_rate s."""
        return request.prompt_tokens / self.prefill_rate + request.max_tokens / self.token_rate

    def first_token(self, request: Request) -> float:
        """Seconds from the start of service to the first token."""
        return request.prompt_tokens / self.prefill_rate + 1.0 / self.token_rate


def heavy_tailed_tokens(rng: random.Random, median: float = 16.0, sigma: float = 1.0,
                        low: int = 2, high: int = 128) -> int:
    """An answer length from a log-normal distribution clipped to [low, high] tokens: most answers
    are short, a few are ten times the median (chat answers are heavy-tailed like this)."""
    return int(min(high, max(low, round(rng.lognormvariate(0.0, sigma) * median))))


def capacity(backends: list[Backend], mean_tokens: float, prompt_tokens: int = 8) -> float:
    """Requests per second the pool completes when every slot is busy: sum over slots of
    1 / mean service time."""
    probe = Request(0.0, 1, prompt_tokens)
    return sum(b.slots / (probe.prompt_tokens / b.prefill_rate + mean_tokens / b.token_rate) for b in backends)


def poisson(rate: float, duration: float, seed: int, tokens=heavy_tailed_tokens) -> list[Request]:
    """Poisson arrivals at `rate` requests/s for `duration` seconds, answer lengths from `tokens`.

    Raises:
        ValueError: rate or duration is not positive.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate} and {duration}")
    rng = random.Random(seed)
    requests, t = [], rng.expovariate(rate)
    while t < duration:
        requests.append(Request(at=t, max_tokens=tokens(rng)))
        t += rng.expovariate(rate)
    return requests


def mean_tokens(seed: int = 0, samples: int = 20000) -> float:
    """The mean of heavy_tailed_tokens (clipped), estimated from a fixed sample."""
    rng = random.Random(seed)
    return sum(heavy_tailed_tokens(rng) for _ in range(samples)) / samples
