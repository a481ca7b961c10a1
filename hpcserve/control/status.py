"""The pool as `hpcserve status` reports it: what Slurm, the replicas, HAProxy and OpenWebUI say
now, gathered once into a PoolStatus whose `to_json()` is the documented `status --json` shape,
and print_report() its text form.

Reading only: nothing here changes the pool, so it needs no lock and runs beside any command.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import autoscaler
from ..access import accounts, webui_groups
from ..batches import service as batches_service, store as batches_store
from ..clients import webui
from ..config import Deployment
from ..core.pool import Desired, Health, Replica, server_name
from ..errors import SlurmError
from ..haproxy.process import HAProxy
from .observe import observe
from ..slurm import Scheduler
from ..slurm.cli import format_duration
from ..state import StateDir


@dataclasses.dataclass(frozen=True)
class ReplicaStatus:
    """One replica (a job of the deployment that has not ended), with its llama-server and HAProxy
    server.

    Attributes:
        job_id, model, state (squeue's job state), node (None while pending), reason (squeue's
            reason, "None" when there is none), time_left_s (seconds; None when unlimited or unknown).
        endpoint: "HOST:PORT" the job announced, None before it did.
        health: "pending", "starting", "loading", "ready", "refused", "unreachable" (core.pool.Health).
        slots_busy, slots_total: llama-server's /slots (None when it did not answer).
        build: the llama-server build its /props named when it was checked before serving
            ("b11434"; None before, or when /props named none).
        refusal: why a ready llama-server is kept out of rotation (health "refused"), else None.
        haproxy_status, sessions, queued, served: the HAProxy server's status ("UP", "DRAIN", ...),
            current sessions, requests queued on it, sessions served since the worker started; None
            when the job is no server of HAProxy.
    """

    job_id: str
    model: str
    state: str
    node: str | None
    endpoint: str | None
    health: str
    slots_busy: int | None
    slots_total: int | None
    build: str | None
    refusal: str | None
    time_left_s: int | None
    reason: str
    haproxy_status: str | None
    sessions: int | None
    queued: int | None
    served: int | None


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """One model's pool: `desired` replicas (the stored desired state), `jobs` not ended, `ready` ones."""

    desired: int
    jobs: int
    ready: int


@dataclasses.dataclass(frozen=True)
class HAProxyStatus:
    """Whether the deployment's HAProxy master runs, its pid, and the access log lines its current
    worker dropped (HAProxy.dropped_log_lines; None when unknown)."""

    running: bool
    pid: int | None
    dropped_log_lines: int | None = None


@dataclasses.dataclass(frozen=True)
class WebUIStatus:
    """OpenWebUI's URL and whether it answers /health now."""

    url: str
    up: bool


@dataclasses.dataclass(frozen=True)
class BatchesStatus:
    """The Batch API (batches.enabled): its service's pid (None: not running) and the batches that
    have not ended."""

    enabled: bool
    pid: int | None
    running: int


