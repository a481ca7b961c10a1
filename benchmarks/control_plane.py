"""Scenario (e): the control plane at scale, timed on this machine.

512 backends and 2,000 other jobs in the queue: `render` of the HAProxy config, one reconcile step
(squeue, 512 health probes, the plan, HAProxy started with 512 servers), membership changed through
the runtime API, and what `status` probes (512 /health and /slots reads).

Real parts: Slurm's squeue lists 2,000 held jobs submitted to the local cluster (scripts/local-slurm.sh);
HAProxy; 16 simulated llama-servers. The edge that cannot be real on 2 cores: 512 running GPU
jobs. The local cluster runs 32 GPU jobs at most, so the 512 running backend jobs are added to
what squeue printed (job id, name and comment as the sbatch template makes them), each announcing
one of the 16 simulators' endpoints.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time

from benchmarks import systems
from benchmarks.common import KEY
from benchmarks.workload import Backend
from hpcserve import config
from hpcserve.control import observe
from hpcserve.errors import SlurmError
from hpcserve.haproxy import config as haproxy_config
from hpcserve.haproxy.process import HAProxy
from hpcserve.control.reconcile import Reconciler
from hpcserve.core.jobs import Job
from hpcserve.slurm.cli import CLIScheduler
from hpcserve.core.jobs import JobState
from hpcserve.core.pool import Desired
from hpcserve.state import write_private

BACKENDS = 512
QUEUED = 2000
FILLER = "bench-queue-filler"


class ScaledScheduler(CLIScheduler):
    """Slurm's real squeue and sinfo, plus `running` synthetic RUNNING jobs of the deployment."""

    def __init__(self, running: list[Job]):
        super().__init__()
        self.running = running
        self.squeue_seconds: list[float] = []

    def jobs(self, name_prefix: str) -> list[Job]:
        start = time.perf_counter()
        real = super().jobs(name_prefix)  # squeue lists and parses every job of the user
        self.squeue_seconds.append(time.perf_counter() - start)
        return real + [j for j in self.running if j.name.startswith(name_prefix)]

    def queue_length(self) -> int:
        return len(self._run(["squeue", "--me", "--noheader", "--format", "%i"]).splitlines())

    def submit(self, script: str) -> str:
        raise SlurmError("the benchmark submits nothing")


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _fill_queue(count: int) -> float:
    """Submit `count` held jobs (they never run); return the seconds it took."""
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run(["sbatch", "--hold", "--job-name", FILLER, "--parsable", "--wrap", "true"], check=True,
                       stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(settings) -> list[dict]:
    """Time the control plane's steps; one record per step (seconds, and a detail)."""
    folder = settings.folder / "e"
    records: list[dict] = []

    def record(case: str, seconds: float, detail: str) -> None:
        records.append({"scenario": "e", "case": case, "system": "hpcserve", "seconds": round(seconds, 3),
                        "detail": detail})
        settings.progress(f"  e {case}: {seconds:.3f} s ({detail})")

    sims = systems.start_simulators([Backend(4, 50.0)] * 16, folder / "sims")
    state_dir = folder / "state"
    deployment = config.parse({"name": "scale", "state_dir": str(state_dir),
                               "models": [{"name": "m", "gguf": str(folder / "unused.gguf"), "parallel": 4,
                                           "replicas": BACKENDS}],
                               "haproxy": {"port": systems.free_port(), "stats_port": systems.free_port(),
                                           "auth": "open"}},
                              base=folder, check_files=False)
    proxy = HAProxy(deployment, KEY)
    try:
        ports = [systems.port_of(s.urls[0]) for s in sims]
        servers = [haproxy_config.Server("m", str(100000 + i), "127.0.0.1", ports[i % len(ports)])
                   for i in range(BACKENDS)]
        seconds, text = _timed(lambda: haproxy_config.render(deployment, servers), repeat=5)
        record("render 512 servers", seconds, f"{len(text) // 1024} KiB of config, median of 5")

        slurm = os.environ.get("SLURM_CONF") and subprocess.run(["squeue", "--me"], capture_output=True).returncode == 0
        if slurm:
            record(f"sbatch {QUEUED} held jobs", _fill_queue(QUEUED), "filling the queue, not hpcserve")
        running = [Job(job_id=str(100000 + i), name="hpcserve:scale:m", state=JobState.RUNNING, node="gpu1",
                       comment=f"endpoint=127.0.0.1:{ports[i % len(ports)]}", time_limit_s=None,
                       time_left_s=None, reason="None") for i in range(BACKENDS)]
        scheduler = ScaledScheduler(running)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(state_dir / "backend.key", KEY)
        reconciler = Reconciler(deployment, scheduler)
        if slurm:
            seconds, outcome = _timed(lambda: reconciler.step(Desired(up=True, replicas={"m": BACKENDS})))
            record("reconcile step, 512 backends", seconds,
                   f"squeue listed {scheduler.queue_length()} jobs in {scheduler.squeue_seconds[-1]:.2f} s; "
                   f"HAProxy started with 512 servers")
            seconds, outcome = _timed(lambda: reconciler.step(Desired(up=True, replicas={"m": BACKENDS})), repeat=3)
            record("reconcile step, nothing to change", seconds, "median of 3")
            seconds, backends = _timed(lambda: observe.observe(deployment, scheduler, key=KEY, slots=True), repeat=3)
            ready = sum(1 for b in backends if b.slots_total)
            record("status probes, 512 backends", seconds, f"squeue + /health and /slots of {ready} backends, median of 3")
        else:
            records.append({"scenario": "e", "case": "squeue and reconcile", "system": "hpcserve", "seconds": None,
                            "detail": "skipped: no Slurm (scripts/local-slurm.sh start; export SLURM_CONF)"})
            proxy.apply(text)
        seconds, how = _timed(lambda: proxy.update(servers[:BACKENDS // 2], settle_timeout=0))
        record("runtime API: remove 256 servers", seconds, how)
        seconds, how = _timed(lambda: proxy.update(servers, settle_timeout=0))
        record("runtime API: add 256 servers", seconds, how)
    finally:
        proxy.stop()
        for sim in sims:
            sim.stop()
        subprocess.run(["scancel", "--name", FILLER], capture_output=True)
    return records
