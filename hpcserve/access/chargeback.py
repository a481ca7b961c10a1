"""`hpcserve usage --chargeback`: what sacct charged for the pool's own jobs, split across the Slurm
accounts whose requests held their slots (core/chargeback.py), in sreport's columns.
"""

from __future__ import annotations

import dataclasses
import getpass
import time

from ..config import Deployment
from ..core.chargeback import IDLE, JobCharge, by_account, split
from ..slurm.accounting import Accounting
from ..slurm.jobscript import model_of
from . import ledger

#: sreport's columns (sreport(1) cluster AccountUtilizationByUser, -P): Used in seconds and hours.
COLUMNS = ("Cluster", "Account", "TRES Name", "Used", "Used (hours)")


@dataclasses.dataclass(frozen=True)
class Chargeback:
    """The split of [since, until) (epoch seconds).

    Attributes:
        cluster: Slurm's cluster name (from sacct).
        pool_account: the account(s) Slurm charged the pool's jobs to, comma-separated.
        charged_gpu_seconds: what sacct charged for them in the window.
        accounts: account (and IDLE) -> GPU-seconds; they sum to charged_gpu_seconds.
        jobs: job id -> {account or IDLE -> GPU-seconds}.
    """

    since: float
    until: float
    cluster: str
    pool_account: str
    charged_gpu_seconds: float
    accounts: dict[str, float]
    jobs: dict[str, dict[str, float]]

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """One row per account in COLUMNS' order, by GPU-seconds (IDLE last)."""
        order = sorted((a for a in self.accounts if a != IDLE), key=lambda a: (-self.accounts[a], a))
        return [(self.cluster, account, "gres/gpu", f"{self.accounts[account]:.0f}",
                 f"{self.accounts[account] / 3600:.4f}") for account in [*order, IDLE] if account in self.accounts]


def chargeback(deployment: Deployment, since: float, until: float | None = None,
               accounting: Accounting | None = None) -> Chargeback:
    """Split what sacct charged for the deployment's replica jobs in [since, until) (None: now).

    Raises:
        AccountingUnavailable: sacct (slurmdbd) did not answer.
    """
    until = time.time() if until is None else until
    runs = (accounting or Accounting()).job_runs(getpass.getuser(), since, until)
    slots = {m.name: m.parallel for m in deployment.models}
    jobs = [JobCharge(r.job_id, r.account, r.start, r.end if r.end is not None else time.time(), r.gpus,
                      slots[model])
            for r in runs if (model := model_of(deployment, r.name)) in slots and r.gpus]
    with ledger.reading(deployment) as (buckets, records):
        charges = split(jobs, records, buckets, since, until)
    charged = sum(sum(lines.values()) for lines in charges.values())
    return Chargeback(since, until, next((r.cluster for r in runs), ""),
                      ",".join(sorted({job.account for job in jobs})), charged, by_account(charges), charges)
