"""Slurm: the scheduler interface (base), job states (states) and the CLI adapter (cli)."""

from .base import Job, Scheduler
from .cli import CLIScheduler
from .states import JobState

__all__ = ["CLIScheduler", "Job", "JobState", "Scheduler"]
