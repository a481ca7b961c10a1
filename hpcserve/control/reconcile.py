"""One reconcile step: observe the pool, plan, apply. The only place that changes anything.

Order of the apply, chosen so that a failure at any point loses nothing:
1. observe (squeue, /health). If Slurm does not answer, stop here: nothing was changed, and the
   HAProxy membership stays as it is (a failure of squeue never empties the pool);
   then plan, and render every job script to submit: a broken template stops the step here too;
2. HAProxy (its config rendered first): validate the new config, then start or reload; on failure
   the old config keeps running and no job is touched;
3. cancel surplus jobs, which HAProxy no longer routes to: a serving job is first drained (kept
   with weight 0) and cancelled by a later step once its sessions reach zero or its deadline passes;
4. submit missing jobs;
5. persist, only now: the step record (state.StepRecord: the servers HAProxy routes to, the drains,
   startup times), whatever failed after the HAProxy change, then the desired state. (When step 2
   changed HAProxy's membership the record is also written right then, so that a kill -9 during
   3 or 4 cannot leave it naming servers HAProxy no longer has; otherwise it is written once.) A
   command that failed leaves the desired state as it was, and the next step converges toward the
   one that was last applied in full.

A command that must wait for the pool (drains to finish, backends to be ready, jobs to end) does not
loop itself: `Reconciler.run_until` steps again every few seconds until a condition holds
(controller-runtime's requeue: a reconciler returns "requeue after N s" instead of blocking), and
the waits of `up`, `scale` and `down` are built on it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from ..access import accounts, ledger, quotas, webui_groups
from ..batches import service as batches_service
from ..access.keys import serving_haproxy
from ..slurm import jobscript
from ..config import Deployment
from ..core.plan import Plan, effective_renew_before, plan
from ..core.pool import Desired, Health, Replica
from .observe import observe
from ..haproxy.process import HAProxy
from ..slurm import Scheduler
from ..slurm.accounting import Accounting
from ..errors import HpcserveError, WaitTimeout
from ..state import StateDir, StepRecord, write_private

T = TypeVar("T")

#: A change of the desired state: the stored one in, the wanted one out.
Change = Callable[[Desired], Desired]


def keep(current: Desired) -> Desired:
    """The Change that keeps the stored desired state (a repair step)."""
    return current


def _ignore(_text: str) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a step saw and did.

    Attributes:
        replicas: the observed replicas (before the step's own changes).
        plan: the plan it applied.
        submitted: (model, job id) of each job it submitted.
        haproxy_change: "started", "reloaded", "runtime" (membership changed through the runtime
            API), "stopped" or "unchanged".
        sessions: job id -> HAProxy sessions of its server before the step (None if unknown).
    """

    replicas: tuple[Replica, ...]
    plan: Plan
    submitted: tuple[tuple[str, str], ...]
    haproxy_change: str
    sessions: Mapping[str, int] | None = None


