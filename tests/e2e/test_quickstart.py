"""The README's quickstart, as a new user runs it (scripts/quickstart.sh --webui): a pool, a chat
completion, and OpenWebUI started by `hpcserve webui` from the .venv-webui that setup installed,
with the sign-in the script points to; then `webui --stop` and `down`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, missing

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.haproxy]


def test_quickstart(real_model, slurm_env, haproxy_bin):
    if not (ROOT / ".venv-webui" / "bin" / "open-webui").exists():
        missing("open-webui in .venv-webui (scripts/setup.sh installs it)")
    hpcserve = [str(ROOT / ".venv/bin/hpcserve"), "-f", str(ROOT / "examples/local.yaml")]
    try:
        result = subprocess.run([str(ROOT / "scripts/quickstart.sh"), "--webui"], capture_output=True, text=True,
                                timeout=900, env=slurm_env)
        assert result.returncode == 0, result.stdout + result.stderr
        reply = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"choices"')))
        assert reply["model"] == "gemma3-270m" and reply["usage"]["completion_tokens"] > 0
        assert "2 ready of 2 job(s)" in result.stdout
        # The line that says where to point a browser and how to sign in, and it works.
        match = re.search(r"OpenWebUI: (http://\S+) \(admin (\S+), password in (\S+)\)", result.stdout)
        assert match, result.stdout
        base, email, password_file = match.group(1), match.group(2), Path(match.group(3))
        assert base == "http://127.0.0.1:8080" and "ssh -L 8080:127.0.0.1:8080" in result.stdout
        signin = httpx.post(f"{base}/api/v1/auths/signin", timeout=30,
                            json={"email": email, "password": password_file.read_text().strip()})
        auth = {"Authorization": f"Bearer {signin.json()['token']}"}
        assert [m["id"] for m in httpx.get(f"{base}/api/models", headers=auth, timeout=30).json()["data"]] == [
            "gemma3-270m"]
        config = httpx.get(f"{base}/api/config", headers=auth, timeout=30).json()
        assert config["default_models"] == "gemma3-270m"
    finally:
        stop = subprocess.run([*hpcserve, "webui", "--stop"], capture_output=True, text=True, env=slurm_env)
        down = subprocess.run([*hpcserve, "down"], capture_output=True, text=True, env=slurm_env, timeout=300)
    assert stop.returncode == 0, stop.stderr
    assert down.returncode == 0, down.stderr
