"""The usage ledger: what the access log's rotation would have deleted, kept as hourly totals.

The access log writer never deletes a line: a file of access.log or unbilled.log rotated past
`haproxy.access_log_files` goes to STATE_DIR/logs/expired/ (haproxy/accesslog.py). fold() sums
each such file into buckets of (hour the request started, key, OpenWebUI user, model) and appends
them to STATE_DIR/logs/usage-ledger.jsonl as one JSON line naming the file, then deletes the file:
`hpcserve usage` so counts every billed request however much traffic came since, while the ledger
grows by about one line per hour, key and user (not per request). A file already named in the
ledger (a fold cut between its append and the delete) is deleted without being counted again.
What the ledger cannot keep: queue-wait percentiles (usage reports them over the lines still in
the access log) and the second a request started (it counts by the hour).

Locking: fold() and reading() hold usage-ledger.lock (filelock; the ledger file's lock and reader
are accesslog.ledger_lock and ledger_entries, beside the files that end in it, so that the log
writer counts from the ledger too), so a report never sees a file both in the ledger and still in
expired/, or in neither.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..config import Deployment
from ..haproxy import accesslog
from ..state import StateDir
from . import usage

#: Seconds in a bucket of the ledger.
BUCKET_S = 3600


def buckets(records: Iterable[dict]) -> list[dict]:
    """Hourly usage totals of access log `records` (pure).

    Returns:
        [{"hour": epoch seconds of the hour's start (int), "key", "account" (Slurm's), "user",
        "model" (usage.model_of), "server" (job<id>, "-": none; for the chargeback), "requests",
        "ok" (ints), "errors": {kind: count}, "slot_seconds" (float), "bytes_out" (int)}], sorted
        by hour, key, account, user, model, server.
    """
    totals: dict[tuple[int, str, str, str, str, str], dict] = {}
    for record in records:
        hour = int(float(record.get("time", 0)) // BUCKET_S * BUCKET_S)
        model = usage.model_of(record)
        server = str(record.get("server", "-"))
        group = (hour, str(record.get("key", "-")), usage.account_of(record), str(record.get("user", "-")), model,
                 server if server.startswith("job") else "-")
        bucket = totals.setdefault(group, {"hour": hour, "key": group[1], "account": group[2], "user": group[3],
                                           "model": model, "server": group[5],
                                           "requests": 0, "ok": 0, "errors": {}, "slot_seconds": 0.0,
                                           "bytes_out": 0})
        bucket["requests"] += 1
        outcome = usage.kind(record)
        if outcome == "ok":
            bucket["ok"] += 1
        else:
            bucket["errors"][outcome] = bucket["errors"].get(outcome, 0) + 1
        bucket["slot_seconds"] += usage.slot_seconds(record)
        bucket["bytes_out"] += max(0, int(record.get("bytes_out", 0)))
    return [totals[group] for group in sorted(totals)]


def _folded(state: StateDir) -> set[str]:
    return {entry["file"] for entry in accesslog.ledger_entries(state)}


def fold(deployment: Deployment) -> int:
    """Sum each expired access log file into the ledger and delete it (exactly once each).

    Returns:
        the number of files folded.
    Raises:
        OSError: the ledger or an expired file could not be written, read or deleted (what was
            folded before stays folded); filelock.Timeout (an OSError) after accesslog.LEDGER_LOCK_TIMEOUT_S.
    """
    state = StateDir(deployment.state_dir)
    with accesslog.ledger_lock(state):
        files = accesslog.expired_files(deployment)
        if not files:
            return 0
        done = _folded(state)
        count = 0
        for path in files:
            if path.name not in done:
                entry = {"file": path.name, "buckets": buckets(accesslog.read_file(path))}
                _append(state.usage_ledger, (json.dumps(entry, separators=(",", ":")) + "\n").encode())
                count += 1
            path.unlink()
        return count


def _append(ledger: Path, line: bytes) -> None:
    """Append `line` on a line of its own (after a line a crash cut, a newline first), synced."""
    fd = os.open(ledger, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def reading(deployment: Deployment) -> Iterator[tuple[list[dict], Iterator[dict]]]:
    """Everything the access log ever counted, consistent while the block runs: (the ledger's
    buckets, the access log's records, accesslog.records). fold() waits meanwhile."""
    with accesslog.ledger_buckets(StateDir(deployment.state_dir)) as found:
        yield found, accesslog.records(deployment)
