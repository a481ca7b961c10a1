"""What a benchmark runs: simulated or real llama-server backends, and the systems put in front of
them (hpcserve's HAProxy and its ablations, hand-written HAProxy, nginx, LiteLLM, or none).

Every system forwards the backend key, so the backends are the same for all. Each start function
returns a started thing with `url` (the OpenAI base URL clients use) and `stop()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jinja2

from benchmarks.common import KEY, ROOT, free_port, start_haproxy
from benchmarks.workload import Backend
from hpcserve.haproxy.process import HAProxy

CONFIGS = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "configs"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
# Each system and the policy (benchmarks/policies.py) it implements. The peers as an informed admin
# configures them (haproxy-lc, nginx-lc, nginx-maxconns, litellm), the round-robin baselines
# (haproxy-rr, nginx-rr, direct), and ablations of hpcserve's own config (without the per-server
# maxconn; without leastconn).
POLICY = {"hpcserve": "least-connections + slot cap", "haproxy-lc": "least-connections + slot cap",
          "nginx-lc": "least-connections", "nginx-maxconns": "least-connections + slot cap, no queue",
          "litellm": "least-connections", "haproxy-rr": "round-robin", "nginx-rr": "round-robin",
          "direct": "round-robin", "hpcserve-no-maxconn": "least-connections",
          "hpcserve-no-leastconn": "round-robin + slot cap",
          "hpcserve-no-server-close": "least-connections + slot cap"}
SYSTEMS = tuple(POLICY)
_LISTENING = re.compile(r"listening on http://[^:]+:(\d+)")
# Where a system's own documentation names its policy otherwise than the model does: LiteLLM's
# routing_strategy "least-busy" (fewest requests in flight, litellm/router_strategy/least_busy.py)
# is modelled as least-connections.
OWN_NAME = {"litellm": "least-busy"}


def policy_label(system: str) -> str:
    """The policy to print beside `system` in a report: its own name for it where it has one,
    then the model's, e.g. "least-busy = least-connections"; "?" for an unknown system."""
    model = POLICY.get(system, "?")
    return f"{OWN_NAME[system]} = {model}" if system in OWN_NAME else model


@dataclasses.dataclass
class Running:
    """A started process (or none, for direct access) and where clients reach it."""

    name: str
    urls: list[str]
    process: subprocess.Popen | None = None
    stop_hook: object = None
    headers: dict = dataclasses.field(default_factory=dict)
    proxy: HAProxy | None = None  # hpcserve's HAProxy, for membership changes

    def stop(self) -> None:
        if self.stop_hook:
            self.stop_hook()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_simulators(backends: list[Backend], folder: Path, first: int = 0) -> list[Running]:
    """One hpcserve-llama-sim per backend (alias "m", the benchmark key), each ready (/health 200):
    at the backend's fixed token and prefill rates, or following its batch profile (written to
    `folder` for --sim-profile) where it has one.

    Raises:
        SystemExit: a simulator did not start within 30 s (its log is named).
    """
    sim = Path(sys.executable).parent / "hpcserve-llama-sim"
    folder.mkdir(parents=True, exist_ok=True)
    started = []
    for i, backend in enumerate(backends):
        log = folder / f"sim-{first + i}.log"
        profile = folder / f"sim-{first + i}.profile.json" if backend.profile else None
        if profile and backend.profile:
            profile.write_text(backend.profile.to_json())
        process = subprocess.Popen(
            [str(sim), "--port", "0", "--alias", "m", "-np", str(backend.slots), "--sim-load-time", "0",
             "--sim-token-rate", str(backend.token_rate), "--sim-prefill-rate", str(backend.prefill_rate),
             *(["--sim-profile", str(profile)] if profile else [])],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ, "LLAMA_API_KEY": KEY})
        started.append((process, log))
    running = []
    for process, log in started:
        deadline = time.monotonic() + 30
        while not (match := _LISTENING.search(log.read_text())):
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"simulator did not start; see {log}")
            time.sleep(0.05)
        running.append(Running("sim", [f"http://127.0.0.1:{match.group(1)}/v1"], process))
    return running


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def sim_stats(backends: list[Running]) -> list[dict]:
    """Each simulated backend's counters (GET /sim/stats: served, busy, waiting, peaks)."""
    return [httpx.get(b.urls[0].removesuffix("/v1") + "/sim/stats", timeout=10).json() for b in backends]


