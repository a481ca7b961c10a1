"""OpenWebUI wired to a real pool (local Slurm, real llama-server and model), with no internet,
driven by headless Chromium (Debian's) through Playwright: sign in, pick the pool's model, send a
message, see a streamed answer produced by a backend of the pool. The screenshot is kept in
test-artifacts/webui-chat.png."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from hpcserve.haproxy import runtime
from hpcserve.state import HAProxyFiles
from tests.conftest import ARTIFACTS, ROOT, free_port, missing

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.haproxy]

OPEN_WEBUI = ROOT / ".venv-webui" / "bin" / "open-webui"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-quic", "--disable-sync"]


def served(pool) -> int:
    return sum(s.total for s in runtime.show_stat(pool.dir / "state" / "haproxy.sock"))


def sign_in(base: str, env: dict[str, str]) -> dict[str, str]:
    """The headers of OpenWebUI's admin, signed in through its API."""
    token = httpx.post(f"{base}/api/v1/auths/signin", json={"email": env["WEBUI_ADMIN_EMAIL"],
                                                            "password": env["WEBUI_ADMIN_PASSWORD"]}).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def assert_chat_served(pool, base: str, auth: dict[str, str], user: str, klass: str = "interactive",
                       account: str | None = None) -> None:
    """A chat sent to OpenWebUI's API is answered, by a backend of the pool (HAProxy counted it),
    and the access log accounts it to OpenWebUI's key and to the signed-in `user` (e-mail), queued
    as `klass` (interactive or batch), and (when given) counted for Slurm `account`."""
    log = pool.dir / "state" / "logs" / "access.log"
    logged = len(log.read_text().splitlines()) if log.exists() else 0
    before = served(pool)
    reply = httpx.post(f"{base}/api/chat/completions", headers=auth, timeout=120, json={
        "model": pool.model_name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
        "stream": False}).json()
    assert reply["model"] == pool.model_name and reply["usage"]["completion_tokens"] > 0
    assert served(pool) == before + 1
    deadline = time.monotonic() + 10
    while not any((r["key"], r["user"], r["status"], r["class"]) == ("openwebui", user, 200, klass)
                  and r["account"] == (account or r["account"]) and r["server"].startswith("job")
                  for r in map(json.loads, log.read_text().splitlines()[logged:])):
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)


