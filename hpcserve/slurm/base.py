"""The scheduler interface hpcserve plans against (it returns core.jobs.Job records).

One adapter talks to Slurm through its commands (cli.py); a pyslurm adapter can sit behind the
same interface. Adapters only translate: every decision is made in the core (core/plan.py).
"""

from __future__ import annotations

import abc

from ..core.jobs import Job


class Scheduler(abc.ABC):
    """Submit, list and cancel the jobs of a deployment.

    Every method raises hpcserve.errors.SlurmError when the scheduler cannot answer; none of them
    treats a failure to list as "no jobs".
    """

    @abc.abstractmethod
    def submit(self, script: str) -> str:
        """Submit a batch script (text) and return its job id."""

    @abc.abstractmethod
    def test_submit(self, script: str) -> str:
        """Validate a batch script without submitting it (sbatch --test-only); return the answer."""

    @abc.abstractmethod
    def jobs(self, name_prefix: str) -> list[Job]:
        """The current user's jobs whose name starts with `name_prefix`, ended ones included."""

    @abc.abstractmethod
    def cancel(self, job_ids: list[str]) -> None:
        """Cancel jobs; a job that is already gone is not an error."""

    @abc.abstractmethod
    def node_addresses(self) -> dict[str, str]:
        """Map node name -> NodeAddr (the address other hosts reach the node at)."""
