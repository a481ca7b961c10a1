"""The pool: what the user wants (Desired), what runs (Replica) and what HAProxy routes to (Server).

Pure, no I/O. A replica is one Slurm job running one llama-server; a server is HAProxy's entry for a
replica that serves. The words follow DESIGN.md: HAProxy's "backend" is the per-model server group,
never a replica.
"""

from __future__ import annotations

import dataclasses
import enum

from .jobs import Job


@dataclasses.dataclass(frozen=True)
class Desired:
    """What the user asked for.

    Attributes:
        up: the deployment should serve (False after `down`).
        replicas: model name -> number of replica jobs wanted.
    """

    up: bool = False
    replicas: dict[str, int] = dataclasses.field(default_factory=dict)

    def replicas_of(self, model: str) -> int:
        """Jobs wanted for `model`: 0 when the deployment is down or the model unknown."""
        return self.replicas.get(model, 0) if self.up else 0


class Health(enum.Enum):
    """What a replica can do now (llama.cpp server README, GET /health: 200 ready, 503 loading)."""

    READY = "ready"              # /health answered 200
    LOADING = "loading"          # /health answered 503: the model is loading
    UNREACHABLE = "unreachable"  # announced, but no answer or an unexpected one
    STARTING = "starting"        # running, endpoint not announced yet
    REFUSED = "refused"          # /health answered 200, but the server must not serve (Replica.refusal)
    PENDING = "pending"          # waiting in Slurm's queue
    ENDED = "ended"              # the job is over (or ending)


@dataclasses.dataclass(frozen=True)
class Replica:
    """One job of the deployment and what is known of its llama-server.

    Attributes:
        job: the job as squeue reports it.
        model: the model it serves (from its job name).
        address: host or IP to reach llama-server at, or None before it announced.
        port: its TCP port, or None before it announced.
        health: see Health.
        slots_busy, slots_total: from /slots when asked for (status), else None.
        build: the llama-server build from /props build_info ("b11434"; hpcserve.llama.builds),
            read when the replica was checked before serving (llama.props), else None.
        refusal: why a replica that answers /health must not serve (Health.REFUSED), else None.
        warned: Slurm warned the job that it will end (its comment says "leaving").
    """

    job: Job
    model: str
    address: str | None = None
    port: int | None = None
    health: Health = Health.PENDING
    slots_busy: int | None = None
    slots_total: int | None = None
    build: str | None = None
    refusal: str | None = None
    warned: bool = False

    @property
    def endpoint(self) -> str | None:
        """"ADDRESS:PORT", or None before the job announced it."""
        return f"{self.address}:{self.port}" if self.address and self.port else None


def server_name(job_id: str) -> str:
    """The HAProxy server name of a replica: "job" + its Slurm job id (e.g. "job1234")."""
    return f"job{job_id}"


def job_id_of(name: str) -> str | None:
    """The Slurm job id in an HAProxy server name made by server_name(), else None."""
    return name[3:] if name.startswith("job") and name[3:].isdigit() else None


@dataclasses.dataclass(frozen=True, order=True)
class Server:
    """One serving replica as an HAProxy server: the membership entry.

    Attributes:
        model: the model it serves.
        job_id: the Slurm job id; it gives the server a stable name ("job1234") and id (1234), so
            server-state files and hashing keep meaning across changes of the pool.
        address: host or IP HAProxy connects to (the node's NodeAddr).
        port: the TCP port llama-server bound.
        draining: the server finishes its sessions and takes no new request (weight 0 or drain).
        maxconn: a lower limit than the model's slots, while workers from before a reload still
            hold some of them; None otherwise.
        healthy: hpcserve saw its job RUNNING with this endpoint announced and /health answering
            200 in this step: a server HAProxy marked DOWN may return (see
            haproxy.config.server_options).
    """

    model: str
    job_id: str
    address: str
    port: int
    draining: bool = False
    maxconn: int | None = None
    healthy: bool = dataclasses.field(default=True, compare=False)

    @property
    def name(self) -> str:
        """The HAProxy server name: "job" + the Slurm job id."""
        return server_name(self.job_id)

    @property
    def id(self) -> int:
        """The HAProxy server id (a positive integer): the Slurm job id."""
        return int(self.job_id)
