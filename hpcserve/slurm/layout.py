"""What a Slurm cluster offers: partitions, their nodes' CPUs, memory and gres, time limits, and
the user's accounts and QOS; read by `hpcserve init` and `hpcserve check`.

Sources: sinfo(1) --Node --format (one line per node and partition: %N node, %P partition with a
"*" after the default one, %c CPUs, %m memory in MB, %G gres, %l the partition's time limit, %a its
availability, %n NodeHostname, %T node state); gres.conf(5) and sinfo's %G print gres as
"name[:type]:count" joined by commas, with an optional socket binding "(S:0-1)"; sacctmgr(1)
`show associations` with --parsable2 --noheader prints "account|partition|qos" (QOS comma
separated), and `show user` the default account. Verified on Slurm 22.05 (scripts/local-slurm.sh).
"""

from __future__ import annotations

import dataclasses
import getpass
import re
from collections.abc import Mapping

from .. import proc
from ..errors import CommandError, SlurmError
from .cli import SEP, parse_duration

# (sinfo format code, field) in output order.
_SINFO_FIELDS = (("%N", "node"), ("%P", "partition"), ("%c", "cpus"), ("%m", "memory_mb"), ("%G", "gres"),
                 ("%l", "max_time"), ("%a", "available"), ("%n", "hostname"), ("%T", "state"))
SINFO_FORMAT = SEP.join(code for code, _ in _SINFO_FIELDS)
# One gres item: name, optional type, count, optional "(S:...)" socket binding.
_GRES_ITEM = re.compile(r"([A-Za-z0-9_]+)(?::([A-Za-z0-9_.-]+))?:(\d+)(?:\([^)]*\))?")


@dataclasses.dataclass(frozen=True)
class Gres:
    """One generic resource of a node, e.g. gpu:a100:8 -> Gres("gpu", "a100", 8); type None if untyped."""

    name: str
    type: str | None
    count: int


@dataclasses.dataclass(frozen=True)
class Node:
    """One node as sinfo shows it (cpus: CPUs; memory_mb: RealMemory in MB; hostname: NodeHostname)."""

    name: str
    hostname: str
    cpus: int
    memory_mb: int
    gres: tuple[Gres, ...]
    state: str

    def gpus(self, gpu_type: str | None = None) -> int:
        """GPUs of this node (gres named "gpu"), of `gpu_type` when given."""
        return sum(g.count for g in self.gres if g.name == "gpu" and (gpu_type is None or g.type == gpu_type))


@dataclasses.dataclass(frozen=True)
class Partition:
    """One partition: whether it is the default and up, its MaxTime (seconds, None = unlimited), its nodes."""

    name: str
    default: bool
    available: bool
    max_time_s: int | None
    nodes: tuple[Node, ...]

    @property
    def gpus(self) -> int:
        """GPUs in the whole partition."""
        return sum(n.gpus() for n in self.nodes)

    def gpu_types(self) -> dict[str | None, int]:
        """GPU count per gres type (None: untyped gres), most GPUs first."""
        totals: dict[str | None, int] = {}
        for node in self.nodes:
            for g in node.gres:
                if g.name == "gpu" and g.count:
                    totals[g.type] = totals.get(g.type, 0) + g.count
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def gpu_summary(self) -> str:
        """The GPUs per type in words, e.g. "32 a100, 4 untyped", or "none"."""
        return ", ".join(f"{count} {gpu_type or 'untyped'}" for gpu_type, count in self.gpu_types().items()) or "none"


@dataclasses.dataclass(frozen=True)
class Association:
    """An account the user may charge, on one partition (None: any) with the QOS it allows."""

    account: str
    partition: str | None
    qos: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """The cluster as one user sees it. associations is None when sacctmgr does not answer
    (no slurmdbd), default_account likewise."""

    partitions: tuple[Partition, ...]
    associations: tuple[Association, ...] | None = None
    default_account: str | None = None

    def partition(self, name: str | None) -> Partition | None:
        """The partition called `name`, or with None the default partition (sbatch's without
        --partition); None when there is no such partition."""
        if name is None:
            return next((p for p in self.partitions if p.default), None)
        return next((p for p in self.partitions if p.name == name), None)


