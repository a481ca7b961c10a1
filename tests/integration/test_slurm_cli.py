"""The CLI Slurm adapter against the real local cluster (scripts/local-slurm.sh)."""

from __future__ import annotations

import time
import uuid

import pytest

from hpcserve import config, sbatch
from hpcserve.errors import SlurmError
from hpcserve.slurm import CLIScheduler, JobState
from tests.conftest import minimal

pytestmark = pytest.mark.slurm


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("condition not met in time")


def test_rendered_script_passes_sbatch_test_only(slurm_env, gguf, tmp_path):
    raw = minimal(gguf, tmp_path, slurm={"partition": "gpu", "time_limit": "00:30:00",
                                         "extra_directives": ["--requeue"], "setup": ["echo setup"]})
    raw["models"][0]["gpus"] = {"type": "a100", "count": 2}
    d = config.parse(raw, base=tmp_path)
    answer = CLIScheduler().test_submit(sbatch.render(d, d.models[0]))
    assert "to start at" in answer and "gpu" in answer


def test_sbatch_test_only_rejects_an_impossible_request(slurm_env, gguf, tmp_path):
    raw = minimal(gguf, tmp_path, slurm={"partition": "no-such-partition"})
    d = config.parse(raw, base=tmp_path)
    with pytest.raises(SlurmError, match="(?i)invalid partition"):
        CLIScheduler().test_submit(sbatch.render(d, d.models[0]))


def test_submit_list_announce_cancel(slurm_env, tmp_path):
    scheduler = CLIScheduler()
    name = f"hpcserve:it-{uuid.uuid4().hex[:8]}:m"
    script = (f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --gres=gpu:a100:1\n#SBATCH --mem=100M\n"
              f"#SBATCH --output={tmp_path}/%j.out\n"
              'scontrol update JobId="$SLURM_JOB_ID" Comment="endpoint=$(hostname):4242"\nsleep 300\n')
    job_id = scheduler.submit(script)
    assert job_id.isdigit()
    try:
        job = wait_for(lambda: next((j for j in scheduler.jobs(name) if j.comment), None))
        assert job.job_id == job_id and job.state is JobState.RUNNING and job.name == name
        assert job.node in scheduler.node_addresses()
        assert job.comment.startswith("endpoint=") and job.comment.endswith(":4242")
        assert job.time_left_s is None or job.time_left_s > 0
    finally:
        scheduler.cancel([job_id])
    ended = wait_for(lambda: next((j for j in scheduler.jobs(name) if j.state.ended), None))
    assert ended.state in (JobState.CANCELLED, JobState.COMPLETING)
    scheduler.cancel([job_id])  # already gone: not an error
    scheduler.cancel(["999999"])


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
