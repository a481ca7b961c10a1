"""Translating what Slurm's commands print (squeue(1), Slurm 22.05)."""

from __future__ import annotations

import logging
import time

import pytest

from hpcserve.errors import SlurmError
from hpcserve.core.jobs import JobState
from hpcserve.slurm.cli import SEP, first_node, parse_duration, parse_squeue_line
from hpcserve.slurm.states import parse_state


@pytest.mark.parametrize("text, state", [
    ("RUNNING", JobState.RUNNING), ("PENDING", JobState.PENDING), ("R", JobState.RUNNING),
    ("PD", JobState.PENDING), ("CG", JobState.COMPLETING), ("CANCELLED by 0", JobState.CANCELLED),
    ("OUT_OF_MEMORY", JobState.OUT_OF_MEMORY), ("NF", JobState.NODE_FAIL), ("cancelled+", JobState.CANCELLED),
])
def test_states(text, state):
    assert parse_state(text) is state


def test_unknown_state_is_unknown_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_state("LAUNCH_FAILED_NEW_IN_99") is JobState.UNKNOWN
    assert "unknown Slurm job state" in caplog.text


def test_active_and_ended():
    assert JobState.PENDING.active and JobState.RUNNING.active and not JobState.RUNNING.ended
    assert JobState.COMPLETING.ended and JobState.TIMEOUT.ended and not JobState.TIMEOUT.active
    assert not JobState.UNKNOWN.active and not JobState.UNKNOWN.ended


def line(*fields: str) -> str:
    return SEP.join(fields)


def test_running_job_line():
    job = parse_squeue_line(line("42", "hpcserve:d:m", "RUNNING", "gpu[3-4]", "endpoint=n3:4000",
                                 "1-00:00:00", "23:59:30", "None", "2026-11-21T17:30:01"))
    assert (job.job_id, job.name, job.state, job.node, job.comment) == ("42", "hpcserve:d:m", JobState.RUNNING, "gpu3", "endpoint=n3:4000")
    assert job.time_limit_s == 86400 and job.time_left_s == 23 * 3600 + 59 * 60 + 30
    assert job.submit_time == time.mktime((2026, 11, 21, 17, 30, 1, 0, 0, -1))


def test_pending_job_line_has_no_node_and_no_comment():
    job = parse_squeue_line(line("43", "hpcserve:d:m", "PENDING", "", "(null)", "UNLIMITED", "UNLIMITED", "Resources", "N/A"))
    assert job.node is None and job.comment == "" and job.time_limit_s is None and job.reason == "Resources"


def test_a_line_with_the_wrong_field_count_is_an_error():
    with pytest.raises(SlurmError, match="fields where 9 were expected"):
        parse_squeue_line(line("43", "name", "PENDING"))


def test_a_missing_submit_time_is_none():
    assert parse_squeue_line(line("43", "n", "PENDING", "", "", "", "", "", "N/A")).submit_time is None


@pytest.mark.parametrize("text, seconds", [
    ("5:00", 300), ("1:00:00", 3600), ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5), ("0:07", 7),
    ("UNLIMITED", None), ("INVALID", None), ("NOT_SET", None), ("", None),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("nodes, first", [("gpu1", "gpu1"), ("gpu[3-4,7]", "gpu3"), ("a,b", "a"), ("n[010-012]", "n010")])
def test_first_node(nodes, first):
    assert first_node(nodes) == first
