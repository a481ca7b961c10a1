"""`hpcserve check`: what can be checked before a real job waits in the queue, one `Check` each.

`preflight()` asks only the login node and slurmctld (seconds; `up` runs it first and stops on a
failure): every job script through `sbatch --test-only`, HAProxy's release and `haproxy -c` on the
rendered config, the frontend and stats ports, the GGUF files, and whether the state directory is
on a filesystem the compute nodes share. `job_check()` goes further with one short job on the
pool's partition (templates/check.sbatch.j2) that runs the slurm.setup lines and checks from the
compute node what a backend needs; it reports through its job comment, which squeue shows even
where no filesystem is shared, and the login node connects back to a listener on the node.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from .. import releases, templates
from ..config import Deployment, Model
from ..core.jobs import JobState
from ..errors import CommandError, ConfigError, HAProxyError, HpcserveError, SlurmError, TemplateError
from ..haproxy import config as haproxy_config
from ..access.keys import serving_haproxy
from ..llama import builds
from ..control.observe import resolve
from ..slurm import Scheduler, jobscript
from ..slurm import layout as layout_mod
from ..slurm.accounting import Accounting, AccountingUnavailable
from ..state import StateDir, write_private

PASS, FAIL, WARN = "pass", "fail", "warn"
#: Filesystems one host exports to others (mount types as /proc/mounts names them).
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "cifs", "smb3",
                                 "glusterfs", "fuse.glusterfs", "panfs", "wekafs", "fuse.sshfs", "9p", "afs"})
CHECK_JOB_PREFIX = "hpcserve-check:"


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of `hpcserve check`.

    Attributes:
        name: what was checked, e.g. "sbatch:gemma3", "haproxy", "state_dir".
        status: "pass", "fail" or "warn" (a doubt that does not stop `up`).
        detail: what was found (one line).
        fix: what to change when it failed ("" when nothing).
        kind: which part failed, for `up`'s exit code: "config" (2), "slurm" (3), "haproxy" (4).
    """

    name: str
    status: str
    detail: str
    fix: str = ""
    kind: str = "config"

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def preflight(deployment: Deployment, scheduler: Scheduler) -> list[Check]:
    """The checks that need no job (module docstring), the state directory's listed last. It is
    made first: the HAProxy check writes the files its config names there."""
    state = state_dir_check(deployment)
    checks = [*slurm_release(deployment), *accounting_check(deployment), *job_scripts(deployment, scheduler),
              *model_files(deployment)]
    if os.path.isdir(deployment.state_dir):
        checks += haproxy_checks(deployment)
    return [*checks, state]


