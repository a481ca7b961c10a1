"""Rendering haproxy.cfg for a deployment (pure: data in, text out)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import templates
from ..config import Deployment, Model

TEMPLATE = "haproxy.cfg.j2"


@dataclasses.dataclass(frozen=True, order=True)
class Server:
    """One ready backend as an HAProxy server line.

    Attributes:
        model: the model it serves.
        job_id: the Slurm job id; it gives the server a stable name ("job1234") and id (1234), so
            server-state files and hashing keep meaning across changes of the pool.
        address: host or IP HAProxy connects to (the node's NodeAddr).
        port: the TCP port llama-server bound.
    """

    model: str
    job_id: str
    address: str
    port: int

    @property
    def name(self) -> str:
        """The HAProxy server name: "job" + the Slurm job id."""
        return f"job{self.job_id}"

    @property
    def id(self) -> int:
        """The HAProxy server id (a positive integer): the Slurm job id."""
        return int(self.job_id)


def backend_name(model: Model) -> str:
    """The HAProxy backend of a model: "model_" + its name."""
    return f"model_{model.name}"


@dataclasses.dataclass(frozen=True)
class Paths:
    """Files of a deployment's HAProxy, all inside its private state directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "haproxy.cfg"

    @property
    def admin_socket(self) -> Path:
        """The runtime API socket of the current worker (stats socket ... level admin)."""
        return self.root / "haproxy.sock"

    @property
    def master_socket(self) -> Path:
        """The master CLI socket (-S): reload, show proc."""
        return self.root / "haproxy-master.sock"

    @property
    def pid_file(self) -> Path:
        return self.root / "haproxy.pid"

    @property
    def server_state_file(self) -> Path:
        return self.root / "haproxy.state"


def paths(deployment: Deployment) -> Paths:
    """The HAProxy files of `deployment`."""
    return Paths(deployment.state_dir)


def render(deployment: Deployment, servers: list[Server]) -> str:
    """haproxy.cfg text for `deployment` with `servers` in rotation.

    Servers are written in a stable order (by model, then job id) so that the same pool always
    gives the same text and an unchanged pool never causes a reload.

    Raises:
        jinja2.TemplateError: a site template is broken or uses an undefined value.
    """
    by_model: dict[str, list[Server]] = {}
    for server in sorted(servers, key=lambda s: (s.model, s.id)):
        by_model.setdefault(server.model, []).append(server)
    p = paths(deployment)
    return templates.render(TEMPLATE, deployment.templates_dir, deployment=deployment,
                            haproxy=deployment.haproxy, servers=by_model, backend_name=backend_name,
                            admin_socket=p.admin_socket, server_state_file=p.server_state_file)
