"""The one helper that runs outside commands (Slurm CLI, haproxy): argv lists, never a shell; and
the ones that stop processes we started (terminate, then kill): single processes, or the process
groups of sessions we started with `start_new_session=True`.

Each command is logged at debug level (`hpcserve -v`): its argv, exit status and seconds. Argv
holds no secret (secrets travel in files and stdin only), and stdin is not logged.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from .errors import CommandError

log = logging.getLogger(__name__)


def run(argv: list[str], *, input: str | None = None, timeout: float = 60.0,
        env: Mapping[str, str] | None = None, check: bool = True,
        output: Path | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run `argv` and return its result, text mode.

    Args:
        argv: the command and its arguments; no shell is involved, so nothing needs quoting.
        input: text written to its stdin, or None for no stdin.
        timeout: seconds before it is killed.
        env: the full environment for the command, or None to inherit ours.
        check: raise on a non-zero exit status (stderr alone is never taken as failure).
        output: append stdout and stderr to this file instead of capturing them. Needed for a
            command that leaves a daemon behind (haproxy -D): the daemon would hold our pipes open.
            The error's stderr is then the file's last lines.
        pass_fds: file descriptors the command inherits (subprocess.Popen's pass_fds).

    Raises:
        CommandError: it could not be started, timed out, or (with check) exited non-zero; the
            error carries argv, returncode, stdout and stderr.
    """
    log.debug("run: %s", shlex.join(argv))
    started = time.monotonic()
    try:
        if output is None:
            result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                                    env=dict(env) if env is not None else None, pass_fds=pass_fds,
                                    stdin=None if input is not None else subprocess.DEVNULL)
        else:
            with open(output, "a") as sink:
                result = subprocess.run(argv, stdout=sink, stderr=sink, stdin=subprocess.DEVNULL, text=True,
                                        timeout=timeout, env=dict(env) if env is not None else None,
                                        pass_fds=pass_fds)
            result.stderr = "\n".join(output.read_text(errors="replace").splitlines()[-20:])
            result.stdout = ""
    except FileNotFoundError as exc:
        log.debug("%s: not found", argv[0])
        raise CommandError(argv, None, "", "", why=f"not found ({exc.filename})") from exc
    except subprocess.TimeoutExpired as exc:
        log.debug("%s: no answer within %g s", argv[0], timeout)
        raise CommandError(argv, None, _text(exc.stdout), _text(exc.stderr),
                           why=f"no answer within {timeout:g} s") from exc
    log.debug("%s exited %d after %.2f s", argv[0], result.returncode, time.monotonic() - started)
    if check and result.returncode != 0:
        raise CommandError(argv, result.returncode, result.stdout, result.stderr)
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


KILL_WAIT = 5.0
"""Seconds terminate and terminate_groups wait for what they SIGKILLed to end."""


def terminate(processes: list[psutil.Process], timeout: float = 5.0) -> None:
    """SIGTERM each process, wait up to `timeout` s for them to end, SIGKILL those still alive and
    wait (up to KILL_WAIT s) for those to end too: kill(2) returns before the target exits (see
    terminate_groups), and a caller (`hpcserve down`, then `up` on the same port) counts on it.

    A process that ended after the caller last saw it alive (a worker finishing its last stream
    just as the caller's wait timed out) is skipped, not an error: psutil raises NoSuchProcess for it.
    """
    alive = wait_ended(_signal_each(processes, signal.SIGTERM), timeout)
    alive = wait_ended(_signal_each(alive, signal.SIGKILL), KILL_WAIT)
    for process in alive:
        log.warning("process %d still runs %g s after SIGKILL", process.pid, KILL_WAIT)


def wait_ended(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` s (polling every 0.05 s) until each process has ended; returns those
    still running. A zombie has ended: it is reaped here when it is our child, and otherwise left
    to its parent. psutil.wait_procs counts a zombie that is not our child as running until its
    parent reaps it, and a daemon's (HAProxy's master after `-D`) parent is PID 1, which on these
    VMs reaped it 1-1.5 s later (measured 2026-12-08: every HAProxy stop waited that long)."""
    deadline = time.monotonic() + timeout
    alive = list(processes)
    while True:
        alive = [process for process in alive if _running(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _running(process: psutil.Process) -> bool:
    try:
        if not process.is_running():       # ended, and reaped (or its pid reused since)
            return False
        if process.status() != psutil.STATUS_ZOMBIE:
            return True
        try:
            process.wait(0)                 # reaps it if it is our child
        except psutil.Error:
            pass
        return False
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:    # another user's now: running, as far as we can tell
        return True


def _signal_each(processes: list[psutil.Process], sig: signal.Signals) -> list[psutil.Process]:
    """Send `sig` to each process; returns those it reached (the others had ended, or are another
    user's: a pid reused since we recorded it, which the kernel refuses us and we leave alone)."""
    reached = []
    for process in processes:
        try:
            process.send_signal(sig)
            reached.append(process)
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            log.warning("process %d belongs to another user now: left alone", process.pid)
    return reached


def terminate_groups(pgids: list[int], timeout: float = 15.0) -> None:
    """SIGTERM each process group, wait up to `timeout` s until none of its processes runs, then
    SIGKILL the groups that still have one and wait (up to KILL_WAIT s) until they have ended too.

    `pgids` are the ids of groups we started as sessions (`subprocess.Popen(...,
    start_new_session=True)` makes the child's pid its group id), so a job script's or OpenWebUI's
    children end with it. A group already gone is skipped, not an error. Polls every 0.2 s.

    SIGKILL is delivered, not carried out, when kill(2) returns: the target still runs until the
    kernel schedules it to exit (measured here: a killed group still had a running process when
    checked at once, 49 times of 50). Hence the second wait: when this returns, the sessions' ports
    and files are released. A process that survives KILL_WAIT (uninterruptible sleep in the kernel)
    is logged, not waited for.
    """
    groups = _wait_gone([pgid for pgid in pgids if _signal_group(pgid, signal.SIGTERM)], timeout)
    groups = _wait_gone([pgid for pgid in groups if _signal_group(pgid, signal.SIGKILL)], KILL_WAIT)
    for pgid in groups:
        log.warning("process group %d still runs %g s after SIGKILL", pgid, KILL_WAIT)


def _wait_gone(pgids: list[int], timeout: float) -> list[int]:
    """Poll every 0.2 s, up to `timeout` s, until no process of these groups runs; returns those
    that still have one."""
    deadline = time.monotonic() + timeout
    while pgids:
        pgids = [pgid for pgid in pgids if group_alive(pgid)]
        if not pgids or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    return pgids


def pid_from_file(pid_file: Path, matches: Callable[[list[str]], bool]) -> int | None:
    """The pid in `pid_file` (its first word) if that process runs, is no zombie and its command
    line `matches` (a pid the kernel gave to another program since is not taken for ours); else None."""
    try:
        pid = int(pid_file.read_text().split()[0])
        process = psutil.Process(pid)
        if matches(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
            return pid
    except (OSError, ValueError, IndexError, psutil.Error):
        pass
    return None


def started_at(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, psutil's create_time), or None if no
    process `pid` runs (a zombie does not). A pid file holding this beside the pid tells our
    process from a later one that reused its pid: compare within 1 s."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def group_alive(pgid: int) -> bool:
    """A process of group `pgid` still runs (a zombie, dead but not yet reaped by its parent, does
    not count)."""
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send `sig` to group `pgid`; False if the group had ended, or is another user's (a group id
    reused since we recorded it: killpg(2) answers EPERM, and we leave it alone)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("process group %d belongs to another user now: left alone", pgid)
        return False
    return True