@dataclasses.dataclass(frozen=True)
class PoolStatus:
    """The whole report.

    Attributes:
        deployment, url: the deployment's name and the pool's OpenAI-compatible URL.
        up: the stored desired state says the pool is up.
        auth: {"mode": "open"}, or {"mode": "keys", "owner_key", "owner_key_file", "api_keys_file"}
            (the owner key is None before the first `up`; api_keys_file None when not configured).
        haproxy, webui, batches: see HAProxyStatus, WebUIStatus, BatchesStatus.
        fair_share: the last fair-share refresh (access.accounts.FairShareState as a dict: updated,
            delays {account: ms}, error, failing_since, attempted, slurmdbd_error); None when fair
            share is off.
        webui_groups: the last read of OpenWebUI's batch groups (access.webui_groups.GroupsState as
            a dict: updated, members {group: [e-mail]}, error, failing_since, attempted); None when
            webui.batch_groups is empty.
        models: model name -> ModelStatus, in the deployment file's order.
        replicas: the jobs that have not ended, by job id; [] when Slurm did not answer.
        slurm_error: Slurm's error when it did not answer, else None.
        last_autoscale: model -> its last autoscale decision record (autoscaler.last_decisions).
    """

    deployment: str
    url: str
    up: bool
    auth: dict[str, str | None]
    haproxy: HAProxyStatus
    models: dict[str, ModelStatus]
    replicas: list[ReplicaStatus]
    slurm_error: str | None
    last_autoscale: dict[str, dict]
    webui: WebUIStatus
    batches: BatchesStatus
    fair_share: dict[str, Any] | None = None
    webui_groups: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The `hpcserve status --json` document: these fields, nested as plain JSON objects, and
        "backends", the replicas under their name before 2026-12-07 (kept for one release)."""
        document = dataclasses.asdict(self)
        return {**document, "backends": document["replicas"]}


def collect(deployment: Deployment, scheduler: Scheduler) -> PoolStatus:
    """Ask Slurm (one squeue), every replica (/health, /slots), HAProxy (one `show stat`) and
    OpenWebUI (/health) once. A Slurm failure is reported in `slurm_error`, never raised."""
    state = StateDir(deployment.state_dir)
    haproxy = HAProxy(deployment, "")
    slurm_error = None
    replicas: list[Replica] = []
    try:
        key = state.read_backend_key()
        record = state.read_step()
        replicas = observe(deployment, scheduler, key=key, slots=True, admitted=record.in_rotation)
    except SlurmError as exc:
        slurm_error = str(exc)
    desired = state.read_desired()
    stats = haproxy.stats()
    servers = stats.servers if stats else {}
    rows = []
    for b in replicas:
        if b.health is Health.ENDED:
            continue
        s = servers.get(server_name(b.job.job_id))
        rows.append(ReplicaStatus(
            job_id=b.job.job_id, model=b.model, state=b.job.state.value, node=b.job.node,
            endpoint=b.endpoint, health=b.health.value, slots_busy=b.slots_busy, slots_total=b.slots_total,
            build=b.build or record.builds.get(b.job.job_id), refusal=b.refusal,
            time_left_s=b.job.time_left_s, reason=b.job.reason,
            haproxy_status=s.status if s else None, sessions=s.sessions if s else None,
            queued=s.queued if s else None, served=s.total if s else None))
    models = {}
    for m in deployment.models:
        mine = [r for r in rows if r.model == m.name]
        models[m.name] = ModelStatus(desired=desired.replicas_of(m.name), jobs=len(mine),
                                     ready=sum(1 for r in mine if r.health == Health.READY.value))
    auth: dict[str, str | None] = {"mode": "open"}
    if deployment.haproxy.auth != "open":
        auth = {"mode": "keys", "owner_key": state.read_api_key(), "owner_key_file": str(state.api_key_file),
                "api_keys_file": str(deployment.haproxy.api_keys_file) if deployment.haproxy.api_keys_file else None}
    webui_url = webui.url(deployment)
    return PoolStatus(deployment=deployment.name, url=deployment.url, up=desired.up, auth=auth,
                      haproxy=HAProxyStatus(running=haproxy.running(), pid=haproxy.pid(),
                                            dropped_log_lines=haproxy.dropped_log_lines()),
                      models=models, replicas=rows, slurm_error=slurm_error,
                      last_autoscale=autoscaler.last_decisions(deployment.state_dir),
                      webui=WebUIStatus(url=webui_url, up=webui.answers(webui_url + "/health")),
                      batches=BatchesStatus(enabled=deployment.batches.enabled,
                                            pid=batches_service.service_pid(deployment),
                                            running=len(batches_store.Store(deployment).active_tokens())
                                            if deployment.batches.enabled else 0),
                      fair_share=dataclasses.asdict(accounts.read_state(deployment))
                      if accounts.enabled(deployment) and deployment.scheduler == "slurm" else None,
                      webui_groups=dataclasses.asdict(webui_groups.read_state(deployment))
                      if webui_groups.enabled(deployment) else None)


def up_message(deployment: Deployment, desired: Desired, replicas: tuple[Replica, ...]) -> str:
    """`hpcserve up`'s last line: the URL, which replicas are still coming, where the API key is."""
    key_hint = (f"; API key in {StateDir(deployment.state_dir).api_key_file} (`hpcserve status` shows it)"
                if deployment.haproxy.auth != "open" else " (open: no API key needed)")
    return f"pool is up: {deployment.url}" + still_coming(deployment, desired, replicas) + key_hint


def still_coming(deployment: Deployment, desired: Desired, replicas: tuple[Replica, ...]) -> str:
    """The summary's tail when some wanted replicas are not ready yet: they join HAProxy later.

    A replica enters HAProxy only at a reconcile step that finds it ready (core/plan.py), so the ones
    still loading when `up` returns join at the next `hpcserve reconcile` (what cron runs).
    """
    short = []
    for m in deployment.models:
        wanted = desired.replicas_of(m.name)
        ready = sum(1 for b in replicas if b.model == m.name and b.health is Health.READY)
        if ready < wanted:
            short.append(f"{m.name} {ready}/{wanted} ready")
    if not short:
        return ""
    return (f" ({', '.join(short)}; the others join at the next `hpcserve reconcile`, "
            "which cron runs, or `hpcserve scale N --wait`)")


