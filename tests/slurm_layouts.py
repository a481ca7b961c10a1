"""Real Slurm clusters of other layouts than scripts/local-slurm.sh's, each its own slurmctld and
slurmd daemons on this host (their own ports, state and spool; munge shared), for the tests of
`hpcserve init` and `hpcserve check`. Built the way local-slurm.sh builds its cluster (verified on
Slurm 22.05): several `slurmd -N NAME` share the host through NodeHostname=localhost, gres are
backed by empty files, SlurmdParameters=config_overrides lets a node claim the CPUs and memory of
its NodeName line.

A layout may hide a folder from its compute nodes: their slurmd runs in its own mount namespace
with an empty tmpfs over that folder, as a node that does not mount the login node's filesystem.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

from hpcserve import releases
from tests.conftest import free_port


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    name: str
    cpus: int
    memory_mb: int
    gpus: int = 0
    gpu_type: str | None = None


@dataclasses.dataclass(frozen=True)
class PartitionSpec:
    name: str
    nodes: tuple[str, ...]
    default: bool = False
    max_time: str = "INFINITE"


class Cluster:
    """One running cluster: `env` points Slurm's commands at it; `stop()` ends its daemons."""

    def __init__(self, root: Path, name: str, nodes: list[NodeSpec], partitions: list[PartitionSpec],
                 hidden: Path | None = None):
        self.root, self.name, self.nodes, self.partitions, self.hidden = root, name, nodes, partitions, hidden
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write(self) -> None:
        for sub in ("spool/ctld", "log", "gpus"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        lines = [f"ClusterName={self.name}", "SlurmctldHost=localhost", f"SlurmctldPort={free_port()}",
                 "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
                 f"StateSaveLocation={self.root}/spool/ctld", f"SlurmdSpoolDir={self.root}/spool/%n",
                 f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
                 f"SlurmctldLogFile={self.root}/log/slurmctld.log", f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
                 "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
                 "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
                 "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
                 "SlurmdParameters=config_overrides", "SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000",
                 "MinJobAge=120", "KillWait=10", "GresTypes=gpu"]
        gres = []
        for node in self.nodes:
            (self.root / "spool" / node.name).mkdir(parents=True, exist_ok=True)
            line = (f"NodeName={node.name} NodeHostname=localhost Port={free_port()} CPUs={node.cpus} "
                    f"RealMemory={node.memory_mb} State=UNKNOWN")
            if node.gpus:
                kind = f"{node.gpu_type}:" if node.gpu_type else ""
                line += f" Gres=gpu:{kind}{node.gpus}"
                files = []
                for i in range(node.gpus):
                    path = self.root / "gpus" / f"{node.name}-{i}"
                    path.touch()
                    files.append(str(path))
                type_field = f" Type={node.gpu_type}" if node.gpu_type else ""
                gres += [f"NodeName={node.name} Name=gpu{type_field} File={f}" for f in files]
            lines.append(line)
        for p in self.partitions:
            lines.append(f"PartitionName={p.name} Nodes={','.join(p.nodes)} Default={'YES' if p.default else 'NO'} "
                         f"MaxTime={p.max_time} State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (self.root / "gres.conf").write_text("\n".join(gres) + "\n")
        if releases.parse(subprocess.run(["slurmd", "-V"], capture_output=True, text=True).stdout) >= (23, 2, 0):
            (self.root / "cgroup.conf").write_text("CgroupPlugin=disabled\n")   # as scripts/local-slurm.sh

    def start(self) -> Cluster:
        self._write()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for node in self.nodes:
            argv = ["slurmd", "-f", str(self.conf), "-N", node.name]
            if self.hidden is not None:
                self.hidden.mkdir(parents=True, exist_ok=True)
                argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs tmpfs "$0" && exec "$@"', str(self.hidden), *argv]
            subprocess.run(argv, check=True, env=self.env)
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run(["sinfo", "--noheader", "-N", "-t", "idle", "-o", "%N"], env=self.env,
                                    capture_output=True, text=True)
            if len(set(result.stdout.split())) >= len(self.nodes):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster {self.name} did not come up: {result.stdout} {result.stderr}; "
                                   f"see {self.root / 'log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        pattern = f"slurm(ctld|d) -f {self.conf}"
        subprocess.run(["pkill", "-f", pattern])
        deadline = time.monotonic() + 15
        while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
            if time.monotonic() > deadline:
                subprocess.run(["pkill", "-9", "-f", pattern])
                break
            time.sleep(0.2)


def available() -> bool:
    """slurmctld, slurmd and unshare are installed and we are root (slurmd runs jobs as any user)."""
    return os.geteuid() == 0 and all(shutil.which(p) for p in ("slurmctld", "slurmd", "unshare"))