def refuse_on_failure(checks: list[Check]) -> None:
    """Stop a command before it changes anything when a check failed (`up` runs preflight()).

    Raises:
        ConfigError, SlurmError or HAProxyError (by the first failed check's kind), naming every
        failed check and its fix.
    """
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        error = {"slurm": SlurmError, "haproxy": HAProxyError}.get(failed[0].kind, ConfigError)
        raise error("; ".join(f"{c.name}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "") for c in failed))


def slurm_release(deployment: Deployment) -> list[Check]:
    """Slurm's release from `sbatch --version`: a warning when older than the oldest tested one
    (releases.TESTED_SLURM) or unknown; nothing for the workstation launcher."""
    if deployment.scheduler != "slurm":
        return []
    release = releases.slurm()
    tested = releases.text(releases.TESTED_SLURM, slurm=True)
    if release is None or release[:2] < releases.TESTED_SLURM:
        return [Check("slurm", WARN, f"Slurm {releases.text(release, slurm=True)}: hpcserve is tested on {tested} and newer",
                      "expect to find differences first; report them with `hpcserve check --json`")]
    return [Check("slurm", PASS, f"Slurm {releases.text(release, slurm=True)} (tested on {tested} and newer)")]


def accounting_check(deployment: Deployment, accounting: Accounting | None = None) -> list[Check]:
    """Whether slurmdbd answers, and so whether keys' accounts, fair share by account and the
    chargeback can work: a warning when not (serving needs none of them); nothing for the
    workstation launcher."""
    if deployment.scheduler != "slurm":
        return []
    try:
        known = (accounting or Accounting()).accounts()
    except AccountingUnavailable as exc:
        return [Check("accounting", WARN, f"{exc}; keys get no Slurm account, so fair share by account and "
                                          "`usage --chargeback` are off (serving is not affected)",
                      "run slurmdbd (AccountingStorageType=accounting_storage/slurmdbd in slurm.conf) to use them",
                      kind="slurm")]
    unknown = sorted(deployment.accounting.accounts_named() - set(known))
    if unknown:
        return [Check("accounting", FAIL, f"accounting.webui_accounts or webui_group_accounts names account(s) "
                                          f"slurmdbd does not have: "
                                          f"{', '.join(unknown)}", f"one of: {', '.join(known)}")]
    fair = haproxy_config.fair_share_delay_ms(deployment)
    order = f"fair share orders the queue (up to {fair / 1000:g} s)" if fair else "fair share off"
    listed = ", ".join(known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
    return [Check("accounting", PASS, f"slurmdbd answers: {len(known)} account(s) ({listed}); {order}")]


def job_scripts(deployment: Deployment, scheduler: Scheduler) -> list[Check]:
    """Every model's job script rendered and given to `sbatch --test-only` (nothing is queued)."""
    checks = []
    for i, model in enumerate(deployment.models):
        name = f"sbatch:{model.name}"
        try:
            script = jobscript.render(deployment, model)
        except TemplateError as exc:
            checks.append(Check(name, FAIL, f"the job script template is broken: {exc}",
                                f"repair {jobscript.TEMPLATE} in templates_dir {deployment.templates_dir}"))
            continue
        try:
            answer = scheduler.test_submit(script)
        except HpcserveError as exc:
            checks.append(Check(name, FAIL, f"sbatch --test-only refused it: {exc}",
                                _sbatch_fix(str(exc), deployment, i), kind="slurm"))
            continue
        checks.append(Check(name, PASS, answer.removeprefix("sbatch: ").splitlines()[-1] if answer else "accepted"))
    return checks


def _sbatch_fix(message: str, deployment: Deployment, index: int) -> str:
    """What to change for sbatch's refusal `message`, from what the cluster offers."""
    if "contact slurm controller" in message or "could not run" in message:
        return "start slurmctld, or point SLURM_CONF at the cluster's slurm.conf"
    try:
        layout = layout_mod.read(accounts=False)
    except HpcserveError:
        return ""
    names = ", ".join(p.name for p in layout.partitions)
    partition = layout.partition(deployment.slurm.partition)
    if "partition" in message.lower() or partition is None:
        return f"slurm.partition: one of {names}"
    if "time limit" in message.lower():
        return f"slurm.time_limit: at most the MaxTime of {partition.name}"
    model = deployment.models[index]
    return f"models[{index}]: " + unfit(model, partition)


def unfit(model: Model, partition: layout_mod.Partition) -> str:
    """Why no node of `partition` can run a replica of `model`, naming the fields (pure)."""
    gres_type = model.gpus.type if model.gpus.count else None
    nodes = partition.nodes
    offers = "; ".join(sorted({f"{n.cpus} CPUs, {n.memory_mb} MB, gres {_gres_text(n)}" for n in nodes}))
    reasons = []
    if model.gpus.count and not any(n.gpus(gres_type) >= model.gpus.count for n in nodes):
        reasons.append(f"gpus asks for {layout_mod.gpu_words(model.gpus.count, gres_type)} per node "
                       f"(GPUs there: {partition.gpu_summary()})")
    if not any(n.cpus >= model.cpus for n in nodes):
        reasons.append(f"cpus {model.cpus} is more than a node has")
    if not any(n.memory_mb >= model.memory_mb for n in nodes):
        reasons.append(f"memory {model.memory} is more than a node has")
    return (", ".join(reasons) or "sbatch's reason above") + f"; nodes of {partition.name}: {offers}"


def _gres_text(node: layout_mod.Node) -> str:
    return ",".join(f"{g.name}:{g.type + ':' if g.type else ''}{g.count}" for g in node.gres) or "none"


def haproxy_checks(deployment: Deployment) -> list[Check]:
    """HAProxy's release, the rendered config through `haproxy -c`, and the two ports."""
    settings = deployment.haproxy
    try:
        release = releases.haproxy(settings.command)
    except CommandError as exc:
        return [Check("haproxy", FAIL, str(exc), "install HAProxy (Debian/Ubuntu: apt install haproxy; "
                      "RHEL: dnf install haproxy) or set haproxy.command to its path", kind="haproxy")]
    minimum = releases.text(releases.MIN_HAPROXY)
    refusal = releases.haproxy_refusal(release)
    if refusal:
        return [Check("haproxy", FAIL, f"{settings.command}: {refusal}",
                      f"install HAProxy {minimum} or newer, or set haproxy.command to it", kind="haproxy")]
    checks = [Check("haproxy", PASS, f"HAProxy {releases.text(release)} (hpcserve needs {minimum} or newer)")]
    haproxy = serving_haproxy(deployment, "")   # validate writes the served files, the key map too
    try:
        haproxy.validate(haproxy_config.render(deployment, []))
        checks.append(Check("haproxy.cfg", PASS, "haproxy -c accepts the rendered config"))
    except TemplateError as exc:
        checks.append(Check("haproxy.cfg", FAIL, f"the haproxy.cfg template is broken: {exc}",
                            f"repair haproxy.cfg.j2 in templates_dir {deployment.templates_dir}", kind="haproxy"))
    except HpcserveError as exc:
        checks.append(Check("haproxy.cfg", FAIL, str(exc), "see the line HAProxy names; a site template "
                            "in templates_dir overrides hpcserve's", kind="haproxy"))
    pid = haproxy.pid()
    ports = f"{settings.bind}:{settings.port} and 127.0.0.1:{settings.stats_port_or_default}"
    if pid is not None:
        checks.append(Check("ports", PASS, f"{ports} are served by this pool's HAProxy (pid {pid})"))
        return checks
    try:
        haproxy.check_ports()
        checks.append(Check("ports", PASS, f"{ports} are free"))
    except HpcserveError as exc:
        checks.append(Check("ports", FAIL, str(exc), "choose free ports in haproxy.port and haproxy.stats_port",
                            kind="haproxy"))
    return checks


def model_files(deployment: Deployment) -> list[Check]:
    """Each model's GGUF file starts with the GGUF magic (the deployment file load saw it exists)."""
    checks = []
    for i, model in enumerate(deployment.models):
        try:
            with open(model.gguf, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            checks.append(Check(f"gguf:{model.name}", FAIL, f"{model.gguf}: {exc.strerror}",
                                f"models[{i}].gguf: a readable GGUF file"))
            continue
        if magic != b"GGUF":
            checks.append(Check(f"gguf:{model.name}", FAIL, f"{model.gguf} is not a GGUF file (it starts {magic!r})",
                                f"models[{i}].gguf: a llama.cpp GGUF model file"))
        else:
            checks.append(Check(f"gguf:{model.name}", PASS, f"{model.gguf} ({model.gguf.stat().st_size >> 20} MB)"))
    return checks


def state_dir_check(deployment: Deployment) -> Check:
    """The state directory can be made private here, and is on a filesystem the compute nodes
    share: they are this host, or it is a network filesystem. A local filesystem on a login node
    may still be exported to the nodes, so that is a warning; `--job` settles it."""
    state = StateDir(deployment.state_dir)
    try:
        state.ensure()
    except HpcserveError as exc:
        return Check("state_dir", FAIL, str(exc), "state_dir: a folder you can write, shared with the compute nodes")
    if deployment.scheduler == "local":
        return Check("state_dir", PASS, f"{state.root} (scheduler: local, jobs run on this host)")
    fstype = filesystem_type(state.root)
    try:
        partition = layout_mod.read(accounts=False).partition(deployment.slurm.partition)
        hosts = {n.hostname for n in partition.nodes} if partition else set()
    except HpcserveError:
        hosts = set()
    status, detail = shared_verdict(fstype, hosts, this_host_names())
    return Check("state_dir", status, f"{state.root}: {detail}",
                 "" if status == PASS else "put state_dir on a filesystem the compute nodes mount (home, "
                 "project); `hpcserve check --job` verifies it from a node", kind="config")


def shared_verdict(fstype: str, node_hosts: set[str], local_names: set[str]) -> tuple[str, str]:
    """(status, detail) of the shared-filesystem check (pure): PASS when every node is this host or
    the filesystem is a network one, WARN otherwise (a local filesystem may be exported)."""
    if node_hosts and node_hosts <= local_names:
        return PASS, f"on {fstype}; the partition's nodes are this host"
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse.") and fstype[5:] in NETWORK_FILESYSTEMS:
        return PASS, f"on {fstype}, a network filesystem"
    return WARN, (f"on {fstype}, a filesystem of this host; the compute nodes see it only if this host "
                  "exports it")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mount point above it), e.g. "nfs4"."""
    target = os.path.realpath(path)
    best = ("", "unknown")
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
            best = (mount, part.fstype)
    return best[1]


def this_host_names() -> set[str]:
    """Names this host answers to: localhost, its host name and fully qualified name."""
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    return names | {n.split(".")[0] for n in names}


def job_script(deployment: Deployment, marker: Path, nonce: str, minutes: int = 10) -> str:
    """The check job's script (templates/check.sbatch.j2): the first model's resources, every model's files.

    Raises:
        TemplateError: a template is broken (one line naming file and line).
    """
    return templates.render("check.sbatch.j2", deployment.templates_dir, deployment=deployment,
                            model=deployment.models[0], slurm=deployment.slurm,
                            job_name=CHECK_JOB_PREFIX + deployment.name, marker=marker, nonce=nonce,
                            minutes=minutes)


def job_check(deployment: Deployment, scheduler: Scheduler, timeout: float,
              on_progress: Callable[[str], None] = lambda _line: None) -> list[Check]:
    """Run the check job on the pool's partition and turn its report into checks.

    Waits up to `timeout` seconds (queue wait included) for the job's report, then up to 30 s for
    the connection to its listener. The job is cancelled when the wait ends, whatever happened.

    Raises:
        SlurmError: sbatch or squeue failed.
    """
    state = StateDir(deployment.state_dir)
    state.ensure()
    nonce = secrets.token_hex(16)
    folder = state.check_dir
    folder.mkdir(mode=0o700, exist_ok=True)
    marker = folder / f"{nonce}.marker"
    write_private(marker, nonce)
    job_id = None
    try:
        try:
            script = job_script(deployment, marker, nonce)
        except TemplateError as exc:
            return [Check("job", FAIL, f"the check job template is broken: {exc}",
                          f"repair check.sbatch.j2 in templates_dir {deployment.templates_dir}")]
        job_id = scheduler.submit(script)
        on_progress(f"check job {job_id} submitted to partition {deployment.slurm.partition or '(default)'}")
        comment, job = _wait_for_report(deployment, scheduler, job_id, timeout, on_progress)
        if comment is None:
            if job is None or job.state.ended:
                state_text = f"{job.state.value} ({job.reason})" if job else "gone from squeue"
                return [Check("job", FAIL, f"check job {job_id} ended without a report: {state_text}",
                              "a slurm.setup line may end the job (exit, set -e); try them in an "
                              "interactive job (srun --pty bash)", kind="slurm")]
            return [Check("job", FAIL, f"check job {job_id} did not report within {timeout:g} s: "
                          f"{job.state.value}, reason {job.reason}",
                          "wait longer (--timeout), or choose a partition with free nodes", kind="slurm")]
        checks = [Check("job", PASS, f"check job {job_id} ran on {job.node}")]
        checks += parse_report(comment)
        checks.append(_reach(comment, job, scheduler, nonce))
        return checks
    finally:
        if job_id is not None:
            try:
                scheduler.cancel([job_id])
            except HpcserveError:
                pass
        marker.unlink(missing_ok=True)


def _wait_for_report(deployment, scheduler, job_id, timeout, on_progress):
    """(the job's "hpcserve-check ..." comment or None, the job or None) once reported, ended or timed out."""
    deadline = time.monotonic() + timeout
    said = None
    job = None
    while True:
        job = next((j for j in scheduler.jobs(CHECK_JOB_PREFIX + deployment.name) if j.job_id == job_id), None)
        if job is not None and job.comment.startswith("hpcserve-check "):
            return job.comment, job
        if job is None or job.state.ended or time.monotonic() > deadline:
            return None, job
        waiting = job.state is JobState.PENDING
        news = f"check job {job_id}: {job.state.value}" + (
            (f" ({job.reason})" if job.reason not in ("None", "") else "") if waiting else f" on {job.node}")
        if news != said:
            on_progress(news)
            said = news
        time.sleep(1)


def parse_report(comment: str) -> list[Check]:
    """The checks in a check job's comment ("hpcserve-check listen=HOST:PORT results=BASE64"),
    whose results are "NAME|STATUS|DETAIL" lines (pure)."""
    match = re.search(r"results=([A-Za-z0-9+/=]*)", comment)
    text = base64.b64decode(match.group(1)).decode(errors="replace") if match else ""
    checks = []
    for line in text.splitlines():
        name, _, rest = line.partition("|")
        status, _, detail = rest.partition("|")
        if status not in (PASS, FAIL, WARN):
            continue
        if name.startswith("llama-server:") and status == PASS:
            status, detail = _llama_build(detail)
        checks.append(Check(f"node:{name}", status, detail, _NODE_FIXES.get(name.split(":")[0], "") if status == FAIL
                            else "", kind="slurm"))
    return checks


def _llama_build(detail: str) -> tuple[str, str]:
    """(status, detail) of a llama-server that answered --version ("PATH --version: LINE"): the
    build it names, or that the PyPI package its path lies in names (builds.identify: a build
    without git says "build 0"), or a warning that neither names one."""
    path, said, version = detail.partition(" --version:")
    build = builds.identify(version if said else detail, Path(path) if said else None)
    if build is None or build.number is None:
        return WARN, (f"{detail}: no llama.cpp build number in it; hpcserve assumes the answers of the "
                      f"newest build it knows ({builds.newest_known().name})")
    named_by = build.reported.partition("; ")[2]
    return PASS, f"{detail} (llama.cpp {build.name}" + (f", named by {named_by})" if named_by else ")")


_NODE_FIXES = {
    "setup": "fix the slurm.setup line named (it runs before llama-server on the node)",
    "gguf": "put the GGUF file on a filesystem the compute nodes mount",
    "llama-server": "models[].command: a llama-server the node can run (a path on a shared "
                    "filesystem, or a name slurm.setup puts on PATH, e.g. module load llama.cpp)",
    "state_dir": "put state_dir on a filesystem the compute nodes mount (home, project)",
    "reachable": "python3 on the compute nodes is needed for this check only",
}


def _reach(comment: str, job, scheduler: Scheduler, nonce: str) -> Check:
    """Connect to the job's listener as hpcserve reaches a backend (the node's NodeAddr, else the
    host name the job announced) and read the nonce back."""
    match = re.search(r"listen=(\S+):(\d+)", comment)
    if not match:
        return Check("node:reachable", FAIL, "the job opened no listener: python3 is missing on the node, "
                     "or did not start",
                     _NODE_FIXES["reachable"], kind="slurm")
    announced, port = match.group(1), int(match.group(2))
    try:
        host = scheduler.node_addresses().get(job.node or "", "") or announced
    except HpcserveError:
        host = announced
    address = resolve(host)
    if address is None:
        return Check("node:reachable", FAIL, f"{host} (node {job.node}) does not resolve on this login node",
                     "the node's NodeAddr in slurm.conf, or its host name in DNS / /etc/hosts", kind="slurm")
    try:
        with socket.create_connection((address, port), timeout=30) as connection:
            connection.settimeout(30)
            answer = connection.recv(64).decode(errors="replace")
    except OSError as exc:
        return Check("node:reachable", FAIL, f"cannot connect to {host}:{port} ({address}): {exc.strerror or exc}",
                     "a firewall between login and compute nodes must let the login node reach "
                     "the nodes' unprivileged ports", kind="slurm")
    if answer != nonce:
        return Check("node:reachable", FAIL, f"{host}:{port} answered, but not with the check job's nonce",
                     "another program took the port; run the check again", kind="slurm")
    return Check("node:reachable", PASS, f"this login node reached {host}:{port} ({address}) on node {job.node}")
