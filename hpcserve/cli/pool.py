"""The hpcserve command group and the pool's commands: up, status, scale, down, reconcile,
autoscale (batch and webui: clients.py; keys, usage and metrics: access.py; init, check and
render: site.py; what they share: context.py).

Each changing command is one reconcile step with a new desired state, and a wait is
Reconciler.run_until (reconcile.py); the CLI only declares the commands and prints. Errors are one
line on stderr with an exit code from hpcserve.errors (2 bad input, 3 Slurm, 4 HAProxy, 5 timeout).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from .. import __version__
from ..batches import service as batch_service
from ..batches.store import OWNER
from ..control import autoscaler
from . import access, clients, site as site_cli
from ..site import check as check_mod
from ..control import status as status_mod
from .context import Context, err, late_options, out, pass_ctx
from ..core.pool import Desired
from ..errors import DeploymentBusy, HpcserveError, SlurmError
from ..control.reconcile import describe
from ..state import StateDir


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
    click_ctx.obj = Context(file, as_json)
    if verbose:
        click_ctx.obj.log_commands()


drain_option = click.option(
    "--drain-timeout", type=click.FloatRange(min=0), default=None,
    help="Seconds a leaving server may finish its requests before scancel "
         "[default: the deployment's haproxy.drain_timeout].")


@cli.command()
@late_options
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until every model has a ready replica.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              help="Seconds to wait for ready replicas (queue wait plus model load).")
@pass_ctx
def up(ctx: Context, wait: bool, timeout: float) -> None:
    """Start the pool: submit the jobs, start HAProxy, wait for ready replicas.

    Sets the desired replicas of every model to the deployment file's `replicas`. Running it
    again is harmless: only what is missing is submitted.
    """
    deployment = ctx.deployment
    check_mod.refuse_on_failure(check_mod.preflight(deployment, ctx.scheduler()))
    desired = Desired(up=True, replicas={m.name: m.replicas for m in deployment.models})
    outcome = ctx.finish_drains(ctx.reconciler().locked_step(lambda _current: desired), None)
    if wait:
        outcome = ctx.wait_ready({m.name: 1 for m in deployment.models if m.replicas > 0}, outcome, timeout)
    ctx.print_summary(outcome, status_mod.up_message(deployment, desired, outcome.replicas))


@cli.command()
@late_options
@click.argument("replicas", type=click.IntRange(min=0, max=1024))
@click.option("--model", "model_name", help="The model to scale (needed when there are several).")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Wait until the model has REPLICAS ready replicas.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              help="Seconds to wait with --wait.")
@drain_option
@pass_ctx
def scale(ctx: Context, replicas: int, model_name: str | None, wait: bool, timeout: float,
          drain_timeout: float | None) -> None:
    """Grow or shrink the pool of one model to REPLICAS replicas (llama-server jobs).

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

    outcome = ctx.finish_drains(ctx.reconciler().locked_step(change, drain_timeout), drain_timeout)
    if wait and replicas > 0:
        outcome = ctx.wait_ready({model_name: replicas}, outcome, timeout)
    ctx.print_summary(outcome, f"{model_name}: {replicas} replica(s) wanted")


@cli.command()
@late_options
@click.option("--timeout", type=click.FloatRange(min=0), default=120, show_default=True,
              help="Seconds to wait for the jobs to end after scancel.")
@drain_option
@click.option("--now", is_flag=True, help="Do not drain: cancel at once, cutting requests in flight.")
@click.option("--cancel-batches", is_flag=True,
              help="Cancel the Batch API's batches that send their rows through the pool (their finished rows "
                   "are kept); without it, down refuses while there are any.")
@pass_ctx
def down(ctx: Context, timeout: float, drain_timeout: float | None, now: bool, cancel_batches: bool) -> None:
    """Stop the pool: drain the servers, stop HAProxy, cancel every job, wait until they have ended.

    Batches of the Batch API that go through the pool would fail their rows while it is down: down
    refuses (exit 1, naming them) unless --cancel-batches cancels them first. Batches on GPUs of
    their own (batches.own_capacity) go on.
    """
    drain_timeout = 0 if now else drain_timeout
    if ctx.deployment.batches.enabled:
        _stop_batches_through_pool(ctx, cancel_batches)
    outcome = ctx.reconciler().locked_step(lambda current: Desired(up=False, replicas=current.replicas),
                                            drain_timeout)
    outcome = ctx.finish_drains(outcome, drain_timeout)
    ctx.reconciler().wait_ended(timeout)
    ctx.print_summary(outcome, "pool is down: no job and no HAProxy left")


def _stop_batches_through_pool(ctx: Context, cancel: bool) -> None:
    """Cancel (`cancel`) the running batches whose rows go through the pool, or refuse naming them.

    Raises:
        HpcserveError: there are such batches and `cancel` is False (nothing was changed).
    """
    api = batch_service.BatchAPI(ctx.deployment, ctx.scheduler)
    running = api.through_pool()
    if running and not cancel:
        listed = ", ".join(f"{r['id']} of key {r['owner']} ({r['completed'] + r['failed']}/{r['total']} rows)"
                           for r in running)
        raise HpcserveError(f"{len(running)} batch(es) send their rows through the pool, which would fail while it "
                            f"is down: {listed}. Cancel them (`hpcserve batches cancel ID`, or down --cancel-batches: "
                            "their finished rows are kept), or let them finish")
    for row in running:
        api.cancel(OWNER, row["id"])
        ctx.say(f"batch {row['id']} of key {row['owner']} cancelled: {row['completed'] + row['failed']} of "
                f"{row['total']} rows have their line")


@cli.command()
@late_options
@drain_option
@pass_ctx
def reconcile(ctx: Context, drain_timeout: float | None) -> None:
    """Repair the pool toward its desired state once (what a cron job runs); drains advance one step."""
    outcome = ctx.reconciler().locked_step(drain_timeout=drain_timeout)
    ctx.print_summary(outcome, "reconciled" if describe(outcome) else "nothing to change")


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
        click.echo(autoscaler.cron_line(ctx.file, ctx.deployment.state_dir))
        return
    while True:
        _autoscale_once(ctx)
        if not watch:
            return
        time.sleep(interval)


def _autoscale_once(ctx: Context) -> None:
    try:
        with StateDir(ctx.deployment.state_dir).exclusive(timeout=0):
            records, outcome = autoscaler.run_once(ctx.reconciler())
    except DeploymentBusy:
        ctx.say("another hpcserve command is changing this deployment; this autoscale run does nothing")
        return
    if outcome is None:
        ctx.say("nothing to scale: the deployment is down or no model has an autoscale policy")
    if ctx.as_json:
        click.echo(json.dumps(records))
    for r in records:
        out.print(f"{r['model']}: {r['desired_before']} -> {r['desired_after']} replica(s): {r['reason']}")


@cli.command()
@late_options
@pass_ctx
def status(ctx: Context) -> None:
    """Show the pool: jobs, endpoints, health, slots, HAProxy sessions. Exit 3 if Slurm is down.

    --json prints status.PoolStatus (its docstring describes every field).
    """
    report = status_mod.collect(ctx.deployment, ctx.scheduler())
    if ctx.as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        status_mod.print_report(report, out, err)
    if report.slurm_error:
        sys.exit(SlurmError.exit_code)


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


# The commands of the pool's clients (batch, webui), of a shared pool (keys, usage, metrics) and of
# day one at a site (init, check) live in modules of their own.
for _command in (clients.batch, clients.batches, clients.webui, access.keys, access.usage, access.quota,
                 access.metrics,
                 site_cli.init, site_cli.check, site_cli.render):
    cli.add_command(_command)