class Reconciler:
    """Applies desired state to one deployment.

    Args:
        deployment: the validated deployment file.
        scheduler: the Slurm adapter.
        haproxy: makes the deployment's HAProxy from (deployment, backend key);
            access.keys.serving_haproxy (HAProxy with the key map) unless a test records the calls.
        report: gets one human line per change a step made (describe()); the CLI prints them.
        accounting: Slurm's accounting, whose fair share each step brings into HAProxy's queue
            (access/accounts.py); None: no fair share (a pool of local processes, a test).
    """

    def __init__(self, deployment: Deployment, scheduler: Scheduler,
                 haproxy: Callable[[Deployment, str], HAProxy] = serving_haproxy,
                 report: Callable[[str], None] = _ignore, accounting: Accounting | None = None):
        self.deployment = deployment
        self.scheduler = scheduler
        self.accounting = accounting
        self.state = StateDir(deployment.state_dir)
        self._make_haproxy = haproxy
        self._report = report

    def in_rotation(self) -> frozenset[str]:
        """Job ids of the servers written into the live HAProxy config by the last step.

        Raises:
            HpcserveError: the step record is unreadable (StateDir.read_step).
        """
        return self.state.read_step().in_rotation

    def haproxy(self) -> HAProxy:
        """The deployment's HAProxy (its backend key created on first use)."""
        return self._make_haproxy(self.deployment, self.state.backend_key())

    @staticmethod
    def _learn_startups(record: Mapping[str, list], replicas: list[Replica], now: float) -> dict:
        """Startup times (submit -> first seen ready: queue wait plus model load, in seconds) of
        the last 20 replicas: those of the last step's record plus what is new now."""
        seen = list(record.get("jobs", []))
        seconds = list(record.get("seconds", []))
        for b in replicas:
            if b.health is Health.READY and b.job.submit_time is not None and b.job.job_id not in seen:
                seen.append(b.job.job_id)
                seconds.append(max(0.0, now - b.job.submit_time))
        return {"jobs": seen[-50:], "seconds": seconds[-20:]}

    def step(self, desired: Desired, drain_timeout: float | None = None) -> Outcome:
        """Observe, plan and apply once toward `desired` (see the module docstring for the order).

        Args:
            desired: the desired state.
            drain_timeout: seconds a leaving server may finish its requests before scancel;
                None = the deployment's haproxy.drain_timeout, 0 = cancel at once.
        Raises:
            SlurmError: Slurm did not answer; nothing was changed.
            TemplateError: a job script or haproxy.cfg template is broken; nothing was changed.
            HAProxyError: the new HAProxy config was refused; no job was touched.
            ConfigError: the state directory cannot be created.
        """
        self.state.ensure()
        key = self.state.backend_key()
        if self.deployment.haproxy.auth == "keys":
            self.state.api_key()  # the owner's frontend key: the frontend is never open by default
        record = self.state.read_step()
        replicas = observe(self.deployment, self.scheduler, key=key, admitted=record.in_rotation)
        haproxy = self._make_haproxy(self.deployment, key)
        sessions = haproxy.server_sessions()
        now = time.time()
        active = {b.job.job_id for b in replicas if b.job.state.active}
        builds = {**{j: b for j, b in record.builds.items() if j in active},
                  **{b.job.job_id: b.build for b in replicas if b.build and b.health is Health.READY}}
        startups = self._learn_startups(record.startups, replicas, now)
        the_plan = plan([m.name for m in self.deployment.models], desired, replicas, record.in_rotation,
                        draining=record.draining, sessions=sessions, now=now,
                        drain_timeout=self.deployment.haproxy.drain_timeout if drain_timeout is None else drain_timeout,
                        renew_before=effective_renew_before(self.deployment.slurm.renew_before, startups["seconds"]))

        scripts = {name: jobscript.render(self.deployment, self.deployment.model(name))
                   for name in dict.fromkeys(the_plan.submit)}
        change = "unchanged"
        applied = written = record   # what is true so far / what the state directory says
        try:
            if the_plan.haproxy_running:
                servers = list(the_plan.servers)
                change = haproxy.update(servers)
                applied = dataclasses.replace(applied, in_rotation=frozenset(s.job_id for s in servers))
            elif haproxy.running():
                haproxy.stop()
                applied = dataclasses.replace(applied, in_rotation=frozenset())
                change = "stopped"
            if applied != written:
                # HAProxy's membership changed: on disk at once, so that even a kill -9 during
                # scancel or sbatch leaves a record naming the servers HAProxy really has.
                self.state.write_step(applied)
                written = applied
            self.scheduler.cancel([c.job_id for c in the_plan.cancel])
            submitted = []
            for model_name in the_plan.submit:
                write_private(self.state.sbatch_dir / f"{model_name}.sbatch", scripts[model_name])
                submitted.append((model_name, self.scheduler.submit(scripts[model_name])))
            applied = StepRecord(applied.in_rotation, dict(the_plan.draining), startups, builds)
        finally:
            if applied != written:
                self.state.write_step(applied)
        self.state.write_desired(desired)
        self._keep_batches_service(haproxy, change)
        if self.accounting and accounts.enabled(self.deployment) and change != "stopped" and haproxy.running():
            shares = accounts.refresh(self.deployment, haproxy, self.accounting)
            if shares.error and shares.failing_since == shares.attempted:   # said once, when it starts
                self._report(f"warning: fair share not refreshed, HAProxy keeps the last order: {shares.error}")
        if webui_groups.enabled(self.deployment) and change != "stopped" and haproxy.running():
            groups = webui_groups.refresh(self.deployment, haproxy)
            if groups.error and groups.failing_since == groups.attempted:   # said once, when it starts
                self._report(f"warning: OpenWebUI's batch groups not read, HAProxy keeps their last members: {groups.error}")
        quotas.keep_models_current(self.deployment)   # the writer bills quotas by the models' GPUs per slot
        try:   # access logs rotated out since the last step: their totals into the usage ledger
            ledger.fold(self.deployment)
        except OSError as e:   # they wait in logs/expired/ and count from there meanwhile
            self._report(f"warning: the usage ledger was not updated: {e}")
        outcome = Outcome(tuple(replicas), the_plan, tuple(submitted), change, sessions)
        for line in describe(outcome):
            self._report(line)
        return outcome

    def _keep_batches_service(self, haproxy: HAProxy, change: str) -> None:
        """The Batch API service runs while HAProxy does and batches.enabled says so (started,
        or restarted with a changed deployment file); else it is stopped. Its failure to start is
        reported, not raised: the pool serves chats without it (HAProxy answers 503 there)."""
        if self.deployment.batches.enabled and change != "stopped" and haproxy.running():
            try:
                if batches_service.ensure(self.deployment):
                    self._report("Batch API service started")
            except HpcserveError as e:
                self._report(f"warning: {e}")
        elif batches_service.service_pid(self.deployment) is not None:
            batches_service.stop(self.deployment)
            self._report("Batch API service stopped")

    def locked_step(self, change: Change = keep, drain_timeout: float | None = None,
                    lock_timeout: float = 600.0) -> Outcome:
        """One step toward `change(stored desired state)`, under the deployment lock.

        The stored state is read after the lock is taken, so a command that waited behind another
        (an autoscale run, a second `scale`) builds on what that one wrote instead of writing back
        what it read before (a lost update).

        Raises:
            DeploymentBusy: another command held the lock for `lock_timeout` seconds.
            whatever step() or `change` raises.
        """
        with self.state.exclusive(lock_timeout):
            return self.step(change(self.state.read_desired()), drain_timeout)

    def run_until(self, done: Callable[[Outcome], bool], outcome: Outcome, *, deadline: float | None = None,
                  on_progress: Callable[[Outcome], None] = lambda _o: None, interval: float = 1.0,
                  drain_timeout: float | None = None,
                  on_timeout: Callable[[Outcome], Exception] | None = None) -> Outcome:
        """Step toward the stored desired state every `interval` seconds until `done(outcome)`.

        Args:
            done: the condition, asked of `outcome` and of each later step's outcome; it may raise
                to end the wait early (a job that failed).
            outcome: the last step's outcome.
            deadline: time.monotonic() after which the wait ends with on_timeout's error; None = none.
            on_progress: called with the current outcome before each wait.
            drain_timeout: passed to each step.
        Raises:
            WaitTimeout (or what on_timeout returns): the deadline passed first.
        """
        return _requeue(lambda: self.locked_step(drain_timeout=drain_timeout), done, outcome,
                        deadline=deadline, interval=interval, on_progress=on_progress,
                        on_timeout=on_timeout or (lambda _o: WaitTimeout("the pool did not get there in time")))

    def finish_drains(self, outcome: Outcome, drain_timeout: float | None,
                      on_progress: Callable[[str], None] = _ignore) -> Outcome:
        """Step every second until no server drains: each is cancelled once idle or at its deadline
        (core/plan.py), so this ends by itself. on_progress gets one line naming each drain."""
        def progress(o: Outcome) -> None:
            sessions = o.sessions or {}
            on_progress(", ".join(f"job {job_id} ({sessions.get(job_id, '?')} session(s), "
                                  f"{max(0, deadline - time.time()):.0f} s left)"
                                  for job_id, deadline in sorted(o.plan.draining.items())))
        return self.run_until(lambda o: not o.plan.draining, outcome, on_progress=progress,
                              drain_timeout=drain_timeout)

    def wait_ready(self, wanted: Mapping[str, int], outcome: Outcome, timeout: float,
                   on_progress: Callable[[str], None] = _ignore) -> Outcome:
        """Step every 2 s until each model of `wanted` (name -> count) has that many ready replicas
        that the plan keeps.

        Raises:
            WaitTimeout: not ready within `timeout` seconds (the jobs stay; the pool keeps coming up).
            HpcserveError: a job submitted by these steps ended before it was ready (its log named),
                or its llama-server was refused (llama.props: the reason named; the job is kept,
                out of rotation, until the deployment is fixed or the pool scaled down).
        """
        submitted: set[str] = set()

        def ready(o: Outcome) -> dict[str, int]:
            leaving = {c.job_id for c in o.plan.cancel}
            return {name: sum(1 for b in o.replicas if b.model == name and b.health is Health.READY
                              and b.job.job_id not in leaving) for name in wanted}

        def progress_text(o: Outcome) -> str:
            counts = ready(o)
            return ", ".join(f"{name} {counts[name]}/{n} ready ({phases(o.replicas, name)})"
                             for name, n in wanted.items())

        def done(o: Outcome) -> bool:
            submitted.update(job_id for _, job_id in o.submitted)
            counts = ready(o)
            if all(counts[name] >= n for name, n in wanted.items()):
                return True
            for b in o.replicas:
                if b.job.job_id in submitted and b.health is Health.REFUSED:
                    raise HpcserveError(f"job {b.job.job_id} ({b.model}) is not put in rotation: {b.refusal}. "
                                        "Fix the deployment file or the llama-server build, then scale "
                                        "the model to 0 and back (or `hpcserve down` and `up`)")
                if b.job.job_id in submitted and b.health is Health.ENDED:
                    log = jobscript.log_dir(self.deployment) / f"job-{b.job.job_id}.out"
                    raise HpcserveError(f"job {b.job.job_id} ({b.model}) ended {b.job.state.value} before it "
                                        f"was ready; see {log}")
            return False

        return self.run_until(
            done, outcome, deadline=time.monotonic() + timeout, interval=2.0,
            on_progress=lambda o: on_progress(progress_text(o)),
            on_timeout=lambda o: WaitTimeout(f"no ready replica within {timeout:g} s ({progress_text(o)}); "
                                             "the jobs stay queued, see `hpcserve status`"))

    def wait_ended(self, timeout: float) -> None:
        """Poll the scheduler every second until no job of the deployment is active (after `down`).

        Raises:
            WaitTimeout: some are still ending after `timeout` seconds (their ids named).
            SlurmError: Slurm did not answer.
        """
        prefix = jobscript.job_name_prefix(self.deployment)
        _requeue(lambda: [j for j in self.scheduler.jobs(prefix) if not j.state.ended], lambda active: not active,
                 None, deadline=time.monotonic() + timeout, interval=1.0,
                 on_timeout=lambda active: WaitTimeout(f"{len(active)} job(s) still ending after {timeout:g} s: "
                                                       + ", ".join(j.job_id for j in active)))


