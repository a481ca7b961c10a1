"""One autoscale run: read the load from HAProxy, decide per model (core/autoscale.py), apply as one
reconcile step, and append each decision as a JSON line to STATE_DIR/decisions.jsonl; and the
crontab line that runs it."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..core.autoscale import Memory, Signals, decide
from ..core.jobs import JobState
from ..core.pool import Desired
from ..haproxy.config import backend_name
from .reconcile import Outcome, Reconciler
from ..state import StateDir

def run_once(reconciler: Reconciler, now: float | None = None) -> tuple[list[dict], Outcome | None]:
    """Decide and apply once; the caller holds the deployment lock.

    Returns:
        (the decision records written, the reconcile outcome), or ([], None) when the deployment
        is down or no model has an autoscale policy.
    Raises:
        SlurmError, HAProxyError: as Reconciler.step (nothing is decided then: no record written).
    """
    deployment, state = reconciler.deployment, reconciler.state
    now = time.time() if now is None else now
    desired = state.read_desired()
    policies = {m.name: m.autoscale for m in deployment.models if m.autoscale is not None}
    if not desired.up or not policies:
        return [], None
    stats = reconciler.haproxy().stats()
    backends = stats.backends if stats else {}
    memory = state.read_json("autoscale", {})
    memory = memory if isinstance(memory, dict) else {}
    replicas = dict(desired.replicas)
    records: list[dict[str, Any]] = []
    new_memory: dict[str, dict[str, Any]] = {}
    for name, policy in policies.items():
        model = deployment.model(name)
        served = backends.get(backend_name(model))
        wake = backends.get(f"wake_{name}")
        mine = memory.get(name, {})
        wake_total = wake.total if wake else 0
        wakeups = wake_total - mine.get("wake_total", 0)
        wakeups = wake_total if wakeups < 0 else wakeups  # HAProxy reloaded: its counters restarted
        signals = Signals(sessions=served.sessions if served else 0, queued=served.queued if served else 0,
                          wakeups=wakeups, slots_per_replica=model.parallel)
        remembered = Memory(**{k: mine.get(k) for k in ("above_since", "below_since", "last_change")})
        decision = decide(policy, desired.replicas_of(name), signals, remembered, now)
        replicas[name] = decision.after
        new_memory[name] = {**dataclasses.asdict(decision.memory), "wake_total": wake_total}
        records.append({"time": now, "model": name, "sessions": signals.sessions, "queued": signals.queued,
                        "wakeups": wakeups, "desired_before": decision.before, "desired_after": decision.after,
                        "reason": decision.reason})
    outcome = reconciler.step(Desired(up=True, replicas=replicas))
    pending = {name: sum(1 for b in outcome.replicas if b.model == name and b.job.state is JobState.PENDING)
               for name in policies}
    state.write_json("autoscale", new_memory)
    fd = os.open(state.decisions_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as log:
        for record in records:
            record["pending_jobs"] = pending[record["model"]]
            log.write(json.dumps(record, sort_keys=True) + "\n")
    return records, outcome


def last_decisions(state_dir: Path, limit: int = 200) -> dict[str, dict]:
    """Model -> its most recent decision record (from the tail of STATE_DIR/decisions.jsonl)."""
    try:
        lines = StateDir(state_dir).decisions_file.read_text().splitlines()[-limit:]
    except FileNotFoundError:
        return {}
    last = {}
    for line in lines:
        try:
            record = json.loads(line)
            last[record["model"]] = record
        except (ValueError, KeyError, TypeError):
            continue
    return last


def cron_line(deployment_file: Path, state_dir: Path) -> str:
    """The crontab line that runs `hpcserve autoscale` every minute for `deployment_file`, with what
    cron's environment lacks: PATH (sbatch, squeue, haproxy) and SLURM_CONF, as this process has
    them; its output goes to STATE_DIR/logs/autoscale.log. The program is the one running now
    (`python -m hpcserve`, a script path, or hpcserve on PATH)."""
    env = [f"PATH={shlex.quote(os.environ.get('PATH', '/usr/bin:/bin'))}"]
    if os.environ.get("SLURM_CONF"):
        env.append(f"SLURM_CONF={shlex.quote(os.environ['SLURM_CONF'])}")
    if sys.argv[0].endswith("__main__.py"):  # python -m hpcserve
        program = f"{shlex.quote(sys.executable)} -m hpcserve"
    elif os.path.exists(sys.argv[0]):
        program = shlex.quote(os.path.abspath(sys.argv[0]))
    else:
        program = shlex.quote(shutil.which("hpcserve") or "hpcserve")
    log = shlex.quote(str(StateDir(state_dir).autoscale_log))
    return (f"* * * * * {' '.join(env)} {program} -f {shlex.quote(str(deployment_file.resolve()))} autoscale "
            f">> {log} 2>&1")
