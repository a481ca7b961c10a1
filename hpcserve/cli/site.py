"""The commands of day one at a site: `hpcserve init` (a deployment file that fits the cluster),
`hpcserve check` (what would fail, before a job waits in the queue) and `hpcserve render` (the job
scripts and haproxy.cfg that `up` would use). hpcserve.cli.pool adds them to its command group."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click

from ..site import check as check_mod
from .. import config as config_mod
from ..site import plan as site
from .context import Context, err, late_options, out, pass_ctx
from ..errors import ConfigError
from ..haproxy import config as haproxy_config
from ..slurm import jobscript
from ..slurm import layout as layout_mod
from ..state import write_atomic


def _default_llama_server() -> str:
    """llama-server on PATH, else the one beside this Python (scripts/setup.sh links it into .venv/bin),
    else the bare name for a slurm.setup line (module load) to provide."""
    found = shutil.which("llama-server")
    beside = Path(sys.prefix) / "bin" / "llama-server"
    return found or (str(beside) if beside.exists() else "llama-server")


@click.command()
@late_options
@click.option("--gguf", type=click.Path(dir_okay=False, path_type=Path),
              help="The model's GGUF file, on a filesystem the compute nodes share (asked if missing).")
@click.option("--model-name", help="The model id clients ask for [default: from the file name].")
@click.option("--replicas", type=click.IntRange(min=0, max=1024), help="Backend jobs [default: 1; asked].")
@click.option("--gpus", type=click.IntRange(min=1, max=64), default=1, show_default=True, help="GPUs per replica.")
@click.option("--partition", help="Partition for the replicas [default: the GPU partition Slurm offers].")
@click.option("--gpu-type", help="Gres type [default: the partition's most common].")
@click.option("--time-limit", help="Job time limit, within the partition's MaxTime [default: 1 day or MaxTime].")
@click.option("--account", help="Slurm account [default: yours].")
@click.option("--qos", help="Slurm QOS [default: the account's].")
@click.option("--llama-server", "llama_server", default=_default_llama_server, show_default="llama-server on PATH",
              help="llama-server path or command line, as the compute nodes run it.")
@click.option("--setup", "setup", multiple=True, metavar="LINE",
              help="A shell line the job runs before llama-server, e.g. 'module load cuda' (repeatable).")
@click.option("--parallel", type=click.IntRange(min=1, max=256), default=4, show_default=True,
              help="Slots per replica (requests served at once).")
@click.option("--context-size", type=click.IntRange(min=0), default=16384, show_default=True,
              help="Tokens of context per replica, shared by its slots.")
@click.option("--name", "name", default="pool", show_default=True, help="The deployment's name.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="hpcserve's state folder, shared with the compute nodes [default: ~/.hpcserve/NAME].")
@click.option("--port", type=click.IntRange(min=1025, max=65535), default=8000, show_default=True,
              help="The frontend's port.")
@click.option("--bind", default="127.0.0.1", show_default=True, help="The frontend's address.")
@click.option("--non-interactive", is_flag=True, help="Ask nothing: defaults, and an error for what has none.")
@click.option("--force", is_flag=True, help="Overwrite an existing deployment file.")
@pass_ctx
def init(ctx: Context, gguf: Path | None, model_name: str | None, replicas: int | None, non_interactive: bool,
         force: bool, **options) -> None:
    """Write a deployment file (-f, default hpcserve.yaml) that fits this cluster.

    Reads the partitions, their nodes' GPUs (gres), CPUs, memory and MaxTime from sinfo, and your
    accounts and QOS from sacctmgr where it answers; asks only for the model (file, name,
    replicas). Every value is commented with where it came from. Next: `hpcserve check --job`.
    """
    target = ctx.file
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; choose another file with -f, or --force to overwrite it")
    ask = not non_interactive and sys.stdin.isatty()
    cluster = layout_mod.read()
    if options["partition"] is None and ask and len(site.gpu_partitions(cluster)) > 1:
        choices = [p.name for p in site.gpu_partitions(cluster)]
        options["partition"] = click.prompt("partition for the replicas", type=click.Choice(choices),
                                            default=site.choose_partition(cluster, None).name, err=True)
    if gguf is None:
        if not ask:
            raise ConfigError("--gguf: expected the model's GGUF file (there is no terminal to ask on)")
        gguf = click.prompt("model file (GGUF)", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                            err=True)
    gguf = gguf.expanduser().resolve()
    if not gguf.is_file():
        raise ConfigError(f"--gguf: expected an existing GGUF file, {gguf} does not exist")
    if model_name is None:
        model_name = click.prompt("model name", default=site.model_name_from(gguf), err=True) if ask \
            else site.model_name_from(gguf)
    if replicas is None:
        replicas = click.prompt("replicas", default=1, type=click.IntRange(min=0, max=1024), err=True) if ask else 1
    state_dir = options.pop("state_dir")
    answers = site.Answers(gguf=gguf, model_name=model_name, replicas=replicas,
                           state_dir=state_dir.expanduser().resolve() if state_dir else None,
                           setup=tuple(options.pop("setup")), **options)
    plan = site.plan(cluster, answers, gguf_bytes=gguf.stat().st_size)
    text = site.render(plan, target)
    # What init writes, the loader must accept as it is: check it before the file exists.
    config_mod.parse(config_mod.parse_yaml(text, str(target)), base=target.resolve().parent, source=str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text, 0o644)   # a deployment file holds no secret
    ctx.say(f"cluster: {plan.cluster}")
    for warning in plan.warnings:
        ctx.say(f"warning: {warning}")
    if ctx.as_json:
        click.echo(json.dumps({"file": str(target), "deployment": plan.document, "notes": plan.notes,
                               "warnings": list(plan.warnings)}, indent=2))
        return
    slurm = plan.document["slurm"]
    model = plan.document["models"][0]
    out.print(f"wrote {target}: model {model['name']}, {model['replicas']} replica(s) on partition "
              f"{slurm['partition']} ({_resources(model)}, time limit {slurm['time_limit']})", markup=False)
    out.print(f"next: hpcserve -f {target} check --job, then hpcserve -f {target} up", markup=False)


def _resources(model: dict) -> str:
    gpus = model["gpus"]
    gpu_text = " ".join(str(part) for part in (gpus["count"], gpus.get("type"), "GPU") if part) if gpus["count"] \
        else "no GPU"
    return f"{gpu_text}, {model['cpus']} CPUs, {model['memory']}"


_STYLE = {check_mod.PASS: "[green]PASS[/]", check_mod.FAIL: "[red]FAIL[/]", check_mod.WARN: "[yellow]WARN[/]"}


@click.command()
@late_options
@click.option("--job", "with_job", is_flag=True,
              help="Also run one short job on the pool's partition that checks from a compute node.")
@click.option("--timeout", type=click.FloatRange(min=10), default=600, show_default=True,
              help="Seconds to wait for the check job (queue wait included).")
@pass_ctx
def check(ctx: Context, with_job: bool, timeout: float) -> None:
    """Check the deployment before a real job waits in the queue: every job script through
    `sbatch --test-only`, Slurm accounting (slurmdbd), HAProxy's release, config and ports, the GGUF
    files, the state directory; with --job, from a compute node: the setup lines, the model files,
    llama-server --version, the state directory, and the node's address from here.

    \b
    Exit code: the number of failed checks (0: all passed; warnings do not count).
    """
    deployment = ctx.deployment
    scheduler = ctx.scheduler()
    checks = check_mod.preflight(deployment, scheduler)
    if with_job:
        if deployment.scheduler == "local":
            checks.append(check_mod.Check("job", check_mod.PASS, "scheduler: local runs replicas on this host; "
                                          "the checks above cover it"))
        else:
            checks += check_mod.job_check(deployment, scheduler, timeout, on_progress=ctx.say)
    failures = sum(1 for c in checks if c.status == check_mod.FAIL)
    if ctx.as_json:
        click.echo(json.dumps({"deployment": deployment.name, "failures": failures,
                               "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        for c in checks:
            out.print(f"{_STYLE[c.status]}  {c.name}: ", end="")
            out.print(c.detail, markup=False)
            if c.fix and c.status != check_mod.PASS:
                out.print(f"      fix: {c.fix}", markup=False)
        err.print(f"{len(checks)} checks, {failures} failed" if failures else f"{len(checks)} checks passed")
    sys.exit(min(failures, 100))


@click.command()
@late_options
@click.option("--what", type=click.Choice(["all", "sbatch", "haproxy"]), default="all", show_default=True)
@pass_ctx
def render(ctx: Context, what: str) -> None:
    """Print the sbatch script(s) and haproxy.cfg that `up` would use, touching nothing."""
    deployment = ctx.deployment
    documents: dict[str, str] = {}
    if what in ("all", "sbatch"):
        for model in deployment.models:
            documents[f"sbatch:{model.name}"] = jobscript.render(deployment, model)
    if what in ("all", "haproxy"):
        documents["haproxy.cfg"] = haproxy_config.render(deployment, [])
    if ctx.as_json:
        click.echo(json.dumps(documents, indent=2))
        return
    for title, text in documents.items():
        if len(documents) > 1:
            click.echo(f"# ===== {title} =====")
        click.echo(text, nl=False)
