"""The access log: HAProxy's one JSON line per request, written to STATE_DIR/logs/access.log and
rotated by size, without syslog or root.

HAProxy sends each line as one datagram to a UNIX socket in the private state directory (`log
/path format raw`, HAProxy 2.6 configuration manual 4.2 "log"); the writer started here reads them
and appends them through Python's RotatingFileHandler (access.log, access.log.1 ... .N). HAProxy
never blocks on logging: were the writer gone, lines would be dropped and counted by HAProxy
(`show info`, DroppedLogs), which is why every step of hpcserve restarts a writer that is not running.

Run as `python -m hpcserve.accesslog SOCKET FILE MAX_BYTES BACKUPS HAPROXY_PID_FILE` (by `ensure_writer`).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from . import proc
from .config import Deployment
from .haproxy.config import paths
from .state import StateDir

#: The receive buffer asked for (bytes): a burst of lines waits here while a line is written.
RECEIVE_BUFFER = 4 << 20


def log_file(deployment: Deployment) -> Path:
    """STATE_DIR/logs/access.log (rotated ones: access.log.1 ... .N, the highest the oldest)."""
    return StateDir(deployment.state_dir).access_log


def _pid_file(deployment: Deployment) -> Path:
    return StateDir(deployment.state_dir).access_writer_files[0]


def writer_pid(deployment: Deployment) -> int | None:
    """The pid of this deployment's log writer if it runs, else None."""
    try:
        pid = int(_pid_file(deployment).read_text().split()[0])
        process = psutil.Process(pid)
        if "hpcserve.accesslog" in process.cmdline() and str(log_file(deployment)) in process.cmdline() \
                and process.status() != psutil.STATUS_ZOMBIE:
            return pid
    except (OSError, ValueError, IndexError, psutil.Error):
        pass
    return None


def ensure_writer(deployment: Deployment, timeout: float = 10.0) -> bool:
    """Start the log writer unless it runs (or the access log is off); returns True if it was started.

    Raises:
        OSError: it could not be started, or its socket did not appear within `timeout` seconds.
    """
    if not deployment.haproxy.access_log or writer_pid(deployment) is not None:
        return False
    settings = deployment.haproxy
    sock = paths(deployment).access_log_socket
    sock.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "hpcserve.accesslog", str(sock), str(log_file(deployment)),
            str(settings.access_log_max_bytes), str(settings.access_log_files), str(paths(deployment).pid_file)]
    error_file = StateDir(deployment.state_dir).access_writer_files[1]
    with open(os.open(error_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as errors:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise OSError(f"the access log writer did not start (see {error_file})")
        time.sleep(0.02)
    _pid_file(deployment).write_text(f"{process.pid}\n")
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


def serve(sock_path: Path, file: Path, max_bytes: int, backups: int, haproxy_pid_file: Path) -> None:
    """Receive datagrams on `sock_path` (made 0600) and append each as a line of `file`, rotating it
    at `max_bytes` bytes and keeping `backups` older files. Returns on SIGTERM or SIGINT, or once
    the HAProxy of `haproxy_pid_file` has been gone for ORPHAN_GRACE seconds (killed, or stopped
    without hpcserve): the next step that starts HAProxy starts a writer again."""
    os.umask(0o077)
    handler = logging.handlers.RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind(str(sock_path))
        running = True

        def stop(_signum, _frame):
            nonlocal running
            running = False
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        sock.settimeout(1.0)
        last_seen = time.monotonic()
        try:
            while running:
                try:
                    data = sock.recv(65536)
                except (TimeoutError, InterruptedError):
                    if _haproxy_alive(haproxy_pid_file):
                        last_seen = time.monotonic()
                    elif time.monotonic() - last_seen > ORPHAN_GRACE:
                        return
                    continue
                line = data.decode("utf-8", errors="replace").rstrip("\n")
                handler.emit(logging.makeLogRecord({"msg": line, "args": None}))
        finally:
            handler.close()
            sock_path.unlink(missing_ok=True)


def records(deployment: Deployment) -> Iterator[dict]:
    """The access log's requests, oldest file first (access.log.N ... access.log), as dicts with
    the keys of the log-format in haproxy.cfg.j2. Lines that are not JSON objects (a site template
    with another format, a line cut by a crash) are skipped."""
    current = log_file(deployment)
    rotated = sorted(current.parent.glob(current.name + ".*"),
                     key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else -1, reverse=True)
    for path in [p for p in rotated if p.suffix[1:].isdigit()] + [current]:
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
            continue


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
