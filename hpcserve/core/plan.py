"""The reconcile plan: desired state + observed replicas -> what to change. Pure, no I/O.

Every command (up, scale, down, reconcile) is the same step with a different desired state, so a
repeated command or a cron run plans nothing new, and a crash between two steps is repaired by
the next one (the Kubernetes controller pattern, ../shared/DESIGN.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from .jobs import JobState
from .pool import Desired, Health, Replica, Server


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
        servers: the HAProxy membership after the step: every ready replica not being cancelled,
            those leaving the pool marked draining.
        draining: job id -> deadline (epoch seconds) of every server draining after the step.
        haproxy_running: HAProxy should run (the deployment is up, or servers are still draining).
    """

    submit: tuple[str, ...]
    cancel: tuple[Cancel, ...]
    servers: tuple[Server, ...]
    haproxy_running: bool
    draining: Mapping[str, float] = dataclasses.field(default_factory=dict)


# Which active job goes first when a model has more than it should: the ones that serve nobody yet
# (pending, then starting or loading, newest first), then ready ones closest to their time limit.
def _cancel_order(replica: Replica) -> tuple[int, float]:
    job_number = -int(replica.job.job_id) if replica.job.job_id.isdigit() else 0
    if replica.health is Health.PENDING:
        return (0, job_number)
    if replica.health is not Health.READY:
        return (1, job_number)
    time_left = replica.job.time_left_s if replica.job.time_left_s is not None else float("inf")
    return (2, time_left)


def plan(models: Sequence[str], desired: Desired, replicas: Sequence[Replica],
         in_rotation: frozenset[str] = frozenset(), *, draining: Mapping[str, float] | None = None,
         sessions: Mapping[str, int] | None = None, now: float = 0.0, drain_timeout: float = 0.0,
         renew_before: float | None = None) -> Plan:
    """The plan that moves `replicas` (observed) toward `desired`.

    Args:
        models: the names of the deployment file's models, in its order (submissions follow it).
        desired: replicas wanted per model, and whether the deployment is up.
        replicas: every job of the deployment as observed (control.observe.observe), ended ones included.
        in_rotation: job ids of the servers in HAProxy now. Such a server stays while its job
            runs even if one probe failed (a busy server may answer slowly): HAProxy's own health
            checks take a dead one out of rotation within a few intervals, and a reload for every
            missed probe would pile up old workers.
        draining: job id -> drain deadline (epoch s) of servers already draining (the last plan's).
        sessions: job id -> current HAProxy sessions of its server ({} when HAProxy is not running);
            None when unknown, and then a drain lasts until its deadline.
        now: the current time (epoch s).
        drain_timeout: seconds a leaving server may finish its requests; 0 cancels at once.
        renew_before: seconds before its time limit a running job is renewed; None = never.

    A surplus job that serves (in rotation) is drained first: it stays in HAProxy with weight 0
    and is cancelled once a later step sees it with no session, or at its deadline. A job that
    serves nobody yet (pending, loading) is cancelled at once. Draining jobs are the first
    surplus, so the choice is stable from step to step; scaling back up ends their drain.

    Renewal: a running job within renew_before of its time limit, or one Slurm warned (its
    comment says "leaving"), no longer counts toward the replicas, so its successor is submitted
    now. A warned job is
    drained at once; one near its time limit keeps serving until enough others are ready, then
    is drained, so no request is lost over a renewal.

    Returns:
        A Plan. Jobs of models that left the deployment file are cancelled.
    """
    draining = draining or {}
    new_draining: dict[str, float] = {}
    submit: list[str] = []
    cancel: list[Cancel] = []
    known = set(models)
    active = [b for b in replicas if b.job.state.active]

    def serving(b: Replica) -> bool:
        return (b.address is not None and b.port is not None and b.model in known
                and (b.health is Health.READY or (b.job.job_id in in_rotation and b.health is Health.UNREACHABLE)))

    def leave(b: Replica, reason: str) -> None:
        job_id = b.job.job_id
        if not (serving(b) and job_id in in_rotation) or drain_timeout <= 0:
            cancel.append(Cancel(job_id, b.model, reason))
        elif job_id in draining and (now >= draining[job_id]
                                     or (sessions is not None and sessions.get(job_id, 0) == 0)):
            why = "drain deadline passed" if now >= draining[job_id] else "drained"
            cancel.append(Cancel(job_id, b.model, f"{reason}, {why}"))
        else:
            new_draining[job_id] = draining.get(job_id, now + drain_timeout)

    for replica in active:
        if replica.model not in known:
            leave(replica, "model no longer in the deployment file")

    def renewing(b: Replica) -> bool:
        near_end = (renew_before is not None and b.job.time_left_s is not None
                    and b.job.state is JobState.RUNNING and b.job.time_left_s < renew_before)
        return b.warned or near_end

    for model in models:
        want = desired.replicas_of(model)
        mine = [b for b in active if b.model == model]
        staying = sorted((b for b in mine if not renewing(b)),
                         key=lambda b: (b.job.job_id not in draining, _cancel_order(b)))
        if len(staying) < want:
            submit.extend([model] * (want - len(staying)))
        reason = "deployment is down" if not desired.up else f"scaling {model} to {want}"
        for replica in staying[:max(0, len(staying) - want)]:
            leave(replica, reason)
        ready = sum(1 for b in staying if b.health is Health.READY)
        for replica in (b for b in mine if renewing(b)):
            if replica.warned:
                leave(replica, "Slurm warned the job that it ends soon")
            elif ready >= want:
                leave(replica, "time limit near, its successor is ready" if want else reason)

    cancelled = {c.job_id for c in cancel}
    servers = tuple(sorted(
        Server(model=b.model, job_id=b.job.job_id, address=b.address or "", port=b.port or 0,
               draining=b.job.job_id in new_draining, healthy=b.health is Health.READY)
        for b in active if serving(b) and b.job.job_id not in cancelled
    ))
    return Plan(submit=tuple(submit), cancel=tuple(cancel), servers=servers,
                haproxy_running=desired.up or bool(new_draining), draining=new_draining)


def effective_renew_before(floor: float, startups: Sequence[float]) -> float:
    """Seconds before a replica's time limit to submit its successor: the deployment's floor
    (slurm.renew_before, seconds), or 1.5 times the slowest recent startup (queue wait plus model
    load, seconds) when that is longer."""
    return max(floor, 1.5 * max(startups, default=0.0))
