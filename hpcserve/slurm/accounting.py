"""Slurm's accounting, read through its commands: the accounts and associations slurmdbd keeps
(sacctmgr), their fair share (sshare) and the GPU time the pool's jobs were charged (sacct).

Facts it relies on (verified on Slurm 22.05 with slurmdbd on MariaDB, scripts/local-slurm.sh):
`sacctmgr -nP show assoc format=...` prints one "|"-separated line per association, an account's
own line with an empty user; with slurmdbd down sacctmgr exits 1 ("failed to open persistent
connection"), while `sshare` keeps answering from slurmctld's copy. `sshare -a -n -P -o
Account,User,FairShare,LevelFS` prints the tree depth first, an account's line with an empty user,
its name indented by one space per level (sshare(1)); under Fair Tree (the default) an account's
FairShare is empty and its LevelFS "inf" until it has used something (verified on 22.05, 24.11 and
26.05).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from collections.abc import Mapping

from .. import proc
from ..core.fairshare import Share
from ..errors import CommandError, SlurmError


def _number(field: str) -> float | None:
    """A number sshare printed ("inf" included), None for an empty field.

    Raises:
        ValueError: not a number, or NaN.
    """
    value = float(field) if field.strip() else None
    if value is not None and math.isnan(value):
        raise ValueError(field)
    return value


class AccountingUnavailable(SlurmError):
    """slurmdbd is not configured, not running or not answering: accounts, quotas by account and
    chargeback cannot be checked; serving goes on."""


class Accounting:
    """sacctmgr, sshare and sacct for one deployment's user.

    Args:
        env: environment of the commands (SLURM_CONF), or None to inherit ours.
        timeout: seconds one command may take (slurmdbd may be slow or hanging).
    """

    def __init__(self, env: Mapping[str, str] | None = None, timeout: float = 20.0):
        self._env = env
        self._timeout = timeout

    def _run(self, argv: list[str]) -> str:
        try:
            return proc.run(argv, env=self._env, timeout=self._timeout).stdout
        except CommandError as exc:
            raise AccountingUnavailable(f"Slurm accounting (slurmdbd) is unavailable: {exc}") from exc

    def accounts(self, user: str | None = None) -> list[str]:
        """The accounts with an association in slurmdbd (of `user`, or of anyone), sorted.

        Raises:
            AccountingUnavailable: sacctmgr failed (no slurmdbd, slurmdbd down, timeout).
        """
        where = ["where", f"users={user}"] if user else []
        out = self._run(["sacctmgr", "-nP", "show", "assoc", *where, "format=account"])
        return sorted({line.strip() for line in out.splitlines() if line.strip()})

    def default_account(self, user: str) -> str | None:
        """`user`'s default account in slurmdbd, or None when the user is not known there.

        Raises:
            AccountingUnavailable: sacctmgr failed.
        """
        out = self._run(["sacctmgr", "-nP", "show", "user", user, "format=defaultaccount"])
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        return lines[0] if lines else None

    def shares(self) -> list[Share]:
        """Every account's line of the fair-share tree (sshare -a), from slurmctld, in sshare's
        order: its depth (the name's indent), LevelFS and, under the classic algorithm, FairShare.

        Raises:
            AccountingUnavailable: sshare failed or printed a line that is not sshare's.
        """
        out = self._run(["sshare", "-a", "-n", "-P", "-o", "Account,User,FairShare,LevelFS"])
        shares: list[Share] = []
        for line in out.splitlines():
            fields = line.split("|")
            if len(fields) != 4:
                raise AccountingUnavailable(f"sshare printed an unexpected line: {line!r}")
            indented, user, fair_share, level_fs = fields
            account = indented.strip()
            if user.strip() or not account or account == "root":
                continue        # users' lines, and the tree's root
            try:
                shares.append(Share(account, depth=len(indented) - len(indented.lstrip(" ")),
                                    level_fs=_number(level_fs), fair_share=_number(fair_share)))
            except ValueError:
                raise AccountingUnavailable(f"sshare printed an unexpected line: {line!r}") from None
        return shares

    def job_runs(self, user: str, since: float, until: float) -> list[JobRun]:
        """`user`'s jobs that ran in [since, until) (epoch seconds), one line each (sacct -X),
        pending ones left out. sacct prints local times ("2026-12-07T17:42:46"), "Unknown" as
        the end of a running job.

        Raises:
            AccountingUnavailable: sacct failed, or printed a line that is not sacct's.
        """
        def local(epoch: float) -> str:
            return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%dT%H:%M:%S")

        out = self._run(["sacct", "-X", "-n", "-P", f"--user={user}", "-S", local(since), "-E", local(until),
                         "-o", "JobID,JobName,Account,Start,End,AllocTRES,Cluster"])
        runs = []
        for line in out.splitlines():
            fields = line.split("|")
            if len(fields) != 7:
                raise AccountingUnavailable(f"sacct printed an unexpected line: {line!r}")
            job_id, name, account, start, end, tres, cluster = fields
            try:
                began = datetime.datetime.fromisoformat(start).timestamp()
            except ValueError:
                continue        # "Unknown", "None": it never started
            try:
                ended: float | None = datetime.datetime.fromisoformat(end).timestamp()
            except ValueError:
                ended = None    # still running
            gpus = re.search(r"gres/gpu(?::[^=,]*)?=(\d+)", tres)
            runs.append(JobRun(job_id, name, account, began, ended, int(gpus.group(1)) if gpus else 0, cluster))
        return runs


@dataclasses.dataclass(frozen=True)
class JobRun:
    """One job as sacct reports it: id, name, the account charged, when it started and ended
    (epoch seconds; end None while it runs), the GPUs allocated (AllocTRES gres/gpu), its cluster."""

    job_id: str
    name: str
    account: str
    start: float
    end: float | None
    gpus: int
    cluster: str = ""
