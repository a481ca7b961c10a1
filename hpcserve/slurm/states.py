"""Slurm job states: the translation from what squeue prints to core.jobs.JobState.

Source: squeue(1), JOB STATE CODES (Slurm 22.05); only the first token counts ("CANCELLED by 0").
An unknown code maps to UNKNOWN with a warning, never a crash.
"""

from __future__ import annotations

import logging

from ..core.jobs import JobState

log = logging.getLogger(__name__)


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
