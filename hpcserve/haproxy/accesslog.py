"""The access log: HAProxy's one JSON line per request, written to STATE_DIR/logs/access.log and
rotated by size, without syslog or root.

HAProxy writes each line to its file descriptor 3 (`log fd@3 format raw`, HAProxy 2.6 configuration
manual 4.2 "log": unbuffered, one writev() per line, atomic on a pipe up to PIPE_BUF bytes, dropped
and counted in DroppedLogs when it would block). hpcserve makes that descriptor a named pipe in the
private state directory, enlarged to PIPE_BYTES (open_pipe, HAProxy.start); the master passes it
to every worker through reloads. The writer started here reads the pipe and appends the lines
through Python's RotatingFileHandler: a request that reached a replica (its server a job, so it
held a slot and is billed) to access.log (access.log.1 ... .N, then expired/, never deleted here:
the usage ledger folds it, access/ledger.py); one HAProxy answered itself (the model list, 429,
400, 404, 413, 503) to unbilled.log (unbilled.log.1 ... .N, then expired/ and the ledger alike), so
that a key holder's flood of refusals is kept apart from the billed lines and rotates no line away,
a refusal included: each ends as an hourly count in the ledger. Other lines HAProxy logs there (its alerts,
"Proxy ... stopped") go to logs/haproxy.log. A line waits in the pipe while the writer is busy or
restarting; were the writer gone for long, the pipe would fill and HAProxy drop lines, which is
why every step of hpcserve restarts a writer that is not running.

Why not a datagram socket (the way before): its queue is net.unix.max_dgram_qlen datagrams (10 on
a bare kernel), so a burst of 300 requests logged 142 lines; and not a ring buffer forwarding to a
stream socket (HAProxy `ring`): an old worker exits without sending what its ring still holds, and
so lost the line of every stream that ended on it after a reload (measured, 2.6.12).

Run as `python -m hpcserve.haproxy.accesslog PIPE STATE_DIR MAX_BYTES BACKUPS HAPROXY_PID_FILE` (by `ensure_writer`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import logging.handlers
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import filelock
import psutil

from .. import proc
from ..config import Deployment
from ..core.quota import Counts
from . import quotas
from .config import paths
from ..state import StateDir

#: The pipe's size asked for (bytes; Linux's default limit for a user, /proc/sys/fs/pipe-max-size):
#: about 2,500 lines of 400 bytes wait here while the writer is busy.
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)   # Linux fcntl(2)


def open_pipe(path: Path) -> int:
    """Open the named pipe `path` for reading and writing, non-blocking, made first if missing
    (mode 0600), and enlarged to PIPE_BYTES (or the system's limit). The caller closes the
    descriptor; the pipe and its size last while any process holds it open.

    Returns:
        the file descriptor.
    Raises:
        OSError: `path` is something else than a named pipe of this user (it is then left alone),
            or it could not be made or opened.
    """
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISFIFO(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise OSError(errno.EPERM, "not a private named pipe of this user", str(path))
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
            fcntl.fcntl(fd, _F_SETPIPE_SZ, min(PIPE_BYTES, limit))
    except BaseException:
        os.close(fd)
        raise
    return fd


def holds_pipe(pid: int, path: Path) -> bool:
    """Whether process `pid` has the named pipe `path` as its file descriptor 3 (the HAProxy
    master that hpcserve started with it; one started otherwise would write its log lines to
    whatever its descriptor 3 is)."""
    try:
        held, ours = os.stat(f"/proc/{pid}/fd/3"), os.stat(path)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (ours.st_dev, ours.st_ino)


def log_file(deployment: Deployment) -> Path:
    """STATE_DIR/logs/access.log (rotated ones: access.log.1 ... .N, the highest the oldest)."""
    return StateDir(deployment.state_dir).access_log


def reached_replica(record: dict) -> bool:
    """Whether a logged request reached a replica (HAProxy's server for it is a job, "job<ID>"),
    so held one of its slots; else HAProxy answered it itself ("<NOSRV>", a 429, 400, 404 ...)."""
    return str(record.get("server", "")).startswith("job")


class KeepingHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler that moves its oldest file (FILE.N) into `expired_dir` as
    PREFIX-<epoch ns>.log instead of deleting it (Python's handler deletes it on rollover).
    `prefix`: "access" for the billed lines, "unbilled" for HAProxy's own answers."""

    def __init__(self, file: Path, max_bytes: int, backups: int, expired_dir: Path, prefix: str = "access"):
        super().__init__(file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.expired_dir = expired_dir
        self.prefix = prefix

    def doRollover(self) -> None:   # noqa: N802 (logging's name)
        oldest = Path(f"{self.baseFilename}.{self.backupCount}")
        if oldest.exists():
            self.expired_dir.mkdir(mode=0o700, exist_ok=True)
            os.replace(oldest, self.expired_dir / f"{self.prefix}-{time.time_ns()}.log")
        super().doRollover()


def _rotated(current: Path) -> list[Path]:
    """current.N ... current.1, current (the oldest first)."""
    numbered = [p for p in current.parent.glob(current.name + ".*") if p.suffix[1:].isdigit()]
    return sorted(numbered, key=lambda p: int(p.suffix[1:]), reverse=True) + [current]


def _pid_file(deployment: Deployment) -> Path:
    return StateDir(deployment.state_dir).access_writer_files[0]


def writer_pid(deployment: Deployment) -> int | None:
    """The pid of this deployment's log writer if it runs, else None (a writer started before
    2026-12-07 names the access log, not the state dir, and is recognised too)."""
    names = {str(deployment.state_dir), str(log_file(deployment))}
    return proc.pid_from_file(_pid_file(deployment), lambda argv: "hpcserve.haproxy.accesslog" in argv
                              and bool(names & set(argv)))


#: What the writer does, counted up when that changes, and written beside its pid: 1 appends and
#: rotates; 2 also counts the quotas (2026-12-07) and expires unbilled.log into the ledger. A running
#: writer of an older generation is replaced by ensure_writer (no line is lost: they wait in the pipe).
WRITER_GENERATION = 2


def writer_generation(deployment: Deployment) -> int:
    """The generation (WRITER_GENERATION) of the running writer, from its pid file: 1 for a writer
    that wrote none (one started before generations)."""
    try:
        return int(_pid_file(deployment).read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 1


def ensure_writer(deployment: Deployment) -> bool:
    """Start the log writer unless it runs (or the access log is off), replacing one of an older
    generation (WRITER_GENERATION); returns True if it was started. Lines HAProxy writes meanwhile
    wait in the pipe.

    Raises:
        OSError: the pipe is not a private named pipe of this user, or the writer exited at once.
    """
    if not deployment.haproxy.access_log:
        return False
    if writer_pid(deployment) is not None:
        if writer_generation(deployment) >= WRITER_GENERATION:
            return False
        stop_writer(deployment)       # it flushes what it read; the rest waits in the pipe
    settings = deployment.haproxy
    pipe = paths(deployment).access_log_fifo
    os.close(open_pipe(pipe))   # made (and checked) before the writer reads it
    argv = [sys.executable, "-m", "hpcserve.haproxy.accesslog", str(pipe), str(deployment.state_dir),
            str(settings.access_log_max_bytes), str(settings.access_log_files), str(paths(deployment).pid_file)]
    error_file = StateDir(deployment.state_dir).access_writer_files[1]
    with open(os.open(error_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as errors:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                   start_new_session=True)
    time.sleep(0.05)
    if process.poll() is not None:
        raise OSError(f"the access log writer did not start (see {error_file})")
    _pid_file(deployment).write_text(f"{process.pid} {WRITER_GENERATION}\n")
    return True


def stop_writer(deployment: Deployment, timeout: float = 5.0) -> None:
    """Stop the log writer (after HAProxy, so that it has the last lines)."""
    pid = writer_pid(deployment)
    if pid is not None:
        try:
            proc.terminate([psutil.Process(pid)], timeout)
        except psutil.NoSuchProcess:
            pass    # it ended by itself since writer_pid() saw it
    _pid_file(deployment).unlink(missing_ok=True)


#: Seconds the writer waits for its HAProxy to (re)appear before it exits.
ORPHAN_GRACE = 60.0


def _haproxy_alive(pid_file: Path) -> bool:
    try:
        return psutil.pid_exists(int(pid_file.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return False


def serve(pipe: Path, state_dir: Path, max_bytes: int, backups: int, haproxy_pid_file: Path) -> None:
    """Read lines from the named pipe `pipe` and append each JSON one to the access log of
    `state_dir` (StateDir.access_log, KeepingHandler) when it reached a replica, else to its
    unbilled log (StateDir.unbilled_log), each rotated at `max_bytes` bytes with `backups` older
    files; other lines (HAProxy's alerts) go to haproxy.log beside them. Returns on SIGTERM or
    SIGINT, or once the HAProxy of `haproxy_pid_file` has been gone for ORPHAN_GRACE seconds
    (killed, or stopped without hpcserve): the next step that starts HAProxy starts a writer again.
    What is in the pipe then stays for the next writer."""
    os.umask(0o077)
    state = StateDir(state_dir)
    served = KeepingHandler(state.access_log, max_bytes, backups, state.expired_logs_dir)
    unbilled = KeepingHandler(state.unbilled_log, max_bytes, backups, state.expired_logs_dir, prefix="unbilled")
    for handler in (served, unbilled):
        handler.setFormatter(logging.Formatter("%(message)s"))
    keeper = quotas.Keeper(state_dir, functools.partial(_seed_counts, state))
    running = True

    def stop(_signum, _frame):
        nonlocal running
        running = False
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fd = open_pipe(pipe)    # read and write: no end of file while HAProxy restarts
    pending = b""
    last_seen = time.monotonic()
    try:
        with open(state.logs_dir / "haproxy.log", "ab") as alerts:
            while running:
                try:
                    ready, _, _ = select.select([fd], [], [], 1.0)
                except InterruptedError:
                    continue
                if not ready:
                    keeper.idle()    # a changed quota file, a period that ended
                    if _haproxy_alive(haproxy_pid_file):
                        last_seen = time.monotonic()
                    elif time.monotonic() - last_seen > ORPHAN_GRACE:
                        return
                    continue
                try:
                    pending += os.read(fd, PIPE_BYTES)
                except BlockingIOError:
                    continue
                *lines, pending = pending.split(b"\n")
                billed = []
                for raw in lines:
                    line = raw.decode("utf-8", errors="replace")
                    if line.startswith("{"):
                        try:
                            record = json.loads(line)
                        except ValueError:
                            record = None   # a site template's own format: kept with the billed lines
                        handler = unbilled if isinstance(record, dict) and not reached_replica(record) else served
                        handler.emit(logging.makeLogRecord({"msg": line, "args": None}))
                        if handler is served and isinstance(record, dict):
                            billed.append(record)
                    elif line:
                        alerts.write(raw + b"\n")
                alerts.flush()
                keeper.count(billed)
    finally:
        keeper.flush()
        served.close()
        unbilled.close()
        os.close(fd)


def expired_files(deployment: Deployment) -> list[Path]:
    """The access logs rotated past access_log_files and not yet folded into the usage ledger
    (STATE_DIR/logs/expired/access-<ns>.log, then unbilled-<ns>.log), the oldest first."""
    state = StateDir(deployment.state_dir)
    return _expired(state) + _expired(state, "unbilled")


def _expired(state: StateDir, prefix: str = "access") -> list[Path]:
    return sorted(state.expired_logs_dir.glob(f"{prefix}-*.log"), key=lambda p: (len(p.name), p.name))


def read_file(path: Path) -> Iterator[dict]:
    """The JSON object lines of one access log file (none if it is gone); other lines (a site
    template's own format, a line cut by a crash) are skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
    except FileNotFoundError:
        return


# The usage ledger's file (STATE_DIR/logs/usage-ledger.jsonl), where the expired files end: one
# JSON line per folded file, {"file", "buckets"} (access/ledger.py writes it; its lock keeps a fold
# and a reader from seeing a file twice or not at all).

#: Seconds a fold or a reader waits for another one (a fold of one file takes well under that).
LEDGER_LOCK_TIMEOUT_S = 600.0


def ledger_lock(state: StateDir) -> filelock.FileLock:
    """The usage ledger's lock (logs/usage-ledger.lock; filelock.Timeout after LEDGER_LOCK_TIMEOUT_S)."""
    state.logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return filelock.FileLock(str(state.logs_dir / "usage-ledger.lock"), timeout=LEDGER_LOCK_TIMEOUT_S, mode=0o600)


def ledger_entries(state: StateDir) -> Iterator[dict]:
    """The usage ledger's entries ({"file", "buckets"}), oldest first; a line a crash cut is skipped
    (its file is still in expired/ and is folded again)."""
    try:
        with open(state.usage_ledger, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("buckets"), list):
                    yield entry
    except FileNotFoundError:
        return


@contextlib.contextmanager
def ledger_buckets(state: StateDir) -> Iterator[list[dict]]:
    """The ledger's hourly buckets (access/ledger.py buckets()), with folds waiting until the block
    ends: a file the block then reads from logs/expired/ is not in them, and stays there meanwhile."""
    with ledger_lock(state):
        yield [b for entry in ledger_entries(state) for b in entry["buckets"]]


def _seed_counts(state: StateDir, counts: Counts, now: float) -> None:
    """The quota count of a writer that finds none: the usage ledger's hours and the billed lines
    not folded into it, read under the ledger's lock (as `hpcserve usage` and `quota` count)."""
    with ledger_buckets(state) as buckets:
        for bucket in buckets:
            counts.add_bucket(bucket, now)
        for path in _billed_files(state):
            for record in read_file(path):
                counts.add(record, now)


def _billed_files(state: StateDir) -> list[Path]:
    """The files of billed lines: expired ones not yet folded, access.log.N ... access.log."""
    return _expired(state) + _rotated(state.access_log)


def records(deployment: Deployment) -> Iterator[dict]:
    """The access log's requests as dicts with the keys of the log-format in haproxy.cfg.j2: those
    that reached a replica (the expired files not yet in the ledger, then access.log.N ...
    access.log), then those HAProxy answered itself (the expired ones not yet in the ledger, then
    unbilled.log.N ... unbilled.log); each file's lines in the order they were written."""
    state = StateDir(deployment.state_dir)
    for path in _billed_files(state) + _expired(state, "unbilled") + _rotated(state.unbilled_log):
        yield from read_file(path)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
