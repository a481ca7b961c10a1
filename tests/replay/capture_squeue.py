"""Capture real `squeue` output for the replay tests (tests/unit/test_slurm_replay.py).

    eval "$(scripts/local-slurm.sh env)"
    .venv/bin/python tests/replay/capture_squeue.py

Against the running Slurm cluster (SLURM_CONF), submits four jobs named "hpcserve:replay:m":
one that announces "endpoint=HOST:4242" in its comment and runs (time limit 10 minutes), one held
until tomorrow (PENDING, reason BeginTime), one that exits 3 at once (FAILED), and one cancelled while
running (CANCELLED); then writes what `squeue --me --noheader --states=all --format SQUEUE_FORMAT`
prints for them, exactly as hpcserve's CLI adapter asks, into tests/replay/slurm-VERSION/squeue.txt,
and cancels what is left.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from hpcserve.slurm.cli import SQUEUE_FORMAT

HERE = Path(__file__).resolve().parent
NAME = "hpcserve:replay:m"

SCRIPTS = {
    "running": '#!/bin/bash\nscontrol update JobId="$SLURM_JOB_ID" Comment="endpoint=$(hostname):4242"\nsleep 600\n',
    "pending": "#!/bin/bash\nsleep 600\n",
    "failed": "#!/bin/bash\nexit 3\n",
    "cancelled": "#!/bin/bash\nsleep 600\n",
}
EXTRA = {"pending": ["--begin=now+1day"]}


def sbatch(kind: str) -> str:
    argv = ["sbatch", "--parsable", f"--job-name={NAME}", "--time=10", "--mem=10M", "--output=/dev/null",
            *EXTRA.get(kind, [])]
    return subprocess.run(argv, input=SCRIPTS[kind], capture_output=True, text=True, check=True).stdout.split(";")[0].strip()


def squeue() -> list[str]:
    out = subprocess.run(["squeue", "--me", "--noheader", "--states=all", "--format", SQUEUE_FORMAT],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if NAME in line]


def state_of(job_id: str) -> str:
    return subprocess.run(["squeue", "--noheader", "--states=all", "-j", job_id, "-o", "%T"],
                          capture_output=True, text=True).stdout.strip()


def main() -> None:
    version = subprocess.run(["sbatch", "--version"], capture_output=True, text=True, check=True).stdout.split()[-1]
    jobs = {kind: sbatch(kind) for kind in SCRIPTS}
    try:
        deadline = time.monotonic() + 60
        while state_of(jobs["cancelled"]) != "RUNNING" or state_of(jobs["failed"]) != "FAILED":
            assert time.monotonic() < deadline, "the jobs did not start within 60 s"
            time.sleep(0.5)
        subprocess.run(["scancel", jobs["cancelled"]], check=True)
        while state_of(jobs["cancelled"]) != "CANCELLED" or "endpoint=" not in "".join(squeue()):
            assert time.monotonic() < deadline, "the comment or the cancellation did not show within 60 s"
            time.sleep(0.5)
        lines = squeue()
    finally:
        subprocess.run(["scancel", *jobs.values()], check=False)
    folder = HERE / f"slurm-{version}"
    folder.mkdir(exist_ok=True)
    order = {job_id: i for i, job_id in enumerate(jobs.values())}
    lines.sort(key=lambda line: order.get(line.split("\x1f")[0], 99))
    (folder / "squeue.txt").write_text("".join(line + "\n" for line in lines))
    (folder / "jobs.txt").write_text("".join(f"{kind} {job_id}\n" for kind, job_id in jobs.items()))
    print(f"wrote {folder}: {len(lines)} line(s)")


if __name__ == "__main__":
    main()