def gpu_words(count: int, gpu_type: str | None) -> str:
    """GPUs in words: "2 a100 GPU(s)", or "2 GPU(s)" for untyped gres."""
    return f"{count} {gpu_type} GPU(s)" if gpu_type else f"{count} GPU(s)"


def parse_gres(text: str) -> tuple[Gres, ...]:
    """sinfo's %G: "gpu:a100:8", "gpu:4(S:0-1),mps:400", "(null)" -> Gres items."""
    if text.strip() in ("", "(null)"):
        return ()
    return tuple(Gres(m.group(1), m.group(2), int(m.group(3))) for m in _GRES_ITEM.finditer(text))


def parse_sinfo(text: str) -> tuple[Partition, ...]:
    """Partitions from `sinfo --noheader --Node --format SINFO_FORMAT` output, sorted by name (sinfo
    sorts by node, and its order of one node's partitions varies between calls).

    Raises:
        SlurmError: a line does not have the expected fields.
    """
    order: list[str] = []
    info: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(SEP)]
        if len(parts) != len(_SINFO_FIELDS):
            raise SlurmError(f"sinfo printed {len(parts)} fields where {len(_SINFO_FIELDS)} were expected: {line!r}")
        raw = dict(zip((name for _, name in _SINFO_FIELDS), parts))
        name = raw["partition"].rstrip("*")
        if name not in info:
            order.append(name)
            info[name] = {"default": raw["partition"].endswith("*"), "available": raw["available"] == "up",
                          "max_time_s": parse_duration(raw["max_time"]), "nodes": {}}
        info[name]["nodes"][raw["node"]] = Node(
            name=raw["node"], hostname=raw["hostname"], cpus=_number(raw["cpus"]),
            memory_mb=_number(raw["memory_mb"]), gres=parse_gres(raw["gres"]), state=raw["state"])
    return tuple(Partition(name=n, default=info[n]["default"], available=info[n]["available"],
                           max_time_s=info[n]["max_time_s"], nodes=tuple(info[n]["nodes"].values()))
                 for n in sorted(order))


def _number(text: str) -> int:
    """sinfo prints "16" or, for a range over grouped nodes, "16+": the smallest is what every node has."""
    match = re.match(r"\d+", text)
    return int(match.group(0)) if match else 0


def parse_associations(text: str) -> tuple[Association, ...]:
    """`sacctmgr --noheader --parsable2 show associations format=account,partition,qos` output."""
    rows = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3 or not parts[0]:
            continue
        rows.append(Association(parts[0], parts[1] or None, tuple(q for q in parts[2].split(",") if q)))
    return tuple(rows)


def read(env: Mapping[str, str] | None = None, timeout: float = 30.0, accounts: bool = True) -> Layout:
    """Read the cluster with sinfo, and (with `accounts`) the user's associations with sacctmgr
    where it answers; without, no slurmdbd is asked (it may be slow or down).

    Raises:
        SlurmError: sinfo failed (slurmctld unreachable) or printed something unexpected.
    """
    try:
        text = proc.run(["sinfo", "--noheader", "--Node", "--format", SINFO_FORMAT], env=env, timeout=timeout).stdout
    except CommandError as exc:
        raise SlurmError(str(exc)) from exc
    partitions = parse_sinfo(text)
    user = getpass.getuser()
    associations = default_account = None
    if not accounts:
        return Layout(partitions=partitions)
    try:
        # Without slurmdbd sacctmgr prints its complaint and exits 0: no rows then means "unknown".
        out = proc.run(["sacctmgr", "--noheader", "--parsable2", "show", "associations", f"user={user}",
                        "format=account,partition,qos"], env=env, timeout=timeout).stdout
        associations = parse_associations(out) or None
        if associations:
            default_account = proc.run(["sacctmgr", "--noheader", "--parsable2", "show", "user", user,
                                        "format=defaultaccount"], env=env, timeout=timeout).stdout.strip() or None
    except CommandError:
        pass
    return Layout(partitions=partitions, associations=associations, default_account=default_account)
