"""The Slurm adapter over Slurm's own commands: sbatch, squeue, scancel, sinfo.

Facts it relies on (verified on Slurm 22.05, see ../shared/DESIGN.md): `sbatch --parsable` prints
"jobid[;cluster]"; squeue's JSON output ignores filters on 22.05 and changes schema in 23.11, so a
format string whose fields are split by the ASCII unit separator (0x1f), which no value contains,
is used instead; `squeue --states=all` keeps recently ended jobs visible; a node's name is not its
address, `sinfo -N -o "%N %o"` maps it to NodeAddr.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping

from .. import proc
from ..errors import CommandError, SlurmError
from .base import Job, Scheduler
from .states import parse_state

SEP = "\x1f"
# (squeue format code, Job field) in output order; squeue(1) --format.
_FIELDS = (("%i", "job_id"), ("%j", "name"), ("%T", "state"), ("%N", "node"), ("%k", "comment"),
           ("%l", "time_limit"), ("%L", "time_left"), ("%r", "reason"), ("%V", "submit_time"))
SQUEUE_FORMAT = SEP.join(code for code, _ in _FIELDS)


class CLIScheduler(Scheduler):
    """Scheduler that forks Slurm's commands (the default adapter).

    Args:
        env: environment for the commands (e.g. with SLURM_CONF), or None to inherit ours.
        timeout: seconds to wait for one command; slurmctld's own MessageTimeout is 10 s.
    """

    def __init__(self, env: Mapping[str, str] | None = None, timeout: float = 30.0):
        self._env = env
        self._timeout = timeout

    def _run(self, argv: list[str], input: str | None = None) -> str:
        try:
            return proc.run(argv, input=input, env=self._env, timeout=self._timeout).stdout
        except CommandError as exc:
            raise SlurmError(str(exc)) from exc

    def submit(self, script: str) -> str:
        """Submit `script` on sbatch's stdin; return the job id.

        Raises:
            SlurmError: sbatch refused the script or slurmctld did not answer.
        """
        out = self._run(["sbatch", "--parsable"], input=script).strip()
        job_id = out.splitlines()[-1].split(";")[0] if out else ""
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed no job id (got {out!r})")
        return job_id

    def test_submit(self, script: str) -> str:
        """Validate `script` with `sbatch --test-only` (nothing is queued); return sbatch's answer.

        Raises:
            SlurmError: sbatch rejected it (the message carries sbatch's reason).
        """
        try:
            result = proc.run(["sbatch", "--test-only"], input=script, env=self._env,
                              timeout=self._timeout)
        except CommandError as exc:
            raise SlurmError(str(exc)) from exc
        return (result.stdout + result.stderr).strip()

    def jobs(self, name_prefix: str) -> list[Job]:
        """The current user's jobs named `name_prefix`..., ended ones included (MinJobAge).

        Raises:
            SlurmError: squeue failed (e.g. slurmctld unreachable) or printed a malformed line.
        """
        out = self._run(["squeue", "--me", "--noheader", "--states=all", "--format", SQUEUE_FORMAT])
        return [job for job in (parse_squeue_line(line) for line in out.splitlines() if line.strip())
                if job.name.startswith(name_prefix)]

    def cancel(self, job_ids: list[str]) -> None:
        """scancel the jobs; one that is already gone is not an error (scancel(1))."""
        if not job_ids:
            return
        try:
            proc.run(["scancel", *job_ids], env=self._env, timeout=self._timeout)
        except CommandError as exc:
            if "Invalid job id" in exc.stderr or "already completing" in exc.stderr:
                return
            raise SlurmError(str(exc)) from exc

    def node_addresses(self) -> dict[str, str]:
        """Map node name -> NodeAddr from `sinfo -N`.

        Raises:
            SlurmError: sinfo failed.
        """
        out = self._run(["sinfo", "--noheader", "-N", "--format", f"%N{SEP}%o"])
        addresses = {}
        for line in out.splitlines():
            parts = line.strip().split(SEP)
            if len(parts) == 2 and parts[0]:
                addresses[parts[0]] = parts[1]
        return addresses


def parse_squeue_line(line: str) -> Job:
    """Parse one line of `squeue --format SQUEUE_FORMAT`.

    Raises:
        SlurmError: the line does not have exactly the expected number of fields.
    """
    parts = line.rstrip("\n").split(SEP)
    if len(parts) != len(_FIELDS):
        raise SlurmError(f"squeue printed {len(parts)} fields where {len(_FIELDS)} were expected: {line!r}")
    raw = dict(zip((name for _, name in _FIELDS), (p.strip() for p in parts)))
    node = raw["node"] if raw["node"] and raw["node"] not in ("(null)", "n/a") else None
    if node is not None:
        node = first_node(node)
    return Job(
        job_id=raw["job_id"],
        name=raw["name"],
        state=parse_state(raw["state"]),
        node=node,
        comment="" if raw["comment"] == "(null)" else raw["comment"],
        time_limit_s=parse_duration(raw["time_limit"]),
        time_left_s=parse_duration(raw["time_left"]),
        reason=raw["reason"],
        submit_time=parse_timestamp(raw["submit_time"]),
    )


def parse_timestamp(text: str) -> float | None:
    """squeue's local "YYYY-MM-DDTHH:MM:SS" (%V) to epoch seconds, None when absent."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def first_node(nodelist: str) -> str:
    """The first node of a Slurm node list: "gpu[3-4,7]" -> "gpu3", "gpu1,gpu2" -> "gpu1"."""
    match = re.match(r"^([^\[,]+)(?:\[(\d+))?", nodelist)
    if not match:
        return nodelist
    return match.group(1) + (match.group(2) or "")


def parse_duration(text: str) -> int | None:
    """Slurm's [D-]HH:MM:SS, MM:SS or minutes-free forms to seconds; None for UNLIMITED/NOT_SET.

    Source: squeue(1) %l/%L print "days-hours:minutes:seconds" with leading fields left out.
    """
    text = text.strip()
    if not text or not text[0].isdigit():
        return None  # UNLIMITED, INVALID, NOT_SET, N/A
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
    try:
        numbers = [int(x) for x in text.split(":")]
    except ValueError:
        return None
    while len(numbers) < 3:
        numbers.insert(0, 0)
    hours, minutes, seconds = numbers[-3:]
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def format_duration(seconds: int, days: bool = False) -> str:
    """Seconds as Slurm writes a duration, [D-]HH:MM:SS (the inverse of parse_duration): the day
    field always with `days` (as sbatch(1) --time takes it), else only when not 0 (as squeue %L)."""
    day_count, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{day_count}-{clock}" if days or day_count else clock
