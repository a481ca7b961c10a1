"""Slurm adapters: the scheduler interface (base), squeue's job states (states), the adapter on
Slurm's commands (cli), the pyslurm one (pyslurm_adapter) and the cluster reader (layout)."""

from .base import Scheduler
from .cli import CLIScheduler

__all__ = ["CLIScheduler", "Scheduler"]
