"""The Slurm adapter over pyslurm's class API, for sites that install a pyslurm matching their Slurm.

pyslurm talks to slurmctld through libslurm instead of forking sbatch/squeue. Each pyslurm release
builds only against its own Slurm major version, and PyPI has 25.11 only while the Slurm releases
tested here are 22.05, 24.11 and 26.05 (docs/testing.md, "Tested with"), so `choose()` takes this adapter
only when `import pyslurm` works and its version matches the cluster's major.minor (`sbatch
--version`); otherwise the CLI adapter.

API used (pyslurm's class API, the same from its 22.5 to its 25.11 releases; source:
pyslurm/core/job/job.pyx, submission.pyx, node.pyx): `JobSubmitDescription(script=...)`,
`.load_sbatch_options()`, `.submit()` -> job id; `Jobs.load()` -> collection of `Job` with id,
name, user_name, state, state_reason, comment, batch_host, allocated_nodes, time_limit (minutes),
run_time (seconds), submit_time (epoch); `Job(id).cancel()`; `Nodes.load()` -> `Node` with name,
address; errors are `pyslurm.RPCError`.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from types import ModuleType

from .. import releases
from ..errors import SlurmError
from .base import Job, Scheduler
from .cli import CLIScheduler, first_node
from .states import JobState, parse_state


class PyslurmScheduler(Scheduler):
    """Scheduler over an imported pyslurm module (given, so that tests can hand in a stand-in)."""

    def __init__(self, pyslurm: ModuleType):
        self._pyslurm = pyslurm

    def _call(self, what: str, function, *args):
        try:
            return function(*args)
        except self._pyslurm.RPCError as exc:
            raise SlurmError(f"pyslurm {what}: {exc}") from None

    def submit(self, script: str) -> str:
        """Submit with JobSubmitDescription, #SBATCH options read from the script, our environment
        exported as sbatch does by default."""
        description = self._pyslurm.JobSubmitDescription(script=script, environment=dict(os.environ))
        description.load_sbatch_options()
        return str(self._call("submit", description.submit))

    def test_submit(self, script: str) -> str:
        """pyslurm has no "test only" submission: sbatch --test-only answers."""
        return CLIScheduler().test_submit(script)

    def jobs(self, name_prefix: str) -> list[Job]:
        me = getpass.getuser()
        jobs = []
        for job in self._call("Jobs.load", self._pyslurm.Jobs.load).values():
            if job.user_name != me or not (job.name or "").startswith(name_prefix):
                continue
            state = parse_state(job.state or "UNKNOWN")
            limit = job.time_limit * 60 if job.time_limit is not None else None
            left = max(0, limit - (job.run_time or 0)) if limit is not None and state is JobState.RUNNING else None
            nodes = job.batch_host or job.allocated_nodes
            jobs.append(Job(job_id=str(job.id), name=job.name, state=state,
                            node=first_node(nodes) if nodes else None, comment=job.comment or "",
                            time_limit_s=limit, time_left_s=left, reason=job.state_reason or "None",
                            submit_time=float(job.submit_time) if job.submit_time else None))
        return jobs

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            try:
                self._pyslurm.Job(int(job_id)).cancel()
            except self._pyslurm.RPCError as exc:
                if not re.search(r"(?i)invalid job id|already completing|completed", str(exc)):
                    raise SlurmError(f"pyslurm cancel {job_id}: {exc}") from None

    def node_addresses(self) -> dict[str, str]:
        return {node.name: node.address for node in self._call("Nodes.load", self._pyslurm.Nodes.load).values()}


def slurm_version() -> tuple[int, int] | None:
    """(major, minor) of the cluster's Slurm (releases.slurm: `sbatch --version`), or None."""
    release = releases.slurm()
    return release[:2] if release else None


def choose(notice=lambda line: print(line, file=sys.stderr)) -> Scheduler:
    """pyslurm's adapter when a pyslurm matching the cluster's Slurm major.minor imports, else the
    CLI adapter (with a one-line notice when pyslurm is there but does not match)."""
    try:
        import pyslurm
    except ImportError:
        return CLIScheduler()
    version = getattr(pyslurm, "__version__", "")
    match = re.match(r"(\d+)\.(\d+)", version)
    ours = (int(match.group(1)), int(match.group(2))) if match else None
    cluster = slurm_version()
    if ours is not None and ours == cluster:
        return PyslurmScheduler(pyslurm)
    notice(f"hpcserve: pyslurm {version or '?'} does not match Slurm "
           f"{'.'.join(map(str, cluster)) if cluster else '?'}; using Slurm's commands")
    return CLIScheduler()
