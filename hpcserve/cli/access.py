"""The commands of a shared pool: `hpcserve keys` (who may use it, in which class, within which
limits), `hpcserve usage` (who used how much, from the access log) and `hpcserve metrics` (for
Prometheus). hpcserve.cli.pool adds them to
its command group."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import re
import time

from pathlib import Path

import click
from prometheus_client import generate_latest, write_to_textfile
from rich.table import Table

from ..haproxy import accesslog
from ..access import chargeback as chargeback_mod
from ..access import keys as keys_mod, ledger, metrics as metrics_mod, quotas as quotas_mod, usage as usage_mod
from ..core import quota as quota_core
from .context import Context, deployment_lock, late_options, out, pass_ctx
from ..control.observe import observe
from ..errors import ConfigError, HAProxyError, SlurmError
from ..haproxy import runtime
from ..haproxy.process import KEY_TABLE, HAProxy
from ..state import StateDir


def _rate(_ctx, _param, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return keys_mod.parse_rate(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _key_options(command):
    """NAME and the class and limit options of `keys add` and `keys set`."""
    for option in reversed([
            late_options, click.argument("name"),
            click.option("--class", "priority_class", type=click.Choice(keys_mod.PRIORITY_CLASSES),
                         help="Priority class: interactive requests leave the queue before batch ones."),
            click.option("--max-concurrent", type=click.IntRange(1, keys_mod.MAX_CONCURRENT),
                         help="Requests in service or queued at once [default: haproxy.max_requests_per_client]."),
            click.option("--rate", callback=_rate, metavar="R/min",
                         help="Requests per minute (600, 600/min or 10/s); 0 = no limit [default: 0]."),
            click.option("--account", metavar="ACCOUNT",
                         help="Slurm account the key's requests count for (fair share, quotas, usage), checked "
                              "against slurmdbd [default: slurm.account, else your default account]."),
            pass_ctx]):
        command = option(command)
    return command


@click.group()
def keys() -> None:
    """API keys of the pool: add, list, set, revoke. Changes count from the next request, without
    a reload of HAProxy; only each key's SHA-256 is kept (STATE_DIR/keys.json, STATE_DIR/keys.map).
    """


def _registry(ctx: Context) -> keys_mod.KeyRegistry:
    deployment = ctx.deployment
    if deployment.haproxy.auth == "open":
        raise ConfigError("haproxy.auth: the pool is open (no key is asked for); set `auth: keys` in the "
                          "deployment file to use API keys")
    return keys_mod.KeyRegistry(deployment)


def _locked(ctx: Context, change):
    """Run `change()` under the deployment lock, then bring the running HAProxy's key map up to
    date; returns (change's result, where it took effect)."""
    with deployment_lock(ctx, timeout=60):
        result = change()
        haproxy = keys_mod.serving_haproxy(ctx.deployment, "")
        haproxy.sync_keys()
    return result, ("in effect now" if haproxy.running() else "in effect when the pool starts")


def _describe(key: keys_mod.Key, ctx: Context) -> dict:
    return {"name": key.name, "class": key.priority_class, "max_concurrent": key.limit(ctx.deployment),
            "rate_per_minute": key.rate_per_minute or None, "source": key.source, "created": key.created,
            "forwards_users": key.forwards_users, "account": key.account}


@keys.command("add")
@_key_options
def keys_add(ctx: Context, name: str, priority_class: str | None, max_concurrent: int | None,
             rate: int | None, account: str | None) -> None:
    """Make a key called NAME and print it: the only time it is shown."""
    registry = _registry(ctx)
    account = keys_mod.check_account(ctx.deployment, account)
    (entry, secret), where = _locked(ctx, lambda: registry.add(name, priority_class or "interactive",
                                                               max_concurrent, rate or 0, account))
    if ctx.as_json:
        click.echo(json.dumps({**_describe(entry, ctx), "key": secret}, indent=2))
        return
    ctx.say(f"key {name} added ({_limits(entry, ctx)}), {where}; it is shown only now:")
    click.echo(secret)


@keys.command("set")
@_key_options
def keys_set(ctx: Context, name: str, priority_class: str | None, max_concurrent: int | None,
             rate: int | None, account: str | None) -> None:
    """Change the class, limits or account of the key NAME (the key itself stays)."""
    registry = _registry(ctx)
    if account is not None:
        account = keys_mod.check_account(ctx.deployment, account)
    entry, where = _locked(ctx, lambda: registry.change(name, priority_class, max_concurrent, rate, account))
    _print_key(ctx, entry, f"key {name}: {_limits(entry, ctx)}, {where}")


@keys.command("revoke")
@late_options
@click.argument("name")
@pass_ctx
def keys_revoke(ctx: Context, name: str) -> None:
    """Revoke the key NAME: its next request gets 401."""
    registry = _registry(ctx)
    entry, where = _locked(ctx, lambda: registry.revoke(name))
    _print_key(ctx, entry, f"key {name} revoked, {where}")


def _print_key(ctx: Context, entry: keys_mod.Key, line: str) -> None:
    """The key's entry as JSON (--json), else `line`."""
    if ctx.as_json:
        click.echo(json.dumps(_describe(entry, ctx), indent=2))
    else:
        out.print(line)


@keys.command("list")
@late_options
@pass_ctx
def keys_list(ctx: Context) -> None:
    """List the accepted keys (names, classes, limits; never a key)."""
    _registry(ctx)
    rows = [_describe(k, ctx) for k in keys_mod.accepted_keys(ctx.deployment)]
    if ctx.as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("NAME", "CLASS", "MAX CONCURRENT", "RATE/MIN", "ACCOUNT", "SOURCE", "CREATED", box=None)
    for row in rows:
        table.add_row(row["name"], row["class"], str(row["max_concurrent"]), str(row["rate_per_minute"] or "-"),
                      row["account"] or "-",
                      row["source"] + (" (names its users)" if row["forwards_users"] else ""),
                      row["created"] or "-")
    out.print(table)


def _limits(key: keys_mod.Key, ctx: Context) -> str:
    rate = f", at most {key.rate_per_minute} per minute" if key.rate_per_minute else ""
    account = f", account {key.account}" if key.account else ", no Slurm account"
    return f"{key.priority_class}, at most {key.limit(ctx.deployment)} requests at once{rate}{account}"


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def _when(_ctx, param, value: str | None) -> float | None:
    """Epoch seconds from an ISO 8601 date or time (local time unless it names a zone), or a
    duration before now ("90m", "24h", "7d")."""
    if value is None:
        return None
    if match := _RELATIVE.fullmatch(value.strip()):
        return time.time() - float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise click.BadParameter(f"expected a date or time such as 2026-11-01 or 2026-11-01T08:00, or a "
                                 f"duration before now such as 24h or 7d, got {value!r}", param=param) from None


@click.command()
@late_options
@click.option("--since", callback=_when, help="From this time (2026-11-01, 2026-11-01T08:00, or 24h, 7d ago).")
@click.option("--until", callback=_when, help="Until this time (same forms) [default: now].")
@click.option("--by", type=click.Choice(usage_mod.GROUPINGS), default="key", show_default=True,
              help="Group by API key, Slurm account, model, or OpenWebUI user.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (one row per group) for spreadsheets.")
@click.option("--chargeback", is_flag=True,
              help="Split the GPU time sacct charged for the pool's jobs across the Slurm accounts whose requests "
                   "held their slots, idle time on its own line (sreport's columns) [--since default: the month's "
                   "start, UTC].")
@pass_ctx
def usage(ctx: Context, since: float | None, until: float | None, by: str, as_csv: bool, chargeback: bool) -> None:
    """Requests, errors, queue waits, busy slot-seconds and GPU-hours, from the access log.

    \b
    GPU-hours: a request holds one of a job's `parallel` slots, and the job `gpus.count` GPUs,
    from the backend's connection to the response's end; slot-seconds x gpus.count / parallel.
    Access logs rotated out count from the usage ledger (by the hour; queue waits over the lines
    still logged); requests HAProxy answered itself (429, 400, ...) only while their own log
    (unbilled.log) keeps them.
    """
    deployment = ctx.deployment
    try:
        ledger.fold(deployment)
    except OSError as e:   # the expired files then count from where they are
        ctx.say(f"warning: the usage ledger was not updated: {e}")
    if chargeback:
        _print_chargeback(ctx, chargeback_mod.chargeback(
            deployment, since if since is not None else quota_core.period_start(time.time(), "month"), until),
            as_csv)
        return
    with ledger.reading(deployment) as (archived, records):
        rows = usage_mod.summarize(records, deployment, by, since, until, archived)
    data = [dataclasses.asdict(r) for r in rows]
    if ctx.as_json:
        click.echo(json.dumps({"by": by, "since": since, "until": until, "rows": data}, indent=2))
        return
    if as_csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([by, "requests", "ok", "errors", "queue_p50_ms", "queue_p99_ms", "slot_seconds",
                         "gpu_hours", "bytes_out"])
        for r in rows:
            writer.writerow([r.name, r.requests, r.ok, _errors(r.errors, ";"), _num(r.queue_p50_ms),
                             _num(r.queue_p99_ms), f"{r.slot_seconds:.3f}", f"{r.gpu_hours:.6f}", r.bytes_out])
        click.echo(buffer.getvalue(), nl=False)
        return
    if not rows:
        out.print(f"no requests in {accesslog.log_file(deployment)} for this period")
        return
    table = Table(by.upper(), "REQUESTS", "OK", "ERRORS", "QUEUE P50", "QUEUE P99", "SLOT-S", "GPU-H",
                  "BYTES OUT", box=None)
    for r in rows:
        table.add_row(r.name, str(r.requests), str(r.ok), _errors(r.errors, ", ") or "-",
                      _ms(r.queue_p50_ms), _ms(r.queue_p99_ms), f"{r.slot_seconds:.1f}", f"{r.gpu_hours:.4f}",
                      str(r.bytes_out))
    out.print(table)


@click.group(invoke_without_command=True)
@late_options
@pass_ctx
@click.pass_context
def quota(click_ctx: click.Context, ctx: Context) -> None:
    """GPU-hour quotas per Slurm account: without a subcommand, each quota with what its account
    used in the current period (UTC days, weeks from Monday, months), what is left, and when it
    renews. Over its quota, an account's requests get 429 insufficient_quota until then; each
    answer tells a key holder what is left (X-Quota-Remaining-GPU-Hours).
    """
    if click_ctx.invoked_subcommand is not None:
        return
    rows = quotas_mod.report(ctx.deployment)
    if ctx.as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return
    if not rows:
        out.print("no quotas (set one with `hpcserve quota set ACCOUNT 200h --per month`)")
        return
    table = Table("ACCOUNT", "QUOTA", "USED", "LEFT", "RENEWS (UTC)", box=None)
    for r in rows:
        renews = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.resets))
        table.add_row(r.account, f"{r.quota_gpu_hours:g} GPU-h per {r.period}", f"{r.used_gpu_hours:.4f}",
                      "[red]0 (over)[/]" if r.over else f"{r.remaining_gpu_hours:.4f}", renews)
    out.print(table)


