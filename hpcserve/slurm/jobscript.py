"""Rendering the batch script of one backend job (pure: no I/O beyond reading the template).

A backend job runs one llama-server for one model, binds a port the kernel picks, and announces
"endpoint=HOST:PORT" in its job comment, where `hpcserve.control.observe` finds it through squeue.
"""

from __future__ import annotations

from pathlib import Path

from .. import templates
from ..config import Deployment, Model
from ..state import StateDir

TEMPLATE = "llama-server.sbatch.j2"


def job_name_prefix(deployment: Deployment) -> str:
    """The job-name prefix shared by every job of the deployment: "hpcserve:NAME:"."""
    return f"hpcserve:{deployment.name}:"


def job_name(deployment: Deployment, model: Model) -> str:
    """The job name of a backend of `model`: "hpcserve:DEPLOYMENT:MODEL".

    Names are unique per user and carry the model, so squeue alone tells which model a job
    serves; ":" cannot occur in deployment or model names (config.NAME_PATTERN).
    """
    return job_name_prefix(deployment) + model.name


def model_of(deployment: Deployment, name: str) -> str | None:
    """The model name encoded in a job name of this deployment, or None for another job."""
    prefix = job_name_prefix(deployment)
    return name[len(prefix):] if name.startswith(prefix) else None


def key_file(deployment: Deployment) -> Path:
    """The 0600 file holding the deployment's backend key (read by the job, never printed)."""
    return StateDir(deployment.state_dir).key_file


def log_dir(deployment: Deployment) -> Path:
    """Where job output and llama-server logs go (must exist before sbatch runs)."""
    return StateDir(deployment.state_dir).logs_dir


def render(deployment: Deployment, model: Model) -> str:
    """The batch script (text) for one backend job of `model`.

    Raises:
        TemplateError: a template is broken or uses an undefined value (one line naming file and line).
    """
    return templates.render(TEMPLATE, deployment.templates_dir, deployment=deployment, model=model,
                            slurm=deployment.slurm, job_name=job_name(deployment, model),
                            key_file=key_file(deployment), log_dir=log_dir(deployment))
