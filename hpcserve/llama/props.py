"""Whether a ready llama-server may enter rotation: what its `GET /props` says against the deployment.

Pure, no I/O (llama.probe reads /props and passes the answers in). HAProxy's maxconn per server is
the model's `parallel`, and the pool's exactness (no request waits inside llama-server, where
HAProxy's queue, its priorities and its timeout cannot see it) holds only if the server really has
that many slots; a server that answers without the backend key can be used by every user of its
node. Both are facts of the running server, whatever its build, its defaults (llama.cpp has changed
the number of slots it starts without `-np`) or a site's wrapper did to the command line, so they
are read from the server itself before it serves.

Source of the fields: llama.cpp tools/server README, GET /props ("total_slots",
"default_generation_settings.n_ctx": the context of one slot, "build_info"); measured on b11434:
`-c 1024 -np 2` gives n_ctx 512, and `-c 1000 -np 3` gives 512 (llama-server rounds the context up
so that each slot gets a multiple of its padding), so a slot's context is at least
context_size // parallel, never less unless something shrank it. Both captured builds (b10434,
b11434) answer /props 401 without the key (tests/replay/llama-*/props-nokey.http).
"""

from __future__ import annotations

import dataclasses

from ..config import Model
from . import builds


@dataclasses.dataclass(frozen=True)
class Admission:
    """The verdict on one server.

    Attributes:
        build: its build name from /props build_info ("b11434", "commit 7e4c0a9"), None if unnamed.
        refusal: why it must not serve (one sentence naming the field, what it said and what the
            deployment expects), or None when it may.
    """

    build: str | None
    refusal: str | None


def admit(model: Model, props: object, status_without_key: int | None) -> Admission | None:
    """The verdict on a server of `model` from its /props answers.

    Args:
        model: the deployment's model the server was started for.
        props: the JSON body of `GET /props` with the backend key (any JSON value; a dict when the
            server answered 200).
        status_without_key: the HTTP status of `GET /props` without a key, None if it gave none.

    Returns:
        An Admission, or None when the answers do not decide yet (/props not read: a transient
        failure, or a server still loading): the caller keeps the server out and asks again.
    """
    if not isinstance(props, dict) or status_without_key is None:
        return None
    build = builds.parse_build_info(props.get("build_info"))
    name = build.name if build is not None else None
    if status_without_key not in (401, 403):
        return Admission(name, f"llama-server answered GET /props without the backend key (HTTP "
                               f"{status_without_key}): it does not enforce LLAMA_API_KEY, so every user "
                               "of its node could use it (a build or wrapper that drops the key)")
    slots = props.get("total_slots")
    if type(slots) is not int or slots != model.parallel:
        return Admission(name, f"llama-server has {slots!r} slots (/props total_slots), the deployment "
                               f"says parallel: {model.parallel} (HAProxy's maxconn for it): requests "
                               "would wait inside llama-server or slots stay unused")
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    wanted = model.context_size // model.parallel
    if model.context_size and (type(n_ctx) is not int or n_ctx < wanted):
        return Admission(name, f"llama-server gives each slot {n_ctx!r} tokens of context "
                               f"(/props default_generation_settings.n_ctx), the deployment asks "
                               f"context_size {model.context_size} / parallel {model.parallel} = {wanted}")
    return Admission(name, None)
