"""A STAND-IN for pyslurm, for tests only: PyPI has no pyslurm for this machine's Slurm 22.05.

It offers the part of pyslurm's documented class API that hpcserve's pyslurm adapter uses
(JobSubmitDescription, Jobs.load, Job.cancel, Nodes.load, RPCError; see
hpcserve/slurm/pyslurm_adapter.py for the source) and does the work with Slurm's own commands,
so the adapter's code runs against the real local cluster. It is no substitute for testing
against a real pyslurm, which the contract suite does wherever a matching one imports.
"""

from __future__ import annotations

import re
import subprocess
import time
import types

SEP = "\x1f"


class RPCError(Exception):
    pass


def _run(argv, input=None, env=None):
    result = subprocess.run(argv, input=input, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RPCError(result.stderr.strip() or f"{argv[0]} exited {result.returncode}")
    return result.stdout


_version = re.search(r"(\d+)\.(\d+)", _run(["scontrol", "--version"]))
__version__ = f"{int(_version.group(1))}.{int(_version.group(2))}.0"


class JobSubmitDescription:
    def __init__(self, script=None, environment=None, **attributes):
        self.script, self.environment = script, environment

    def load_sbatch_options(self, overwrite=False):
        pass  # sbatch reads the #SBATCH lines itself

    def submit(self):
        return int(_run(["sbatch", "--parsable"], input=self.script, env=self.environment).strip().split(";")[0])


def _seconds(text):
    text = text.strip()
    if not text or not text[0].isdigit():
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days or 0) * 24 + parts[0]) * 3600 + parts[1] * 60 + parts[2]


class Job:
    def __init__(self, job_id, **fields):
        self.id = int(job_id)
        self.__dict__.update(fields)

    def cancel(self):
        _run(["scancel", str(self.id)])


class Jobs(dict):
    @staticmethod
    def load(preload_passwd_info=False, frozen=False):
        fmt = SEP.join(["%i", "%j", "%u", "%T", "%r", "%k", "%B", "%N", "%l", "%M", "%V"])
        jobs = Jobs()
        for line in _run(["squeue", "--noheader", "--states=all", "--format", fmt]).splitlines():
            i, name, user, state, reason, comment, batch_host, nodes, limit, run, submit = line.split(SEP)
            limit_s = _seconds(limit)
            jobs[int(i)] = Job(i, name=name, user_name=user, state=state, state_reason=reason,
                               comment=None if comment == "(null)" else comment,
                               batch_host=None if batch_host in ("", "n/a", "(null)") else batch_host,
                               allocated_nodes=nodes or None,
                               time_limit=limit_s // 60 if limit_s is not None else None,
                               run_time=_seconds(run) or 0,
                               submit_time=int(time.mktime(time.strptime(submit, "%Y-%m-%dT%H:%M:%S"))))
        return jobs


class Nodes(dict):
    @staticmethod
    def load():
        nodes = Nodes()
        for line in _run(["sinfo", "--noheader", "-N", "--format", f"%N{SEP}%o"]).splitlines():
            name, address = line.split(SEP)
            nodes[name] = types.SimpleNamespace(name=name, address=address)
        return nodes
