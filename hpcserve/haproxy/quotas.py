"""The quotas as the access log writer keeps them: every billed line it writes is counted for its
account (core.quota.Counts, in STATE_DIR/logs/quota-counts.json), and HAProxy's quota map follows
at once, in its file and in every running worker (runtime API, no reload). So an account that used
its quota is refused from the next request HAProxy admits after the line that used it up arrived
(the requests in service then still finish: the overshoot is at most theirs).

The quotas and the models' GPUs per slot come from STATE_DIR/quotas.json, which `hpcserve quota`
and each reconcile step write (access/quotas.py) and which is read again whenever it changes.
When the counts file is missing (the first writer with quotas), the count starts from what
`hpcserve usage` counts: the usage ledger's hours and the billed lines the access logs hold
(access.log, its rotations and the expired files not yet folded), read together under the
ledger's lock (the writer's `seed`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..core.membership import map_text
from ..core.quota import Counts, Quota, quota_map
from ..errors import HAProxyError
from ..state import StateDir, write_private, write_private_if_changed
from . import runtime

log = logging.getLogger(__name__)

#: Seconds between two saves of the counts while lines arrive (each save is an atomic, synced file
#: write); the map follows every line regardless. A writer killed (-9) loses at most this much of
#: counting, which its successor does not see.
SAVE_INTERVAL_S = 1.0


def read_quotas(file: Path) -> tuple[list[Quota], dict[str, float]]:
    """The quotas and the GPUs per slot of each model in `file` (STATE_DIR/quotas.json); none when
    it is missing.

    Raises:
        ValueError: the file is not what access/quotas.py writes.
    """
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return [], {}
    try:
        return ([Quota(str(q["account"]), float(q["gpu_seconds"]), str(q["period"])) for q in data["quotas"]],
                {str(m): float(g) for m, g in data["gpus_per_slot"].items()})
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{file}: not a quota file ({exc})") from None


def read_counts(file: Path) -> Counts | None:
    """The counts the writer keeps, or None when there are none (or they are unreadable)."""
    try:
        return Counts.from_json(json.loads(file.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_map(state: StateDir, entries: dict[str, str]) -> int:
    """Make HAProxy's quota map `entries`: its file, then every running worker's copy; returns the
    runtime commands sent (0 when HAProxy does not run).

    Raises:
        HAProxyError: a running worker refused a change.
    """
    files = state.haproxy
    write_private_if_changed(files.quota_map_file, map_text(entries))
    try:
        runtime.show_proc(files.master_socket)
    except HAProxyError:
        return 0     # HAProxy is not running: the file is what it loads at its start
    return runtime.sync_map(files.master_socket, files.quota_map_file, entries)


class Keeper:
    """The writer's quota bookkeeping (module docstring).

    Args:
        state_dir: the deployment's state directory.
        seed: called with empty counts and the time when no counts file exists yet, to count
            what was used before (the ledger and the access logs).
    """

    def __init__(self, state_dir: Path, seed: Callable[[Counts, float], None] | None = None):
        self.state = StateDir(state_dir)
        self._stamp: tuple[int, int] | None = None
        self.quotas: list[Quota] = []
        self.gpus_per_slot: dict[str, float] = {}
        self._last_map: dict[str, str] | None = None
        self._dirty = False          # counts not saved yet
        self._saved = 0.0            # time.monotonic() of the last save
        counts = read_counts(self.state.quota_counts_file)
        if counts is None:
            counts = Counts()
            if seed is not None:
                seed(counts, time.time())
            self._save(counts)
        self.counts = counts
        self.reload_quotas()

    def reload_quotas(self) -> bool:
        """Read quotas.json again if it changed since the last read; returns True when it did."""
        try:
            info = os.stat(self.state.quotas_file)
            stamp = (info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.quotas, self.gpus_per_slot = read_quotas(self.state.quotas_file)
        except (OSError, ValueError) as exc:
            log.warning("quotas not read: %s", exc)
        return True

    def count(self, records: Iterable[dict[str, Any]]) -> None:
        """Count the billed lines just written and bring HAProxy's quota map up to date (when the
        quotas changed, or a line of an account with a quota arrived)."""
        now = time.time()
        touched = set()
        for record in records:
            try:
                account = self.counts.add(record, now)
            except (ValueError, TypeError) as exc:   # a line of a site's own format: not counted
                log.warning("line not counted for quotas: %s", exc)
                continue
            if account:
                touched.add(account)
        changed = self.reload_quotas()
        self._dirty = self._dirty or bool(touched)
        if self._dirty and time.monotonic() - self._saved >= SAVE_INTERVAL_S:
            self.save()
        if changed or touched & {q.account for q in self.quotas}:
            self.sync(now)

    def idle(self) -> None:
        """Between lines: counts not saved yet, a changed quota file, or a period that ended (its
        accounts freed)."""
        self.flush()
        if self.reload_quotas() or self.quotas:
            self.sync()

    def flush(self) -> None:
        """Save counts not saved yet (the writer stopping)."""
        if self._dirty:
            self.save()

    def save(self) -> None:
        """Write the counts (STATE_DIR/logs/quota-counts.json); a failure is logged and retried."""
        try:
            self._save(self.counts)
            self._dirty = False
        except OSError as exc:
            log.warning("quota counts not saved: %s", exc)
        self._saved = time.monotonic()

    def sync(self, now: float | None = None) -> None:
        """Write HAProxy's quota map from the counts (a failure is logged: the next line tries again)."""
        entries = quota_map(self.quotas, self.counts, self.gpus_per_slot, time.time() if now is None else now)
        if entries == self._last_map:
            return
        try:
            write_map(self.state, entries)
            self._last_map = entries
        except (OSError, HAProxyError) as exc:
            log.warning("quota map not updated: %s", exc)

    def _save(self, counts: Counts) -> None:
        write_private(self.state.quota_counts_file, json.dumps(counts.to_json()) + "\n")
