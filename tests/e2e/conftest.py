"""The e2e fixtures: a deployment in a temporary folder, driven through the real `hpcserve` command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import openai
import psutil
import pytest

from tests.conftest import LLAMA_SERVER, dump_yaml, free_port

SIMULATOR = Path(sys.executable).parent / "hpcserve-llama-sim"


class Pool:
    """A deployment in a temporary folder, driven through the real `hpcserve` command."""

    def __init__(self, tmp_path: Path, model: Path, env: dict[str, str], replicas: int = 2,
                 simulator: str | None = None, parallel: int = 2, haproxy: dict | None = None):
        """`simulator`: run hpcserve-llama-sim with these extra arguments instead of llama-server."""
        self.name = f"e2e-{uuid.uuid4().hex[:6]}"
        self.model_name = f"{'sim' if simulator is not None else 'gemma'}-{self.name}"
        self.dir = tmp_path
        self.env = env
        command = f"{SIMULATOR} {simulator}" if simulator is not None else str(LLAMA_SERVER)
        self.raw = {
            "name": self.name,
            "state_dir": str(tmp_path / "state"),
            "models": [{"name": self.model_name, "gguf": str(model), "command": command,
                        "replicas": replicas, "context_size": 1024, "parallel": parallel, "cpus": 1,
                        "memory": "200M" if simulator is not None else "1G", "gpus": {"type": "a100", "count": 1}}],
            "slurm": {"partition": "gpu", "time_limit": "00:30:00"},
            "haproxy": {"port": free_port(), "stats_port": free_port(), "check_interval": 1, **(haproxy or {})},
        }
        self.file = self.write(self.raw)

    def write(self, raw: dict, name: str = "hpcserve.yaml") -> Path:
        path = self.dir / name
        path.write_text(dump_yaml(raw))
        return path

    def command(self, file: Path | None = None) -> list[str]:
        return [sys.executable, "-m", "hpcserve", "-f", str(file or self.file)]

    def run(self, *args: str, file: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.command(file), *args],
                              capture_output=True, text=True, env=env or self.env, timeout=timeout)

    def ok(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, f"hpcserve {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def status(self) -> dict:
        return json.loads(self.ok("--json", "status").stdout)

    def wait_in_rotation(self, count: int, timeout: float = 60) -> list[dict]:
        """Reconcile until `count` backends are UP in HAProxy; returns the status rows.

        `up` returns once one backend per model is ready; the others join HAProxy at a later
        reconcile step (what cron runs), so the wait runs those steps itself.
        """
        deadline = time.monotonic() + timeout
        while True:
            rows = self.status()["replicas"]
            if sum(1 for r in rows if (r["haproxy_status"] or "").startswith("UP")) >= count:
                return rows
            assert time.monotonic() < deadline, rows
            self.ok("reconcile")
            time.sleep(0.5)

    @property
    def api_key(self) -> str:
        """The owner's API key, which `up` made (the frontend asks for a key by default)."""
        return (self.dir / "state" / "api.key").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.raw['haproxy']['port']}/v1",
                             api_key=self.api_key, max_retries=0, timeout=120)

    def active_jobs(self) -> list[str]:
        out = subprocess.run(["squeue", "--me", "--noheader", "-o", "%i %j %T"], capture_output=True,
                             text=True, env=self.env, check=True).stdout
        return [line.split()[0] for line in out.splitlines()
                if f"hpcserve:{self.name}:" in line and line.split()[2] in ("PENDING", "RUNNING", "CONFIGURING")]

    def haproxy_processes(self) -> list[psutil.Process]:
        config = str(self.dir / "state" / "haproxy.cfg")
        return [p for p in psutil.process_iter(["cmdline"]) if config in (p.info["cmdline"] or [])]

    def llama_processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if self.model_name in (p.info["cmdline"] or [])]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.raw['haproxy']['port']}/v1"

    def simulator_stats(self) -> dict[str, dict]:
        """Job id -> the peak counters each simulated backend printed when it stopped."""
        stats = {}
        for log in (self.dir / "state" / "logs").glob("job-*-llama-server.log"):
            for line in log.read_text().splitlines():
                if line.startswith("simulator stats: "):
                    stats[log.name.split("-")[1]] = json.loads(line[len("simulator stats: "):])
        return stats

    def cleanup(self) -> None:
        self.run("down", "--timeout", "60", "--cancel-batches")


@pytest.fixture
def pool_factory(tmp_path, real_model, slurm_env, haproxy_bin):
    pools = []

    def make(replicas: int = 2, subdir: str = "a", **options) -> Pool:
        folder = tmp_path / subdir
        folder.mkdir()
        pool = Pool(folder, real_model, slurm_env, replicas, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.cleanup()


