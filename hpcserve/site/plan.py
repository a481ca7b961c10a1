"""A deployment file that fits the cluster it is written on (`hpcserve init`): pure planning from
a `slurm.layout.Layout` and the few answers Slurm cannot give, then rendering the commented YAML
(templates/hpcserve.yaml.j2).

The rules, each stated in the file it writes:
- partition: the one asked for; else the default partition if it has GPUs; else the partition with
  the most GPUs (the first by name of equals); with no GPU anywhere, a CPU-only deployment on the
  default partition.
- gpus.type: the gres type of that partition with the most GPUs (untyped gres: no type).
- cpus and memory per replica: the node's share per GPU times the GPUs a replica asks for, from the
  smallest node of that type, so that a replica fits every node of the partition (CPU-only: a
  quarter of the smallest node, at most 16 CPUs).
- time_limit: the one asked for if within the partition's MaxTime; else one day, or MaxTime when
  that is shorter. renew_before: 600 s, or a quarter of a shorter time limit.
- account and QOS: only when asked for; the user's associations (sacctmgr) are listed beside them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from pathlib import Path

from .. import templates
from ..errors import ConfigError
from ..slurm.cli import format_duration, parse_duration
from ..slurm.layout import Layout, Node, Partition, gpu_words

TEMPLATE = "hpcserve.yaml.j2"
DAY_S = 86400
DEFAULT_RENEW_BEFORE_S = 600
# Quantisation and precision suffixes of GGUF file names ("-Q4_K_M", ".f16", "-IQ3_XS").
_QUANT_SUFFIX = re.compile(r"[-._](i?q\d[a-z0-9_]*|f16|f32|bf16)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Answers:
    """What Slurm cannot tell: the model and how it is served. Paths absolute.

    Attributes:
        gguf: the model file. model_name: the OpenAI model id. replicas: backend jobs.
        gpus: GPUs per replica (ignored on a cluster without GPUs). parallel: slots per replica.
        context_size: tokens shared by the slots. partition, gpu_type, account, qos, time_limit:
        None = chosen from the cluster. llama_server: the command. setup: shell lines before it.
        name: the deployment's name. state_dir: None = ~/.hpcserve/NAME. bind, port: the frontend.
    """

    gguf: Path
    model_name: str
    llama_server: str = "llama-server"
    replicas: int = 1
    gpus: int = 1
    parallel: int = 4
    context_size: int = 16384
    partition: str | None = None
    gpu_type: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = None
    setup: tuple[str, ...] = ()
    name: str = "pool"
    state_dir: Path | None = None
    bind: str = "127.0.0.1"
    port: int = 8000


@dataclasses.dataclass(frozen=True)
class Plan:
    """The deployment file's values (`document`, a dict in the deployment schema) and why each was
    chosen (`notes`: field path such as "slurm.partition" -> one line), plus warnings for the user."""

    document: dict
    notes: dict[str, str]
    warnings: tuple[str, ...]
    cluster: str


def model_name_from(gguf: Path) -> str:
    """A model id from a GGUF file name: "Qwen2.5-7B-Instruct-Q4_K_M.gguf" -> "qwen2.5-7b-instruct"."""
    stem = gguf.name.removesuffix(".gguf")
    stem = _QUANT_SUFFIX.sub("", stem)
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return name[:63] or "model"


def choose_partition(layout: Layout, wanted: str | None) -> Partition:
    """The partition to run the backends in (rules in the module docstring).

    Raises:
        ConfigError: `wanted` is not a partition of the cluster, or the cluster has none.
    """
    if not layout.partitions:
        raise ConfigError("sinfo shows no partition: is this a Slurm login node (SLURM_CONF)?")
    if wanted is not None:
        found = layout.partition(wanted)
        if found is None:
            raise ConfigError(f"--partition: expected one of {', '.join(p.name for p in layout.partitions)}, "
                              f"got {wanted!r}")
        return found
    usable = [p for p in layout.partitions if p.available] or list(layout.partitions)
    with_gpus = [p for p in usable if p.gpus]
    if with_gpus:
        default = next((p for p in with_gpus if p.default), None)
        return default or max(with_gpus, key=lambda p: p.gpus)   # max keeps the first of equals
    return next((p for p in usable if p.default), usable[0])


def gpu_partitions(layout: Layout) -> list[Partition]:
    """The partitions with GPUs, for a user to choose from."""
    return [p for p in layout.partitions if p.gpus]


def plan(layout: Layout, answers: Answers, gguf_bytes: int | None = None) -> Plan:
    """The deployment for `answers` on `layout` (rules in the module docstring).

    Args:
        gguf_bytes: the model file's size, for a warning when a replica's memory is smaller.
    Raises:
        ConfigError: an answer does not fit the cluster (partition, GPU type or count, time limit);
            the message names the option and what the cluster offers.
    """
    partition = choose_partition(layout, answers.partition)
    notes: dict[str, str] = {}
    warnings: list[str] = []
    types = partition.gpu_types()
    others = [p.name for p in gpu_partitions(layout) if p.name != partition.name]
    notes["slurm.partition"] = (f"{len(partition.nodes)} node(s)" + (f", {partition.gpus} GPUs" if partition.gpus else ", no GPUs")
                                + (f"; other GPU partitions: {', '.join(others)}" if others else ""))
    gpus: dict = {"count": 0}
    if types:
        gpu_type = answers.gpu_type if answers.gpu_type is not None else next(iter(types))
        if gpu_type not in types:
            raise ConfigError(f"--gpu-type: partition {partition.name} has "
                              f"{', '.join(t or '(untyped)' for t in types)}, not {gpu_type!r}")
        nodes = [n for n in partition.nodes if n.gpus(gpu_type)]
        most = max(n.gpus(gpu_type) for n in nodes)
        if answers.gpus > most:
            raise ConfigError(f"--gpus: a node of partition {partition.name} has at most "
                              f"{gpu_words(most, gpu_type)}, not {answers.gpus}")
        nodes = [n for n in nodes if n.gpus(gpu_type) >= answers.gpus]
        smallest = min(nodes, key=lambda n: (n.cpus / n.gpus(gpu_type), n.memory_mb / n.gpus(gpu_type)))
        share = answers.gpus / smallest.gpus(gpu_type)
        gpus = {"type": gpu_type, "count": answers.gpus} if gpu_type else {"count": answers.gpus}
        notes["gpus"] = (f"gres gpu{':' + gpu_type if gpu_type else ''}; GPUs of partition {partition.name}: "
                         f"{partition.gpu_summary()}")
        cpus, memory_mb = _share(smallest, share)
        why = f"{smallest.cpus} CPUs and {smallest.memory_mb} MB per node of {smallest.gpus(gpu_type)} GPUs, x {answers.gpus}"
    else:
        smallest = min(partition.nodes, key=lambda n: (n.cpus, n.memory_mb))
        cpus, memory_mb = _share(smallest, min(0.25, 16 / max(smallest.cpus, 1)))
        notes["gpus"] = f"no gres gpu in partition {partition.name}: llama-server runs on the CPUs"
        why = f"a quarter of a node of {smallest.cpus} CPUs and {smallest.memory_mb} MB"
        if answers.gpu_type is not None:
            raise ConfigError(f"--gpu-type: partition {partition.name} has no GPUs")
    notes["cpus"] = why
    if gguf_bytes is not None and gguf_bytes > memory_mb * (1 << 20):
        warnings.append(f"models[0].memory: the GGUF file has {gguf_bytes >> 20} MB, more than the "
                        f"{memory_mb} MB a replica gets; raise memory or gpus")

    time_limit, renew_before = _time_limit(partition, answers.time_limit)
    notes["slurm.time_limit"] = ("MaxTime of " + partition.name + ": "
                                 + (format_duration(partition.max_time_s, days=True) if partition.max_time_s else "unlimited")
                                 + "; a replica's successor is submitted before it ends")
    model: dict = {"name": answers.model_name, "gguf": str(answers.gguf), "command": answers.llama_server,
                   "replicas": answers.replicas, "parallel": answers.parallel,
                   "context_size": answers.context_size, "gpus": gpus, "cpus": cpus,
                   "memory": f"{memory_mb}M"}
    if not types:
        model["gpu_layers"] = 0
    slurm: dict = {"partition": partition.name, "time_limit": time_limit}
    if renew_before != DEFAULT_RENEW_BEFORE_S:
        slurm["renew_before"] = renew_before
    for field in ("account", "qos"):
        if getattr(answers, field):
            slurm[field] = getattr(answers, field)
    if answers.setup:
        slurm["setup"] = list(answers.setup)
    notes.update(_association_notes(layout, partition))
    document = {"name": answers.name, "state_dir": str(answers.state_dir) if answers.state_dir else None,
                "models": [model], "slurm": slurm, "haproxy": {"bind": answers.bind, "port": answers.port}}
    cluster = f"{len(layout.partitions)} partition(s): " + ", ".join(
        f"{p.name}{'*' if p.default else ''} ({len(p.nodes)} nodes" + (f", {p.gpus} GPUs)" if p.gpus else ")")
        for p in layout.partitions)
    return Plan(document=document, notes=notes, warnings=tuple(warnings), cluster=cluster)


def _share(node: Node, share: float) -> tuple[int, int]:
    """(CPUs, memory in MB) of `share` of `node`, at least 1 CPU and 1024 MB (or the whole node)."""
    cpus = max(1, int(node.cpus * share))
    memory = max(min(1024, node.memory_mb), int(node.memory_mb * share))
    return cpus, memory


def _time_limit(partition: Partition, wanted: str | None) -> tuple[str, int]:
    """(time_limit, renew_before seconds) for the partition."""
    limit = partition.max_time_s
    if wanted is not None:
        seconds = parse_duration(wanted) if wanted not in ("UNLIMITED", "INFINITE") else None
        if not re.fullmatch(r"[\d:-]+|UNLIMITED|INFINITE", wanted) or (seconds is None and wanted[0].isdigit()):
            raise ConfigError(f"--time-limit: expected D-HH:MM:SS, HH:MM:SS or minutes, got {wanted!r}")
        if ":" not in wanted and "-" not in wanted and seconds is not None:
            seconds *= 60   # sbatch(1): a bare number is minutes
            wanted = format_duration(seconds, days=True)
        if limit is not None and (seconds is None or seconds > limit):
            raise ConfigError(f"--time-limit: partition {partition.name} allows at most {format_duration(limit, days=True)} "
                              f"(MaxTime), got {wanted}")
    else:
        seconds = DAY_S if limit is None else min(DAY_S, limit)
        wanted = format_duration(seconds, days=True)
    renew = DEFAULT_RENEW_BEFORE_S if seconds is None else min(DEFAULT_RENEW_BEFORE_S, seconds // 4)
    return wanted, renew


def _association_notes(layout: Layout, partition: Partition) -> dict[str, str]:
    if layout.associations is None:
        return {"slurm.account": "sacctmgr did not answer (no accounting database): Slurm uses your default account",
                "accounting": "sacctmgr did not answer (no slurmdbd): fair share, quotas and the chargeback by "
                              "account are off until it does (`hpcserve check` says when)"}
    usable = [a for a in layout.associations if a.partition in (None, partition.name)]
    accounts = sorted({a.account for a in usable})
    qos = sorted({q for a in usable for q in a.qos})
    notes = {"slurm.account": f"your accounts: {', '.join(accounts) or 'none'}"
                              + (f" (default {layout.default_account})" if layout.default_account else ""),
             "accounting": f"slurmdbd answers: fair share and quotas by account are on; your accounts: "
                           f"{', '.join(accounts) or 'none'}; keys without --account count for "
                           f"{layout.default_account or 'your default account'}"}
    if qos:
        notes["slurm.qos"] = f"QOS your associations allow: {', '.join(qos)}"
    return notes


def render(plan_: Plan, file: Path, now: datetime.datetime | None = None) -> str:
    """The commented deployment file (YAML text) for `plan_`, to be written at `file`.

    Raises:
        jinja2.TemplateError: a site's copy of the template is broken.
    """
    env = templates.environment()
    env.filters["y"] = _yaml_scalar
    env.filters["flow"] = lambda mapping: "{" + ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in mapping.items()) + "}"
    when = (now or datetime.datetime.now()).strftime("%Y-%m-%d %H:%M")
    return env.get_template(TEMPLATE).render(plan=plan_, d=plan_.document, model=plan_.document["models"][0],
                                             notes=plan_.notes, file=file, when=when)


def _yaml_scalar(value: object) -> str:
    """A YAML scalar: JSON's double-quoted strings, numbers and null are YAML too (YAML 1.2, 1.3)."""
    return json.dumps(value)
