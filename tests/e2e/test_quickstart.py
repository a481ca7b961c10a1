"""The README's quickstart, as a new user runs it (scripts/quickstart.sh), then `down`."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.haproxy]


def test_quickstart(real_model, slurm_env, haproxy_bin):
    hpcserve = [str(ROOT / ".venv/bin/hpcserve"), "-f", str(ROOT / "examples/local.yaml")]
    try:
        result = subprocess.run([str(ROOT / "scripts/quickstart.sh")], capture_output=True, text=True,
                                timeout=900, env=slurm_env)
        assert result.returncode == 0, result.stdout + result.stderr
        reply = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"choices"')))
        assert reply["model"] == "gemma3-270m" and reply["usage"]["completion_tokens"] > 0
        assert "2 ready of 2 job(s)" in result.stdout
    finally:
        down = subprocess.run([*hpcserve, "down"], capture_output=True, text=True, env=slurm_env, timeout=300)
    assert down.returncode == 0, down.stderr
