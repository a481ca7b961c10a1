"""OpenWebUI wired to the pool: its environment, and starting it on the login node.

The settings (verified with open-webui 0.12.4, ../shared/DESIGN.md; admin variables from
open_webui/env.py): one OpenAI connection to the HAProxy /v1 URL (OpenWebUI's list of several URLs
does not load-balance), Ollama off, offline mode (else ~90 s of retries to reach a model hub),
ENABLE_PERSISTENT_CONFIG=False (else environment changes after the first start are ignored), the
pool's models visible to every user, the user-info headers forwarded (their chat id header is what
prompt-cache affinity keys on), the admin account created from the environment. The data folder,
secret key and admin password live in STATE_DIR/webui, private to the owner.
"""

from __future__ import annotations

import secrets
import shlex
from pathlib import Path

from . import templates
from .config import Deployment, read_api_keys
from .state import StateDir, write_private


def folder(deployment: Deployment) -> Path:
    return deployment.state_dir / "webui"


def _secret(path: Path, nbytes: int = 32) -> str:
    """The secret in `path`, created (random, 0600) on first use."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = secrets.token_urlsafe(nbytes)
        write_private(path, value + "\n")
        return value


def environment(deployment: Deployment) -> dict[str, str]:
    """The environment OpenWebUI needs for this deployment (secrets created on first use).

    Raises:
        ConfigError: the state directory cannot be created.
    """
    StateDir(deployment.state_dir).ensure()
    root = folder(deployment)
    (root / "data").mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = read_api_keys(deployment.haproxy.api_keys_file) if deployment.haproxy.api_keys_file else []
    return {
        "OPENAI_API_BASE_URL": deployment.url,
        "OPENAI_API_KEY": keys[0] if keys else "hpcserve",
        "ENABLE_OLLAMA_API": "False",
        "OFFLINE_MODE": "True",
        "ENABLE_PERSISTENT_CONFIG": "False",
        "BYPASS_MODEL_ACCESS_CONTROL": "True",
        "ENABLE_FORWARD_USER_INFO_HEADERS": "True",
        "DATA_DIR": str(root / "data"),
        "WEBUI_SECRET_KEY": _secret(root / "secret-key"),
        "WEBUI_ADMIN_EMAIL": deployment.webui.admin_email,
        "WEBUI_ADMIN_NAME": "hpcserve admin",
        "WEBUI_ADMIN_PASSWORD": _secret(root / "admin-password", 18),
    }


def job_script(deployment: Deployment) -> str:
    """The batch script that runs OpenWebUI as a Slurm job; its environment is written to
    STATE_DIR/webui/env (0600) and only named by the script.

    Raises:
        jinja2.TemplateError: a site template is broken.
    """
    env_file = folder(deployment) / "env"
    write_private(env_file, "".join(f"{k}={shlex.quote(v)}\n" for k, v in environment(deployment).items()))
    return templates.render("openwebui.sbatch.j2", deployment.templates_dir, deployment=deployment,
                            webui=deployment.webui, slurm=deployment.slurm, env_file=env_file,
                            log_dir=deployment.state_dir / "logs")


def url(deployment: Deployment) -> str:
    """Where OpenWebUI answers, e.g. http://127.0.0.1:8080."""
    return f"http://{deployment.webui.host}:{deployment.webui.port}"
