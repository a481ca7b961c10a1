"""The HAProxy and Slurm releases a deployment runs with: read once per process, and what hpcserve
needs of each.

HAProxy: 2.6 or newer. hpcserve's haproxy.cfg uses `option idle-close-on-response` (HAProxy 2.6
configuration manual, section 4; the option is new in 2.6), and the runtime API adds servers with
health checks (`add server ... check`, `enable health`; servers added at runtime gained health
checks in 2.5). Both are from HAProxy's release history, not tried on a 2.4 binary (none is
reachable here). So RHEL 9's HAProxy 2.4 cannot serve a pool and is refused with that reason
(`hpcserve check`, and before HAProxy starts).
Tested releases (scripts/matrix.sh): 2.6.12 (Debian 12), 3.0.11 (Debian 13), 3.2.x (Debian sid).

Slurm: tested on 22.05 (Debian 12), 24.11 (Debian 13) and 26.05 (Debian sid). hpcserve uses only
commands and options that all of them share (sbatch --parsable/--test-only/--signal, squeue -o,
scontrol update of a job's comment, sinfo -N -o), so an older Slurm is not refused, only named
as untested by `hpcserve check`.
"""

from __future__ import annotations

import functools
import os
import re
import shlex

from . import proc
from .errors import CommandError

#: The oldest HAProxy hpcserve serves with, and why (see the module docstring).
MIN_HAPROXY = (2, 6)
MIN_HAPROXY_WHY = ("its haproxy.cfg uses option idle-close-on-response (HAProxy 2.6) and it adds servers "
                   "with health checks at runtime (2.5); RHEL 9's 2.4 has neither")
#: The oldest Slurm hpcserve's tests ran on.
TESTED_SLURM = (22, 5)

Release = tuple[int, int, int]


def parse(text: str) -> Release | None:
    """The first "MAJOR.MINOR[.PATCH]" in `text` as a tuple, e.g. "HAProxy version 3.0.11-1+deb13u3"
    -> (3, 0, 11), "slurm 24.11.5" -> (24, 11, 5), "slurm-wlm 22.05.8" -> (22, 5, 8); None if absent."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)) if match else None


def text(release: tuple[int, ...] | None, slurm: bool = False) -> str:
    """"3.0.11" for (3, 0, 11); Slurm's way with `slurm`: "22.05.8" for (22, 5, 8), "22.05" for
    (22, 5); "an unknown release" for None."""
    if not release:
        return "an unknown release"
    return ".".join(f"{x:02d}" if slurm and i == 1 else str(x) for i, x in enumerate(release))


@functools.lru_cache(maxsize=8)
def haproxy(command: str) -> Release | None:
    """The release of the HAProxy that `command` runs, from `haproxy -v`; read once per command.

    Raises:
        CommandError: haproxy could not be run.
    """
    return parse(proc.run([*shlex.split(command), "-v"], timeout=30).stdout)


def haproxy_refusal(release: Release | None) -> str | None:
    """Why hpcserve cannot serve with this HAProxy release, or None when it can."""
    if release is not None and release[:2] >= MIN_HAPROXY:
        return None
    return f"HAProxy {text(release)}: hpcserve needs {text(MIN_HAPROXY)} or newer ({MIN_HAPROXY_WHY})"


#: HAProxy issue #2744: a server leaving maintenance while requests wait in the backend's queue
#: could take up to twice its maxconn (the surplus then waits inside llama-server). Fixed in 2.6.21,
#: 2.8.14 and, more strictly, 3.2.0 (the issue thread). 3.0 and 3.1 are counted unfixed: their
#: backport release was not confirmed here. The first fixed release per branch:
QUEUE_OVERSHOOT_FIXED = {(2, 6): (2, 6, 21), (2, 8): (2, 8, 14)}
QUEUE_OVERSHOOT_FIXED_FROM = (3, 2, 0)


def fixes_queue_overshoot(release: Release | None) -> bool:
    """Whether this HAProxy has the fix of issue #2744 (see QUEUE_OVERSHOOT_FIXED); False if unknown."""
    if release is None:
        return False
    if release >= QUEUE_OVERSHOOT_FIXED_FROM:
        return True
    first = QUEUE_OVERSHOOT_FIXED.get(release[:2])
    return first is not None and release >= first


def slurm() -> Release | None:
    """The release of the Slurm commands on PATH, from `sbatch --version` ("slurm 24.11.5"), or None
    when sbatch cannot be run; read once per SLURM_CONF (Slurm 24.11's commands read their config
    even for --version)."""
    return _slurm(os.environ.get("SLURM_CONF", ""))


@functools.lru_cache(maxsize=4)
def _slurm(slurm_conf: str) -> Release | None:
    try:
        return parse(proc.run(["sbatch", "--version"], timeout=30).stdout)
    except CommandError:
        return None
