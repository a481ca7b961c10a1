"""OpenWebUI wired to the pool: its environment, and starting it on the login node.

The settings (verified with open-webui 0.12.4, ../shared/DESIGN.md; admin variables from
open_webui/env.py): one OpenAI connection to the HAProxy /v1 URL (OpenWebUI's list of several URLs
does not load-balance), Ollama off, offline mode (else ~90 s of retries to reach a model hub),
ENABLE_PERSISTENT_CONFIG=False (else environment changes after the first start are ignored), the
pool's models visible to every user, the user-info headers forwarded (the user's e-mail is what the
access log accounts by, the chat id header what prompt-cache affinity keys on), the admin account created from the environment. The data folder,
secret key and admin password live in STATE_DIR/webui, private to the owner.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from .. import proc, templates
from ..config import ANY_ADDRESSES, Deployment, is_loopback, url_host
from ..config.schema import EMAIL_PATTERN
from ..errors import ConfigError, HpcserveError, WaitTimeout
from ..state import StateDir, read_secret, secret_file, write_private


def folder(deployment: Deployment) -> Path:
    """STATE_DIR/webui: OpenWebUI's data, secret key, admin password, env file (0700)."""
    return StateDir(deployment.state_dir).webui_dir


def key_file(deployment: Deployment) -> Path:
    """OpenWebUI's frontend API key (0600), made on first use; keys.py accepts it as "openwebui"."""
    return folder(deployment) / "api.key"


def environment(deployment: Deployment, pool_url: str | None = None) -> dict[str, str]:
    """The environment OpenWebUI needs for this deployment (secrets created on first use).

    Args:
        pool_url: the pool's OpenAI base URL as OpenWebUI reaches it; default: deployment.url
            (this host).
    Raises:
        ConfigError: the state directory cannot be created, or a key file is not a key.
    """
    state = StateDir(deployment.state_dir)
    state.ensure()
    root = folder(deployment)
    (root / "data").mkdir(mode=0o700, parents=True, exist_ok=True)
    return {
        "OPENAI_API_BASE_URL": pool_url or deployment.url,
        # OpenWebUI's own key (keys.py, "openwebui"): the one key whose requests may name their
        # user (X-OpenWebUI-User-Email, forwarded below), accounted per user in the access log.
        "OPENAI_API_KEY": secret_file(key_file(deployment)) if deployment.haproxy.auth == "keys" else "hpcserve",
        "ENABLE_OLLAMA_API": "False",
        "OFFLINE_MODE": "True",
        "ENABLE_PERSISTENT_CONFIG": "False",
        "BYPASS_MODEL_ACCESS_CONTROL": "True",
        "ENABLE_FORWARD_USER_INFO_HEADERS": "True",
        # The pool's (first) model preselected in a new chat, and no release-notes dialog at the
        # first sign-in (open_webui/config.py: DEFAULT_MODELS, DEFAULT_INTERFACE_SETTINGS, whose
        # showChangelog the frontend reads before showing "What's New").
        "DEFAULT_MODELS": deployment.models[0].name,
        "DEFAULT_INTERFACE_SETTINGS": json.dumps({"showChangelog": False}),
        "DATA_DIR": str(root / "data"),
        "WEBUI_SECRET_KEY": secret_file(root / "secret-key"),
        "WEBUI_ADMIN_EMAIL": deployment.webui.admin_email,
        "WEBUI_ADMIN_NAME": "hpcserve admin",
        "WEBUI_ADMIN_PASSWORD": secret_file(root / "admin-password", 18),
    }


def job_script(deployment: Deployment) -> str:
    """The batch script that runs OpenWebUI as a Slurm job; its environment is written to
    STATE_DIR/webui/env (0600) and only named by the script.

    Raises:
        TemplateError: a template is broken (one line naming file and line).
    """
    env_file = folder(deployment) / "env"
    env = environment(deployment, pool_url_from_compute_nodes(deployment))
    write_private(env_file, "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    return templates.render("openwebui.sbatch.j2", deployment.templates_dir, deployment=deployment,
                            webui=deployment.webui, slurm=deployment.slurm, env_file=env_file,
                            log_dir=StateDir(deployment.state_dir).logs_dir)


