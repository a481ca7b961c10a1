"""The commands of the pool's clients: `hpcserve batch` (a dataset through the pool) and
`hpcserve webui` (OpenWebUI wired to the pool). hpcserve.cli.pool adds them to its command group."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from pathlib import Path

import click
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..batches import objects as batch_objects, runner as batch_runner, service as batch_api, store as batch_store
from ..clients import batch as batch_mod
from ..clients import webui as webui_mod
from .context import Context, deployment_lock, err, late_options, out, pass_ctx
from ..errors import HpcserveError
from ..access.keys import serving_haproxy
from ..state import StateDir


@click.command()
@late_options
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL: OpenAI batch requests, or plain records with --template.")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL results (OpenAI batch output format); an existing file is resumed.")
@click.option("--template", help='Prompt for plain records, fields in braces: "Classify: {description}".')
@click.option("--id-field", default="id", show_default=True, help="Field of a plain record that names it.")
@click.option("--model", "model_name", help="Model for rows that name none [default: the first model].")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Limit for rows that set none.")
@click.option("--concurrency", type=click.IntRange(min=1, max=4096),
              help="Requests in flight [default: the free slots of the model's ready replicas].")
@click.option("--retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="Retries of a request that failed before any answer (with backoff).")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Seconds one request may take.")
@click.option("--api-key", envvar="HPCSERVE_API_KEY",
              help="A frontend API key [default: the owner key, STATE_DIR/api.key, when readable].")
@click.option("--priority", type=click.Choice(["batch", "interactive"]), default="batch", show_default=True,
              help="batch: chats of interactive keys leave the queue first (a key of class batch is "
                   "always batch).")
@pass_ctx
def batch(ctx: Context, input_path: Path, output_path: Path, template: str | None, id_field: str,
          model_name: str | None, max_tokens: int | None, concurrency: int | None, retries: int,
          timeout: float, api_key: str | None, priority: str) -> None:
    """Send every row of a JSONL file through the pool; write one result per row.

    Resumable: rows already in --output are skipped, so rerunning after an interruption finishes
    the job. Exit 1 when some rows still failed after their retries (each is in --output with its
    error); exit 2 for a malformed input line (nothing is sent then).
    """
    deployment = ctx.deployment
    model = deployment.model(model_name) if model_name else deployment.models[0]
    if output_path.exists() and os.path.samefile(output_path, input_path):
        raise click.BadParameter("--output must not be the --input file (results would overwrite the rows)",
                                 param_hint="--output")
    if api_key is None and deployment.haproxy.auth == "keys":
        api_key = StateDir(deployment.state_dir).read_api_key()

    work = batch_mod.workload(input_path, output_path, template=template, model=model.name,
                              max_tokens=max_tokens, id_field=id_field)
    total, todo = work.total, work.todo
    if concurrency is None:
        concurrency = batch_mod.default_concurrency(deployment, model)
    ctx.say(f"{total} row(s), {total - todo} already in {output_path}, {todo} to send, {concurrency} at a time")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]:.1f} rows/s"), TimeRemainingColumn(), console=err,
                  transient=False) as progress:
        task = progress.add_task("batch", total=todo, rate=0.0)
        started = time.monotonic()

        def on_done(ok: bool) -> None:
            completed = progress.tasks[0].completed + 1
            progress.update(task, advance=1, rate=completed / max(time.monotonic() - started, 1e-6))

        answered, failed = asyncio.run(batch_mod.run(
            work.rows(), deployment.url, output_path,
            concurrency=concurrency, api_key=api_key, retries=retries, timeout=timeout, on_done=on_done,
            priority_class=priority))
    summary = {"rows": total, "already_done": total - todo, "answered": answered, "failed": failed,
               "output": str(output_path)}
    if ctx.as_json:
        click.echo(json.dumps(summary))
    else:
        out.print(f"{answered} answered, {failed} failed, {total - todo} already done: {output_path}")
    if failed:
        raise HpcserveError(f"{failed} row(s) failed after {retries} retries; they are in {output_path} "
                            "with their error")


@click.command()
@late_options
@click.option("--env", "print_env", is_flag=True, help="Print the environment (KEY=value lines) and exit.")
@click.option("--stop", is_flag=True, help="Stop the OpenWebUI this command started.")
@click.option("--sbatch", "print_sbatch", is_flag=True,
              help="Print a job script that runs OpenWebUI on a (CPU) partition, for `sbatch`, and exit.")
@click.option("--timeout", type=click.FloatRange(min=1), default=180, show_default=True,
              help="Seconds to wait for OpenWebUI to answer /health.")
@pass_ctx
def webui(ctx: Context, print_env: bool, stop: bool, print_sbatch: bool, timeout: float) -> None:
    """Start OpenWebUI wired to the pool's URL (pip install 'hpcserve[webui]').

    `--env` prints the environment instead, for running OpenWebUI another way (systemd unit,
    container, another host): it holds secrets, so keep it in a private file.
    """
    deployment = ctx.deployment
    if print_env:
        for key, value in webui_mod.environment(deployment).items():
            click.echo(f"{key}={shlex.quote(value)}")
        _sync_keys(ctx)
        return
    if print_sbatch:
        click.echo(webui_mod.job_script(deployment), nl=False)
        _sync_keys(ctx)
        return
    if stop:
        with err.status("stopping OpenWebUI", spinner="dots"):
            webui_mod.stop(deployment)
        out.print("OpenWebUI stopped")
        return
    executable = webui_mod.program(deployment)
    env = webui_mod.environment(deployment)   # makes OpenWebUI's key on first use
    _sync_keys(ctx)   # so that HAProxy accepts that key from OpenWebUI's first request
    process = webui_mod.start(deployment, executable, env)
    with err.status("waiting for OpenWebUI", spinner="dots"):
        webui_mod.wait_ready(deployment, process, timeout)
    settings = deployment.webui
    out.print(f"OpenWebUI: {webui_mod.url(deployment)} (admin {settings.admin_email}, password in "
              f"{webui_mod.folder(deployment) / 'admin-password'})")


def _sync_keys(ctx: Context) -> None:
    """Bring the running HAProxy's key map up to date (keys.py), under the deployment lock."""
    with deployment_lock(ctx, timeout=60):
        serving_haproxy(ctx.deployment, "").sync_keys()


