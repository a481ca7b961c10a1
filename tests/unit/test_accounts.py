"""Slurm accounts without Slurm: the fair-share formula and its bound, the settings that keep
interactive before batch, and what a refresh keeps when sshare fails (the real slurmdbd, sshare
and HAProxy: tests/integration/test_accounts.py)."""

from __future__ import annotations

import datetime
import json
import math

import pytest

from hpcserve import config
from hpcserve.access import accounts
from hpcserve.core import chargeback, quota
from hpcserve.core.fairshare import Share, delays, factors
from hpcserve.errors import ConfigError
from hpcserve.haproxy.config import render
from hpcserve.haproxy.process import HAProxy
from hpcserve.site import check
from hpcserve.slurm.accounting import Accounting, AccountingUnavailable
from tests.conftest import minimal


def test_fair_tree_ranks_accounts_depth_first_by_level_fairshare():
    """Fair Tree (slurm.schedmd.com/fair_tree.html): siblings by LevelFS, sub-accounts of a higher
    account all before those of a lower one, whatever their own LevelFS; ties share a place."""
    tree = [Share("science", 1, level_fs=2.0), Share("physics", 2, level_fs=0.1), Share("chemistry", 2, level_fs=5.0),
            Share("arts", 1, level_fs=0.5), Share("music", 2, level_fs=math.inf),
            Share("idle", 1, level_fs=math.inf), Share("idle2", 1, level_fs=math.inf),
            Share("lab", 2, level_fs=None)]         # shares "parent": in its parent idle2's place
    got = factors(tree)
    order = ["idle", "idle2", "lab", "science", "chemistry", "physics", "arts", "music"]
    assert sorted(got, key=got.get, reverse=True) == order
    assert got["idle"] == got["idle2"] == got["lab"] == 1.0 and got["science"] == 5 / 8   # ties share a place
    assert got["music"] == 1 / 8 < got["physics"]       # unused, but under the account that used the most
    assert delays(tree, 8_000)["music"] == 7_000 and delays(tree, 8_000)["idle"] == 0
    # Two accounts as on the local cluster: physics used the cluster, chemistry nothing.
    assert delays([Share("chemistry", 1, math.inf), Share("physics", 1, 0.333333)], 4_000) == {
        "chemistry": 0, "physics": 2_000}
    assert delays([Share("a", 1, math.inf), Share("b", 1, math.inf)], 4_000) == {"a": 0, "b": 0}


def test_under_the_classic_algorithm_sshares_own_factor_is_used():
    classic = [Share("idle", 1, 0.0, fair_share=1.0), Share("fair", 1, 0.0, fair_share=0.5),
               Share("none", 1, 0.0, fair_share=0.0)]
    assert delays(classic, 10_000) == {"idle": 0, "fair": 5_000, "none": 10_000}   # bounded by factor 0's
    assert delays([], 10_000) == {}


def test_sshare_lines_give_depth_level_fairshare_and_the_factor():
    """sshare -a -n -P -o Account,User,FairShare,LevelFS as Slurm 22.05 printed it (Fair Tree)."""
    out = ("root|||\n root|root|1.000000|inf\n chemistry|||inf\n  chemistry|root|1.000000|inf\n"
           " physics|||0.333333\n  physics|root|0.333333|1.000000\n  quantum|||\n")
    accounting = Accounting()
    accounting._run = lambda argv: out
    assert accounting.shares() == [Share("chemistry", 1, math.inf, None), Share("physics", 1, 0.333333, None),
                                   Share("quantum", 2, None, None)]
    for bad in ("physics||0.5\n", " physics|||nan\n", " physics|||high\n"):
        accounting._run = lambda argv, bad=bad: bad
        with pytest.raises(AccountingUnavailable, match="unexpected line"):
            accounting.shares()


def deployment(tmp_path, gguf, **sections):
    raw = minimal(gguf, tmp_path, haproxy={"auth": "keys", "timeout_queue": 60, **sections.pop("haproxy", {})},
                  **sections)
    return config.parse(raw, base=tmp_path)


def test_fair_share_stays_below_the_batch_delay(tmp_path, gguf):
    d = deployment(tmp_path, gguf)
    assert d.accounting.fair_share_delay_or_default(d.haproxy) == 15    # half of batch_delay (half of 60 s)
    with pytest.raises(ConfigError, match="accounting.fair_share_delay .* must be shorter than haproxy.batch_delay"):
        deployment(tmp_path, gguf, haproxy={"batch_delay": 10}, accounting={"fair_share_delay": 10})
    assert "set-priority-offset var(txn.queue_delay)" in render(d, [])
    off = deployment(tmp_path, gguf, accounting={"fair_share_delay": 0})
    assert not accounts.enabled(off) and "fairshare.map" not in render(off, [])