def _gpu_time(_ctx, _param, value: str) -> float:
    try:
        return quota_core.parse_gpu_time(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@quota.command("set")
@late_options
@click.argument("account")
@click.argument("amount", metavar="GPU_TIME", callback=_gpu_time)
@click.option("--per", "period", type=click.Choice(quota_core.PERIODS), default="month", show_default=True,
              help="The period the quota renews each (UTC).")
@pass_ctx
def quota_set(ctx: Context, account: str, amount: float, period: str) -> None:
    """Give ACCOUNT (a Slurm account) a quota of GPU_TIME (200h, 90m, 30s; a bare number is hours)
    per period; in effect from the next request."""
    with deployment_lock(ctx, timeout=60):
        entry = quotas_mod.set_quota(ctx.deployment, account, amount, period)
    _print_quota(ctx, entry, f"quota of {entry.account}: {entry.gpu_seconds / 3600:g} GPU-hours per {entry.period}")


@quota.command("unset")
@late_options
@click.argument("account")
@pass_ctx
def quota_unset(ctx: Context, account: str) -> None:
    """Remove ACCOUNT's quota; in effect from the next request."""
    with deployment_lock(ctx, timeout=60):
        entry = quotas_mod.unset_quota(ctx.deployment, account)
    _print_quota(ctx, entry, f"quota of {entry.account} removed")


def _print_quota(ctx: Context, entry: quota_core.Quota, line: str) -> None:
    if ctx.as_json:
        click.echo(json.dumps(dataclasses.asdict(entry), indent=2))
    else:
        out.print(line)


def _print_chargeback(ctx: Context, split: chargeback_mod.Chargeback, as_csv: bool) -> None:
    if ctx.as_json:
        click.echo(json.dumps(dataclasses.asdict(split), indent=2))
        return
    if as_csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(chargeback_mod.COLUMNS)
        writer.writerows(split.rows())
        click.echo(buffer.getvalue(), nl=False)
        return
    window = " to ".join(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) for t in (split.since, split.until))
    out.print(f"chargeback {window}: {split.charged_gpu_seconds / 3600:.4f} GPU-hours charged by Slurm to "
              f"{split.pool_account or '(no job)'} for {len(split.jobs)} job(s)")
    table = Table(*chargeback_mod.COLUMNS, box=None)
    for row in split.rows():
        table.add_row(*row)
    out.print(table)