def _requeue(poll: Callable[[], T], done: Callable[[T], bool], first: T | None, *, deadline: float | None,
             interval: float, on_timeout: Callable[[T], Exception],
             on_progress: Callable[[T], None] = lambda _v: None) -> T:
    """Poll until done(value): the one wait loop of the controller (see the module docstring)."""
    value = poll() if first is None else first
    while not done(value):
        on_progress(value)
        if deadline is not None and time.monotonic() > deadline:
            raise on_timeout(value)
        time.sleep(interval)
        value = poll()
    return value


def phases(replicas: tuple[Replica, ...], model: str) -> str:
    """How many of `model`'s replicas are in each health, e.g. "1 loading, 2 ready" ("no job")."""
    counts: dict[str, int] = {}
    for b in replicas:
        if b.model == model and b.health is not Health.ENDED:
            counts[b.health.value] = counts.get(b.health.value, 0) + 1
    return ", ".join(f"{n} {h}" for h, n in sorted(counts.items())) or "no job"


def describe(outcome: Outcome) -> list[str]:
    """One human line per change the step made (empty when it changed nothing)."""
    lines = [f"submitted job {job_id} for model {model}" for model, job_id in outcome.submitted]
    lines += [f"cancelled job {c.job_id} ({c.reason})" for c in outcome.plan.cancel]
    if outcome.haproxy_change == "stopped":
        lines.append("HAProxy stopped")
    elif outcome.haproxy_change != "unchanged":
        serving = [s for s in outcome.plan.servers if not s.draining]
        draining = len(outcome.plan.servers) - len(serving)
        lines.append(f"HAProxy {outcome.haproxy_change}: {len(serving)} server(s) in rotation"
                     + (f", {draining} draining" if draining else ""))
    return lines


def summary(outcome: Outcome, message: str, url: str) -> dict:
    """The --json document of a changing command: {"message", "url", "submitted": [{"model",
    "job_id"}], "cancelled": [{"job_id", "model", "reason"}], "servers": [{"name", "model",
    "endpoint"}]} (servers: the membership the step gave HAProxy)."""
    return {
        "message": message, "url": url,
        "submitted": [{"model": m, "job_id": j} for m, j in outcome.submitted],
        "cancelled": [{"job_id": c.job_id, "model": c.model, "reason": c.reason} for c in outcome.plan.cancel],
        "servers": [{"name": s.name, "model": s.model, "endpoint": f"{s.address}:{s.port}"}
                    for s in outcome.plan.servers],
    }
