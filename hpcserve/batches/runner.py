"""One batch's Slurm job: every row of its input through the pool, each answer a line of its output.

Run as `python -m hpcserve.batches.runner RUN_DIR` by the job script (templates/batch.sbatch.j2).
RUN_DIR holds run.json ({"input", "url", "model", "concurrency", "timeout_s", "retries"}) and the
batch's token (store.py); the job writes output.jsonl through the `hpcserve batch` engine
(clients/batch.py: one line per row, appended as each row ends, so a job killed, preempted or
requeued resumes where it stopped and no row gets two lines), progress.json while it runs
({"completed", "failed"}: rows with a line, answered or not) and done.json once every row has its
line. The rows go at batch priority (X-Priority-Class: batch) with the token, which HAProxy
accounts to the key that made the batch.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from ..clients import batch as engine
from ..state import read_secret, write_private

#: Seconds between two writes of progress.json.
PROGRESS_EVERY_S = 1.0


def results(output: Path) -> tuple[list[str], list[str]]:
    """The result lines of the engine's `output` (none if missing): (answered rows, rows written
    with an error). A line that is not a result (a cut last line, which the engine cuts off before
    resuming) is skipped."""
    answered: list[str] = []
    failed: list[str] = []
    if output.exists():
        for line in output.read_text().splitlines():
            try:
                (failed if json.loads(line)["error"] is not None else answered).append(line)
            except (ValueError, KeyError, TypeError):
                continue
    return answered, failed


def counts(output: Path) -> tuple[int, int]:
    """(rows answered, rows written with an error) in the engine's `output` (results())."""
    answered, failed = results(output)
    return len(answered), len(failed)


def run(folder: Path) -> int:
    """Run the batch of `folder` to its end; returns the exit code (0: every row has its line).

    Raises:
        HpcserveError, ConfigError: the input or the output is not what the service wrote.
    """
    spec = json.loads((folder / "run.json").read_text())
    token = read_secret(folder / "token")
    output = folder / "output.jsonl"
    work = engine.workload(Path(spec["input"]), output, template=None, model=spec["model"], max_tokens=None,
                           id_field="custom_id")
    completed, failed = counts(output)
    print(f"hpcserve-batch start: {work.todo} of {work.total} rows to send to {spec['url']}", flush=True)
    last = 0.0

    def on_done(ok: bool) -> None:
        nonlocal completed, failed, last
        completed, failed = completed + ok, failed + (not ok)
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            write_private(folder / "progress.json", json.dumps({"completed": completed, "failed": failed}))

    write_private(folder / "progress.json", json.dumps({"completed": completed, "failed": failed}))
    asyncio.run(engine.run(work.rows(), spec["url"], output, concurrency=int(spec["concurrency"]), api_key=token,
                           retries=int(spec.get("retries", 5)), timeout=float(spec.get("timeout_s", 600)),
                           on_done=on_done))
    completed, failed = counts(output)
    write_private(folder / "progress.json", json.dumps({"completed": completed, "failed": failed}))
    if completed + failed < work.total:
        print(f"hpcserve batch: {completed + failed} of {work.total} rows have a line", file=sys.stderr)
        return 1
    write_private(folder / "done.json", json.dumps({"completed": completed, "failed": failed,
                                                    "total": work.total}))
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
