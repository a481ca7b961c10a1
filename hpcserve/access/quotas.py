"""GPU-hour quotas per Slurm account, as `hpcserve quota` sets and reports them.

STATE_DIR/quotas.json holds the quotas and the models' GPUs per slot; the access log writer reads
it and enforces it (haproxy/quotas.py: it counts each billed line and keeps HAProxy's quota map).
A change here is written to HAProxy's map at once too, from the writer's counts, so it holds from
the next request. The report's "used" is `hpcserve usage --by account` over the current period
(the access logs and the usage ledger), the same formula the writer counts with (core/billing.py).
"""

from __future__ import annotations

import dataclasses
import json
import time

from ..config import Deployment
from ..core.quota import PERIODS, Counts, Quota, next_reset, period_start, quota_map
from ..errors import ConfigError
from ..haproxy import quotas as haproxy_quotas
from ..slurm.accounting import Accounting
from ..state import StateDir, write_private
from . import ledger, usage
from .keys import check_account


def read(deployment: Deployment) -> list[Quota]:
    """The quotas, by account.

    Raises:
        ConfigError: STATE_DIR/quotas.json is not what hpcserve writes.
    """
    try:
        found, _ = haproxy_quotas.read_quotas(StateDir(deployment.state_dir).quotas_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"quotas: {exc}; fix or remove the file and set the quotas again") from None
    return sorted(found, key=lambda q: q.account)


def write(deployment: Deployment, quotas: list[Quota]) -> None:
    """Write the quotas with the deployment's GPUs per slot (what the writer bills by), then make
    HAProxy's quota map follow at once (haproxy.quotas.write_map).

    Raises:
        HAProxyError: a running HAProxy refused the map change (the file is written: it holds
            from HAProxy's next start, and the writer's next line retries).
    """
    state = StateDir(deployment.state_dir)
    state.ensure()
    document = {"quotas": [dataclasses.asdict(q) for q in sorted(quotas, key=lambda q: q.account)],
                "gpus_per_slot": usage.gpus_per_slot(deployment)}
    write_private(state.quotas_file, json.dumps(document, indent=2) + "\n")
    counts = haproxy_quotas.read_counts(state.quota_counts_file) or Counts()
    haproxy_quotas.write_map(state, quota_map(quotas, counts, usage.gpus_per_slot(deployment), time.time()))


def keep_models_current(deployment: Deployment) -> None:
    """Rewrite quotas.json when the deployment's models changed their GPUs per slot (each reconcile
    step): the writer bills by the file's figures."""
    state = StateDir(deployment.state_dir)
    try:
        found, factors = haproxy_quotas.read_quotas(state.quotas_file)
    except (OSError, ValueError):
        return
    if found and factors != usage.gpus_per_slot(deployment):
        write(deployment, found)


def set_quota(deployment: Deployment, account: str, gpu_seconds: float, period: str,
              accounting: Accounting | None = None) -> Quota:
    """Give `account` a quota of `gpu_seconds` per `period`, replacing its old one.

    Raises:
        ConfigError: the pool has no keys or no access log, the period or account is wrong.
        AccountingUnavailable: slurmdbd cannot be asked whether the account exists.
    """
    _check_pool(deployment)
    if period not in PERIODS:
        raise ConfigError(f"--per: expected one of {', '.join(PERIODS)}, got {period!r}")
    checked = check_account(deployment, account, accounting, field="ACCOUNT")
    assert checked is not None      # an account was given
    quota = Quota(checked, gpu_seconds, period)
    write(deployment, [q for q in read(deployment) if q.account != quota.account] + [quota])
    return quota


def unset_quota(deployment: Deployment, account: str) -> Quota:
    """Remove `account`'s quota; returns it.

    Raises:
        ConfigError: the account has none.
    """
    current = read(deployment)
    for quota in current:
        if quota.account == account.lower():
            write(deployment, [q for q in current if q is not quota])
            return quota
    raise ConfigError(f"ACCOUNT: {account!r} has no quota (see `hpcserve quota`)")


def _check_pool(deployment: Deployment) -> None:
    if deployment.haproxy.auth != "keys":
        raise ConfigError("haproxy.auth: quotas belong to the accounts of API keys; set `auth: keys`")
    if not deployment.haproxy.access_log:
        raise ConfigError("haproxy.access_log: quotas count from the access log; set `access_log: true`")


@dataclasses.dataclass(frozen=True)
class QuotaReport:
    """One account's quota now.

    Attributes:
        account, period: the quota's.
        quota_gpu_hours: the quota, GPU-hours per period.
        used_gpu_hours: GPU-hours its requests used in the current period (`usage --by account`).
        remaining_gpu_hours: what is left (0 when over).
        period_start, resets: epoch seconds (UTC periods).
        over: its requests are refused until `resets`.
    """

    account: str
    period: str
    quota_gpu_hours: float
    used_gpu_hours: float
    remaining_gpu_hours: float
    period_start: float
    resets: float
    over: bool


def report(deployment: Deployment, now: float | None = None) -> list[QuotaReport]:
    """Each quota with what its account used in the current period, from the access logs and the
    usage ledger (a full read: seconds for large logs)."""
    now = time.time() if now is None else now
    quotas = read(deployment)
    if not quotas:
        return []
    earliest = min(period_start(now, q.period) for q in quotas)
    with ledger.reading(deployment) as (buckets, lines):
        archived = [b for b in buckets if float(b["hour"]) >= earliest]
        records = [r for r in lines if float(r.get("time", 0)) >= earliest]
    rows = []
    for quota in quotas:
        start = period_start(now, quota.period)
        used = {r.name: r.gpu_hours for r in usage.summarize(records, deployment, "account", since=start,
                                                              archived=archived)}.get(quota.account, 0.0)
        left = max(0.0, quota.gpu_seconds / 3600 - used)
        rows.append(QuotaReport(quota.account, quota.period, quota.gpu_seconds / 3600, used, left, start,
                                next_reset(now, quota.period), used * 3600 >= quota.gpu_seconds))
    return rows