def pool_url_from_compute_nodes(deployment: Deployment) -> str:
    """The pool's OpenAI base URL as a job on a compute node reaches it: the frontend's address,
    or this login node's name when the frontend listens on every address.

    Raises:
        ConfigError: the frontend listens on a loopback address only, which no compute node reaches.
    """
    bind = deployment.haproxy.bind
    if bind in ANY_ADDRESSES:
        host = socket.getfqdn()
    else:
        if is_loopback(bind):
            raise ConfigError(f"haproxy.bind: {bind} is reachable from this host only, so an OpenWebUI job on a "
                              "compute node cannot reach the pool; bind the frontend to this login node's "
                              "address (keep haproxy.auth: keys), or run `hpcserve webui` here")
        host = bind
    return f"http://{url_host(host)}:{deployment.haproxy.port}/v1"


def find_program(command: str) -> str | None:
    """The open-webui program `hpcserve webui` starts: `command` itself when it is a path; else the
    name on PATH, beside this Python (pip install 'hpcserve[webui]'), or in the .venv-webui that
    scripts/setup.sh installs beside this checkout's .venv (OpenWebUI's dependencies pin versions
    of packages hpcserve uses too, so setup keeps it apart). None when none is there."""
    if "/" in command:
        return command if os.path.exists(command) else None
    prefix = Path(sys.prefix)
    for candidate in (shutil.which(command), prefix / "bin" / command, prefix.parent / ".venv-webui" / "bin" / command):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def url(deployment: Deployment) -> str:
    """Where OpenWebUI answers, e.g. http://127.0.0.1:8080."""
    return f"http://{deployment.webui.host}:{deployment.webui.port}"


def group_members(deployment: Deployment, names: list[str], timeout: float = 10.0) -> dict[str, list[str]]:
    """The e-mails (lower case) of the members of OpenWebUI's groups `names`, asked of OpenWebUI's
    API as its admin (the account hpcserve made). OpenWebUI forwards a user's name, id, e-mail and
    role with each request, not their groups (open_webui/utils/headers.py, 0.12.4), so a group is
    turned into its members here.

    API (open_webui/routers/auths.py, groups.py, 0.12.4): POST /api/v1/auths/signin {email,
    password} -> {token}; GET /api/v1/groups/ -> [{id, name}]; POST /api/v1/groups/id/ID/users ->
    [{email}] (admin only). The admin's token is kept in STATE_DIR/webui/admin-token (0600, beside
    the admin password) and a new one asked for only when OpenWebUI refuses it: OpenWebUI allows
    15 sign-ins of one e-mail in 3 minutes (auths.py, signin_rate_limiter), and each reconcile
    step reads the groups.

    Args:
        names: group names as OpenWebUI shows them (webui.batch_groups); a group OpenWebUI does
            not have has no members.
        timeout: seconds for each call.
    Returns:
        group name -> its members' e-mails, sorted, for every name given.
    Raises:
        HpcserveError: OpenWebUI is not answering, refused the admin's sign-in, or answered
            something that is not its API's; ConfigError: a secret file is not private.
    """
    root = folder(deployment)
    password = read_secret(root / "admin-password")
    if password is None:
        raise HpcserveError("OpenWebUI has no admin password yet (`hpcserve webui` makes it)")
    base = url(deployment)
    try:
        with httpx.Client(base_url=base, timeout=timeout) as client:
            def sign_in() -> str:
                answer = client.post("/api/v1/auths/signin",
                                     json={"email": deployment.webui.admin_email, "password": password})
                answer.raise_for_status()
                token = str(answer.json()["token"])
                write_private(root / "admin-token", token + "\n")
                return token

            token = read_secret(root / "admin-token") or sign_in()
            listed = client.get("/api/v1/groups/", headers={"Authorization": f"Bearer {token}"})
            if listed.status_code == 401:          # expired, or OpenWebUI's secret key changed
                token = sign_in()
                listed = client.get("/api/v1/groups/", headers={"Authorization": f"Bearer {token}"})
            listed.raise_for_status()
            ids = {group["name"]: group["id"] for group in listed.json()}
            members: dict[str, list[str]] = {}
            for name in names:
                if name not in ids:
                    members[name] = []
                    continue
                users = client.post(f"/api/v1/groups/id/{ids[name]}/users", headers={"Authorization": f"Bearer {token}"})
                users.raise_for_status()
                emails = {str(user["email"]).strip().lower() for user in users.json()}
                # Only plain addresses: each becomes a word of a runtime API command (add map).
                members[name] = sorted(e for e in emails if re.fullmatch(EMAIL_PATTERN, e))
            return members
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise HpcserveError(f"OpenWebUI's groups could not be read at {base}: {exc}") from exc


