"""Fixtures: deployments in temporary folders, and the real parts (local Slurm, haproxy, model).

A real part that is missing skips its tests on a developer's machine, but fails them when
HPCSERVE_REQUIRE_REAL=1 (set by scripts/test.sh, so CI can never pass by skipping).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hpcserve import config
from hpcserve.llama import builds

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path(os.environ.get("HPCSERVE_TEST_MODEL", ROOT / ".cache/models/gemma3-270m-q4_k_m.gguf"))
# The llama-server under test: scripts/setup.sh links the build it chose here (the wheel's, or one
# built from source; see its HPCSERVE_LLAMA_BUILD); HPCSERVE_LLAMA_SERVER names another build.
LLAMA_SERVER = Path(os.environ.get("HPCSERVE_LLAMA_SERVER") or Path(sys.executable).parent / "llama-server")
ARTIFACTS = ROOT / "test-artifacts"


@contextlib.contextmanager
def simulator(log: Path, slots: int, token_rate: float, key: str, alias: str = "m",
              prefill_rate: float = 2000) -> Iterator[int]:
    """A running hpcserve simulator (loaded at once) with `slots` slots, `token_rate` tokens/s,
    `prefill_rate` prompt tokens/s, backend key `key` and model id `alias`; yields its port, stops
    it on exit. Its output goes to `log`."""
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "hpcserve.llama.simulator", "--port", "0", "--parallel",
                                    str(slots), "--sim-load-time", "0", "--sim-token-rate", str(token_rate),
                                    "--sim-prefill-rate", str(prefill_rate), "--alias", alias],
                                   stdout=sink, stderr=subprocess.STDOUT,
                                   env={"LLAMA_API_KEY": key, "PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 20
        while not (match := re.search(r"listening on http://[^ ]*:(\d+)", log.read_text())):
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.05)
        yield int(match.group(1))
    finally:
        process.terminate()
        process.wait(10)


@functools.cache
def llama_server_build() -> builds.Build | None:
    """The build of LLAMA_SERVER: its `--version`, or where that has no build number (a build
    without git says "build 0"), the PyPI package that installed it; None when it is missing or
    neither names a build."""
    if not LLAMA_SERVER.exists():
        return None
    version = subprocess.run([str(LLAMA_SERVER), "--version"], capture_output=True, text=True, timeout=60)
    return builds.identify(version.stdout + version.stderr, LLAMA_SERVER)


def pytest_report_header(config) -> str:
    """Which llama-server build the llama-facing tests run against, at the top of every run."""
    build = llama_server_build()
    where = f"{LLAMA_SERVER} -> {LLAMA_SERVER.resolve()}"
    if build is None:
        return f"llama-server under test: {where}: missing or no build named by --version"
    return f"llama-server under test: {build.name} ({build.reported}), {where}"


def missing(what: str) -> None:
    """Skip, or fail when the real parts are required."""
    if os.environ.get("HPCSERVE_REQUIRE_REAL") == "1":
        pytest.fail(f"required real part missing: {what}")
    pytest.skip(f"missing: {what}")


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    """A placeholder GGUF file, for tests that only validate or render."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


def minimal(gguf: Path, tmp_path: Path, **overrides) -> dict:
    """The smallest valid deployment dict (a test changes what it is about)."""
    raw = {"name": "t", "state_dir": str(tmp_path / "state"),
           "models": [{"name": "m", "gguf": str(gguf)}]}
    raw.update(overrides)
    return raw


class PlainDumper(yaml.SafeDumper):
    """yaml.safe_dump without anchors and aliases: a dict used twice is written out twice (hpcserve
    refuses aliases in a deployment file)."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump_yaml(raw: dict) -> str:
    return yaml.dump(raw, Dumper=PlainDumper, sort_keys=False)


def write_deployment(tmp_path: Path, raw: dict, name: str = "hpcserve.yaml") -> Path:
    path = tmp_path / name
    path.write_text(dump_yaml(raw))
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (for test servers on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port P with P and P + 1 both free now: a deployment's frontend and its default stats port
    (haproxy.stats_port = port + 1). A bare free_port() + 1 can be a port another test's daemon
    holds (the Slurm layouts of tests/slurm_layouts.py keep theirs for the whole session)."""
    while True:
        port = free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def haproxy_for(raw: dict, base: Path, key: str = "k"):
    """The HAProxy of a raw deployment dict, its state folders made (nothing started).

    Without a reconcile step nobody makes the owner key, so the frontend is open unless `raw`
    sets haproxy.auth (tests/integration/test_frontend.py checks the keys).
    """
    from hpcserve.access.keys import serving_haproxy
    raw = {**raw, "haproxy": {"auth": "open", **raw.get("haproxy", {})}}
    deployment = config.parse(raw, base=base)
    (deployment.state_dir / "logs").mkdir(mode=0o700, parents=True)
    return serving_haproxy(deployment, key)


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """The environment that points Slurm clients at the running local cluster."""
    conf = os.environ.get("SLURM_CONF") or "/tmp/hpcserve-slurm/slurm.conf"
    env = {**os.environ, "SLURM_CONF": conf}
    if not shutil.which("sinfo") or not Path(conf).exists():
        missing("the local Slurm cluster (scripts/local-slurm.sh start)")
    result = subprocess.run(["sinfo", "--noheader", "-o", "%N %t"], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        missing(f"a running slurmctld ({result.stderr.strip()})")
    os.environ["SLURM_CONF"] = conf
    return env


@pytest.fixture(scope="session")
def haproxy_bin() -> str:
    path = shutil.which("haproxy")
    if not path:
        missing("haproxy (Debian package haproxy)")
    return path


@pytest.fixture(scope="session")
def real_model() -> Path:
    if not MODEL.is_file():
        missing(f"the model at {MODEL} (scripts/setup.sh assembles it)")
    if not LLAMA_SERVER.exists():
        missing(f"llama-server at {LLAMA_SERVER} (scripts/setup.sh)")
    return MODEL


@pytest.fixture
def load(tmp_path: Path):
    """Validate a raw deployment dict through a real file, as the CLI does."""
    def _load(raw: dict) -> config.Deployment:
        return config.load(write_deployment(tmp_path, raw))
    return _load
