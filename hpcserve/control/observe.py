"""Observed state: the deployment's jobs, the endpoints they announced, and whether each is ready.

A job announces "endpoint=HOST:PORT" in its comment once llama-server listens (see the sbatch
template). Ready means llama-server's /health answered 200; RUNNING alone is not ready, because
llama-server listens (and answers 503) while it is still loading its model (llama.cpp server
README, GET /health). The address HAProxy uses is the node's NodeAddr from sinfo, which is how the
cluster reaches a node (the announced host is the fallback), resolved here to an IP address:
HAProxy resolves names in its config file at start, but a server added through the runtime API
with a name gets no address without a `resolvers` section (seen with HAProxy 2.6). This module
joins Slurm (squeue, sinfo) with the llama-server probe (hpcserve.llama.probe).
"""

from __future__ import annotations

import asyncio
import re
import socket

from ..config import Deployment
from ..core.jobs import JobState
from ..core.pool import Health, Replica
from ..llama.probe import probe_all
from ..slurm import Scheduler
from ..slurm.jobscript import job_name_prefix, model_of

_ENDPOINT = re.compile(r"(?:^|\s)endpoint=(?P<host>[^\s:]+):(?P<port>\d{1,5})(?:\s|$)")
_LEAVING = re.compile(r"(?:^|\s)leaving(?:\s|$)")


def parse_endpoint(comment: str) -> tuple[str, int] | None:
    """("HOST", PORT) from a job comment holding "endpoint=HOST:PORT", else None."""
    match = _ENDPOINT.search(comment)
    if not match:
        return None
    port = int(match.group("port"))
    return (match.group("host"), port) if 0 < port < 65536 else None


def observe(deployment: Deployment, scheduler: Scheduler, *, key: str | None = None,
            probe_timeout: float = 3.0, slots: bool = False,
            admitted: frozenset[str] | None = None) -> list[Replica]:
    """The deployment's jobs with their endpoints and health, sorted by job id.

    Args:
        deployment: whose jobs (by job name prefix).
        scheduler: where to list them.
        key: the backend key, needed to read /slots and /props.
        probe_timeout: seconds per HTTP probe; probes run concurrently.
        slots: also read /slots of ready replicas (for status: busy slots).
        admitted: job ids of replicas already serving (the step record's in_rotation): every other
            replica that answers /health 200 is checked before it may serve (llama.props.admit:
            /props with and without the key) and gets its build, or Health.REFUSED with the
            reason, or Health.UNREACHABLE while /props gives no answer. None: no check (every
            ready replica stays READY).

    Raises:
        SlurmError: the job list could not be read. A failure to list is never taken as "no jobs".
    """
    jobs = scheduler.jobs(job_name_prefix(deployment))
    announced = {job.job_id: parse_endpoint(job.comment) for job in jobs}
    needs_address = any(ep and job.state is JobState.RUNNING for job, ep in
                        ((j, announced[j.job_id]) for j in jobs))
    node_addr = scheduler.node_addresses() if needs_address else {}
    resolved: dict[str, str | None] = {}
    replicas = []
    for job in sorted(jobs, key=lambda j: int(j.job_id) if j.job_id.isdigit() else 0):
        model = model_of(deployment, job.name)
        if model is None:
            continue
        endpoint = announced[job.job_id]
        if job.state.ended:
            replicas.append(Replica(job, model, health=Health.ENDED))
        elif job.state is not JobState.RUNNING:
            replicas.append(Replica(job, model, health=Health.PENDING))
        elif endpoint is None:
            replicas.append(Replica(job, model, health=Health.STARTING))
        else:
            host = node_addr.get(job.node or "", "") or endpoint[0]
            if host not in resolved:
                resolved[host] = resolve(host)
            address = resolved[host]
            replicas.append(Replica(job, model, address=address, port=endpoint[1] if address else None,
                                    health=Health.UNREACHABLE, warned=bool(_LEAVING.search(job.comment))))
    models = {m.name: m for m in deployment.models}
    check = {} if admitted is None else {
        r.job.job_id: models[r.model] for r in replicas if r.job.job_id not in admitted and r.model in models}
    return asyncio.run(probe_all(replicas, key, probe_timeout, slots, check))


def resolve(host: str) -> str | None:
    """The IP address of `host` (IPv4 preferred: llama-server listens on 0.0.0.0), or None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return str(socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)[0][4][0])
        except (OSError, IndexError):
            continue
    return None
