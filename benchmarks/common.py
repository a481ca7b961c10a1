"""What the benchmarks share: free ports, a real llama-server, an HAProxy from hpcserve's template."""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hpcserve import config
from hpcserve.haproxy import config as haproxy_config
from hpcserve.access.keys import serving_haproxy
from hpcserve.haproxy.process import HAProxy
from hpcserve.state import StateDir

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".cache/models/gemma3-270m-q4_k_m.gguf"
KEY = "benchmark-key"


def dated(name: str) -> Path:
    """Where a run of today writes by default: benchmarks/results/YYYY-MM-DD-NAME (a folder, or a
    file when `name` has a suffix); results/INDEX.md maps published figures to such runs."""
    import datetime
    return ROOT / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}-{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LLAMA_SERVER = Path(sys.executable).parent / "llama-server"


def start_llama_server(model: Path, log: Path, parallel: int = 1, ctx: int = 1024,
                       threads: int | None = None, cpus: set[int] | None = None,
                       flags: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """A real llama-server on a free port, ready (/health 200); (process, port). `cpus`: the CPUs it
    runs on (set before it starts, so every thread it makes inherits them); `flags`: more options."""
    port = free_port()
    argv = [str(LLAMA_SERVER), "--model", str(model), "--alias", "m",
            "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel), "--ctx-size", str(ctx), *flags]
    if threads:
        argv += ["--threads", str(threads)]
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "LLAMA_API_KEY": KEY},
                               preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process, port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"llama-server did not start; see {log}")


def provenance() -> dict[str, object]:
    """What a result file records of the run behind it: {"commit": git HEAD (+ "-dirty" when the
    tree differs), "machine": {"cpus", "cpu_model", "platform"}, "versions": {"haproxy",
    "llama-server"}} (first lines of `haproxy -v` and `llama-server --version`; None if absent)."""
    def first_line(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        return next((line for line in lines if "version" in line.lower()), lines[0] if lines else None)

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:   # no git (a release root): the commit stays unknown
            return ""

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    commit = git("rev-parse", "--short", "HEAD")
    return {"commit": (commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None,
            "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model, "platform": sys.platform},
            "versions": {"haproxy": first_line(["haproxy", "-v"]),
                         "llama-server": first_line([str(LLAMA_SERVER), "--version"])}}


def start_haproxy(folder: Path, backend_ports: list[int], parallel: int = 1, no_delay: bool = True,
                  without: tuple[str, ...] = (), accounting: dict | None = None,
                  **haproxy_settings) -> tuple[HAProxy, int]:
    """HAProxy rendered from hpcserve's template over `backend_ports`, all servers UP; (proxy, port).
    `haproxy_settings` and `accounting` are the deployment file's sections of those names.

    Ablations for the comparison: no_delay=False drops `option http-no-delay`; `without` names
    directives to take out: "maxconn" (the per-server slot cap of default-server), "leastconn"
    (`balance roundrobin` instead), "server-close" (`option http-server-close`: HAProxy then keeps
    idle server connections for reuse, benchmarks/server_close.py), "body-checks" (the request body
    checks by regular expression: benchmarks/body_checks.py).
    """
    port = free_port()
    deployment = config.parse({"name": "bench", "state_dir": str(folder),
                               "models": [{"name": "m", "gguf": str(folder / "unused.gguf"), "parallel": parallel}],
                               # Loopback only, for the comparison: no API keys (the peers have none).
                               "haproxy": {"port": port, "stats_port": free_port(), "auth": "open",
                                           **haproxy_settings},
                               **({"accounting": accounting} if accounting else {})},
                              base=folder, check_files=False)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    servers = [haproxy_config.Server("m", str(i + 1), "127.0.0.1", p) for i, p in enumerate(backend_ports)]
    text = haproxy_config.render(deployment, servers)
    if not no_delay:
        text = re.sub(r"^\s*option http-no-delay\n", "", text, flags=re.MULTILINE)
    if "maxconn" in without:
        text = re.sub(r"^(\s*default-server .*) maxconn \d+", r"\1", text, flags=re.MULTILINE)
    if "server-close" in without:
        text = re.sub(r"^\s*option http-server-close\n", "", text, flags=re.MULTILINE)
    if "body-checks" in without:   # the checks of n, n_cmpl, id_slot, escapes, cache_prompt (#42)
        text = re.sub(r"^\s*http-request return status 400 .* if \{ req\.body -m reg .*\n", "", text, flags=re.MULTILINE)
    if "leastconn" in without:
        text = re.sub(r"^(\s*)balance leastconn$", r"\1balance roundrobin", text, flags=re.MULTILINE)
    proxy = serving_haproxy(deployment, KEY)
    # With auth: keys the stats page asks for a key too: the owner key, made here.
    owner = StateDir(folder).api_key() if deployment.haproxy.auth == "keys" else None
    proxy.apply(text)
    stats = f"http://127.0.0.1:{deployment.haproxy.stats_port}/stats;csv"
    headers = {"Authorization": f"Bearer {owner}"} if owner else {}
    deadline = time.monotonic() + 30
    while httpx.get(stats, headers=headers).text.count(",UP,") < len(backend_ports):
        if time.monotonic() > deadline:
            raise SystemExit("HAProxy did not mark every llama-server UP")
        time.sleep(0.2)
    return proxy, port


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (inclusive method); the value itself for a single sample."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def rotated(names: list[str] | tuple[str, ...], seed: int) -> list[str]:
    """`names` in the order seed `seed` runs them: rotated left by `seed` places (seed 1 starts with
    the second name), so that over as many seeds as names each system runs first once and none
    always runs on a warm or a cold machine, or right after the same one. [] for no names."""
    k = seed % len(names) if names else 0
    return [*names[k:], *names[:k]]
