"""Rendering haproxy.cfg for a deployment (pure: data in, text out)."""

from __future__ import annotations

import json

from .. import templates
from ..config import Deployment, Model
from ..core.pool import Server, server_name
from ..state import HAProxyFiles, StateDir

TEMPLATE = "haproxy.cfg.j2"


def backend_name(model: Model) -> str:
    """The HAProxy backend of a model: "model_" + its name."""
    return f"model_{model.name}"


def leaving_state(deployment: Deployment) -> str:
    """How a server leaves the pool through the runtime API (core.membership.leave): "drain", or
    "weight" with affinity on.

    DRAIN still accepts persistent traffic (HAProxy 2.6 management guide, `set server state`:
    "only persistent connections will be accepted"), so with the affinity stick table a drained
    server kept taking its conversations' requests, never emptied, and was cancelled under them
    (measured: 37 broken streams with 200 streams through 20 pool changes). MAINT took none, but
    on HAProxy 3.0.11 a state change while a sticky request waits in the server's own queue gives
    it that request over its maxconn (core.membership.leave); so with affinity a leaving server
    gets weight 0 and a line in the leaving map that the stick match skips, and keeps its state.
    Without a stick
    table no request waits in a server's own queue; DRAIN keeps the health check running, so
    `status` still shows whether a leaving backend is alive.
    """
    return "weight" if deployment.haproxy.affinity_header else "drain"


#: `rise` of every server: successful checks a DOWN server needs to return by itself. With checks
#: every 2 s, a million take 23 days: in effect, only hpcserve's `health up` brings it back. The fall
#: count is unchanged (HAProxy 2.6 check.c: a server is UP at health >= rise, a failure below rise
#: + fall - 1 ... rise takes it to 0, DOWN).
RISE_NEVER = 1000000


def server_options(deployment: Deployment, model: Model) -> str:
    """The options of every server of `model`, in haproxy.cfg (default-server) and in runtime
    `add server` alike (HAProxy 2.6 management guide: dynamic servers do not use default-server).

    /health checks every check_interval, 3 failures to leave; maxconn = llama-server's slots, so
    waiting requests queue in HAProxy.

    A server marked DOWN never returns by its checks alone (rise RISE_NEVER): its llama-server may
    have died, and whoever binds the freed port next (any cluster user) would answer /health,
    and then get prompts with the backend key. hpcserve brings it back (`set server ... health up`,
    HAProxy 2.6 management guide) only after it saw the job RUNNING in squeue with the same
    endpoint announced and /health answering: a job's script ends when its llama-server does, so a
    RUNNING job still holds its port. Passive check: 2 connection
    errors in a row on live traffic mark the server down at once (observe layer4, error-limit 2,
    on-error mark-down). Without it, leastconn sends every new request to a dead backend (it has
    no connection, and refusing takes microseconds) until the health check notices, and each
    retry lands there again: thousands of failed requests in 3 s (seen in
    tests/e2e/test_serving.py). Marking down only changes the state: sessions are never cut
    (that would be on-marked-down shutdown-sessions, which is never used).

    No `maxqueue`, with affinity on or off: leastconn (lb_fwlc.c) still picks a server whose queue
    is at maxqueue while served + queue < maxconn + maxqueue (two requests picking the same full
    server at once, or one arriving as a slot frees before the queue moves up), and HAProxy then
    refuses (503, "SQ") every request not sent there by persistence (backend.c
    srv_redispatch_connect, 2.6 to 3.x): 1 in ~4,100 requests of the 200-stream test with affinity
    on. Affinity is bounded by the stick rule instead (templates/haproxy.cfg.j2).
    """
    return (f"check inter {templates.duration(deployment.haproxy.check_interval)} fall 3 rise {RISE_NEVER} "
            f"maxconn {model.parallel} observe layer4 error-limit 2 on-error mark-down")


def paths(deployment: Deployment) -> HAProxyFiles:
    """The HAProxy files of `deployment` (their names: state.HAProxyFiles)."""
    return StateDir(deployment.state_dir).haproxy


