"""The CLI adapter's squeue parser against output captured from real Slurm 22.05.8 (Debian 12),
24.11.5 (Debian 13) and 26.05.5 (sid): tests/replay/capture_squeue.py made it, with one job of each
kind hpcserve meets (running with its endpoint announced, held pending, failed, cancelled)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcserve.core.jobs import JobState
from hpcserve.slurm.cli import parse_squeue_line

REPLAY = Path(__file__).resolve().parent.parent / "replay"
RELEASES = sorted(p.name for p in REPLAY.glob("slurm-*"))


def test_every_slurm_release_of_the_matrix_has_its_answers():
    assert RELEASES == ["slurm-22.05.8", "slurm-24.11.5", "slurm-26.05.5"]


@pytest.fixture(params=RELEASES)
def jobs(request) -> dict:
    folder = REPLAY / request.param
    ids = dict(line.split() for line in (folder / "jobs.txt").read_text().splitlines())
    parsed = {job.job_id: job for job in map(parse_squeue_line, (folder / "squeue.txt").read_text().splitlines())}
    return {kind: parsed[job_id] for kind, job_id in ids.items()}


def test_a_running_job_has_its_node_endpoint_and_time(jobs):
    job = jobs["running"]
    assert job.name == "hpcserve:replay:m" and job.state is JobState.RUNNING and job.state.active
    assert job.node == "gpu1" and job.comment.startswith("endpoint=") and job.comment.endswith(":4242")
    assert job.time_limit_s == 600 and 590 <= job.time_left_s <= 600 and job.reason == "None"
    assert job.submit_time is not None and job.submit_time > 1.7e9


def test_a_held_job_is_pending_with_its_reason_and_no_node_or_comment(jobs):
    job = jobs["pending"]
    assert job.state is JobState.PENDING and job.node is None and job.comment == ""
    assert job.reason == "BeginTime"


def test_ended_jobs_are_ended_with_slurms_reason(jobs):
    assert jobs["failed"].state is JobState.FAILED and jobs["failed"].reason == "NonZeroExitCode"
    assert jobs["cancelled"].state is JobState.CANCELLED and jobs["cancelled"].state.ended
    assert not jobs["failed"].state.active and jobs["failed"].comment == ""