class Failing:
    """sshare and sacctmgr as they answer with slurmctld gone."""

    def accounts(self, user=None):
        raise AccountingUnavailable("Slurm accounting (slurmdbd) is unavailable: sacctmgr exited 1")

    def shares(self):
        raise AccountingUnavailable("sshare exited 1: Unable to contact slurm controller")


class Answering(Failing):
    def __init__(self, shares):
        self._shares = shares

    def accounts(self, user=None):
        return sorted(s.account for s in self._shares)

    def shares(self):
        return self._shares


def test_a_failed_refresh_keeps_the_last_order_and_says_since_when(tmp_path, gguf):
    d = deployment(tmp_path, gguf)
    d.state_dir.mkdir(mode=0o700)
    proxy = HAProxy(d, "k", key_map=lambda: {})          # not running: the map file only
    first = accounts.refresh(d, proxy, Answering([Share("physics", 1, 0.5), Share("chemistry", 1, math.inf)]), now=1000)
    assert first.delays == {"physics": 7500, "chemistry": 0} and first.error is None
    assert proxy.paths.fair_share_map_file.read_text() == "chemistry 0\nphysics 7500\n"
    # Within REFRESH_S nothing is asked again.
    assert accounts.refresh(d, proxy, Failing(), now=1010) == first
    failed = accounts.refresh(d, proxy, Failing(), now=1040)
    assert failed.delays == first.delays and failed.updated == 1000 and failed.failing_since == 1040
    assert "Unable to contact" in failed.error and "slurmdbd" in failed.slurmdbd_error
    assert proxy.paths.fair_share_map_file.read_text() == "chemistry 0\nphysics 7500\n"   # kept
    still = accounts.refresh(d, proxy, Failing(), now=1080)
    assert still.failing_since == 1040 and accounts.read_state(d) == still
    back = accounts.refresh(d, proxy, Answering([Share("physics")]), now=1120)
    assert back.error is None and back.failing_since is None and back.delays == {"physics": 0}


def utc(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc).timestamp()


def test_quota_periods_are_utc_days_weeks_from_monday_and_months():
    now = utc("2026-12-31T23:59:59")                   # a Thursday
    assert quota.period_start(now, "day") == utc("2026-12-31T00:00:00")
    assert quota.period_start(now, "week") == utc("2026-12-28T00:00:00")
    assert quota.period_start(now, "month") == utc("2026-12-01T00:00:00")
    assert quota.next_reset(now, "month") == utc("2027-01-01T00:00:00")
    assert quota.next_reset(utc("2028-02-10T12:00:00"), "month") == utc("2028-03-01T00:00:00")   # leap year
    assert quota.next_reset(now, "week") == utc("2027-01-04T00:00:00")
    with pytest.raises(ValueError):
        quota.period_start(now, "year")


def test_gpu_time_is_read_in_hours_minutes_or_seconds():
    assert quota.parse_gpu_time("200h") == 720000 and quota.parse_gpu_time("200") == 720000
    assert quota.parse_gpu_time("1.5 GPU-h") == 5400 and quota.parse_gpu_time("90m") == 5400
    assert quota.parse_gpu_time("30s") == 30
    for bad in ("-1h", "2 parsecs", "", "1e9h", "h"):
        with pytest.raises(ValueError):
            quota.parse_gpu_time(bad)


def line(started: float, held_ms: int, account: str = "physics", model: str = "m") -> dict:
    return {"time": started, "account": account, "backend": f"model_{model}", "server": "job7",
            "Ta": held_ms + 30, "TR": 10, "Tw": 15, "Tc": 5}


def test_counts_bill_like_usage_and_start_again_each_period():
    counts = quota.Counts()
    day = utc("2026-12-09T10:00:00")          # a Wednesday
    assert counts.add(line(day, 4000), now=day + 5) == "physics"
    assert counts.add({**line(day, 4000), "server": "<NOSRV>"}, now=day + 5) is None     # HAProxy answered it
    counts.add(line(day - 86400, 2000), now=day + 6)     # started yesterday: this week's and month's, not today's
    factors = {"m": 0.5}                                   # 1 GPU, 2 slots
    assert counts.gpu_seconds("physics", "day", factors) == 2.0
    assert counts.gpu_seconds("physics", "week", factors) == 3.0
    assert quota.Counts.from_json(json.loads(json.dumps(counts.to_json()))) == counts
    quotas = [quota.Quota("physics", 2.5, "day"), quota.Quota("chemistry", 3600, "month")]
    entries = quota.quota_map(quotas, counts, factors, now=day + 7)
    assert entries["physics"] == f"0|{int(utc('2026-12-10T00:00:00'))}|0.0001|2026-12-10T00:00:00Z"
    counts.add(line(day + 10, 1000), now=day + 12)        # 0.5 GPU-s more: the quota is used up
    assert quota.quota_map(quotas, counts, factors, now=day + 12)["physics"].startswith("1|")
    assert quota.quota_map(quotas, counts, factors, now=day + 12)["chemistry"].startswith("0|")
    # The next day the day's count starts from zero; the week's goes on.
    assert quota.quota_map(quotas, counts, factors, now=day + 86400)["physics"].startswith("0|")
    assert counts.gpu_seconds("physics", "week", factors) == 3.5