def models_list(deployment: Deployment) -> str:
    """The OpenAI list of the deployment's models (GET /v1/models), every model whatever its replicas.

    Shape of the OpenAI API's "list models" (object "list", data of {id, object "model", created,
    owned_by}), as llama-server also answers it; `created` is 0 so the text only changes with the models.
    """
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "hpcserve"} for m in deployment.models]
    return json.dumps({"object": "list", "data": data}) + "\n"


#: tune.maxrewrite: room to add headers (the backend key) to a full buffer. 8 KiB is far more than
#: the one header hpcserve sets (HAProxy 2.6 manual, tune.maxrewrite: the default is 1024 or half
#: the buffer, whichever is smaller).
MAXREWRITE = 8192


def buffer_size(deployment: Deployment) -> int:
    """tune.bufsize in bytes: the largest accepted headers (haproxy.max_header_bytes; larger get
    431) + the largest accepted body + the rewrite reserve, so that a body one byte over the limit
    still fits and is measured, whatever the headers (HAProxy 2.6 manual, tune.bufsize: a request
    must fit the buffer less tune.maxrewrite; wait-for-body stops waiting when the buffer is full:
    with 40 KB of headers a body arrived cut, and routing missed its model)."""
    return deployment.haproxy.max_header_bytes + deployment.max_request_body + 1 + MAXREWRITE


def fair_share_delay_ms(deployment: Deployment) -> int:
    """The queue delay of an account of fair-share factor 0, ms (accounting.fair_share_delay); 0 when
    fair share is off: explicitly, or with an open pool (no key, so no account)."""
    if deployment.haproxy.auth != "keys":
        return 0
    return round(deployment.accounting.fair_share_delay_or_default(deployment.haproxy) * 1000)


def render(deployment: Deployment, servers: list[Server]) -> str:
    """haproxy.cfg text for `deployment` with `servers` in rotation.

    Servers are written in a stable order (by model, then job id) so that the same pool always
    gives the same text and an unchanged pool never causes a reload.

    Raises:
        TemplateError: a template is broken or uses an undefined value (one line naming file and line).
    """
    by_model: dict[str, list[Server]] = {}
    for server in sorted(servers, key=lambda s: (s.model, s.id)):
        by_model.setdefault(server.model, []).append(server)
    p = paths(deployment)
    return templates.render(TEMPLATE, deployment.templates_dir, deployment=deployment,
                            haproxy=deployment.haproxy, servers=by_model, backend_name=backend_name,
                            server_options=lambda model: server_options(deployment, model),
                            server_prefix=server_name(""),
                            admin_socket=p.admin_socket, server_state_file=p.server_state_file,
                            keys_map=p.keys_map_file if deployment.haproxy.auth == "keys" else None,
                            leaving_map=p.leaving_map_file,
                            fair_share_map=p.fair_share_map_file if fair_share_delay_ms(deployment) else None,
                            webui_batch_map=p.webui_batch_map_file if deployment.haproxy.auth == "keys"
                            and (deployment.webui.batch_users or deployment.webui.batch_groups) else None,
                            webui_accounts_map=p.webui_accounts_map_file
                            if deployment.haproxy.auth == "keys" and (deployment.accounting.webui_accounts
                                                                      or deployment.accounting.webui_group_accounts)
                            else None,
                            quota_map=p.quota_map_file
                            if deployment.haproxy.auth == "keys" and deployment.haproxy.access_log else None,
                            fair_share_delay_ms=fair_share_delay_ms(deployment),
                            access_log_fifo=deployment.haproxy.access_log,
                            batch_delay_ms=round(deployment.haproxy.batch_delay_or_default * 1000),
                            models_file=p.models_file,
                            batches_socket=StateDir(deployment.state_dir).batches_socket
                            if deployment.batches.enabled else None,
                            max_body=deployment.max_request_body, bufsize=buffer_size(deployment),
                            maxrewrite=MAXREWRITE)
