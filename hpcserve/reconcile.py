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
5. persist the desired state and the drains, only now: a command that failed leaves the state files as they were,
   and the next step converges toward the desired state that was last applied in full.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping

from .slurm import jobscript
from .config import Deployment
from .core.plan import Plan, plan, renewal_lead
from .core.pool import Desired, Health, Replica
from .llama.probe import observe
from .haproxy.process import HAProxy
from .slurm import Scheduler
from .state import StateDir, write_private


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
        haproxy: makes the deployment's HAProxy from (deployment, backend key); HAProxy itself
            unless a test records the calls.
    """

    def __init__(self, deployment: Deployment, scheduler: Scheduler,
                 haproxy: Callable[[Deployment, str], HAProxy] = HAProxy):
        self.deployment = deployment
        self.scheduler = scheduler
        self.state = StateDir(deployment.state_dir)
        self._make_haproxy = haproxy

    @property
    def _membership_file(self):
        return self.state.root / "servers.json"

    def in_rotation(self) -> frozenset[str]:
        """Job ids of the servers written into the live HAProxy config by the last step."""
        try:
            return frozenset(json.loads(self._membership_file.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return frozenset()

    def haproxy(self) -> HAProxy:
        """The deployment's HAProxy (its backend key created on first use)."""
        return self._make_haproxy(self.deployment, self.state.backend_key())

    def _learn_startups(self, replicas: list[Replica], now: float) -> dict:
        """Startup times (submit -> first seen ready: queue wait plus model load, in seconds) of
        the last 20 replicas, from the record in the state directory plus what is new now."""
        record = self.state.read_json("startups", {})
        seen = [str(j) for j in record.get("jobs", [])] if isinstance(record, dict) else []
        seconds = [float(x) for x in record.get("seconds", [])] if isinstance(record, dict) else []
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
        replicas = observe(self.deployment, self.scheduler, key=key)
        haproxy = self._make_haproxy(self.deployment, key)
        sessions = haproxy.server_sessions()
        now = time.time()
        startups = self._learn_startups(replicas, now)
        the_plan = plan([m.name for m in self.deployment.models], desired, replicas, self.in_rotation(),
                        draining=self.state.read_draining(), sessions=sessions, now=now,
                        drain_timeout=self.deployment.haproxy.drain_timeout if drain_timeout is None else drain_timeout,
                        renew_lead=renewal_lead(self.deployment.slurm.renew_before, startups["seconds"]))

        scripts = {name: jobscript.render(self.deployment, self.deployment.model(name))
                   for name in dict.fromkeys(the_plan.submit)}
        change = "unchanged"
        if the_plan.haproxy_running:
            servers = list(the_plan.servers)
            change = haproxy.update(servers)
            write_private(self._membership_file, json.dumps(sorted(s.job_id for s in servers)) + "\n")
        elif haproxy.running():
            haproxy.stop()
            self._membership_file.unlink(missing_ok=True)
            change = "stopped"

        self.scheduler.cancel([c.job_id for c in the_plan.cancel])
        submitted = []
        for model_name in the_plan.submit:
            write_private(self.state.root / "sbatch" / f"{model_name}.sbatch", scripts[model_name])
            submitted.append((model_name, self.scheduler.submit(scripts[model_name])))
        self.state.write_draining(the_plan.draining)
        self.state.write_json("startups", startups)
        self.state.write_desired(desired)
        return Outcome(tuple(replicas), the_plan, tuple(submitted), change, sessions)


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

