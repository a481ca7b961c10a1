"""proc: stopping the process groups of sessions we started (the local scheduler's jobs, OpenWebUI)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from hpcserve import proc


def _session(script: str) -> subprocess.Popen:
    process = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len([p for p in psutil.Process(process.pid).children()]) < 1:   # its child started
        assert time.monotonic() < deadline, "the session's child did not start"
        time.sleep(0.05)
    return process


def _kill_session(process: subprocess.Popen) -> None:
    """The test's own cleanup: SIGKILL the whole session (its child too), reap its leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def test_terminate_groups_returns_only_once_the_killed_group_has_ended():
    """SIGKILL is carried out after kill(2) returns; a caller told the group is stopped (webui --stop:
    "its port is free") must not find a process of it still running."""
    for _ in range(10):   # without the wait, about half the tries here find the child still running
        process = _session("trap '' TERM; sleep 300 & wait")
        try:
            proc.terminate_groups([process.pid], timeout=0)
            assert not proc.group_alive(process.pid)
        finally:
            _kill_session(process)


def test_terminate_returns_only_once_the_killed_process_has_ended():
    """The same for single processes (HAProxy's master and workers at `hpcserve down`)."""
    for _ in range(10):
        session = _session("trap '' TERM; sleep 300 & wait")
        try:
            child = psutil.Process(session.pid).children()[0]
            proc.terminate([child], timeout=0)
            assert proc.started_at(child.pid) is None   # gone, or a zombie: no longer runs
        finally:
            _kill_session(session)


def test_a_zombie_that_is_not_our_child_has_ended():
    """Its parent (here a `sleep` that never reaps; for HAProxy's daemonized master, PID 1) may
    reap it late: waiting for the reaping made every HAProxy stop take 1-1.5 s on these VMs."""
    parent = subprocess.Popen(["bash", "-c", "sleep 0.1 & exec sleep 300"])
    try:
        deadline = time.monotonic() + 10
        while not (children := psutil.Process(parent.pid).children()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child = children[0]
        while child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert psutil.wait_procs([child], timeout=0.3)[1] == [child]     # psutil: still running
        started = time.monotonic()
        assert proc.wait_ended([child], timeout=5) == []
        assert time.monotonic() - started < 1
        assert proc.wait_ended([psutil.Process(parent.pid)], timeout=0.2) != []   # a live one runs
    finally:
        parent.kill()
        parent.wait()


def test_terminate_groups_leaves_other_groups_and_skips_ended_ones():
    ours, other = _session("sleep 300 & wait"), _session("sleep 300 & wait")
    try:
        proc.terminate_groups([ours.pid], timeout=5)
        assert ours.wait(timeout=5) != 0 and not proc.group_alive(ours.pid)
        assert proc.group_alive(other.pid)
        proc.terminate_groups([ours.pid], timeout=5)   # already gone: not an error
    finally:
        for process in (ours, other):
            _kill_session(process)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the stop as another user")
def test_a_group_id_reused_by_another_user_is_left_alone_without_an_error():
    """A pid file may name a group id that another user's session has since taken; the kernel
    refuses the signal (EPERM) and the stop goes on: no traceback, the other session untouched.
    Here the stop runs as `nobody` against a session of root's."""
    theirs = _session("sleep 300 & wait")
    try:
        child = os.fork()
        if child == 0:   # the stop, as another user
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                proc.terminate_groups([theirs.pid], timeout=0)
                proc.terminate([psutil.Process(theirs.pid)], timeout=0)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert theirs.poll() is None and proc.group_alive(theirs.pid)
    finally:
        _kill_session(theirs)
