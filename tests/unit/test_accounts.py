"""Slurm accounts without Slurm: the fair-share formula and its bound, the settings that keep
interactive before batch, and what a refresh keeps when sshare fails (the real slurmdbd, sshare
and HAProxy: tests/integration/test_accounts.py)."""

from __future__ import annotations

import pytest

from hpcserve import config
from hpcserve.access import accounts
from hpcserve.core.fairshare import Share, delays, factor
from hpcserve.errors import ConfigError
from hpcserve.haproxy.config import render
from hpcserve.haproxy.process import HAProxy
from hpcserve.slurm.accounting import AccountingUnavailable
from tests.conftest import minimal


def test_slurms_fair_share_factor_and_the_delay_it_gives():
    assert factor(Share("idle", 0.5, 0.0)) == 1.0
    assert factor(Share("fair", 0.25, 0.25)) == 0.5          # used exactly its share
    assert factor(Share("heavy", 0.25, 1.0)) == 2.0 ** -4
    assert factor(Share("none", 0.0, 0.1)) == 0.0            # no shares: never ahead of others
    got = delays([Share("idle", 0.5, 0.0), Share("fair", 0.25, 0.25), Share("none", 0.0, 0.3)], 10_000)
    assert got == {"idle": 0, "fair": 5_000, "none": 10_000}   # bounded by the delay of factor 0


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
    first = accounts.refresh(d, proxy, Answering([Share("physics", 0.5, 1.0), Share("chemistry", 0.5, 0.0)]), now=1000)
    assert first.delays == {"physics": 11250, "chemistry": 0} and first.error is None
    assert proxy.paths.fair_share_map_file.read_text() == "chemistry 0\nphysics 11250\n"
    # Within REFRESH_S nothing is asked again.
    assert accounts.refresh(d, proxy, Failing(), now=1010) == first
    failed = accounts.refresh(d, proxy, Failing(), now=1040)
    assert failed.delays == first.delays and failed.updated == 1000 and failed.failing_since == 1040
    assert "Unable to contact" in failed.error and "slurmdbd" in failed.slurmdbd_error
    assert proxy.paths.fair_share_map_file.read_text() == "chemistry 0\nphysics 11250\n"   # kept
    still = accounts.refresh(d, proxy, Failing(), now=1080)
    assert still.failing_since == 1040 and accounts.read_state(d) == still
    back = accounts.refresh(d, proxy, Answering([Share("physics", 0.5, 0.0)]), now=1120)
    assert back.error is None and back.failing_since is None and back.delays == {"physics": 0}
