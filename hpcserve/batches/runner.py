"""One batch's Slurm job: every row of its input sent for an answer, each answer a line of its output.

Run by the job script as `python -m hpcserve.batches.runner RUN_DIR` (templates/batch.sbatch.j2:
the rows go through the pool) or, in each element of a job array that brings its own GPUs
(templates/batch-gpu.sbatch.j2), `... RUN_DIR --shard INDEX --url http://127.0.0.1:PORT`: the rows
of shard INDEX of run.json's "shards" go to the element's own llama-server, with the key in
RUN_DIR/server-key. RUN_DIR holds run.json ({"input", "url", "model", "concurrency", "timeout_s",
"retries", "shards"}) and the batch's token (store.py). The job writes its output through the
`hpcserve batch` engine (clients/batch.py: one line per row, appended as each row ends, so a job
killed, preempted or requeued resumes where it stopped and no row gets two lines), its progress
({"completed", "failed"}: rows with a line, answered or not) while it runs and a done file once
every row has its line: output.jsonl, progress.json and done.json, or output-INDEX.jsonl,
progress-INDEX.json and done-INDEX.json per shard (Shard). Through the pool the rows go at batch
priority (X-Priority-Class: batch) with the token, which HAProxy accounts to the key that made the
batch.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx

from ..clients import batch as engine
from ..config import is_loopback
from ..errors import HpcserveError
from ..state import read_secret, write_private

#: Seconds between two writes of progress.json.
PROGRESS_EVERY_S = 1.0
#: Seconds an element waits for its llama-server to load the model (/health 200).
READY_TIMEOUT_S = 1800.0


@dataclasses.dataclass(frozen=True)
class Shard:
    """The files of one shard of a batch's run folder: `index` None for a batch through the pool
    (output.jsonl, ...), else the element's index (output-INDEX.jsonl, ...)."""

    folder: Path
    index: int | None = None

    def _path(self, stem: str, ext: str) -> Path:
        return self.folder / (f"{stem}{ext}" if self.index is None else f"{stem}-{self.index}{ext}")

    @property
    def output(self) -> Path:
        return self._path("output", ".jsonl")

    @property
    def progress(self) -> Path:
        return self._path("progress", ".json")

    @property
    def done(self) -> Path:
        return self._path("done", ".json")


def own_gpus(folder: Path) -> int | None:
    """The elements of the job array of the run in `folder` (run.json's "shards") when the batch
    runs on GPUs of its own; None for a batch through the pool."""
    try:
        count = json.loads((folder / "run.json").read_text()).get("shards")
    except (OSError, ValueError, AttributeError):
        count = None
    return int(count) if count else None


def shards(folder: Path) -> list[Shard]:
    """The shards of the run in `folder`: one (no index) for a batch through the pool, one per
    element (own_gpus) for a batch on its own GPUs."""
    count = own_gpus(folder)
    return [Shard(folder)] if count is None else [Shard(folder, i) for i in range(count)]


def results(output: Path) -> Iterator[tuple[str, bool]]:
    """The result lines of the engine's `output` (none if missing), read line by line (a 500k-row
    output is never held in memory): (the line without its newline, whether it was answered:
    False for a row written with an error). A line that is not a result (a cut last line, which
    the engine cuts off before resuming) is skipped."""
    if not output.exists():
        return
    with open(output, encoding="utf-8") as lines:
        for line in lines:
            line = line.rstrip("\n")
            try:
                answered = json.loads(line)["error"] is None
            except (ValueError, KeyError, TypeError):
                continue
            yield line, answered


def counts(output: Path) -> tuple[int, int]:
    """(rows answered, rows written with an error) in the engine's `output` (results())."""
    answered = failed = 0
    for _, ok in results(output):
        answered, failed = answered + ok, failed + (not ok)
    return answered, failed


#: Connections refused in a row after which the element's llama-server counts as ended: it was
#: listening when the job script read its port, so a refusal means it has exited.
REFUSED_IN_A_ROW = 5


def reaches_the_pool(url: str, login_host: str | None) -> bool:
    """Whether a job on this host reaches the pool at `url`: False when `url` is a loopback
    address (or localhost) and this is not `login_host`, the host whose loopback it is."""
    loopback = is_loopback(urllib.parse.urlsplit(url).hostname or "")
    return not loopback or login_host is None or login_host == socket.gethostname()


