"""The reconcile plan: desired state + observed backends -> what to change. Pure, no I/O.

Every command (up, scale, down, reconcile) is the same step with a different desired state, so a
repeated command or a cron run plans nothing new, and a crash between two steps is repaired by
the next one (the Kubernetes controller pattern, ../shared/DESIGN.md).
"""

from __future__ import annotations

import dataclasses

from .config import Deployment
from .endpoints import Backend, Health
from .haproxy.config import Server
from .state import Desired


@dataclasses.dataclass(frozen=True)
class Cancel:
    """A job to cancel, and why (shown to the user)."""

    job_id: str
    model: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one reconcile step changes.

    Attributes:
        submit: one model name per job to submit.
        cancel: jobs to take out of rotation and cancel.
        servers: the HAProxy membership after the step: every ready backend not being cancelled.
        haproxy_running: HAProxy should run (the deployment is up).
    """

    submit: tuple[str, ...]
    cancel: tuple[Cancel, ...]
    servers: tuple[Server, ...]
    haproxy_running: bool

    @property
    def changes_jobs(self) -> bool:
        return bool(self.submit or self.cancel)


# Which active job goes first when a model has more than it should: the ones that serve nobody yet
# (pending, then starting or loading, newest first), then ready ones closest to their time limit.
def _cancel_order(backend: Backend) -> tuple[int, float]:
    job_number = -int(backend.job.job_id) if backend.job.job_id.isdigit() else 0
    if backend.health is Health.PENDING:
        return (0, job_number)
    if backend.health is not Health.READY:
        return (1, job_number)
    time_left = backend.job.time_left_s if backend.job.time_left_s is not None else float("inf")
    return (2, time_left)


def plan(deployment: Deployment, desired: Desired, backends: list[Backend],
         in_rotation: frozenset[str] = frozenset()) -> Plan:
    """The plan that moves `backends` (observed) toward `desired`.

    Args:
        deployment: the validated deployment file.
        desired: replicas wanted per model, and whether the deployment is up.
        backends: every job of the deployment as observed (endpoints.observe), ended ones included.
        in_rotation: job ids of the servers in HAProxy now. Such a server stays while its job
            runs even if one probe failed (a busy server may answer slowly): HAProxy's own health
            checks take a dead one out of rotation within a few intervals, and a reload for every
            missed probe would pile up old workers.

    Returns:
        A Plan. Jobs of models that left the deployment file are cancelled.
    """
    submit: list[str] = []
    cancel: list[Cancel] = []
    models = {m.name for m in deployment.models}
    active = [b for b in backends if b.job.state.active]

    for backend in active:
        if backend.model not in models:
            cancel.append(Cancel(backend.job.job_id, backend.model, "model no longer in the deployment file"))

    for model in deployment.models:
        want = desired.replicas_of(model.name)
        mine = sorted((b for b in active if b.model == model.name), key=_cancel_order)
        if len(mine) < want:
            submit.extend([model.name] * (want - len(mine)))
        reason = "deployment is down" if not desired.up else f"scaling {model.name} to {want}"
        for backend in mine[:max(0, len(mine) - want)]:
            cancel.append(Cancel(backend.job.job_id, model.name, reason))

    cancelled = {c.job_id for c in cancel}
    servers = tuple(sorted(
        Server(model=b.model, job_id=b.job.job_id, address=b.address, port=b.port)
        for b in active
        if (b.health is Health.READY or (b.job.job_id in in_rotation and b.health is Health.UNREACHABLE))
        and b.job.job_id not in cancelled and b.model in models
        and b.address is not None and b.port is not None
    ))
    return Plan(submit=tuple(submit), cancel=tuple(cancel), servers=servers, haproxy_running=desired.up)
