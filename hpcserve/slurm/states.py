"""Slurm job states: an explicit enum and the translation from what squeue prints.

Source: squeue(1), JOB STATE CODES (Slurm 22.05); only the first token counts ("CANCELLED by 0").
An unknown code maps to UNKNOWN with a warning, never a crash.
"""

from __future__ import annotations

import enum
import logging

log = logging.getLogger(__name__)


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

# squeue prints long names with %T and two-letter codes with %t; both are accepted.
_SHORT_CODES = {
    "PD": JobState.PENDING, "CF": JobState.CONFIGURING, "R": JobState.RUNNING,
    "S": JobState.SUSPENDED, "CG": JobState.COMPLETING, "CD": JobState.COMPLETED,
    "CA": JobState.CANCELLED, "F": JobState.FAILED, "TO": JobState.TIMEOUT,
    "PR": JobState.PREEMPTED, "NF": JobState.NODE_FAIL, "BF": JobState.BOOT_FAIL,
    "DL": JobState.DEADLINE, "OOM": JobState.OUT_OF_MEMORY, "RQ": JobState.REQUEUED,
    "RS": JobState.RESIZING, "RV": JobState.REVOKED, "SI": JobState.SIGNALING,
    "SE": JobState.SPECIAL_EXIT, "SO": JobState.STAGE_OUT, "ST": JobState.STOPPED,
}


def parse_state(text: str) -> JobState:
    """Translate a squeue state ("RUNNING", "R", "CANCELLED by 0") to a JobState.

    Unknown codes give JobState.UNKNOWN and a logged warning.
    """
    token = text.strip().split(" ")[0].rstrip("+").upper()
    if token in _SHORT_CODES:
        return _SHORT_CODES[token]
    try:
        return JobState(token)
    except ValueError:
        log.warning("unknown Slurm job state %r, treated as UNKNOWN", text)
        return JobState.UNKNOWN