def served_counts(backends: list[Running]) -> list[int]:
    """Requests each simulated backend has served so far."""
    return [stats["served"] for stats in sim_stats(backends)]


def _wait_http(url: str, ok=lambda r: r.status_code == 200, timeout: float = 60, what: str = "",
               process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"{what or url} exited with status {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if ok(httpx.get(url, timeout=5)):
                return
        time.sleep(0.2)
    raise SystemExit(f"{what or url} did not become ready within {timeout:g} s")


def start_hpcserve(ports: list[int], slots: int, folder: Path, without: tuple[str, ...] = (),
                   **haproxy_settings) -> Running:
    """HAProxy with the config hpcserve generates (templates/haproxy.cfg.j2), every server UP;
    `without` ablates directives (common.start_haproxy)."""
    proxy, port = start_haproxy(folder, ports, parallel=slots, without=without, **haproxy_settings)
    return Running("hpcserve", [f"http://127.0.0.1:{port}/v1"], stop_hook=proxy.stop, proxy=proxy)


def start_haproxy_static(variant: str, ports: list[int], slots: int, folder: Path) -> Running:
    """HAProxy written by hand (configs/haproxy.cfg.j2, variant "rr" or "lc"), daemonised with a
    pid file so that `reload_haproxy_static` can replace it the usual way (-x, -sf); its servers
    are named b1, b2, ... in the order of `ports`."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    running = Running(f"haproxy-{variant}", [f"http://127.0.0.1:{port}/v1"])
    write_haproxy_static(folder, variant, port, [(f"b{i + 1}", p) for i, p in enumerate(ports)], slots)
    config = folder / f"haproxy-{variant}.cfg"
    subprocess.run(["haproxy", "-D", "-p", str(folder / f"haproxy-{variant}.pid"), "-f", str(config)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running.stop_hook = lambda: _kill_matching(str(config))
    _wait_http(f"http://127.0.0.1:{port}/v1/models", ok=lambda r: r.status_code < 500, what=running.name)
    time.sleep(2.5)  # its checks (2 s) mark the servers UP
    return running


def write_haproxy_static(folder: Path, variant: str, port: int, servers: list[tuple[str, int]], slots: int) -> None:
    """Render the hand-written config with `servers` ((name, port) pairs, in backend "pool")."""
    (folder / f"haproxy-{variant}.cfg").write_text(CONFIGS.get_template("haproxy.cfg.j2").render(
        variant=variant, port=port, servers=servers, slots=slots, key=KEY, folder=folder))


def haproxy_static_socket(running: Running, folder: Path) -> Path:
    """The admin socket of the newest process of a hand-written HAProxy started in `folder`."""
    return folder / f"{running.name}.sock"


def reload_haproxy_static(running: Running, folder: Path, servers: list[tuple[str, int]], slots: int) -> None:
    """The admin's membership change: rewrite the config with `servers` ((name, port) pairs), start
    a new HAProxy that takes the listening sockets over from the old one through its admin socket
    (-x; no connection is refused meanwhile) and tells it to finish its connections and exit (-sf;
    HAProxy 2.6 management guide)."""
    variant = running.name.removeprefix("haproxy-")
    write_haproxy_static(folder, variant, port_of(running.urls[0]), servers, slots)
    pid_file = folder / f"haproxy-{variant}.pid"
    old = pid_file.read_text().split()
    subprocess.run(["haproxy", "-D", "-p", str(pid_file), "-f", str(folder / f"haproxy-{variant}.cfg"),
                    "-x", str(haproxy_static_socket(running, folder)), "-sf", *old],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_matching(needle: str) -> None:
    import psutil
    found = [p for p in psutil.process_iter(["cmdline"]) if needle in " ".join(p.info["cmdline"] or [])]
    for process in found:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    psutil.wait_procs(found, timeout=10)


def start_nginx(variant: str, ports: list[int], slots: int, folder: Path) -> Running:
    """nginx (configs/nginx.conf.j2, variant "rr", "lc" or "maxconns"), in the foreground,
    unprivileged paths in `folder`.

    Raises:
        SystemExit: nginx is not installed (Debian package nginx-light) or did not start.
    """
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise SystemExit("nginx is not installed: apt-get install nginx-light (scripts/setup-bench.sh)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "nginx.conf"
    write_nginx(folder, variant, port, ports, slots)
    process = subprocess.Popen([binary, "-p", str(folder), "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=(folder / "nginx.log").open("w"))
    _wait_http(f"http://127.0.0.1:{port}/v1/models", what=f"nginx (see {folder / 'nginx.log'})", process=process)
    return Running(f"nginx-{variant}", [f"http://127.0.0.1:{port}/v1"], process)


def write_nginx(folder: Path, variant: str, port: int, ports: list[int], slots: int) -> None:
    (folder / "nginx.conf").write_text(CONFIGS.get_template("nginx.conf.j2").render(
        variant=variant, port=port, backend_ports=ports, slots=slots, key=KEY, folder=folder))


def reload_nginx(running: Running, folder: Path, ports: list[int], slots: int) -> None:
    """The admin's membership change: rewrite the config and send the master SIGHUP (nginx -s
    reload); old workers finish their requests and exit."""
    write_nginx(folder, running.name.removeprefix("nginx-"), port_of(running.urls[0]), ports, slots)
    running.process.send_signal(signal.SIGHUP)


def start_litellm(ports: list[int], slots: int, folder: Path) -> Running:
    """LiteLLM proxy with least-busy routing and max_parallel_requests = `slots` per backend
    (configs/litellm.yaml.j2), 2 workers, from .venv-litellm.

    Raises:
        SystemExit: LiteLLM is not installed (scripts/setup-bench.sh) or did not start in 120 s.
    """
    if not LITELLM.exists():
        raise SystemExit(f"LiteLLM is not installed at {LITELLM}: run scripts/setup-bench.sh")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "litellm.yaml"
    config.write_text(CONFIGS.get_template("litellm.yaml.j2").render(backend_ports=ports, slots=slots, key=KEY))
    master_key = "sk-" + secrets.token_hex(16)  # LiteLLM refuses to start without one
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True",
           "LITELLM_MASTER_KEY": master_key}
    process = subprocess.Popen([str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                "--num_workers", "2"], stdout=subprocess.DEVNULL,
                               stderr=(folder / "litellm.log").open("w"), env=env, cwd=folder)
    _wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=120,
               what=f"LiteLLM (see {folder / 'litellm.log'})", process=process)
    return Running("litellm", [f"http://127.0.0.1:{port}/v1"], process,
                   headers={"Authorization": f"Bearer {master_key}"})


def start(name: str, backend_urls: list[str], slots: int, folder: Path,
          hpcserve_settings: dict | None = None) -> Running:
    """Start system `name` (one of SYSTEMS) in front of the backends at `backend_urls`
    (`slots` each; `hpcserve_settings`: deployment-file haproxy settings for hpcserve's config).

    Raises:
        ValueError: an unknown name.
    """
    ports = [port_of(u) for u in backend_urls]
    if name == "hpcserve" or name.startswith("hpcserve-no-"):
        running = start_hpcserve(ports, slots, folder / name, without=tuple(name.split("-no-")[1:]),
                                 **(hpcserve_settings or {}))
        running.name = name
        return running
    if name.startswith("haproxy-"):
        return start_haproxy_static(name.removeprefix("haproxy-"), ports, slots, folder / name)
    if name.startswith("nginx-"):
        return start_nginx(name.removeprefix("nginx-"), ports, slots, folder / name)
    if name == "litellm":
        return start_litellm(ports, slots, folder / "litellm")
    if name == "direct":
        return Running("direct", list(backend_urls), headers={"Authorization": f"Bearer {KEY}"})
    raise ValueError(f"system: expected one of {', '.join(SYSTEMS)}, got {name!r}")