def print_report(report: PoolStatus, out: Console, err: Console) -> None:
    """`hpcserve status` without --json: a summary per deployment and model on `out`, then one table
    row per replica; a Slurm failure on `err`."""
    h = report.haproxy
    out.print(f"deployment [bold]{report.deployment}[/]: {'up' if report.up else 'down'}, "
              f"URL {report.url}, HAProxy {'running (pid %s)' % h.pid if h.running else 'not running'}")
    auth = report.auth
    if auth["mode"] == "open":
        out.print("  API keys: none (haproxy.auth: open): anyone who reaches the URL can use the pool")
    else:
        out.print(f"  API key: {auth['owner_key'] or '(made at the next up)'} (in {auth['owner_key_file']})",
                  markup=False)
    if h.dropped_log_lines:
        err.print(f"[yellow]access log:[/] HAProxy dropped {h.dropped_log_lines} line(s) since its last start "
                  "(the log writer fell behind): `hpcserve usage` misses those requests")
    out.print(f"  OpenWebUI {report.webui.url}: {'up' if report.webui.up else 'not running'}")
    b = report.batches
    if b.enabled:
        out.print(f"  Batch API: {'running (pid %s)' % b.pid if b.pid else 'not running'}, "
                  f"{b.running} batch(es) not ended")
    _print_fair_share(report.fair_share, out, err)
    _print_webui_groups(report.webui_groups, out, err)
    for name, m in report.models.items():
        out.print(f"  model {name}: {m.ready} ready of {m.jobs} job(s), {m.desired} wanted")
        last = report.last_autoscale.get(name)
        if last:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["time"]))
            out.print(f"    last autoscale {when}: {last['desired_before']} -> {last['desired_after']}, "
                      f"{last['reason']}", markup=False)
    if report.slurm_error:
        err.print(f"[red]Slurm is not answering:[/] {report.slurm_error}")
        return
    if not report.replicas:
        return
    table = Table(box=None, pad_edge=False)
    for column in ("JOB", "MODEL", "STATE", "NODE", "ENDPOINT", "HEALTH", "SLOTS", "BUILD", "SESS", "QUEUE",
                   "SERVED", "TIME LEFT"):
        table.add_column(column)
    for r in report.replicas:
        table.add_row(r.job_id, r.model, r.state, r.node or r.reason, r.endpoint or "-", r.health,
                      f"{r.slots_busy}/{r.slots_total}" if r.slots_total is not None else "-", r.build or "-",
                      _dash(r.sessions), _dash(r.queued), _dash(r.served),
                      "-" if r.time_left_s is None else format_duration(r.time_left_s))
    out.print(table)
    for r in report.replicas:
        if r.refusal:
            err.print(f"[red]job {r.job_id} refused:[/] {escape(r.refusal)}", highlight=False)


def _print_fair_share(fair: dict[str, Any] | None, out: Console, err: Console) -> None:
    """The fair-share line of `status`: each account's queue delay, and what is stale or down."""
    if fair is None:
        return
    delays = ", ".join(f"{a} +{ms / 1000:g} s" for a, ms in sorted(fair["delays"].items())) or "no accounts"
    _print_refreshed(fair, "fair share", "from sshare at", delays, "the last order", out, err)
    if fair["slurmdbd_error"]:
        err.print(f"[yellow]accounting unavailable:[/] {escape(fair['slurmdbd_error'])} (keys cannot get accounts "
                  "and `usage --chargeback` cannot read sacct; serving and fair share go on)")


def _print_webui_groups(groups: dict[str, Any] | None, out: Console, err: Console) -> None:
    """The line of `status` on OpenWebUI's batch groups: members per group, and a failing read."""
    if groups is None:
        return
    counts = ", ".join(f"{g} {len(m)}" for g, m in sorted(groups["members"].items()))
    _print_refreshed(groups, "OpenWebUI batch groups", "read at", f"{counts} member(s)", "their last members", out, err)


def _print_refreshed(record: dict[str, Any], label: str, source: str, summary: str, kept: str,
                     out: Console, err: Console) -> None:
    """A runtime map's status line, "LABEL (SOURCE HH:MM:SS): SUMMARY" from its last refresh or
    "not read yet", and since when a failing refresh has left HAProxy with `kept`. `record`:
    {"updated", "error", "failing_since"} (epoch seconds; updated 0: never)."""
    if record["updated"]:
        when = time.strftime("%H:%M:%S", time.localtime(record["updated"]))
        out.print(f"  {label} ({source} {when}): {summary}", markup=False)
    else:
        out.print(f"  {label}: not read yet (at the next `hpcserve reconcile`)")
    if record["error"]:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["failing_since"]))
        err.print(f"[yellow]{label}:[/] not refreshed since {since}, HAProxy keeps {kept}: {escape(record['error'])}")


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)
