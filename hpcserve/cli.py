"""The hpcserve command line: up, status, scale, down, render, reconcile, autoscale, batch, webui
(keys, usage and metrics: cli_access.py; init and check: cli_site.py; what they share: cli_context.py).

Each changing command is one reconcile step with a new desired state (reconcile.py); the CLI only
parses arguments, takes the deployment lock, waits where asked, and prints. Errors are one line
on stderr with an exit code from hpcserve.errors (2 bad input, 3 Slurm, 4 HAProxy, 5 timeout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import filelock
import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__, autoscaler, cli_access, cli_site
from . import batch as batch_mod
from . import check as check_mod
from . import webui as webui_mod
from .cli_context import Context, deployment_lock, err, late_options, out, pass_ctx
from .config import Deployment
from .core.pool import Desired, Health, Replica, server_name
from .errors import ConfigError, HAProxyError, HpcserveError, SlurmError, WaitTimeout
from .haproxy import config as haproxy_config
from .haproxy import runtime
from .haproxy.process import HAProxy
from .llama.probe import observe
from .reconcile import Outcome, describe
from .slurm import jobscript
from .slurm.cli import format_duration
from .state import StateDir, write_private


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-f", "--file", "file", type=click.Path(dir_okay=False, path_type=Path),
              default="hpcserve.yaml", envvar="HPCSERVE_FILE", show_default=True, show_envvar=True,
              help="The deployment file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document on stdout for scripts.")
@click.option("-v", "--verbose", is_flag=True,
              help="Log every outside command (Slurm, haproxy) and HAProxy runtime API command on stderr.")
@click.version_option(__version__, prog_name="hpcserve")
@click.pass_context
def cli(click_ctx: click.Context, file: Path, as_json: bool, verbose: bool) -> None:
    """Serve LLMs from a Slurm GPU cluster behind one OpenAI-compatible HAProxy endpoint.

    \b
    Exit codes: 0 done, 1 failure, 2 bad deployment file or arguments,
    3 Slurm unreachable or refusing, 4 HAProxy failure, 5 a wait timed out.
    """
    if verbose:   # hpcserve's own loggers only: httpx and asyncio would drown them
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger("hpcserve").addHandler(handler)
        logging.getLogger("hpcserve").setLevel(logging.DEBUG)
    click_ctx.obj = Context(file, as_json)


#: A change of the desired state: the stored one in, the wanted one out.
Change = Callable[[Desired], Desired]


def _keep(current: Desired) -> Desired:
    return current


def _step(ctx: Context, change: Change = _keep, drain_timeout: float | None = None,
          timeout: float = 600.0) -> Outcome:
    """One reconcile step toward `change(stored desired state)`, under the deployment lock.

    The stored state is read after the lock is taken, so a command that waited behind another
    (an autoscale run, a second `scale`) builds on what that one wrote instead of writing back
    what it read before (a lost update).
    """
    state = StateDir(ctx.deployment.state_dir)
    reconciler = ctx.reconciler()
    with deployment_lock(ctx, timeout):
        outcome = reconciler.step(change(state.read_desired()), drain_timeout)
    for line in describe(outcome):
        ctx.say(line)
    return outcome


def _finish_drains(ctx: Context, outcome: Outcome, drain_timeout: float | None) -> Outcome:
    """Step until no server drains: each is cancelled once idle or at its deadline (core/plan.py)."""
    with err.status("draining", spinner="dots") as spinner:
        while outcome.plan.draining:
            sessions = outcome.sessions or {}
            progress = ", ".join(f"job {job_id} ({sessions.get(job_id, '?')} session(s), "
                                 f"{max(0, deadline - time.time()):.0f} s left)"
                                 for job_id, deadline in sorted(outcome.plan.draining.items()))
            spinner.update(f"draining: {progress}")
            time.sleep(1)
            outcome = _step(ctx, drain_timeout=drain_timeout)
    return outcome


drain_option = click.option(
    "--drain-timeout", type=click.FloatRange(min=0), default=None,
    help="Seconds a leaving server may finish its requests before scancel "
         "[default: the deployment's haproxy.drain_timeout].")


@cli.command()
@late_options
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until every model has a ready backend.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              help="Seconds to wait for ready backends (queue wait plus model load).")
@pass_ctx
def up(ctx: Context, wait: bool, timeout: float) -> None:
    """Start the pool: submit the jobs, start HAProxy, wait for ready backends.

    Sets the desired replicas of every model to the deployment file's `replicas`. Running it
    again is harmless: only what is missing is submitted.
    """
    deployment = ctx.deployment
    _preflight(ctx)
    desired = Desired(up=True, replicas={m.name: m.replicas for m in deployment.models})
    outcome = _finish_drains(ctx, _step(ctx, lambda _current: desired), None)
    if wait:
        outcome = _wait_ready(ctx, desired, outcome, timeout)
    _print_summary(ctx, outcome, f"pool is up: {deployment.url}" + _still_coming(deployment, desired, outcome.replicas)
                   + _key_hint(deployment))


def _preflight(ctx: Context) -> None:
    """Stop before changing anything when a check of `hpcserve check` fails (check.preflight).

    Raises:
        ConfigError, SlurmError or HAProxyError (by the first failed check's kind), naming every
        failed check and its fix.
    """
    failed = [c for c in check_mod.preflight(ctx.deployment, ctx.scheduler()) if c.status == check_mod.FAIL]
    if failed:
        error = {"slurm": SlurmError, "haproxy": HAProxyError}.get(failed[0].kind, ConfigError)
        raise error("; ".join(f"{c.name}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "") for c in failed))


@cli.command()
@late_options
@click.argument("replicas", type=click.IntRange(min=0, max=1024))
@click.option("--model", "model_name", help="The model to scale (needed when there are several).")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Wait until the model has REPLICAS ready backends.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              help="Seconds to wait with --wait.")
@drain_option
@pass_ctx
def scale(ctx: Context, replicas: int, model_name: str | None, wait: bool, timeout: float,
          drain_timeout: float | None) -> None:
    """Grow or shrink the pool of one model to REPLICAS backend jobs.

    Shrinking drains first: a leaving server takes no new request, finishes the ones it has (or
    reaches --drain-timeout), and only then is its job cancelled.
    """
    deployment = ctx.deployment
    if model_name is None:
        if len(deployment.models) > 1:
            raise click.UsageError("--model is needed: the deployment has models "
                                   + ", ".join(m.name for m in deployment.models))
        model_name = deployment.models[0].name
    deployment.model(model_name)  # raises ConfigError for an unknown name

    def change(current: Desired) -> Desired:
        if not current.up:
            raise HpcserveError("the deployment is down; start it with `hpcserve up` first")
        return Desired(up=True, replicas={**current.replicas, model_name: replicas})

    outcome = _finish_drains(ctx, _step(ctx, change, drain_timeout), drain_timeout)
    desired = Desired(up=True, replicas={model_name: replicas})
    if wait:
        outcome = _wait_ready(ctx, desired, outcome, timeout, model_name=model_name, count=replicas)
    _print_summary(ctx, outcome, f"{model_name}: {replicas} replica(s) wanted")


@cli.command()
@late_options
@click.option("--timeout", type=click.FloatRange(min=0), default=120, show_default=True,
              help="Seconds to wait for the jobs to end after scancel.")
@drain_option
@click.option("--now", is_flag=True, help="Do not drain: cancel at once, cutting requests in flight.")
@pass_ctx
def down(ctx: Context, timeout: float, drain_timeout: float | None, now: bool) -> None:
    """Stop the pool: drain the servers, stop HAProxy, cancel every job, wait until they have ended."""
    drain_timeout = 0 if now else drain_timeout
    outcome = _step(ctx, lambda current: Desired(up=False, replicas=current.replicas), drain_timeout)
    outcome = _finish_drains(ctx, outcome, drain_timeout)
    deadline = time.monotonic() + timeout
    scheduler = ctx.scheduler()
    while True:
        active = [j for j in scheduler.jobs(jobscript.job_name_prefix(ctx.deployment)) if not j.state.ended]
        if not active:
            break
        if time.monotonic() > deadline:
            raise WaitTimeout(f"{len(active)} job(s) still ending after {timeout:g} s: "
                              + ", ".join(j.job_id for j in active))
        time.sleep(1)
    _print_summary(ctx, outcome, "pool is down: no job and no HAProxy left")


@cli.command()
@late_options
@drain_option
@pass_ctx
def reconcile(ctx: Context, drain_timeout: float | None) -> None:
    """Repair the pool toward its desired state once (what a cron job runs); drains advance one step."""
    outcome = _step(ctx, drain_timeout=drain_timeout)
    _print_summary(ctx, outcome, "reconciled" if describe(outcome) else "nothing to change")


@cli.command()
@late_options
@click.option("--watch", is_flag=True, help="Decide again every --interval seconds until interrupted.")
@click.option("--interval", type=click.FloatRange(min=1), default=30, show_default=True,
              help="Seconds between decisions with --watch.")
@click.option("--print-cron", is_flag=True, help="Print the crontab line that runs this every minute, and exit.")
@pass_ctx
def autoscale(ctx: Context, watch: bool, interval: float, print_cron: bool) -> None:
    """Size each model's pool to its load, once (for cron) or with --watch.

    Reads sessions and queued requests per model from HAProxy, decides with the model's
    `autoscale` policy (min, max, target_utilization, delays, cooldown, max_step), applies the
    result as one reconcile step, and appends the decision to STATE_DIR/decisions.jsonl. A run that
    finds another hpcserve command changing the deployment exits 0 without acting.
    """
    if print_cron:
        click.echo(_cron_line(ctx))
        return
    while True:
        _autoscale_once(ctx)
        if not watch:
            return
        time.sleep(interval)


def _autoscale_once(ctx: Context) -> None:
    state = StateDir(ctx.deployment.state_dir)
    try:
        with state.lock(timeout=0):
            records, outcome = autoscaler.run_once(ctx.reconciler())
    except filelock.Timeout:
        ctx.say("another hpcserve command is changing this deployment; this autoscale run does nothing")
        return
    if outcome is None:
        ctx.say("nothing to scale: the deployment is down or no model has an autoscale policy")
    else:
        for line in describe(outcome):
            ctx.say(line)
    if ctx.as_json:
        click.echo(json.dumps(records))
    for r in records:
        out.print(f"{r['model']}: {r['desired_before']} -> {r['desired_after']} replica(s): {r['reason']}")


def _cron_line(ctx: Context) -> str:
    """A crontab line with what cron's environment lacks: PATH (sbatch, squeue, haproxy), SLURM_CONF."""
    deployment = ctx.deployment
    env = [f"PATH={shlex.quote(os.environ.get('PATH', '/usr/bin:/bin'))}"]
    if os.environ.get("SLURM_CONF"):
        env.append(f"SLURM_CONF={shlex.quote(os.environ['SLURM_CONF'])}")
    if sys.argv[0].endswith("__main__.py"):  # python -m hpcserve
        program = f"{shlex.quote(sys.executable)} -m hpcserve"
    elif os.path.exists(sys.argv[0]):
        program = shlex.quote(os.path.abspath(sys.argv[0]))
    else:
        program = shlex.quote(shutil.which("hpcserve") or "hpcserve")
    log = shlex.quote(str(deployment.state_dir / "logs" / "autoscale.log"))
    return (f"* * * * * {' '.join(env)} {program} -f {shlex.quote(str(ctx.file.resolve()))} autoscale "
            f">> {log} 2>&1")


@cli.command()
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
              help="Requests in flight [default: the free slots of the model's ready backends].")
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

    def read():
        return batch_mod.read_rows(input_path, template=template, model=model.name, max_tokens=max_tokens,
                                   id_field=id_field)

    total = sum(1 for _ in read())  # validates every line before anything is sent
    done = batch_mod.finished_ids(output_path)
    todo = total - sum(1 for row in read() if row.custom_id in done)
    if concurrency is None:  # within what the frontend lets one client have at once
        concurrency = min(_free_slots(deployment, model), deployment.haproxy.max_requests_per_client)
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
            (row for row in read() if row.custom_id not in done), deployment.url, output_path,
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


