"""Slurm accounts in the running pool: the fair-share map HAProxy queues by, kept up to date by
each reconcile step, and what status says about it.

Each step (at most every REFRESH_S seconds) reads every account's shares and usage from sshare,
turns them into queue delays (core/fairshare.py) and changes HAProxy's map at runtime (no reload).
When sshare fails or times out the map keeps the last delays, and STATE_DIR/fairshare.json says
since when and why (`hpcserve status`): the pool keeps serving, in the last known order.
"""

from __future__ import annotations

import dataclasses
import json
import time

from ..config import Deployment
from ..core.fairshare import delays
from ..haproxy.config import fair_share_delay_ms
from ..haproxy.process import HAProxy
from ..slurm.accounting import Accounting, AccountingUnavailable
from ..state import StateDir, write_private
from ..errors import HAProxyError

#: Seconds between two sshare reads. Slurm itself recomputes fair share every PriorityCalcPeriod
#: (default 5 minutes; slurm.conf(5)), so a faster refresh would see nothing new.
REFRESH_S = 30.0


@dataclasses.dataclass(frozen=True)
class FairShareState:
    """What the pool's fair share last did (STATE_DIR/fairshare.json).

    Attributes:
        updated: epoch seconds of the last successful refresh (0: never).
        delays: account -> queue delay in ms, as HAProxy has them.
        error: why the last refresh failed (None: it did not), the delays then being older.
        failing_since: epoch seconds of the first failure in a row (None: not failing).
        attempted: epoch seconds of the last try, successful or not.
        slurmdbd_error: why slurmdbd did not answer at the last try (None: it did). sshare reads
            slurmctld's copy of the shares, so fair share goes on while slurmdbd is down; adding
            keys with an account and the chargeback cannot.
    """

    updated: float = 0.0
    delays: dict[str, int] = dataclasses.field(default_factory=dict)
    error: str | None = None
    failing_since: float | None = None
    attempted: float = 0.0
    slurmdbd_error: str | None = None


def read_state(deployment: Deployment) -> FairShareState:
    """The last refresh's record; an empty one when there is none or it is unreadable."""
    try:
        data = json.loads(StateDir(deployment.state_dir).fair_share_file.read_text())
        return FairShareState(float(data["updated"]), {str(k): int(v) for k, v in data["delays"].items()},
                              data.get("error"), data.get("failing_since"), float(data.get("attempted", 0)),
                              data.get("slurmdbd_error"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return FairShareState()


def enabled(deployment: Deployment) -> bool:
    """Fair share applies: API keys, and accounting.fair_share_delay not 0."""
    return fair_share_delay_ms(deployment) > 0


def refresh(deployment: Deployment, haproxy: HAProxy, accounting: Accounting,
            now: float | None = None, force: bool = False) -> FairShareState:
    """Bring HAProxy's fair-share map to sshare's current shares, unless tried less than REFRESH_S
    ago (or `force`). A failure is recorded, never raised: the map keeps its last delays.

    Returns:
        the new record (also written to STATE_DIR/fairshare.json).
    """
    now = time.time() if now is None else now
    state = read_state(deployment)
    if not force and 0 <= now - state.attempted < REFRESH_S:
        return state
    try:
        accounting.accounts()
        slurmdbd_error = None
    except AccountingUnavailable as exc:
        slurmdbd_error = str(exc)
    try:
        wanted = delays(accounting.shares(), fair_share_delay_ms(deployment))
        haproxy.sync_fair_share(wanted)
        state = FairShareState(now, wanted, attempted=now, slurmdbd_error=slurmdbd_error)
    except (AccountingUnavailable, HAProxyError) as exc:
        state = dataclasses.replace(state, error=str(exc), failing_since=state.failing_since or now, attempted=now,
                                    slurmdbd_error=slurmdbd_error)
    write_private(StateDir(deployment.state_dir).fair_share_file, json.dumps(dataclasses.asdict(state), indent=2) + "\n")
    return state
