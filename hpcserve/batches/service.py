"""The Batch API service: OpenAI's /v1/files and /v1/batches for the pool's keys, each batch run as a
Slurm job (templates/batch.sbatch.j2, runner.py).

It listens on a Unix socket in the private state directory (STATE_DIR/batches.sock), so only the
pool's owner (and so HAProxy) can reach it; HAProxy checks the API key and passes the key's name
in X-Hpcserve-Key (the client's own header of that name is removed first: haproxy.cfg.j2), which
the service takes as the caller. A key sees its own files and batches only (404 for another's);
the owner key sees all. Built on Starlette (routing, multipart uploads through python-multipart)
on uvicorn; metadata in SQLite (store.py).

Run as `python -m hpcserve.batches.service STATE_DIR` (by ensure(); the deployment it serves is
the one ensure() wrote to STATE_DIR/batches/deployment.json).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .. import proc, templates
from ..access.keys import accepted_keys, digest, serving_haproxy
from ..config import Deployment
from ..core.jobs import JobState
from ..errors import HpcserveError, SlurmError
from ..slurm import Scheduler
from ..state import StateDir, write_private
from .objects import (COMPLETION_WINDOWS, ENDPOINTS, FINAL, APIError, batch_object, check_expiry, check_input,
                      check_metadata, file_object, page)
from . import runner
from .store import OWNER, Store

#: The header HAProxy sets to the caller's key name.
KEY_HEADER = "X-Hpcserve-Key"
#: Seconds between two refreshes of the running batches when no client asks.
REFRESH_EVERY_S = 15.0
#: Seconds a batch job must show an ended state before its batch fails (a requeue passes through one).
JOB_GONE_S = 60
#: Read chunk of an upload, bytes.
CHUNK = 1 << 20


def socket_path(deployment: Deployment) -> Path:
    """STATE_DIR/batches.sock: where the service listens (HAProxy's `server ... unix@`)."""
    return StateDir(deployment.state_dir).batches_socket


def job_name_prefix(deployment: Deployment) -> str:
    """The job-name prefix of the deployment's batch jobs: "hpcserve-batch:NAME:"."""
    return f"hpcserve-batch:{deployment.name}:"


class BatchAPI:
    """The service's logic, apart from HTTP: each method takes the caller's key name.

    Args:
        deployment: the deployment served.
        scheduler: makes the Slurm adapter (called when a batch is submitted or refreshed).
        python: the Python the batch jobs run (this one; a site's login and compute nodes share it).
    """

    def __init__(self, deployment: Deployment, scheduler: Callable[[], Scheduler], python: str = sys.executable):
        self.deployment = deployment
        self.store = Store(deployment)
        self._scheduler = scheduler
        self.python = python

    # Files.

    def add_file(self, key: str, upload: Path, filename: str, purpose: str, expires_after: int | None = None) -> dict:
        """Check the uploaded file at `upload` (moved into the store when valid) and record it, to
        expire `expires_after` seconds from now (objects.check_expiry), else after
        batches.file_expiry (0: never).

        Raises:
            APIError: 400 for a purpose other than batch or a bad line (check_input).
        """
        if purpose != "batch":
            raise APIError(400, "purpose: only \"batch\" files are accepted here", param="purpose")
        with open(upload, "rb") as lines:
            check_input(lines, [m.name for m in self.deployment.models], self.deployment.batches.max_rows)
        file_id = self.store.new_file_id()
        os.replace(upload, self.store.file_path(file_id))
        size = self.store.file_path(file_id).stat().st_size
        lifetime = expires_after or self.deployment.batches.file_expiry or None
        return file_object(self.store.add_file(file_id, key, filename, purpose, size, lifetime))

    # Batches.

    def create_batch(self, key: str, body: object) -> dict:
        """Check a batch request, record it, start its job; returns the Batch object (status
        in_progress, or failed with errors when Slurm refused the job).

        Raises:
            APIError: 400 for a bad field, 404 for an input file the key does not have.
        """
        if not isinstance(body, dict):
            raise APIError(400, "expected a JSON object")
        window = body.get("completion_window")
        if window not in COMPLETION_WINDOWS:
            raise APIError(400, f"completion_window: expected one of {', '.join(COMPLETION_WINDOWS)}",
                           param="completion_window")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise APIError(400, f"endpoint: expected one of {', '.join(ENDPOINTS)}", param="endpoint")
        metadata = check_metadata(body.get("metadata"))
        output_expires_after = check_expiry(body.get("output_expires_after"), "output_expires_after")
        file_id = str(body.get("input_file_id", ""))
        source = self.store.file(file_id, key)
        if source["purpose"] != "batch":
            raise APIError(400, f"input_file_id: {file_id} is not a batch input file", param="input_file_id")
        with open(self.store.file_path(file_id), "rb") as lines:
            summary = check_input(lines, [m.name for m in self.deployment.models], self.deployment.batches.max_rows)
        if summary.endpoint != endpoint:
            raise APIError(400, f"endpoint: the input file's requests go to {summary.endpoint}", param="endpoint")
        batch_id = self.store.new_batch_id()
        owner = source["owner"] if key == OWNER else key
        model = self.deployment.model(sorted(summary.models)[0])
        own = self.deployment.batches.own_capacity
        run: dict[str, object] = {"input": str(self.store.file_path(file_id)), "model": model.name}
        key_secret = secrets.token_urlsafe(32)
        if own is not None and summary.rows >= own.min_rows and len(summary.models) == 1:
            # Its own GPUs: a job array, each element one llama-server and a shard of the rows (of
            # one model: rows naming several go through the pool, which routes each by its model).
            run.update(shards=min(own.jobs, summary.rows), concurrency=model.parallel)
            row = self.store.add_batch(batch_id, owner, file_id, endpoint, COMPLETION_WINDOWS[window], window,
                                       metadata, summary.rows, None, output_expires_after)
            folder = self.store.write_run(batch_id, run, key_secret, key_file="server-key")
            slurm = self.deployment.slurm.model_copy(update={
                "account": self._account_of(owner), "partition": own.partition or self.deployment.slurm.partition})
            template, context = "batch-gpu.sbatch.j2", {
                "model": model, "slurm": slurm, "shards": run["shards"],
                "time_limit": own.time_limit or self.deployment.batches.time_limit}
        else:
            # login_host: a pool on loopback is reached from this host only (runner.run checks).
            run.update(url=self._pool_url(), concurrency=self.deployment.batches.concurrency,
                       login_host=socket.gethostname())
            row = self.store.add_batch(batch_id, owner, file_id, endpoint, COMPLETION_WINDOWS[window], window,
                                       metadata, summary.rows, digest(key_secret), output_expires_after)
            folder = self.store.write_run(batch_id, run, key_secret)
            template, context = "batch.sbatch.j2", {"batches": self.deployment.batches, "slurm": self.deployment.slurm,
                                                    "account": self._account_of(owner)}
        try:
            self._sync_keys()      # HAProxy takes the token before the job's first request
            script = templates.render(template, self.deployment.templates_dir, deployment=self.deployment,
                                      batch_id=batch_id, run_dir=folder, python=self.python, **context)
            job_id = self._scheduler().submit(script)
        except HpcserveError as exc:
            row = self.store.update_batch(batch_id, status="failed", failed_at=int(time.time()), errors=json.dumps(
                [{"code": "job_not_started", "message": str(exc), "param": None, "line": None}]))
            self._sync_keys()
            return batch_object(row)
        return batch_object(self.store.update_batch(batch_id, status="in_progress", job_id=job_id,
                                                    in_progress_at=int(time.time())))

    def _account_of(self, key: str) -> str | None:
        """The Slurm account a batch of key `key` is charged to: the key's (`keys add --account`),
        else the pool's (slurm.account; None: the submitting user's default)."""
        for entry in accepted_keys(self.deployment):
            if entry.name == key and entry.source != "batch":
                return entry.account or self.deployment.slurm.account
        return self.deployment.slurm.account

    def batch(self, key: str, batch_id: str) -> dict:
        """The Batch object, its counts and status brought up to date first."""
        row = self.store.batch(batch_id, key)
        if row["status"] not in FINAL:
            row = self.refresh([row])[0]
        return batch_object(row)

    def cancel(self, key: str, batch_id: str) -> dict:
        """Cancel a batch: its job is cancelled, what finished is kept (status cancelling, then
        cancelled with the output so far).

        Raises:
            APIError: 404; 409 when the batch has already ended.
        """
        row = self.store.batch(batch_id, key)
        if row["status"] in FINAL:
            raise APIError(409, f"Batch {batch_id} is {row['status']}: it cannot be cancelled.", code="batch_ended")
        if row["job_id"]:
            self._scheduler().cancel([row["job_id"]])
        row = self.store.update_batch(batch_id, status="cancelling", cancelling_at=int(time.time()))
        return batch_object(self.refresh([row])[0])

    def through_pool(self) -> list[dict]:
        """The batches still running whose rows go through the pool (not on GPUs of their own),
        brought up to date first: what a stopped pool would fail (`hpcserve down` asks).

        Raises:
            SlurmError: squeue did not answer.
        """
        return [r for r in self.refresh() if r["status"] not in FINAL
                and runner.own_gpus(self.store.run_dir(r["id"])) is None]

    def refresh(self, rows: list[dict] | None = None) -> list[dict]:
        """Bring running batches (`rows`, or all of them) up to date: counts from progress.json;
        completed once the job wrote done.json; cancelled once a cancelled job has ended; expired
        past the completion window (the job cancelled); failed when the job ended without
        finishing. A batch that ends gets its output and error files, and its token leaves
        HAProxy's key map. Returns the rows as they are now.

        Raises:
            SlurmError: squeue did not answer (nothing was changed).
        """
        rows = rows if rows is not None else self.store.batches(None, 10**6, final=False)
        running = [r for r in rows if r["status"] not in FINAL]
        if not running:
            return rows
        jobs = self._scheduler().jobs(job_name_prefix(self.deployment))
        now = int(time.time())
        changed: dict[str, dict] = {}
        ended = False
        for row in running:
            folder = self.store.run_dir(row["id"])
            parts = runner.shards(folder)
            counted: collections.Counter[str] = collections.Counter()
            for shard in parts:
                progress = _read_json(shard.progress) or {}
                counted.update({k: int(progress[k]) for k in ("completed", "failed") if k in progress})
            fields: dict[str, object] = dict(counted)
            state, present = _job_state(jobs, row["job_id"])
            end: tuple[str, list[dict] | None] | None = None
            if all(shard.done.exists() for shard in parts):
                end = "completed", None
            elif row["cancelling_at"] is not None and not present:   # cancelling (or left finalizing after it)
                end = "cancelled", None
            elif now >= row["expires_at"]:
                if present:
                    self._scheduler().cancel([row["job_id"]])
                end = "expired", None
            elif row["status"] in ("in_progress", "finalizing") and self._job_gone(folder, present, state, now):
                end = "failed", [{"code": "job_ended", "message": f"Slurm job {row['job_id']} ended before every "
                                  f"request had its answer (see {folder}/job-{row['job_id']}"
                                  f"{'_*' if parts[0].index is not None else ''}.out)",
                                  "param": None, "line": None}]
            if end is not None and self.store.claim_end(row["id"]):
                fields.update(self._finish(row, end[0], now, errors=end[1]))
            if fields:
                changed[row["id"]] = self.store.update_batch(row["id"], **fields)
                ended = ended or changed[row["id"]]["status"] in FINAL
        if ended:
            self._sync_keys()
        return [changed.get(r["id"], r) for r in rows]

    @staticmethod
    def _job_gone(folder: Path, present: bool, state: JobState | None, now: int) -> bool:
        """Whether a batch's job has ended for good: gone from squeue, or in an ended state for
        JOB_GONE_S seconds on end (a job requeued after a node failure or preemption may show one
        for a moment; a requeue passes through COMPLETING, which counts as present). The first
        time it was seen ended is kept in the run folder."""
        marker = folder / "job-ended-since"
        if present:
            marker.unlink(missing_ok=True)
            return False
        if state is None:
            return True
        try:
            since = int(marker.read_text())
        except (OSError, ValueError):
            since = now
            write_private(marker, str(now))
        return now - since >= JOB_GONE_S

    def _finish(self, row: dict, status: str, now: int, errors: list[dict] | None = None) -> dict[str, object]:
        """The fields of a batch that ends with `status`: its output lines (of every shard) split
        into an output file (answered) and an error file (with an error), copied line by line,
        each recorded when not empty."""
        ids = {True: self.store.new_file_id(), False: self.store.new_file_id()}
        written = {True: 0, False: 0}
        sinks = {ok: open(os.open(self.store.file_path(ids[ok]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                          "w", encoding="utf-8") for ok in ids}
        try:
            for shard in runner.shards(self.store.run_dir(row["id"])):
                for line, ok in runner.results(shard.output):
                    sinks[ok].write(line + "\n")
                    written[ok] += 1
        finally:
            for sink in sinks.values():
                sink.flush()
                os.fsync(sink.fileno())
                sink.close()
        fields: dict[str, object] = {"status": status, f"{status}_at": now, "completed": written[True],
                                     "failed": written[False]}
        for ok, name in ((True, "output_file_id"), (False, "error_file_id")):
            path = self.store.file_path(ids[ok])
            if not written[ok]:
                path.unlink(missing_ok=True)
                continue
            self.store.add_file(ids[ok], row["owner"], f"{row['id']}_{name.split('_')[0]}.jsonl", "batch_output",
                                path.stat().st_size, row.get("output_expires_after"))
            fields[name] = ids[ok]
        if errors:
            fields["errors"] = json.dumps(errors)
        return fields

    def _pool_url(self) -> str:
        from ..clients.webui import pool_url_from_compute_nodes
        try:
            return pool_url_from_compute_nodes(self.deployment)
        except HpcserveError:
            return self.deployment.url     # a loopback frontend: jobs on this host (a workstation, tests)

    def _sync_keys(self) -> None:
        with contextlib.suppress(HpcserveError):   # HAProxy not running: the next step writes the map
            serving_haproxy(self.deployment, "").sync_keys()


def _job_state(jobs: list, job_id: str | None) -> tuple[JobState | None, bool]:
    """(a state of job `job_id` in `jobs` (squeue's), whether it is still there): for a job array,
    its elements ("ID_INDEX", and "ID_[...]" while pending) taken together: present while any one
    is active (a requeue passes through COMPLETING; UNKNOWN counts as present)."""
    states = [job.state for job in jobs if job_id and (job.job_id == job_id or job.job_id.startswith(f"{job_id}_"))]
    present = [s for s in states if s.active or s in (JobState.COMPLETING, JobState.UNKNOWN)]
    return (present or states or [None])[0], bool(present)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def app(api: BatchAPI) -> Starlette:
    """The ASGI application of `api`."""

    def caller(request: Request) -> str:
        key = request.headers.get(KEY_HEADER, "")
        if key:
            return key
        if api.deployment.haproxy.auth == "open":
            return OWNER        # no keys: everyone who reaches the pool is its owner
        raise APIError(401, "No API key.", type_="authentication_error", code="invalid_api_key")

    def limit_of(request: Request) -> int:
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 10000:
            raise APIError(400, "limit: expected 1 to 10000", param="limit")
        return limit

    async def create_file(request: Request) -> Response:
        key = caller(request)
        maximum = api.deployment.batches.max_file_bytes
        if int(request.headers.get("content-length", "0") or 0) > maximum + (1 << 20):
            raise APIError(413, f"The file is larger than this deployment accepts ({maximum} bytes).",
                           code="file_too_large")
        async with request.form(max_files=1, max_fields=6) as form:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise APIError(400, "file: expected a file part named \"file\"", param="file")
            if not isinstance(purpose, str):
                raise APIError(400, "purpose: expected \"batch\"", param="purpose")
            # expires_after as OpenAI's clients send it in a form: expires_after[anchor], [seconds].
            fields = {k: form.get(f"expires_after[{k}]") for k in ("anchor", "seconds")}
            expires_after = check_expiry(fields if any(v is not None for v in fields.values()) else None,
                                         "expires_after")
            part = api.store.files_dir / f".upload-{secrets.token_hex(8)}"
            api.store.files_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            size = 0
            try:
                with open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as sink:
                    while chunk := await upload.read(CHUNK):
                        size += len(chunk)
                        if size > maximum:
                            raise APIError(413, f"The file is larger than this deployment accepts ({maximum} bytes).",
                                           code="file_too_large")
                        sink.write(chunk)
                name = (upload.filename or "input.jsonl")[:255]
                return JSONResponse(await run_in_threadpool(api.add_file, key, part, name, purpose, expires_after))
            finally:
                part.unlink(missing_ok=True)

    async def list_files(request: Request) -> Response:
        rows = await run_in_threadpool(api.store.files, caller(request), request.query_params.get("purpose"),
                                       limit_of(request), request.query_params.get("after"))
        return JSONResponse(page([file_object(r) for r in rows], limit_of(request)))

    async def get_file(request: Request) -> Response:
        row = await run_in_threadpool(api.store.file, request.path_params["id"], caller(request))
        return JSONResponse(file_object(row))

    async def file_content(request: Request) -> Response:
        row = await run_in_threadpool(api.store.file, request.path_params["id"], caller(request))
        return FileResponse(api.store.file_path(row["id"]), media_type="application/jsonl")

    async def delete_file(request: Request) -> Response:
        await run_in_threadpool(api.store.delete_file, request.path_params["id"], caller(request))
        return JSONResponse({"id": request.path_params["id"], "object": "file", "deleted": True})

    async def create_batch(request: Request) -> Response:
        key = caller(request)
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "expected a JSON body") from None
        return JSONResponse(await run_in_threadpool(api.create_batch, key, body))

    async def list_batches(request: Request) -> Response:
        key, limit = caller(request), limit_of(request)
        rows = await run_in_threadpool(api.store.batches, key, limit, request.query_params.get("after"))
        rows = await run_in_threadpool(api.refresh, rows)
        return JSONResponse(page([batch_object(r) for r in rows], limit))

    async def get_batch(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(api.batch, caller(request), request.path_params["id"]))

    async def cancel_batch(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(api.cancel, caller(request), request.path_params["id"]))

    async def refused(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body, status_code=exc.status)

    async def slurm_down(_request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": {"message": f"Slurm did not answer: {exc}", "type": "server_error",
                                       "param": None, "code": "scheduler_unavailable"}}, status_code=503,
                            headers={"Retry-After": "30"})

    async def storage_failed(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OSError)     # a full or unwritable state directory: nothing was recorded
        return JSONResponse({"error": {"message": f"The pool could not store this: {exc.strerror or exc}.",
                                       "type": "server_error", "param": None, "code": "storage_error"}},
                            status_code=507)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async def refresh_forever() -> None:
            while True:
                with contextlib.suppress(Exception):   # Slurm or the disk may fail for a while
                    await run_in_threadpool(api.refresh)
                with contextlib.suppress(Exception):
                    await run_in_threadpool(api.store.expire_files)
                await asyncio.sleep(REFRESH_EVERY_S)
        task = asyncio.create_task(refresh_forever())
        yield
        task.cancel()

    return Starlette(routes=[
        Route("/v1/files", create_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{id}", get_file, methods=["GET"]),
        Route("/v1/files/{id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{id}/cancel", cancel_batch, methods=["POST"]),
    ], exception_handlers={APIError: refused, SlurmError: slurm_down, OSError: storage_failed}, lifespan=lifespan)


# The process, as the reconcile step keeps it running (like HAProxy and its log writer).

def _files(deployment: Deployment) -> tuple[Path, Path, Path]:
    root = StateDir(deployment.state_dir).root / "batches"
    return root / "deployment.json", root / "service.pid", StateDir(deployment.state_dir).logs_dir / "batches.log"


def service_pid(deployment: Deployment) -> int | None:
    """The pid of the deployment's Batch API service if it runs, else None."""
    return proc.pid_from_file(_files(deployment)[1], lambda argv: "hpcserve.batches.service" in argv
                              and str(deployment.state_dir) in argv)


def ensure(deployment: Deployment, timeout: float = 30.0) -> bool:
    """Start the Batch API service unless it runs (with this deployment: a changed file restarts
    it); returns True if it was started. Waits until its socket accepts connections.

    Raises:
        HpcserveError: it did not start within `timeout` seconds (its log is named).
    """
    spec, pid_file, log = _files(deployment)
    wanted = deployment.model_dump_json()
    pid = service_pid(deployment)
    if pid is not None and spec.exists() and spec.read_text() == wanted:
        return False
    if pid is not None:
        stop(deployment)
    spec.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(spec, wanted)
    sock = socket_path(deployment)
    sock.unlink(missing_ok=True)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "hpcserve.batches.service", str(deployment.state_dir)],
                                   stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, start_new_session=True)
    write_private(pid_file, f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise HpcserveError(f"the Batch API service did not start (see {log})")
        time.sleep(0.05)
    return True


def stop(deployment: Deployment, timeout: float = 10.0) -> None:
    """Stop the Batch API service (its jobs run on; a new service takes them up)."""
    pid = service_pid(deployment)
    if pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate([psutil.Process(pid)], timeout)
    _files(deployment)[1].unlink(missing_ok=True)


def main(state_dir: str) -> None:
    """Serve the deployment that ensure() wrote to STATE_DIR/batches/deployment.json."""
    import uvicorn

    from ..slurm import for_deployment
    spec = Path(state_dir) / "batches" / "deployment.json"
    deployment = Deployment.model_validate_json(spec.read_text())
    os.umask(0o077)
    uvicorn.run(app(BatchAPI(deployment, lambda: for_deployment(deployment))), uds=str(socket_path(deployment)),
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main(sys.argv[1])