def test_a_writer_without_counts_starts_from_the_ledger_and_the_logs(tmp_path):
    """The quota count of a writer that finds no counts file (the first with quotas, or after it
    was lost) holds what `hpcserve usage` holds: the ledger's hours (files the rotation expired and
    reconcile folded), expired files not folded yet and the access log; what started before the
    current periods is left out."""
    import time

    from hpcserve.access import ledger
    from hpcserve.haproxy import accesslog
    from hpcserve.haproxy.quotas import Keeper
    from hpcserve.state import StateDir
    now = time.time()
    hour = now // 3600 * 3600
    state = StateDir(tmp_path / "state")
    state.ensure()
    state.expired_logs_dir.mkdir(parents=True, exist_ok=True)
    folded = [line(hour, 4000), line(hour, 500, account="chemistry"), line(hour - 40 * 86400, 9000)]
    state.usage_ledger.write_text(json.dumps({"file": "access-1.log", "buckets": ledger.buckets(folded)}) + "\n")
    (state.expired_logs_dir / "access-2.log").write_text(json.dumps(line(hour + 1, 2000)) + "\n")
    state.access_log.write_text(json.dumps(line(hour + 2, 1000)) + "\n")
    def seed(counts, now):
        accesslog._seed_counts(state, counts, now)   # what the writer's main passes
    counts = Keeper(tmp_path / "state", seed).counts
    assert counts.gpu_seconds("physics", "day", {"m": 1.0}) == pytest.approx(7.0)
    assert counts.gpu_seconds("physics", "month", {"m": 1.0}) == pytest.approx(7.0)   # 40 days ago: none
    assert counts.gpu_seconds("chemistry", "day", {"m": 1.0}) == pytest.approx(0.5)
    # Saved: the next writer goes on from the file, not from the logs again.
    state.access_log.write_text("")
    assert Keeper(tmp_path / "state", seed).counts == counts


def test_the_chargeback_splits_each_jobs_charge_and_the_rest_is_idle():
    # Job 7: 2 GPUs, 4 slots, ran 100-200 s; the window is [150, 300): 50 s x 2 GPUs = 100 GPU-s.
    job = chargeback.JobCharge("7", "pool", 100.0, 200.0, gpus=2, slots=4)

    def held(start: float, seconds: float, account: str, server: str = "job7") -> dict:
        return {"time": start, "account": account, "server": server, "Ta": int(seconds * 1000), "TR": 0, "Tw": 0,
                "Tc": 0}
    records = [held(160, 10, "physics"),        # inside: 10 s x 2/4 = 5 GPU-s
               held(140, 20, "physics"),        # half before the window: 10 s count, 5 GPU-s
               held(195, 10, "chemistry"),      # half after the job ended: 5 s count, 2.5 GPU-s
               held(170, 10, "physics", "job8"),            # another job's: not this one's
               {**held(170, 10, "physics"), "server": "<NOSRV>"}]   # held no slot
    buckets = [{"hour": 3600, "account": "physics", "server": "job7", "slot_seconds": 8.0},   # outside the window
               {"hour": 180, "account": "chemistry", "server": "job7", "slot_seconds": 4.0}]  # inside: 2 GPU-s
    charges = chargeback.split([job], records, buckets, since=150, until=300)
    assert charges["7"]["physics"] == 10 and charges["7"]["chemistry"] == 4.5
    assert charges["7"][chargeback.IDLE] == 100 - 14.5
    assert sum(charges["7"].values()) == 100
    assert chargeback.by_account({"7": charges["7"], "9": {"physics": 1.0}})["physics"] == 11


def test_openwebui_users_accounts_are_checked_in_the_file_and_against_slurmdbd(tmp_path, gguf):
    d = deployment(tmp_path, gguf, accounting={"webui_accounts": {"Ann@Example.org": "Chemistry"}})
    assert d.accounting.webui_accounts == {"ann@example.org": "chemistry"}
    for bad in ({"not-an-email": "physics"}, {"ann@example.org": "a|b"}):
        with pytest.raises(ConfigError, match="accounting.webui_accounts"):
            deployment(tmp_path, gguf, accounting={"webui_accounts": bad})
    (line,) = check.accounting_check(d, Answering([Share("physics")]))
    assert line.status == check.FAIL and "chemistry" in line.detail and "physics" in line.fix
    (line,) = check.accounting_check(d, Answering([Share("chemistry")]))
    assert line.status == check.PASS
    (line,) = check.accounting_check(d, Failing())
    assert line.status == check.WARN and "slurmdbd" in line.detail
