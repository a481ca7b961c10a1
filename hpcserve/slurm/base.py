"""The scheduler interface hpcserve plans against, and the job record it returns.

One adapter talks to Slurm through its commands (cli.py); a pyslurm adapter can sit behind the
same interface. Adapters only translate: every decision is made in plan.py.
"""

from __future__ import annotations

import abc
import dataclasses

from .states import JobState


@dataclasses.dataclass(frozen=True)
class Job:
    """One Slurm job as squeue reports it.

    Attributes:
        job_id: Slurm job id (str, e.g. "1234").
        name: job name (--job-name).
        state: the job state.
        node: the node it runs on (the first of its node list), or None while pending.
        comment: the job comment, where a backend announces its endpoint ("" when unset).
        time_limit_s: the time limit in seconds, None for UNLIMITED.
        time_left_s: seconds until the time limit, None when unlimited or not running.
        reason: why it is pending or ended ("None" when there is no reason).
        submit_time: when it was submitted (epoch seconds), None if unknown.
    """

    job_id: str
    name: str
    state: JobState
    node: str | None
    comment: str
    time_limit_s: int | None
    time_left_s: int | None
    reason: str
    submit_time: float | None = None


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
