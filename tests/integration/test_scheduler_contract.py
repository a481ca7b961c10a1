"""One contract for every Scheduler: the Slurm CLI adapter on the local cluster, and the
workstation launcher's local processes. Each must submit, list (with the announced comment),
cancel idempotently, and never lose a job from the list while it runs."""

from __future__ import annotations

import importlib.util
import time
import uuid
from pathlib import Path

import pytest

from hpcserve.errors import SlurmError
from hpcserve.slurm.local import LocalScheduler
from hpcserve.core.jobs import JobState
from hpcserve.slurm import CLIScheduler, pyslurm_adapter
from hpcserve.slurm.pyslurm_adapter import PyslurmScheduler

SCRIPT = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --mem=100M
#SBATCH --output={out}/job-%j.out
comment="endpoint=$(hostname):4242 gpus=${{CUDA_VISIBLE_DEVICES:-none}}"
scontrol update JobId="$SLURM_JOB_ID" Comment="$comment"
sleep 300
"""


def load_pyslurm(standin: bool):
    """The stand-in (tests/standin/pyslurm.py), or a real pyslurm that matches the cluster's Slurm."""
    if standin:
        spec = importlib.util.spec_from_file_location("pyslurm_standin", Path(__file__).parent.parent / "standin" / "pyslurm.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        import pyslurm
    except ImportError:
        pytest.skip("no pyslurm installed (PyPI has 25.11 only; no Slurm here is 25.11): the stand-in runs instead")
    if pyslurm_adapter.choose(notice=lambda _: None).__class__ is not PyslurmScheduler:
        pytest.skip(f"pyslurm {pyslurm.__version__} does not match this cluster's Slurm")
    return pyslurm


@pytest.fixture(params=["slurm", "local", "pyslurm-standin", "pyslurm"])
def scheduler(request, tmp_path):
    (tmp_path / "logs").mkdir()
    if request.param == "local":
        return LocalScheduler(tmp_path / "local", gpus=[])
    request.getfixturevalue("slurm_env")
    if request.param == "slurm":
        return CLIScheduler()
    return PyslurmScheduler(load_pyslurm(standin=request.param == "pyslurm-standin"))


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_submit_list_cancel(scheduler, tmp_path):
    name = f"hpcserve:contract-{uuid.uuid4().hex[:6]}:m"
    job_id = scheduler.submit(SCRIPT.format(name=name, out=tmp_path / "logs"))
    try:
        job = wait_for(lambda: next((j for j in scheduler.jobs(name) if j.comment), None))
        assert job.job_id == job_id and job.state is JobState.RUNNING and job.name == name
        assert job.comment.startswith("endpoint=") and ":4242 " in job.comment
        assert job.node in scheduler.node_addresses()
        assert scheduler.jobs(name + "-other") == []
    finally:
        scheduler.cancel([job_id])
    ended = wait_for(lambda: next((j for j in scheduler.jobs(name) if j.state.ended), None))
    assert ended.state in (JobState.CANCELLED, JobState.COMPLETING)
    scheduler.cancel([job_id])      # already gone: not an error
    scheduler.cancel(["999999"])


def test_test_submit_accepts_a_good_script(scheduler, tmp_path):
    assert scheduler.test_submit(SCRIPT.format(name="hpcserve:t:m", out=tmp_path / "logs"))


def test_local_hands_out_gpus_one_set_per_backend(tmp_path):
    (tmp_path / "logs").mkdir()
    local = LocalScheduler(tmp_path / "local", gpus=[0, 1])
    ids = [local.submit(SCRIPT.format(name="hpcserve:g:m", out=tmp_path)) for _ in range(2)]
    try:
        comments = wait_for(lambda: [j.comment for j in local.jobs("hpcserve:g:") if j.comment] if all(
            j.comment for j in local.jobs("hpcserve:g:")) else None)
        assert sorted(c.split("gpus=")[1] for c in comments) == ["0", "1"]
        with pytest.raises(SlurmError, match=r"local.gpus: all of \[0, 1\] are in use"):
            local.submit(SCRIPT.format(name="hpcserve:g:m", out=tmp_path))
    finally:
        local.cancel(ids)


def test_pyslurm_is_chosen_only_when_it_matches_the_cluster(slurm_env, monkeypatch):
    standin = load_pyslurm(standin=True)
    monkeypatch.setitem(__import__("sys").modules, "pyslurm", standin)
    assert isinstance(pyslurm_adapter.choose(), PyslurmScheduler)          # same major.minor
    monkeypatch.setattr(standin, "__version__", "25.11.0")
    notices = []
    assert isinstance(pyslurm_adapter.choose(notice=notices.append), CLIScheduler)
    assert notices == [f"hpcserve: pyslurm 25.11.0 does not match Slurm "
                       f"{'.'.join(map(str, pyslurm_adapter.slurm_version()))}; using Slurm's commands"]
