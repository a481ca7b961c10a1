"""Two commands that change the desired state, racing: the second builds on what the first wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hpcserve.core.pool import Desired
from hpcserve.state import StateDir
from tests.conftest import free_port, minimal, write_deployment

pytestmark = pytest.mark.haproxy


def test_a_command_queued_behind_another_does_not_write_back_a_stale_desired_state(tmp_path, gguf, haproxy_bin):
    raw = minimal(gguf, tmp_path, scheduler="local",
                  haproxy={"port": free_port(), "stats_port": free_port(), "auth": "open"})
    # Backends that end at once: only the desired state matters here.
    raw["models"] = [{"name": "a", "gguf": str(gguf), "command": "/bin/false", "replicas": 0},
                     {"name": "b", "gguf": str(gguf), "command": "/bin/false", "replicas": 0}]
    path = write_deployment(tmp_path, raw)
    hpcserve = [sys.executable, "-m", "hpcserve", "-f", str(path)]
    env = {**os.environ, "SLURM_CONF": "/nonexistent"}
    subprocess.run([*hpcserve, "up", "--no-wait"], check=True, capture_output=True, env=env, timeout=120)
    state = StateDir(tmp_path / "state")
    try:
        with state.lock(timeout=10):   # another command (an autoscale run) holds the deployment
            queued = subprocess.Popen([*hpcserve, "scale", "1", "--model", "a"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(3)   # the scale command has started and waits for the lock
            assert queued.poll() is None
            state.write_desired(Desired(up=True, replicas={"a": 0, "b": 2}))   # what the other one decided
        _, stderr = queued.communicate(timeout=120)
        assert queued.returncode == 0, stderr
        assert json.loads(state.desired_file.read_text())["replicas"] == {"a": 1, "b": 2}
    finally:
        subprocess.run([*hpcserve, "down", "--now", "--timeout", "60"], capture_output=True, env=env, timeout=180)
