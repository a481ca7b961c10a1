"""Observed state: the deployment's jobs, the endpoints they announced, and whether each is ready.

A job announces "endpoint=HOST:PORT" in its comment once llama-server listens (see the sbatch
template). Ready means llama-server's /health answered 200; RUNNING alone is not ready, because
llama-server listens (and answers 503) while it is still loading its model (llama.cpp server
README, GET /health). The address HAProxy uses is the node's NodeAddr from sinfo, which is how the
cluster reaches a node (the announced host is the fallback), resolved here to an IP address:
HAProxy resolves names in its config file at start, but a server added through the runtime API
with a name gets no address without a `resolvers` section (seen with HAProxy 2.6).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import re
import socket

import httpx

from .config import Deployment
from .sbatch import job_name_prefix, model_of
from .slurm import Job, JobState, Scheduler

_ENDPOINT = re.compile(r"(?:^|\s)endpoint=(?P<host>[^\s:]+):(?P<port>\d{1,5})(?:\s|$)")
_LEAVING = re.compile(r"(?:^|\s)leaving(?:\s|$)")


class Health(enum.Enum):
    """What a backend can do now."""

    READY = "ready"              # /health answered 200
    LOADING = "loading"          # /health answered 503: the model is loading
    UNREACHABLE = "unreachable"  # announced, but no answer or an unexpected one
    STARTING = "starting"        # running, endpoint not announced yet
    PENDING = "pending"          # waiting in Slurm's queue
    ENDED = "ended"              # the job is over (or ending)


@dataclasses.dataclass(frozen=True)
class Backend:
    """One job of the deployment and what is known of its llama-server.

    Attributes:
        job: the job as squeue reports it.
        model: the model it serves (from its job name).
        address: host or IP to reach llama-server at, or None before it announced.
        port: its TCP port, or None before it announced.
        health: see Health.
        slots_busy, slots_total: from /slots when asked for (status), else None.
        leaving: Slurm warned the job that it will end (its comment says "leaving").
    """

    job: Job
    model: str
    address: str | None = None
    port: int | None = None
    health: Health = Health.PENDING
    slots_busy: int | None = None
    slots_total: int | None = None
    leaving: bool = False

    @property
    def endpoint(self) -> str | None:
        """"ADDRESS:PORT", or None before the job announced it."""
        return f"{self.address}:{self.port}" if self.address and self.port else None


def parse_endpoint(comment: str) -> tuple[str, int] | None:
    """("HOST", PORT) from a job comment holding "endpoint=HOST:PORT", else None."""
    match = _ENDPOINT.search(comment)
    if not match:
        return None
    port = int(match.group("port"))
    return (match.group("host"), port) if 0 < port < 65536 else None


def observe(deployment: Deployment, scheduler: Scheduler, *, key: str | None = None,
            probe_timeout: float = 3.0, slots: bool = False) -> list[Backend]:
    """The deployment's jobs with their endpoints and health, sorted by job id.

    Args:
        deployment: whose jobs (by job name prefix).
        scheduler: where to list them.
        key: the backend key, needed only to read /slots.
        probe_timeout: seconds per HTTP probe; probes run concurrently.
        slots: also read /slots of ready backends (for status).

    Raises:
        SlurmError: the job list could not be read. A failure to list is never taken as "no jobs".
    """
    jobs = scheduler.jobs(job_name_prefix(deployment))
    announced = {job.job_id: parse_endpoint(job.comment) for job in jobs}
    needs_address = any(ep and job.state is JobState.RUNNING for job, ep in
                        ((j, announced[j.job_id]) for j in jobs))
    node_addr = scheduler.node_addresses() if needs_address else {}
    resolved: dict[str, str | None] = {}
    backends = []
    for job in sorted(jobs, key=lambda j: int(j.job_id) if j.job_id.isdigit() else 0):
        model = model_of(deployment, job.name)
        if model is None:
            continue
        endpoint = announced[job.job_id]
        if job.state.ended:
            backends.append(Backend(job, model, health=Health.ENDED))
        elif job.state is not JobState.RUNNING:
            backends.append(Backend(job, model, health=Health.PENDING))
        elif endpoint is None:
            backends.append(Backend(job, model, health=Health.STARTING))
        else:
            host = node_addr.get(job.node or "", "") or endpoint[0]
            if host not in resolved:
                resolved[host] = resolve(host)
            address = resolved[host]
            backends.append(Backend(job, model, address=address, port=endpoint[1] if address else None,
                                    health=Health.UNREACHABLE, leaving=bool(_LEAVING.search(job.comment))))
    return asyncio.run(_probe_all(backends, key, probe_timeout, slots))


def resolve(host: str) -> str | None:
    """The IP address of `host` (IPv4 preferred: llama-server listens on 0.0.0.0), or None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)[0][4][0]
        except (OSError, IndexError):
            continue
    return None


async def _probe_all(backends: list[Backend], key: str | None, timeout: float, slots: bool) -> list[Backend]:
    # At most 50 probes at a time, each within `timeout` (connect and read). Measured with 512
    # backends (benchmarks, scenario e): handing httpx all 512 at once cost 9 ms of CPU per probe
    # in its connection pool's bookkeeping, and a wait for a free connection counted in the timeout
    # marked healthy backends unreachable.
    gate = asyncio.Semaphore(50)

    async def probe(client: httpx.AsyncClient, backend: Backend) -> Backend:
        async with gate:
            return await _probe(client, backend, key, slots)

    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        return list(await asyncio.gather(*(probe(client, b) for b in backends)))


async def _probe(client: httpx.AsyncClient, backend: Backend, key: str | None, slots: bool) -> Backend:
    if backend.endpoint is None:
        return backend
    base = f"http://{backend.endpoint}"
    try:
        response = await client.get(f"{base}/health")
    except httpx.HTTPError:
        return dataclasses.replace(backend, health=Health.UNREACHABLE)
    health = {200: Health.READY, 503: Health.LOADING}.get(response.status_code, Health.UNREACHABLE)
    backend = dataclasses.replace(backend, health=health)
    if slots and health is Health.READY and key:
        try:
            response = await client.get(f"{base}/slots", headers={"Authorization": f"Bearer {key}"})
            data = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            data = None
        if isinstance(data, list):
            busy = sum(1 for slot in data if isinstance(slot, dict) and slot.get("is_processing"))
            backend = dataclasses.replace(backend, slots_busy=busy, slots_total=len(data))
    return backend
