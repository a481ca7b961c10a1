"""hpcserve webui: the environment that wires OpenWebUI to the pool, its job script, and stopping
it (here a stand-in program; tests/e2e/test_webui.py drives the real OpenWebUI in a browser)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from hpcserve import config, proc
from hpcserve.clients import webui
from hpcserve.state import StateDir
from tests.conftest import minimal, write_deployment


def hpcserve(path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "hpcserve", "-f", str(path), *args], capture_output=True,
                          text=True, env=env or os.environ)


def test_env_wires_openwebui_to_the_pool_with_private_secrets(tmp_path, gguf):
    keys = tmp_path / "keys"
    keys.write_text("frontend-key-0123456789abcdefghijklmnopqrstuv\n")
    path = write_deployment(tmp_path, minimal(gguf, tmp_path, haproxy={"port": 8123, "api_keys_file": str(keys)}))
    result = hpcserve(path, "webui", "--env")
    assert result.returncode == 0, result.stderr
    env = dict(line.split("=", 1) for line in result.stdout.splitlines())
    env = {k: shlex.split(v)[0] for k, v in env.items()}
    # OpenWebUI's own key (made on first use, 0600): the one key whose requests may name a user.
    webui_key = (tmp_path / "state" / "webui" / "api.key").read_text().strip()
    assert env["OPENAI_API_BASE_URL"] == "http://127.0.0.1:8123/v1" and env["OPENAI_API_KEY"] == webui_key
    assert (tmp_path / "state" / "webui" / "api.key").stat().st_mode & 0o077 == 0
    assert env["ENABLE_FORWARD_USER_INFO_HEADERS"] == "True"
    listed = json.loads(hpcserve(path, "keys", "list", "--json").stdout)
    assert [(k["name"], k["source"], k["forwards_users"]) for k in listed] == [
        ("openwebui", "openwebui", True), ("file-" + hashlib.sha256(b"frontend-key-0123456789abcdefghijklmnopqrstuv").hexdigest()[:8], "file", False)]
    assert (env["ENABLE_OLLAMA_API"], env["OFFLINE_MODE"], env["ENABLE_PERSISTENT_CONFIG"],
            env["BYPASS_MODEL_ACCESS_CONTROL"]) == ("False", "True", "False", "True")
    webui_dir = tmp_path / "state" / "webui"
    assert env["DATA_DIR"] == str(webui_dir / "data")
    assert env["WEBUI_SECRET_KEY"] == (webui_dir / "secret-key").read_text().strip()
    assert env["WEBUI_ADMIN_PASSWORD"] == (webui_dir / "admin-password").read_text().strip()
    for name in ("secret-key", "admin-password"):
        assert (webui_dir / name).stat().st_mode & 0o077 == 0
    assert hpcserve(path, "webui", "--env").stdout == result.stdout   # stable: secrets are kept


def test_webui_without_open_webui_installed_says_how_to_get_it(tmp_path, gguf):
    # A name found nowhere: not on PATH, not beside this Python, not in the checkout's .venv-webui.
    path = write_deployment(tmp_path, {**minimal(gguf, tmp_path), "webui": {"command": "open-webui-of-nowhere"}})
    result = hpcserve(path, "webui", env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "pip install 'hpcserve[webui]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_openwebui_as_a_slurm_job_names_its_secrets_file_only(tmp_path, gguf):
    raw = minimal(gguf, tmp_path, haproxy={"bind": "0.0.0.0", "port": 8123})
    raw["webui"] = {"partition": "cpu", "port": 8181, "host": "10.0.0.7"}
    path = write_deployment(tmp_path, raw)
    script = hpcserve(path, "webui", "--sbatch").stdout
    env_file = tmp_path / "state" / "webui" / "env"
    assert "#SBATCH --partition=cpu\n" in script and "#SBATCH --job-name=hpcserve-webui:t\n" in script
    assert f". {env_file}\n" in script and "serve --host 10.0.0.7 --port 8181" in script
    # The job reaches the pool at this login node's name, not at 127.0.0.1 (the compute node itself).
    assert f"OPENAI_API_BASE_URL=http://{socket.getfqdn()}:8123/v1\n" in env_file.read_text()
    secret = (tmp_path / "state" / "webui" / "secret-key").read_text().strip()
    assert secret not in script and secret in env_file.read_text()
    assert env_file.stat().st_mode & 0o077 == 0
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_openwebui_job_is_refused_when_the_pool_listens_on_loopback_only(tmp_path, gguf):
    path = write_deployment(tmp_path, minimal(gguf, tmp_path, haproxy={"bind": "127.0.0.1"}))
    result = hpcserve(path, "webui", "--sbatch")
    assert result.returncode == 2 and result.stdout == ""
    assert "haproxy.bind: 127.0.0.1 is reachable from this host only" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def deployment(tmp_path, gguf):
    """A loaded deployment with its state folder (0700), as the CLI has it before `webui`."""
    loaded = config.load(write_deployment(tmp_path, minimal(gguf, tmp_path)))
    StateDir(loaded.state_dir).ensure()
    return loaded


@pytest.fixture
def stubborn(tmp_path):
    """A stand-in for `open-webui` that ignores SIGTERM and starts a child that inherits the ignore."""
    path = tmp_path / "open-webui"
    path.write_text("#!/bin/bash\ntrap '' TERM\nsleep 300 &\nwait\n")
    path.chmod(0o700)
    return path


def test_webui_stop_ends_its_whole_session_even_a_process_that_ignores_sigterm(deployment, stubborn):
    """`hpcserve webui --stop` must leave the port free: SIGTERM to the session, SIGKILL after the
    timeout to a server (and its children) that ignore it."""
    process = webui.start(deployment, str(stubborn), webui.environment(deployment))   # as the CLI does
    try:
        deadline = time.monotonic() + 10
        while len([p for p in psutil.process_iter() if _pgid(p) == process.pid]) < 2:
            assert time.monotonic() < deadline, "the stand-in's child did not start"
            time.sleep(0.1)
        webui.stop(deployment, timeout=1)
        assert not proc.group_alive(process.pid)
        assert process.wait(timeout=5) == -signal.SIGKILL
        assert not (StateDir(deployment.state_dir).webui_dir / "webui.pid").exists()
        webui.stop(deployment, timeout=1)   # nothing runs: not an error
    finally:
        proc.terminate_groups([process.pid], timeout=0)


def _pgid(process):
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_webui_that_cannot_record_its_pid_is_not_left_running(deployment, stubborn):
    """start() writes the pid file stop() needs; when it cannot (here: no STATE_DIR/webui, which
    environment() would have made), the session it started is stopped before the error goes up."""
    with pytest.raises(FileNotFoundError):
        webui.start(deployment, str(stubborn), {})
    time.sleep(0.5)
    left = [p for p in psutil.process_iter(["cmdline", "status"])
            if str(stubborn) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert left == []


def test_webui_stop_leaves_alone_a_process_that_reused_the_pid(deployment):
    """The pid file names OpenWebUI's pid and start time; a later process with that pid (here: any
    other session of the same user) is not signalled, and the stale pid file goes."""
    webui.environment(deployment)
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        pid_file = StateDir(deployment.state_dir).webui_dir / "webui.pid"
        pid_file.write_text(f"{other.pid} {psutil.Process(other.pid).create_time() - 3600}\n")
        webui.stop(deployment, timeout=1)
        assert other.poll() is None and not pid_file.exists()
        pid_file.write_text(f"{other.pid}\n")   # an older hpcserve's pid file (no start time): trusted
        webui.stop(deployment, timeout=1)
        assert other.wait(timeout=5) == -signal.SIGTERM
    finally:
        other.kill()
        other.wait()


def test_batch_groups_are_checked_and_a_failed_read_keeps_the_last_members(tmp_path, gguf, monkeypatch):
    from hpcserve.access import webui_groups
    from hpcserve.errors import ConfigError, HpcserveError
    for bad in ([""], ["a\nb"], ["x" * 256]):
        with pytest.raises(ConfigError, match="webui.batch_groups"):
            config.parse(minimal(gguf, tmp_path, webui={"batch_groups": bad}), base=tmp_path)
    for bad in ({"bulk": "no spaces"}, {"": "physics"}):
        with pytest.raises(ConfigError, match="accounting.webui_group_accounts"):
            config.parse(minimal(gguf, tmp_path, accounting={"webui_group_accounts": bad}), base=tmp_path)
    d = config.parse(minimal(gguf, tmp_path, webui={"batch_groups": ["bulk work"], "batch_users": ["Dee@example.org"]},
                             accounting={"webui_accounts": {"cy@example.org": "physics"},
                                         "webui_group_accounts": {"chem lab": "Chemistry", "bulk work": "biology"}}),
                     base=tmp_path)
    assert webui_groups.enabled(d) and webui_groups.groups(d) == ["bulk work", "chem lab"]
    assert d.accounting.accounts_named() == {"physics", "chemistry", "biology"}
    StateDir(d.state_dir).ensure()

    class Proxy:
        synced: list = []

        def sync_webui_batch(self, emails):
            self.synced.append(emails)

        def sync_webui_accounts(self, accounts):
            self.synced.append(accounts)

    monkeypatch.setattr(webui, "group_members", lambda deployment, names: {
        "bulk work": ["ann@example.org", "cy@example.org"], "chem lab": ["ann@example.org", "bo@example.org"]})
    first = webui_groups.refresh(d, Proxy(), now=100)
    # Ann is in both groups: the group listed first in webui_group_accounts; Cy's own entry wins.
    assert first.error is None and Proxy.synced == [
        ["ann@example.org", "cy@example.org", "dee@example.org"],
        {"ann@example.org": "chemistry", "bo@example.org": "chemistry", "cy@example.org": "physics"}]

    def unreachable(deployment, names):
        raise HpcserveError("OpenWebUI's groups could not be read at http://127.0.0.1:8080: refused")
    monkeypatch.setattr(webui, "group_members", unreachable)
    failed = webui_groups.refresh(d, Proxy(), now=160)
    assert failed.members == first.members and failed.failing_since == 160 and "refused" in failed.error
    # The maps keep the members last read (and follow the deployment file's own entries).
    assert Proxy.synced[2:] == Proxy.synced[:2] and webui_groups.batch_users(d) == [
        "ann@example.org", "cy@example.org", "dee@example.org"]
