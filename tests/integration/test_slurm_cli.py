"""The CLI Slurm adapter against the real local cluster (scripts/local-slurm.sh); submitting,
listing and cancelling are in the scheduler contract (test_scheduler_contract.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hpcserve import config
from hpcserve.slurm import jobscript
from hpcserve.errors import SlurmError
from hpcserve.slurm import CLIScheduler
from tests.conftest import minimal, write_deployment

pytestmark = pytest.mark.slurm


def test_rendered_script_passes_sbatch_test_only(slurm_env, gguf, tmp_path):
    raw = minimal(gguf, tmp_path, slurm={"partition": "gpu", "time_limit": "00:30:00",
                                         "extra_directives": ["--requeue"], "setup": ["echo setup"]})
    raw["models"][0]["gpus"] = {"type": "a100", "count": 2}
    d = config.parse(raw, base=tmp_path)
    answer = CLIScheduler().test_submit(jobscript.render(d, d.models[0]))
    assert "to start at" in answer and "gpu" in answer


def test_sbatch_test_only_rejects_an_impossible_request(slurm_env, gguf, tmp_path):
    raw = minimal(gguf, tmp_path, slurm={"partition": "no-such-partition"})
    d = config.parse(raw, base=tmp_path)
    with pytest.raises(SlurmError, match="(?i)invalid partition"):
        CLIScheduler().test_submit(jobscript.render(d, d.models[0]))


def test_node_addresses(slurm_env):
    addresses = CLIScheduler().node_addresses()
    assert {"gpu1", "gpu2"} <= set(addresses) and addresses["gpu1"] == "localhost"


def test_unreachable_slurmctld_is_a_slurm_error(slurm_env, tmp_path):
    """A real squeue against a controller that does not answer (a config naming an unused port)."""
    conf = (tmp_path / "slurm.conf")
    text = open(slurm_env["SLURM_CONF"]).read().replace("SlurmctldPort=16817", "SlurmctldPort=16999")
    conf.write_text(text)
    scheduler = CLIScheduler(env={**slurm_env, "SLURM_CONF": str(conf)}, timeout=60)
    with pytest.raises(SlurmError, match="squeue exited 1: .*(connect|contact)"):
        scheduler.jobs("hpcserve:")


def test_openwebui_job_script_passes_sbatch_test_only(slurm_env, gguf, tmp_path):
    from hpcserve.clients import webui

    raw = minimal(gguf, tmp_path, slurm={"partition": "gpu"}, haproxy={"bind": "0.0.0.0"})
    raw["webui"] = {"partition": "gpu", "time_limit": "01:00:00"}
    d = config.parse(raw, base=tmp_path)
    (d.state_dir / "logs").mkdir(parents=True)
    assert "to start at" in CLIScheduler().test_submit(webui.job_script(d))


def test_verbose_logs_each_slurm_command_on_stderr_and_quiet_logs_none(slurm_env, gguf, tmp_path):
    path = write_deployment(tmp_path, minimal(gguf, tmp_path))
    run = lambda *flags: subprocess.run([sys.executable, "-m", "hpcserve", *flags, "-f", str(path), "status"],
                                        capture_output=True, text=True, env={**os.environ, **slurm_env}, timeout=60)
    verbose, quiet = run("-v"), run()
    assert verbose.returncode == quiet.returncode == 0 and verbose.stdout == quiet.stdout
    lines = verbose.stderr.splitlines()
    assert any(line.startswith("hpcserve.proc: run: squeue --me ") for line in lines), verbose.stderr
    assert any(re.fullmatch(r"hpcserve\.proc: squeue exited 0 after \d+\.\d\d s", line) for line in lines)
    assert "hpcserve.proc" not in quiet.stderr and "httpcore" not in verbose.stderr