def test_openwebui_chats_with_the_pool_in_a_browser(pool_factory):
    if not OPEN_WEBUI.exists() or not CHROMIUM.exists():
        missing("open-webui in .venv-webui and Debian's chromium (scripts/setup.sh installs them)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    pool = pool_factory(replicas=1)
    # No webui.command: `hpcserve webui` finds the OpenWebUI scripts/setup.sh put in .venv-webui.
    pool.raw["webui"] = {"host": "127.0.0.1", "port": free_port(), "admin_email": "admin@example.org",
                         "batch_groups": ["bulk work"]}
    pool.raw["accounting"] = {"webui_group_accounts": {"bulk work": "chemistry"}}
    pool.write(pool.raw)
    pool.ok("up", "--timeout", "240")
    env = {k: shlex.split(v)[0] for k, v in (line.split("=", 1) for line in pool.ok("webui", "--env").stdout.splitlines())}
    started = pool.ok("webui", "--timeout", "240")
    base = f"http://127.0.0.1:{pool.raw['webui']['port']}"
    assert base in started.stdout
    try:
        status = pool.status()
        assert status["webui"] == {"url": base, "up": True}

        # OpenWebUI's own API lists the pool's model and reaches it.
        auth = sign_in(base, env)
        assert [m["id"] for m in httpx.get(f"{base}/api/models", headers=auth).json()["data"]] == [pool.model_name]
        assert_chat_served(pool, base, auth, env["WEBUI_ADMIN_EMAIL"])

        # An OpenWebUI group marked batch (webui.batch_groups) and given a Slurm account
        # (accounting.webui_group_accounts): from the next reconcile step its members' chats queue
        # as batch and count for that account, without a reload; one taken out of it is back (to
        # OpenWebUI's key's account: "-" here, no slurm.account).
        ann = httpx.post(f"{base}/api/v1/auths/add", headers=auth, json={
            "name": "Ann", "email": "Ann@example.org", "password": "a-password-of-ann", "role": "user"}).json()
        group = httpx.post(f"{base}/api/v1/groups/create", headers=auth,
                           json={"name": "bulk work", "description": "batch"}).json()
        members = f"{base}/api/v1/groups/id/{group['id']}/users"
        # OpenWebUI takes any e-mail that starts like one (utils/misc.py validate_email_format:
        # re.match), so a user may be called so that, as a word of a runtime API command, it would
        # be a second command or another map entry: such members are left out, nothing else changes.
        hostile = [httpx.post(f"{base}/api/v1/auths/add", headers=auth, json={
            "name": "Eve", "email": email, "password": "a-password-of-eve", "role": "user"}).json()["id"]
            for email in ("eve@example.org\nclear map #0", "eve@example.org batch;x", "mallory x@example.org")]
        httpx.post(f"{members}/add", headers=auth, json={"user_ids": [ann["id"], *hostile]}).raise_for_status()
        files = HAProxyFiles(pool.dir / "state")
        reloads = runtime.show_proc(files.master_socket).reloads
        pool.ok("reconcile")
        groups = pool.status()["webui_groups"]
        assert groups["error"] is None and groups["members"] == {"bulk work": ["ann@example.org"]}
        assert runtime.show_map(files.admin_socket, files.webui_batch_map_file) == {"ann@example.org": "batch"}
        as_ann = {"Authorization": f"Bearer {ann['token']}"}
        assert_chat_served(pool, base, as_ann, "ann@example.org", "batch", account="chemistry")
        httpx.post(f"{members}/remove", headers=auth, json={"user_ids": [ann["id"]]}).raise_for_status()
        pool.ok("reconcile")
        assert_chat_served(pool, base, as_ann, "ann@example.org", "interactive", account="-")
        assert runtime.show_proc(files.master_socket).reloads == reloads

        # A person in a browser.
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{base}/auth")
            page.fill("input[type=email]", env["WEBUI_ADMIN_EMAIL"])
            page.fill("input[type=password]", env["WEBUI_ADMIN_PASSWORD"])
            page.click("button[type=submit]")
            page.wait_for_selector("#chat-input", timeout=60000)
            # A newcomer's first screen: no release-notes dialog, the pool's model already chosen.
            page.wait_for_timeout(2000)
            assert page.get_by_text("Okay, Let's Go!").count() == 0
            assert page.inner_text("#model-selector-model-button").strip() == pool.model_name
            before = served(pool)
            page.click("#chat-input")
            page.keyboard.type("Hello, who are you?")
            page.keyboard.press("Enter")
            # The answer grows while it streams in.
            lengths = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (len(lengths) < 2 or lengths[-1] <= lengths[0]):
                time.sleep(1.5)
                lengths.append(len(page.inner_text("#chat-container")))
            page.screenshot(path=str(ARTIFACTS / "webui-chat.png"))   # README's openwebui/first-chat.png
            browser.close()
        assert len(lengths) >= 2 and lengths[-1] > lengths[0], lengths
        assert served(pool) > before          # the answer came from a backend of the pool

        # Scaled to zero, the model stays listed, and a chat gets the "starting" answer. (Once the
        # browser's answer has ended: a server still streaming is "in service", and then HAProxy
        # queues rather than answering "starting".)
        deadline = time.monotonic() + 60
        while sum(s.sessions for s in runtime.show_stat(pool.dir / "state" / "haproxy.sock")):
            assert time.monotonic() < deadline, "the browser's answer did not end"
            time.sleep(0.5)
        pool.ok("scale", "0", "--drain-timeout", "0")
        assert [m["id"] for m in httpx.get(f"{base}/api/models", headers=auth).json()["data"]] == [pool.model_name]
        starting = httpx.post(f"{base}/api/chat/completions", headers=auth, timeout=60, json={
            "model": pool.model_name, "messages": [{"role": "user", "content": "Hello"}], "stream": False})
        assert starting.status_code >= 400 and f"Model {pool.model_name} is starting" in starting.text, starting.text
    finally:
        pool.run("webui", "--stop")


def test_openwebui_as_a_slurm_job_on_a_cpu_partition_chats_with_the_pool(pool_factory, slurm_env):
    """`hpcserve webui --sbatch | sbatch` on the local cluster's CPU partition: the job reaches the
    pool at the login node's address (not its own 127.0.0.1) with the owner key, and a chat sent to
    OpenWebUI's API is answered by a backend of the pool."""
    if not OPEN_WEBUI.exists():
        missing("open-webui in .venv-webui (scripts/setup.sh installs it)")
    pool = pool_factory(replicas=1, simulator="--sim-load-time 0")
    pool.raw["haproxy"]["bind"] = "0.0.0.0"   # compute nodes reach the frontend
    pool.raw["webui"] = {"host": "127.0.0.1", "port": free_port(), "command": str(OPEN_WEBUI), "partition": "cpu",
                         "cpus": 1, "memory": "3G", "time_limit": "00:30:00", "admin_email": "admin@example.org"}
    pool.write(pool.raw)
    pool.ok("up", "--timeout", "120")
    script = pool.ok("webui", "--sbatch").stdout
    job_id = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True, env=slurm_env,
                            check=True).stdout.strip().split(";")[0]
    env_file = (pool.dir / "state" / "webui" / "env").read_text()
    env = {k: shlex.split(v)[0] for k, v in (line.split("=", 1) for line in env_file.splitlines())}
    base = f"http://127.0.0.1:{pool.raw['webui']['port']}"
    try:
        assert env["OPENAI_API_BASE_URL"] == f"http://{socket.getfqdn()}:{pool.raw['haproxy']['port']}/v1"
        assert env["OPENAI_API_KEY"] == (pool.dir / "state" / "webui" / "api.key").read_text().strip()
        partition = subprocess.run(["squeue", "-j", job_id, "-h", "-o", "%P"], capture_output=True, text=True,
                                   env=slurm_env).stdout.strip()
        assert partition == "cpu"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, [log.read_text()[-2000:]
                                                 for log in (pool.dir / "state" / "logs").glob("webui-*.out")]
            time.sleep(2)
        assert_chat_served(pool, base, sign_in(base, env), env["WEBUI_ADMIN_EMAIL"])
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env)