def _errors(errors: dict[str, int], sep: str) -> str:
    return sep.join(f"{k}:{v}" for k, v in sorted(errors.items()))


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


@click.command()
@late_options
@click.option("--textfile", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the metrics to this file (atomically) for node_exporter's textfile collector, "
                   "e.g. from cron every minute, instead of printing them.")
@pass_ctx
def metrics(ctx: Context, textfile: Path | None) -> None:
    """Prometheus series HAProxy's exporter lacks: replicas by state, per-key requests and limits.

    HAProxy's own exporter (frontends, backends, servers) answers on the stats port at /metrics.
    """
    deployment = ctx.deployment
    state = StateDir(deployment.state_dir)
    try:
        key = state.read_backend_key()
        backends = observe(deployment, ctx.scheduler(), key=key, admitted=state.read_step().in_rotation)
    except SlurmError:
        backends = None   # hpcserve_scheduler_up 0; the desired replicas are still exported
    table, unauthenticated = {}, {}
    haproxy = HAProxy(deployment, "")
    if haproxy.running():
        try:
            table = runtime.show_table(haproxy.paths.admin_socket, KEY_TABLE)
            if deployment.haproxy.access_log:
                unauthenticated = runtime.show_table(haproxy.paths.admin_socket, "unauthenticated")
        except HAProxyError:
            pass
    registry = metrics_mod.registry(metrics_mod.PoolCollector(deployment, state.read_desired(), backends, table,
                                                              dropped_log_lines=haproxy.dropped_log_lines(),
                                                              unauthenticated=unauthenticated))
    if textfile:
        write_to_textfile(str(textfile), registry)
    else:
        click.echo(generate_latest(registry).decode(), nl=False)
