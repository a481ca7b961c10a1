"""Slurm adapters: the scheduler interface (base), squeue's job states (states), the adapter on
Slurm's commands (cli), the pyslurm one (pyslurm_adapter), the workstation launcher (local) and
the cluster reader (layout)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import Scheduler
from .cli import CLIScheduler

if TYPE_CHECKING:
    from ..config import Deployment

__all__ = ["CLIScheduler", "Scheduler", "for_deployment"]


def for_deployment(deployment: Deployment,
                   notice: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Scheduler:
    """The deployment's scheduler: local processes (scheduler: local), or Slurm through a matching
    pyslurm if one imports, else through Slurm's commands (pyslurm_adapter.choose, which says
    through `notice` why a pyslurm it found is not used)."""
    from ..state import StateDir
    from . import pyslurm_adapter
    from .local import LocalScheduler
    if deployment.scheduler == "local":
        return LocalScheduler(StateDir(deployment.state_dir).local_dir, deployment.local.gpus,
                              deployment.local.gpus_per_backend)
    return pyslurm_adapter.choose(notice=notice)