def answers(address: str) -> bool:
    """Whether GET `address` answers 200 within 2 s."""
    try:
        return httpx.get(address, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def program(deployment: Deployment) -> str:
    """The open-webui program to start (find_program of webui.command).

    Raises:
        HpcserveError: it is not installed.
    """
    found = find_program(deployment.webui.command)
    if found is None:
        raise HpcserveError(f"{deployment.webui.command} is not installed: pip install 'hpcserve[webui]', or "
                            "scripts/setup.sh in a checkout (or run it your own way with the output of "
                            "`hpcserve webui --env`)")
    return found


def start(deployment: Deployment, executable: str, env: dict[str, str]) -> subprocess.Popen:
    """Start OpenWebUI (`EXECUTABLE serve`, see program()) in its own session with `env` (from
    environment(), which makes OpenWebUI's key: the caller brings HAProxy's key map up to date in
    between, or the first model list is refused) added to this process's environment; its pid and
    start time go to STATE_DIR/webui/webui.pid (for stop()), its output to logs/webui.log."""
    settings = deployment.webui
    env = {**os.environ, **env}
    with open(_log_file(deployment), "a") as log:
        process = subprocess.Popen([executable, "serve", "--host", settings.host, "--port", str(settings.port)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                   start_new_session=True)
    try:
        write_private(_pid_file(deployment), f"{process.pid} {psutil.Process(process.pid).create_time()}\n")
    except BaseException:
        proc.terminate_groups([process.pid], timeout=0)   # stop() could not find it: do not leave it running
        raise
    return process


def wait_ready(deployment: Deployment, process: subprocess.Popen, timeout: float) -> None:
    """Poll OpenWebUI's /health every second until it answers 200.

    Raises:
        HpcserveError: the process exited first (its log named).
        WaitTimeout: no answer within `timeout` seconds (the process keeps starting).
    """
    deadline = time.monotonic() + timeout
    while not answers(url(deployment) + "/health"):
        if process.poll() is not None:
            raise HpcserveError(f"OpenWebUI exited with status {process.returncode}; see {_log_file(deployment)}")
        if time.monotonic() > deadline:
            raise WaitTimeout(f"OpenWebUI did not answer within {timeout:g} s; it keeps starting "
                              f"(pid {process.pid})")
        time.sleep(1)


def stop(deployment: Deployment, timeout: float = 15.0) -> None:
    """Stop the OpenWebUI that start() started: SIGTERM to its session, SIGKILL what still runs
    after `timeout` s, so that its port is free when this returns; nothing if none runs.

    The pid file holds the pid and its start time: a process that reused the pid after OpenWebUI
    ended is left alone. While any process of the session runs, its group id is not reused (POSIX
    Base Definitions, "Process ID Reuse"), so a session whose first process ended is still stopped."""
    pid_file = _pid_file(deployment)
    try:
        fields = pid_file.read_text().split()
        pgid = int(fields[0])
        created = float(fields[1]) if len(fields) > 1 else None   # None: a pid file of an older hpcserve
    except (FileNotFoundError, ValueError, IndexError):
        pgid = None
    if pgid is not None:
        started = proc.started_at(pgid)
        if started is None or created is None or abs(started - created) < 1:
            proc.terminate_groups([pgid], timeout)
    pid_file.unlink(missing_ok=True)


def _pid_file(deployment: Deployment) -> Path:
    return folder(deployment) / "webui.pid"


def _log_file(deployment: Deployment) -> Path:
    return StateDir(deployment.state_dir).webui_log
