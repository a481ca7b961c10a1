"""Workloads for the comparison benchmarks: when each request arrives and how long its answer is.

Pure and seeded: the same arguments give the same requests, so every system in a run, and the
discrete-event models (benchmarks/policies.py), see exactly the same load. Common random numbers:
one seed is one sequence of answer lengths and of arrival gaps at rate 1, which each load level
scales in time (poisson), so that a higher load is the same trace, faster.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcserve.llama.simulator import BatchProfile

# The simulator counts a chat completion's prompt as 20 tokens of chat template plus the text's
# (hpcserve/llama/simulator.py, _chat: prompt_tokens=20 + _count(text)).
CHAT_TEMPLATE_TOKENS = 20


# Common English words for prompts of distinct text.
WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government "
         "number night point home water room mother area money story fact month lot right study book eye "
         "job word business issue side kind head house service friend father power hour game line end "
         "member law car city community name president team minute idea kid body information back parent "
         "face others level office door health person art war history party result change morning reason "
         "research girl guy moment air teacher force education").split()


def text(tokens: int, rng: random.Random) -> str:
    """`tokens` tokens of random words as the simulator counts them (4 characters a token)."""
    words: list[str] = []
    length = 0
    while length <= 4 * tokens:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    return " ".join(words)[: 4 * tokens]


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of a workload.

    Attributes:
        at: seconds after the start of the run when it is sent.
        max_tokens: tokens the answer has (the simulator and `ignore_eos` produce exactly this many).
        prompt_tokens: the prompt text's length in tokens (the simulator counts 4 characters a
            token, plus CHAT_TEMPLATE_TOKENS for a chat completion: counted_prompt_tokens).
    """

    at: float
    max_tokens: int
    prompt_tokens: int = 8

    @property
    def counted_prompt_tokens(self) -> int:
        """Prompt tokens the backend prefills for this chat completion."""
        return self.prompt_tokens + CHAT_TEMPLATE_TOKENS

    @functools.cached_property
    def prompt(self) -> str:
        """A prompt of `prompt_tokens` tokens as the simulator counts them, random words seeded by
        the request: no two requests share a prefix that a real llama-server's prompt cache could
        skip. Made once per request (a long one takes milliseconds: read it before a run starts,
        so the client does not make it at the send time)."""
        return text(self.prompt_tokens, random.Random(f"{self.at}/{self.max_tokens}/{self.prompt_tokens}"))


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend of the pool as the models (benchmarks/policies.py) and the simulator see it.

    Attributes:
        slots: concurrent requests it serves (llama-server --parallel).
        token_rate: tokens per second per slot while decoding; for a backend with a `profile`, the
            rate of a slot in a full batch (1 / profile.step_seconds(slots, 0)), a nominal figure.
        prefill_rate: prompt tokens per second (ignored with a `profile`).
        profile: None for independent slots at fixed rates (the simulator's default timing), or
            the batch-step profile the backend follows (hpcserve-llama-sim --sim-profile: busy
            slots share each step, a prompt's prefill stalls the slots beside it).
    """

    slots: int
    token_rate: float
    prefill_rate: float = 2000.0
    profile: BatchProfile | None = None

    @classmethod
    def batch(cls, slots: int, profile: BatchProfile) -> "Backend":
        """A backend of `slots` slots following `profile`."""
        return cls(slots, 1.0 / profile.step_seconds(slots, 0), profile=profile)

    def service_time(self, request: Request) -> float:
        """Seconds a slot is busy with `request`: prefill, then one token every 1/token_rate s
        (with a profile: its prefill alone, then a full batch's steps, a nominal figure)."""
        if self.profile:
            return self.profile.prefill_seconds(request.counted_prompt_tokens) + request.max_tokens / self.token_rate
        return request.counted_prompt_tokens / self.prefill_rate + request.max_tokens / self.token_rate

    def first_token(self, request: Request) -> float:
        """Seconds from the start of service to the first token (fixed-rate backends)."""
        return request.counted_prompt_tokens / self.prefill_rate + 1.0 / self.token_rate

    def capacity(self, mean_tokens: float, prompt_tokens: int = 8) -> float:
        """Requests per second it completes when every slot is busy, answers of `mean_tokens`
        tokens: slots / mean service time for fixed-rate slots; with a profile, one request's share
        of full-batch steps plus its prefill, which the whole batch waits for
        (1 / (prefill_seconds + mean_tokens * step_seconds(slots, 0) / slots))."""
        counted = Request(0.0, 1, prompt_tokens).counted_prompt_tokens
        if self.profile:
            return 1.0 / (self.profile.prefill_seconds(counted)
                          + mean_tokens * self.profile.step_seconds(self.slots, 0) / self.slots)
        return self.slots / (counted / self.prefill_rate + mean_tokens / self.token_rate)


def heavy_tailed_tokens(rng: random.Random, median: float = 16.0, sigma: float = 1.0,
                        low: int = 2, high: int = 128) -> int:
    """An answer length from a log-normal distribution clipped to [low, high] tokens: most answers
    are short, a few are ten times the median (chat answers are heavy-tailed like this)."""
    return int(min(high, max(low, round(rng.lognormvariate(0.0, sigma) * median))))


def capacity(backends: list[Backend], mean_tokens: float, prompt_tokens: int = 8) -> float:
    """Requests per second the pool completes when every slot is busy (Backend.capacity summed)."""
    return sum(b.capacity(mean_tokens, prompt_tokens) for b in backends)


def poisson(rate: float, duration: float, seed: int, tokens=heavy_tailed_tokens) -> list[Request]:
    """Poisson arrivals at `rate` requests/s for `duration` seconds, answer lengths from `tokens`.

    The seed's trace at rate 1 scaled by 1/rate: poisson(2r, d, s) is poisson(r, 2d, s) at twice
    the speed, the same requests in the same order (common random numbers across load levels).

    Raises:
        ValueError: rate or duration is not positive.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate} and {duration}")
    gaps, lengths = random.Random(seed), random.Random(seed + 1_000_003)
    requests, unit = [], gaps.expovariate(1.0)
    while unit / rate < duration:
        requests.append(Request(at=unit / rate, max_tokens=tokens(lengths)))
        unit += gaps.expovariate(1.0)
    return requests


def mean_tokens(seed: int = 0, samples: int = 20000) -> float:
    """The mean of heavy_tailed_tokens (clipped), estimated from a fixed sample."""
    rng = random.Random(seed)
    return sum(heavy_tailed_tokens(rng) for _ in range(samples)) / samples


def prefill_heavy(rate: float, duration: float, seed: int, prompt: tuple[int, int] = (1024, 32768),
                  answer: tuple[int, int] = (16, 64)) -> list[Request]:
    """Poisson arrivals at `rate` requests/s for `duration` s of long prompts with short answers
    (documents to summarise or classify): each prompt `prompt[0]`..`prompt[1]` counted tokens,
    log-uniform (as many 1-2k as 16-32k prompts), each answer uniform in `answer` tokens. The
    arrival times are poisson()'s for the same seed (common random numbers across load levels).

    Raises:
        ValueError: rate or duration is not positive, or a range is empty or below the chat
            template's tokens.
    """
    if not (CHAT_TEMPLATE_TOKENS < prompt[0] <= prompt[1]) or not (0 < answer[0] <= answer[1]):
        raise ValueError(f"prompt and answer ranges must be low <= high (prompt above "
                         f"{CHAT_TEMPLATE_TOKENS} tokens), got {prompt} and {answer}")
    sizes = random.Random(seed + 2_000_003)
    return [dataclasses.replace(r, max_tokens=sizes.randint(*answer),
                                prompt_tokens=round(math.exp(sizes.uniform(math.log(prompt[0]), math.log(prompt[1]))))
                                - CHAT_TEMPLATE_TOKENS)
            for r in poisson(rate, duration, seed)]
