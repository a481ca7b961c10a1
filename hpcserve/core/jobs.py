"""Slurm jobs as hpcserve reasons about them: the job record and its state. Pure, no I/O.

Source of the states: squeue(1), JOB STATE CODES (Slurm 22.05, unchanged through 26.05 as far as
hpcserve uses them). Translating what squeue or libslurm prints into these is the Slurm adapters'
job (hpcserve/slurm/states.py).
"""

from __future__ import annotations

import dataclasses
import enum


class JobState(enum.Enum):
    """What Slurm says a job is doing, plus UNKNOWN for codes this release does not know."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    PREEMPTED = "PREEMPTED"
    NODE_FAIL = "NODE_FAIL"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REQUEUED = "REQUEUED"
    RESIZING = "RESIZING"
    REVOKED = "REVOKED"
    SIGNALING = "SIGNALING"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    STAGE_OUT = "STAGE_OUT"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"

    @property
    def active(self) -> bool:
        """The job holds or is waiting for its resources and will serve (or serves) later."""
        return self in _ACTIVE

    @property
    def ended(self) -> bool:
        """The job is over or ending: it will never serve again."""
        return not self.active and self is not JobState.UNKNOWN


_ACTIVE = frozenset({JobState.PENDING, JobState.CONFIGURING, JobState.RUNNING, JobState.SUSPENDED,
                     JobState.REQUEUED, JobState.RESIZING, JobState.SIGNALING, JobState.STOPPED})


@dataclasses.dataclass(frozen=True)
class Job:
    """One Slurm job as squeue reports it.

    Attributes:
        job_id: Slurm job id (str, e.g. "1234").
        name: job name (--job-name).
        state: the job state.
        node: the node it runs on (the first of its node list), or None while pending.
        comment: the job comment, where a replica announces its endpoint ("" when unset).
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