def wait_ready(url: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until the llama-server at `url` has loaded its model: GET /health answers 200 (503 while
    loading; llama.cpp tools/server/README.md, GET /health).

    Raises:
        HpcserveError: not ready within `timeout` seconds, or it refused REFUSED_IN_A_ROW
            connections in a row (it has ended: its log says why).
    """
    deadline = time.monotonic() + timeout
    refused = 0
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=10, trust_env=False).status_code == 200:
                return
            refused = 0
        except httpx.ConnectError:
            refused += 1
            if refused >= REFUSED_IN_A_ROW:
                raise HpcserveError(f"llama-server at {url} refuses connections: it has ended (see its log)") from None
        except httpx.HTTPError:
            refused = 0
        if time.monotonic() > deadline:
            raise HpcserveError(f"llama-server at {url} was not ready within {timeout:.0f} s")
        time.sleep(0.5)


def run(folder: Path, shard: int | None = None, url: str | None = None) -> int:
    """Run the batch of `folder` (its shard `shard` against the llama-server at `url`, or all of it
    through the pool) to its end; returns the exit code (0: every row has its line).

    Raises:
        HpcserveError, ConfigError: the input or the output is not what the service wrote, or the
        own llama-server did not get ready (wait_ready).
    """
    spec = json.loads((folder / "run.json").read_text())
    files = Shard(folder, shard)
    if shard is None:
        if not reaches_the_pool(spec["url"], spec.get("login_host")):
            # Another user's server may listen on this node's loopback at that port: the batch's
            # token goes nowhere but to the pool.
            print(f"hpcserve batch: the pool listens on the loopback of {spec['login_host']}, and this job runs on "
                  f"{socket.gethostname()}: nothing sent. Bind haproxy.bind to an address compute nodes reach "
                  "(keep haproxy.auth: keys).", file=sys.stderr)
            return 1
        token, base = read_secret(folder / "token"), spec["url"]
    else:
        token, base = read_secret(folder / "server-key"), str(url)
    work = engine.workload(Path(spec["input"]), files.output, template=None, model=spec["model"], max_tokens=None,
                           id_field="custom_id", shard=None if shard is None else (shard, int(spec["shards"])))
    completed, failed = counts(files.output)
    print(f"hpcserve-batch start: {work.todo} of {work.total} rows to send to {base}", flush=True)
    if shard is not None and work.todo:
        wait_ready(base)
    last = 0.0

    def on_done(ok: bool) -> None:
        nonlocal completed, failed, last
        completed, failed = completed + ok, failed + (not ok)
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            write_private(files.progress, json.dumps({"completed": completed, "failed": failed}))

    write_private(files.progress, json.dumps({"completed": completed, "failed": failed}))
    asyncio.run(engine.run(work.rows(), base, files.output,
                           concurrency=int(spec["concurrency"]), api_key=token,
                           retries=int(spec.get("retries", 5)), timeout=float(spec.get("timeout_s", 600)),
                           on_done=on_done, priority_class="batch" if shard is None else "interactive"))
    completed, failed = counts(files.output)
    write_private(files.progress, json.dumps({"completed": completed, "failed": failed}))
    if completed + failed < work.total:
        print(f"hpcserve batch: {completed + failed} of {work.total} rows have a line", file=sys.stderr)
        return 1
    write_private(files.done, json.dumps({"completed": completed, "failed": failed, "total": work.total}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hpcserve.batches.runner RUN_DIR [--shard INDEX --url URL]`."""
    parser = argparse.ArgumentParser(prog="python -m hpcserve.batches.runner",
                                     description="Send a batch's rows (or one shard of them) for their answers.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--shard", type=int, help="the job array element's index (SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--url", help="the element's own llama-server, http://127.0.0.1:PORT")
    args = parser.parse_args(argv)
    if (args.shard is None) != (args.url is None):
        parser.error("--shard and --url go together")
    try:
        return run(args.run_dir, args.shard, args.url)
    except HpcserveError as exc:
        print(f"hpcserve batch: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