def _free_slots(deployment: Deployment, model) -> int:
    """Slots of the model's servers that HAProxy has UP, at least the slots of one backend."""
    haproxy = HAProxy(deployment, "")
    up = 0
    if haproxy.running():
        try:
            up = sum(1 for s in runtime.show_stat(haproxy.paths.admin_socket)
                     if s.backend == haproxy_config.backend_name(model) and s.status.startswith("UP"))
        except HpcserveError:
            up = 0
    return max(1, up) * model.parallel


@cli.command()
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
    pid_file = webui_mod.folder(deployment) / "webui.pid"
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
        _stop_pid_file(pid_file)
        out.print("OpenWebUI stopped")
        return
    settings = deployment.webui
    program = webui_mod.find_program(settings.command)
    if program is None:
        raise HpcserveError(f"{settings.command} is not installed: pip install 'hpcserve[webui]', or "
                            "scripts/setup.sh in a checkout (or run it your own way with the output of "
                            "`hpcserve webui --env`)")
    env = {**os.environ, **webui_mod.environment(deployment)}
    _sync_keys(ctx)   # OpenWebUI's key, made on first use, is accepted from its first request
    with open(deployment.state_dir / "logs" / "webui.log", "a") as log:
        process = subprocess.Popen([program, "serve", "--host", settings.host, "--port", str(settings.port)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                   start_new_session=True)
    write_private(pid_file, f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    with err.status("waiting for OpenWebUI", spinner="dots"):
        while not _answers(webui_mod.url(deployment) + "/health"):
            if process.poll() is not None:
                raise HpcserveError(f"OpenWebUI exited with status {process.returncode}; see "
                                    f"{deployment.state_dir / 'logs' / 'webui.log'}")
            if time.monotonic() > deadline:
                raise WaitTimeout(f"OpenWebUI did not answer within {timeout:g} s; it keeps starting "
                                  f"(pid {process.pid})")
            time.sleep(1)
    out.print(f"OpenWebUI: {webui_mod.url(deployment)} (admin {settings.admin_email}, password in "
              f"{webui_mod.folder(deployment) / 'admin-password'})")


def _sync_keys(ctx: Context) -> None:
    """Bring the running HAProxy's key map up to date (keys.py), under the deployment lock."""
    with deployment_lock(ctx, timeout=60):
        HAProxy(ctx.deployment, "").sync_keys()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stop_pid_file(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
        os.killpg(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    pid_file.unlink(missing_ok=True)


@cli.command()
@late_options
@click.option("--what", type=click.Choice(["all", "sbatch", "haproxy"]), default="all", show_default=True)
@pass_ctx
def render(ctx: Context, what: str) -> None:
    """Print the sbatch script(s) and haproxy.cfg that `up` would use, touching nothing."""
    deployment = ctx.deployment
    documents: dict[str, str] = {}
    if what in ("all", "sbatch"):
        for model in deployment.models:
            documents[f"sbatch:{model.name}"] = jobscript.render(deployment, model)
    if what in ("all", "haproxy"):
        documents["haproxy.cfg"] = haproxy_config.render(deployment, [])
    if ctx.as_json:
        click.echo(json.dumps(documents, indent=2))
        return
    for title, text in documents.items():
        if len(documents) > 1:
            click.echo(f"# ===== {title} =====")
        click.echo(text, nl=False)


@cli.command()
@late_options
@pass_ctx
def status(ctx: Context) -> None:
    """Show the pool: jobs, endpoints, health, slots, HAProxy sessions. Exit 3 if Slurm is down."""
    deployment = ctx.deployment
    state = StateDir(deployment.state_dir)
    desired = state.read_desired()
    haproxy = HAProxy(deployment, "")
    slurm_error = None
    backends: list[Replica] = []
    try:
        key = state.key_file.read_text().strip() if state.key_file.exists() else None
        backends = observe(deployment, ctx.scheduler(), key=key, slots=True)
    except SlurmError as exc:
        slurm_error = str(exc)
    stats = {}
    if haproxy.running():
        try:
            stats = {s.server: s for s in runtime.show_stat(haproxy.paths.admin_socket)}
        except HpcserveError:
            pass
    report = _status_report(deployment, desired, haproxy, backends, stats, slurm_error)
    if ctx.as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_status(report)
    if slurm_error:
        sys.exit(SlurmError.exit_code)


def _status_report(deployment, desired, haproxy, backends, stats, slurm_error) -> dict:
    rows = []
    for b in backends:
        if b.health is Health.ENDED:
            continue
        s = stats.get(server_name(b.job.job_id))
        rows.append({
            "job_id": b.job.job_id, "model": b.model, "state": b.job.state.value, "node": b.job.node,
            "endpoint": b.endpoint, "health": b.health.value,
            "slots_busy": b.slots_busy, "slots_total": b.slots_total,
            "time_left_s": b.job.time_left_s, "reason": b.job.reason,
            "haproxy_status": s.status if s else None, "sessions": s.sessions if s else None,
            "queued": s.queued if s else None, "served": s.total if s else None,
        })
    models = {}
    for m in deployment.models:
        mine = [r for r in rows if r["model"] == m.name]
        models[m.name] = {"desired": desired.replicas_of(m.name), "jobs": len(mine),
                          "ready": sum(1 for r in mine if r["health"] == Health.READY.value)}
    state = StateDir(deployment.state_dir)
    auth = ({"mode": "open"} if deployment.haproxy.auth == "open" else
            {"mode": "keys", "owner_key": state.read_api_key(), "owner_key_file": str(state.api_key_file),
             "api_keys_file": str(deployment.haproxy.api_keys_file) if deployment.haproxy.api_keys_file else None})
    return {"deployment": deployment.name, "url": deployment.url, "up": desired.up, "auth": auth,
            "haproxy": {"running": haproxy.running(), "pid": haproxy.pid()},
            "models": models, "backends": rows, "slurm_error": slurm_error,
            "last_autoscale": autoscaler.last_decisions(deployment.state_dir),
            "webui": {"url": webui_mod.url(deployment), "up": _answers(webui_mod.url(deployment) + "/health")}}


def _print_status(report: dict) -> None:
    h = report["haproxy"]
    out.print(f"deployment [bold]{report['deployment']}[/]: {'up' if report['up'] else 'down'}, "
              f"URL {report['url']}, HAProxy {'running (pid %s)' % h['pid'] if h['running'] else 'not running'}")
    auth = report["auth"]
    if auth["mode"] == "open":
        out.print("  API keys: none (haproxy.auth: open): anyone who reaches the URL can use the pool")
    else:
        out.print(f"  API key: {auth['owner_key'] or '(made at the next up)'} (in {auth['owner_key_file']})",
                  markup=False)
    out.print(f"  OpenWebUI {report['webui']['url']}: {'up' if report['webui']['up'] else 'not running'}")
    for name, m in report["models"].items():
        out.print(f"  model {name}: {m['ready']} ready of {m['jobs']} job(s), {m['desired']} wanted")
        last = report["last_autoscale"].get(name)
        if last:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["time"]))
            out.print(f"    last autoscale {when}: {last['desired_before']} -> {last['desired_after']}, "
                      f"{last['reason']}", markup=False)
    if report["slurm_error"]:
        err.print(f"[red]Slurm is not answering:[/] {report['slurm_error']}")
        return
    if not report["backends"]:
        return
    table = Table(box=None, pad_edge=False)
    for column in ("JOB", "MODEL", "STATE", "NODE", "ENDPOINT", "HEALTH", "SLOTS", "SESS", "QUEUE",
                   "SERVED", "TIME LEFT"):
        table.add_column(column)
    for r in report["backends"]:
        slots = f"{r['slots_busy']}/{r['slots_total']}" if r["slots_total"] is not None else "-"
        table.add_row(r["job_id"], r["model"], r["state"], r["node"] or r["reason"], r["endpoint"] or "-",
                      r["health"], slots, _dash(r["sessions"]), _dash(r["queued"]), _dash(r["served"]),
                      _duration(r["time_left_s"]))
    out.print(table)


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _duration(seconds: int | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _wait_ready(ctx: Context, desired: Desired, outcome: Outcome, timeout: float,
                model_name: str | None = None, count: int = 1) -> Outcome:
    """Step until each wanted model (or `model_name`) has `count` ready backends (1 for up).

    Raises:
        WaitTimeout: not ready within `timeout` seconds (the jobs stay; the pool keeps coming up).
        HpcserveError: a job submitted by this command ended before becoming ready.
    """
    deployment = ctx.deployment
    submitted = {job_id for _, job_id in outcome.submitted}
    wanted = {m.name: (count if model_name else 1) for m in deployment.models
              if (model_name is None or m.name == model_name) and desired.replicas_of(m.name) > 0}
    deadline = time.monotonic() + timeout
    last = ""
    with err.status("waiting for ready backends", spinner="dots") as spinner:
        while True:
            leaving = {c.job_id for c in outcome.plan.cancel}
            ready = {name: sum(1 for b in outcome.replicas if b.model == name and b.health is Health.READY
                               and b.job.job_id not in leaving)
                     for name in wanted}
            if all(ready[name] >= n for name, n in wanted.items()):
                return outcome
            failed = [b for b in outcome.replicas if b.job.job_id in submitted and b.health is Health.ENDED]
            if failed:
                b = failed[0]
                log = jobscript.log_dir(deployment) / f"job-{b.job.job_id}.out"
                raise HpcserveError(f"job {b.job.job_id} ({b.model}) ended {b.job.state.value} before it "
                                    f"was ready; see {log}")
            progress = ", ".join(f"{name} {ready[name]}/{n} ready ({_phase(outcome.replicas, name)})"
                                 for name, n in wanted.items())
            spinner.update(f"waiting: {progress}")
            if progress != last and not err.is_terminal:
                ctx.say(f"waiting: {progress}")
            last = progress
            if time.monotonic() > deadline:
                raise WaitTimeout(f"no ready backend within {timeout:g} s ({progress}); the jobs stay "
                                  "queued, see `hpcserve status`")
            time.sleep(2)
            outcome = _step(ctx)
            submitted |= {job_id for _, job_id in outcome.submitted}


def _key_hint(deployment: Deployment) -> str:
    """Where a client finds the API key, when the frontend asks for one."""
    if deployment.haproxy.auth == "open":
        return " (open: no API key needed)"
    return f"; API key in {StateDir(deployment.state_dir).api_key_file} (`hpcserve status` shows it)"


def _still_coming(deployment: Deployment, desired: Desired, backends: tuple[Replica, ...]) -> str:
    """The summary's tail when some wanted backends are not ready yet: they join HAProxy later.

    A backend enters HAProxy only at a reconcile step that finds it ready (core/plan.py), so the ones
    still loading when `up` returns join at the next `hpcserve reconcile` (what cron runs).
    """
    short = []
    for m in deployment.models:
        wanted = desired.replicas_of(m.name)
        ready = sum(1 for b in backends if b.model == m.name and b.health is Health.READY)
        if ready < wanted:
            short.append(f"{m.name} {ready}/{wanted} ready")
    if not short:
        return ""
    return (f" ({', '.join(short)}; the others join at the next `hpcserve reconcile`, "
            "which cron runs, or `hpcserve scale N --wait`)")


def _phase(backends: tuple[Replica, ...], model: str) -> str:
    counts: dict[str, int] = {}
    for b in backends:
        if b.model == model and b.health is not Health.ENDED:
            counts[b.health.value] = counts.get(b.health.value, 0) + 1
    return ", ".join(f"{n} {h}" for h, n in sorted(counts.items())) or "no job"


def _print_summary(ctx: Context, outcome: Outcome, message: str) -> None:
    if ctx.as_json:
        click.echo(json.dumps({
            "message": message, "url": ctx.deployment.url,
            "submitted": [{"model": m, "job_id": j} for m, j in outcome.submitted],
            "cancelled": [{"job_id": c.job_id, "model": c.model, "reason": c.reason} for c in outcome.plan.cancel],
            "servers": [{"name": s.name, "model": s.model, "endpoint": f"{s.address}:{s.port}"}
                        for s in outcome.plan.servers],
        }, indent=2))
    else:
        out.print(message)


def main() -> None:
    """Console entry point: run the CLI, turning hpcserve errors into one line and an exit code."""
    # Files hpcserve creates (and, through sbatch's umask propagation, the jobs' logs) are private.
    os.umask(0o077)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("hpcserve: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except HpcserveError as exc:
        click.echo(f"hpcserve: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("hpcserve: interrupted; the pool is as the last step left it (`hpcserve status`)", err=True)
        sys.exit(130)


# The commands of a shared pool (keys, usage, metrics) and of day one at a site (init, check) live
# in modules of their own.
for _command in (cli_access.keys, cli_access.usage, cli_access.metrics, cli_site.init, cli_site.check):
    cli.add_command(_command)