@click.group()
def batches() -> None:
    """The Batch API's batches (batches.enabled): list, show, cancel, as the owner sees them."""


def _batch_api(ctx: Context) -> batch_api.BatchAPI:
    if not ctx.deployment.batches.enabled:
        raise HpcserveError("batches.enabled is false in the deployment file: the Batch API is off")
    return batch_api.BatchAPI(ctx.deployment, ctx.scheduler)


def _admin_view(api: batch_api.BatchAPI, row: dict) -> dict:
    """A batch as the admin sees it: OpenAI's Batch object with the key that made it, its job and
    where its rows go ("own_gpus": the elements of its job array, None through the pool)."""
    return {**batch_objects.batch_object(row), "key": row["owner"], "job_id": row["job_id"],
            "own_gpus": batch_runner.own_gpus(api.store.run_dir(row["id"]))}


@batches.command("list")
@late_options
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True, help="Newest batches shown.")
@pass_ctx
def batches_list(ctx: Context, limit: int) -> None:
    """List the batches of every key, newest first, their counts brought up to date."""
    api = _batch_api(ctx)
    rows = api.refresh(api.store.batches(None, limit))[:limit]
    if ctx.as_json:
        click.echo(json.dumps([_admin_view(api, r) for r in rows], indent=2))
        return
    if not rows:
        out.print("no batches")
        return
    table = Table("BATCH", "KEY", "STATUS", "DONE", "FAILED", "TOTAL", "JOB", "CREATED", box=None)
    for r in rows:
        own = batch_runner.own_gpus(api.store.run_dir(r["id"]))
        job = (r["job_id"] or "-") + (f" (array of {own}, own GPUs)" if own else "")
        table.add_row(r["id"], r["owner"], r["status"], str(r["completed"]), str(r["failed"]), str(r["total"]),
                      job, time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])))
    out.print(table)


@batches.command("show")
@late_options
@click.argument("batch_id")
@pass_ctx
def batches_show(ctx: Context, batch_id: str) -> None:
    """Print one batch as the API returns it (OpenAI's Batch object), with its key and job."""
    api = _batch_api(ctx)
    try:
        row = api.refresh([api.store.batch(batch_id, batch_store.OWNER)])[0]
    except batch_objects.APIError as exc:
        raise HpcserveError(str(exc)) from None
    click.echo(json.dumps({**_admin_view(api, row), "run_dir": str(api.store.run_dir(batch_id))}, indent=2))


@batches.command("cancel")
@late_options
@click.argument("batch_id")
@pass_ctx
def batches_cancel(ctx: Context, batch_id: str) -> None:
    """Cancel a batch: its job is cancelled; the rows that finished stay in its output file."""
    try:
        batch = _batch_api(ctx).cancel(batch_store.OWNER, batch_id)
    except batch_objects.APIError as exc:
        raise HpcserveError(str(exc)) from None
    if ctx.as_json:
        click.echo(json.dumps(batch, indent=2))
    else:
        out.print(f"batch {batch_id}: {batch['status']} ({batch['request_counts']['completed']} of "
                  f"{batch['request_counts']['total']} rows answered)")
