"""The workstation launcher: the Scheduler interface over local processes, for a machine with no
Slurm (a laptop, one GPU server). `scheduler: local` in the deployment file selects it.

A "job" is the same batch script hpcserve renders for Slurm, run by bash in its own process group
(session). Its record lives in STATE_DIR/local/ID.json and its exit status lands in ID.rc. The job
announces its endpoint as on Slurm, with `scontrol update JobId=ID Comment=TEXT`: the launcher puts
its own `scontrol` first on the job's PATH (STATE_DIR/local/bin), which writes the comment to
STATE_DIR/local/ID.comment, so the job script knows nothing of where it runs. GPUs listed in `local.gpus` are handed out through CUDA_VISIBLE_DEVICES, one set per job;
with none listed, backends run on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil

from .. import proc
from ..core.jobs import Job, JobState
from ..errors import SlurmError
from .base import Scheduler

NODE = "local"

# The one scontrol call a job script makes, for jobs with no Slurm: the comment goes to the file
# named by HPCSERVE_COMMENT_FILE. Anything else is refused, so a script that expects more of Slurm
# fails loudly instead of silently.
SCONTROL_SHIM = """#!/bin/bash
# hpcserve's workstation launcher: `scontrol update JobId=ID Comment=TEXT` writes the job comment
# to $HPCSERVE_COMMENT_FILE; nothing else of scontrol exists here.
set -eu
if [ "${1:-}" != update ]; then
    echo "scontrol (hpcserve local launcher): only 'update JobId=ID Comment=TEXT' is supported" >&2
    exit 1
fi
shift
for arg in "$@"; do
    case "$arg" in
        Comment=*) printf '%s\\n' "${arg#Comment=}" > "$HPCSERVE_COMMENT_FILE" ;;
    esac
done
"""


class LocalScheduler(Scheduler):
    """Scheduler whose jobs are local process groups.

    Args:
        root: the folder of the job records (STATE_DIR/local).
        gpus: GPU indices to hand out; [] = CPU only.
        gpus_per_job: GPU indices each job gets.
    """

    def __init__(self, root: Path, gpus: list[int], gpus_per_job: int = 1):
        self.root = root
        self.gpus = gpus
        self.gpus_per_job = gpus_per_job

    def _records(self) -> list[dict]:
        records = []
        for path in sorted(self.root.glob("*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return records

    def _alive(self, record: dict) -> bool:
        started = proc.started_at(record["pid"])
        return started is not None and abs(started - record["created"]) < 1

    def submit(self, script: str) -> str:
        """Start `script` now in its own session; return its job id.

        Raises:
            SlurmError: every listed GPU is taken by a running job.
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        bin_dir = self._scontrol_shim()
        records = self._records()
        job_id = str(max((int(r["job_id"]) for r in records), default=0) + 1)
        env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURMD_NODENAME": NODE,
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
               "HPCSERVE_COMMENT_FILE": str(self.root / f"{job_id}.comment")}
        devices: list[int] = []
        if self.gpus:
            taken = {g for r in records if self._alive(r) for g in r.get("gpus", [])}
            free = [g for g in self.gpus if g not in taken]
            if len(free) < self.gpus_per_job:
                raise SlurmError(f"local.gpus: all of {self.gpus} are in use by running replicas")
            devices = free[: self.gpus_per_job]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        script_path = self.root / f"{job_id}.sh"
        script_path.write_text(script)
        name = _directive(script, "--job-name") or ""
        # Where Slurm writes the job's output: --output with %j replaced (sbatch(1), filename pattern).
        output = (_directive(script, "--output") or str(self.root / "job-%j.out")).replace("%j", job_id)
        log = open(output, "a")
        process = subprocess.Popen(["bash", "-c", 'bash "$0"; echo $? > "$1"', str(script_path),
                                    str(self.root / f"{job_id}.rc")],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                   start_new_session=True)
        log.close()
        record = {"job_id": job_id, "name": name, "pid": process.pid,
                  "created": psutil.Process(process.pid).create_time(), "submitted": time.time(),
                  "gpus": devices, "cancelled": False}
        (self.root / f"{job_id}.json").write_text(json.dumps(record))
        return job_id

    def _scontrol_shim(self) -> Path:
        """Write the launcher's `scontrol` (SCONTROL_SHIM) into STATE_DIR/local/bin; return that folder."""
        bin_dir = self.root / "bin"
        bin_dir.mkdir(mode=0o700, exist_ok=True)
        shim = bin_dir / "scontrol"
        if not shim.exists() or shim.read_text() != SCONTROL_SHIM:
            shim.write_text(SCONTROL_SHIM)
            shim.chmod(0o700)
        return bin_dir

    def test_submit(self, script: str) -> str:
        """Check the script's shell syntax (bash -n): there is no queue to ask."""
        result = proc.run(["bash", "-n"], input=script, check=False)
        if result.returncode != 0:
            raise SlurmError(f"bash -n: {result.stderr.strip()}")
        return "local: the script would start now"

    def jobs(self, name_prefix: str) -> list[Job]:
        """The local jobs named `name_prefix`..., ended ones included."""
        jobs = []
        for record in self._records():
            if not record["name"].startswith(name_prefix):
                continue
            if self._alive(record):
                state = JobState.RUNNING
            elif record["cancelled"]:
                state = JobState.CANCELLED
            else:
                rc = (self.root / f"{record['job_id']}.rc")
                state = JobState.COMPLETED if rc.exists() and rc.read_text().strip() == "0" else JobState.FAILED
            try:
                comment = (self.root / f"{record['job_id']}.comment").read_text().strip()
            except FileNotFoundError:
                comment = ""
            jobs.append(Job(job_id=record["job_id"], name=record["name"], state=state, node=NODE,
                            comment=comment, time_limit_s=None, time_left_s=None, reason="None",
                            submit_time=record["submitted"]))
        return jobs

    def cancel(self, job_ids: list[str]) -> None:
        """SIGTERM each job's process group, SIGKILL what is left after 15 s; gone jobs are fine."""
        groups = []
        for job_id in job_ids:
            path = self.root / f"{job_id}.json"
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            record["cancelled"] = True
            path.write_text(json.dumps(record))
            if self._alive(record):
                groups.append(record["pid"])
        proc.terminate_groups(groups, timeout=15)

    def node_addresses(self) -> dict[str, str]:
        return {NODE: "127.0.0.1"}


def _directive(script: str, option: str) -> str | None:
    """The value of `#SBATCH OPTION=VALUE` in `script`, or None."""
    return next((line.split("=", 1)[1].strip() for line in script.splitlines()
                 if line.startswith(f"#SBATCH {option}=")), None)
