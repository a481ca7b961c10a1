"""The pure reconcile plan: from desired and observed state to submit/cancel/membership."""

from __future__ import annotations

import dataclasses

import pytest

from hpcserve import config
from hpcserve.core.jobs import Job, JobState
from hpcserve.core.plan import plan, effective_renew_before
from hpcserve.core.pool import Desired, Health, Replica
from hpcserve.control.observe import parse_endpoint
from tests.conftest import minimal

MODELS = ("a", "b")   # the deployment's model names, in its order


@pytest.fixture
def deployment(gguf, tmp_path):
    raw = minimal(gguf, tmp_path)
    raw["models"] = [{"name": "a", "gguf": str(gguf), "parallel": 4}, {"name": "b", "gguf": str(gguf)}]
    return config.parse(raw, base=tmp_path)


def backend(job_id: int, model: str = "a", health: Health = Health.READY, time_left: int | None = 3600) -> Replica:
    state = {Health.PENDING: JobState.PENDING, Health.ENDED: JobState.COMPLETED}.get(health, JobState.RUNNING)
    job = Job(str(job_id), f"hpcserve:t:{model}", state, None if health is Health.PENDING else "gpu1",
              "", 7200, time_left, "None")
    ready_ish = health in (Health.READY, Health.LOADING, Health.UNREACHABLE)
    return Replica(job, model, address="n1" if ready_ish else None, port=5000 + job_id if ready_ish else None,
                   health=health)


def test_up_from_nothing_submits_every_replica():
    p = plan(MODELS, Desired(up=True, replicas={"a": 2, "b": 1}), [])
    assert sorted(p.submit) == ["a", "a", "b"] and p.cancel == () and p.servers == () and p.haproxy_running


def test_reached_state_plans_nothing():
    backends = [backend(1), backend(2), backend(3, "b")]
    p = plan(MODELS, Desired(up=True, replicas={"a": 2, "b": 1}), backends)
    assert p.submit == () and p.cancel == ()
    assert [(s.name, s.id, s.port, s.model) for s in p.servers] == [
        ("job1", 1, 5001, "a"), ("job2", 2, 5002, "a"), ("job3", 3, 5003, "b")]


def test_pending_and_loading_jobs_count_toward_replicas_but_not_membership():
    backends = [backend(1), backend(2, health=Health.PENDING), backend(3, health=Health.LOADING),
                backend(4, health=Health.STARTING)]
    p = plan(MODELS, Desired(up=True, replicas={"a": 4}), backends)
    assert p.submit == () and [s.job_id for s in p.servers] == ["1"]


def test_ended_jobs_are_replaced():
    backends = [backend(1), backend(2, health=Health.ENDED)]
    p = plan(MODELS, Desired(up=True, replicas={"a": 2}), backends)
    assert p.submit == ("a",) and p.cancel == ()


def test_scale_down_cancels_idle_jobs_before_serving_ones():
    backends = [backend(1, time_left=100), backend(2, time_left=5000), backend(3, health=Health.LOADING),
                backend(4, health=Health.PENDING), backend(5, health=Health.PENDING)]
    cancelled = lambda n: [c.job_id for c in plan(MODELS, Desired(up=True, replicas={"a": n}), backends).cancel]
    assert cancelled(4) == ["5"]                      # newest pending first
    assert cancelled(2) == ["5", "4", "3"]            # then what is still loading
    assert cancelled(1) == ["5", "4", "3", "1"]       # then the ready one closest to its time limit
    p = plan(MODELS, Desired(up=True, replicas={"a": 1}), backends)
    assert [s.job_id for s in p.servers] == ["2"]     # cancelled servers leave rotation in the same step


def test_down_cancels_everything_and_stops_haproxy():
    backends = [backend(1), backend(2, "b", Health.PENDING)]
    p = plan(MODELS, Desired(up=False, replicas={"a": 1, "b": 1}), backends)
    assert sorted(c.job_id for c in p.cancel) == ["1", "2"] and p.servers == () and not p.haproxy_running
    assert {c.reason for c in p.cancel} == {"deployment is down"}


def test_jobs_of_a_removed_model_are_cancelled():
    p = plan(MODELS, Desired(up=True, replicas={"a": 0}), [backend(7, "gone")])
    assert [(c.job_id, c.reason) for c in p.cancel] == [("7", "model no longer in the deployment file")]


def test_a_server_in_rotation_survives_one_failed_probe():
    backends = [backend(1, health=Health.UNREACHABLE), backend(2, health=Health.UNREACHABLE)]
    p = plan(MODELS, Desired(up=True, replicas={"a": 2}), backends, in_rotation=frozenset({"1"}))
    assert [s.job_id for s in p.servers] == ["1"] and p.submit == ()


@pytest.mark.parametrize("comment, endpoint", [
    ("endpoint=gpu1:8080", ("gpu1", 8080)), ("x=1 endpoint=10.0.0.5:41234", ("10.0.0.5", 41234)),
    ("", None), ("endpoint=gpu1", None), ("endpoint=gpu1:99999", None), ("myendpoint=a:1", None),
])
def test_parse_endpoint(comment, endpoint):
    assert parse_endpoint(comment) == endpoint


def drain_plan(backends, want, draining=None, sessions=None, now=1000.0, timeout=60.0):
    return plan(MODELS, Desired(up=want is not None, replicas={"a": want or 0}), backends,
                in_rotation=frozenset(b.job.job_id for b in backends if b.health is Health.READY),
                draining=draining or {}, sessions=sessions, now=now, drain_timeout=timeout)


def test_a_serving_job_is_drained_before_it_is_cancelled():
    backends = [backend(1, time_left=100), backend(2)]
    first = drain_plan(backends, 1, sessions={"1": 3, "2": 0})
    assert first.cancel == () and first.draining == {"1": 1060.0}
    assert [(s.job_id, s.draining) for s in first.servers] == [("1", True), ("2", False)]
    assert first.haproxy_running

    busy = drain_plan(backends, 1, draining=first.draining, sessions={"1": 2}, now=1010)
    assert busy.cancel == () and busy.draining == {"1": 1060.0}          # the deadline does not move

    idle = drain_plan(backends, 1, draining=busy.draining, sessions={"1": 0}, now=1020)
    assert [(c.job_id, c.reason) for c in idle.cancel] == [("1", "scaling a to 1, drained")]
    assert [s.job_id for s in idle.servers] == ["2"] and idle.draining == {}

    late = drain_plan(backends, 1, draining=busy.draining, sessions={"1": 5}, now=1060)
    assert [c.reason for c in late.cancel] == ["scaling a to 1, drain deadline passed"]


def test_a_draining_job_stays_the_one_that_leaves():
    """Even when another job now sorts first, the one already draining is the surplus."""
    backends = [backend(1, time_left=5000), backend(2, time_left=100)]
    p = drain_plan(backends, 1, draining={"1": 1060.0}, sessions={"1": 1, "2": 0})
    assert p.draining == {"1": 1060.0} and p.cancel == ()


def test_scaling_back_up_ends_a_drain():
    backends = [backend(1), backend(2)]
    p = drain_plan(backends, 2, draining={"1": 1060.0}, sessions={"1": 1})
    assert p.draining == {} and p.cancel == () and not any(s.draining for s in p.servers)


def test_jobs_that_serve_nobody_are_cancelled_without_drain():
    backends = [backend(1), backend(2, health=Health.LOADING), backend(3, health=Health.PENDING)]
    p = drain_plan(backends, 1)
    assert sorted(c.job_id for c in p.cancel) == ["2", "3"] and p.draining == {}


def test_down_drains_then_stops():
    backends = [backend(1), backend(2)]
    first = drain_plan(backends, None, sessions={"1": 1, "2": 1})
    assert first.haproxy_running and set(first.draining) == {"1", "2"} and first.cancel == ()
    done = drain_plan(backends, None, draining=first.draining, sessions={"1": 0, "2": 0})
    assert not done.haproxy_running and len(done.cancel) == 2 and done.servers == ()


def test_drain_timeout_zero_cancels_at_once():
    """`down --now`."""
    p = drain_plan([backend(1)], None, sessions={"1": 4}, timeout=0)
    assert [c.job_id for c in p.cancel] == ["1"] and not p.haproxy_running


def test_unknown_sessions_keep_a_drain_until_its_deadline():
    backends = [backend(1), backend(2)]
    p = drain_plan(backends, 1, draining={"1": 1060.0}, sessions=None, now=1030)
    assert p.cancel == () and p.draining == {"1": 1060.0}


def test_a_job_near_its_time_limit_is_renewed_without_a_gap():
    old, other = backend(1, time_left=100), backend(2, time_left=5000)
    first = plan(MODELS, Desired(up=True, replicas={"a": 2}), [old, other], in_rotation=frozenset({"1", "2"}),
                 now=0, drain_timeout=60, renew_before=300)
    assert first.submit == ("a",) and first.cancel == () and first.draining == {}   # successor first
    assert {s.job_id for s in first.servers} == {"1", "2"}                           # the old one serves on

    successor_pending = backend(3, health=Health.PENDING)
    waiting = plan(MODELS, Desired(up=True, replicas={"a": 2}), [old, other, successor_pending],
                   in_rotation=frozenset({"1", "2"}), now=10, drain_timeout=60, renew_before=300)
    assert waiting.submit == () and waiting.draining == {} and waiting.cancel == ()

    successor_ready = backend(3)
    handover = plan(MODELS, Desired(up=True, replicas={"a": 2}), [old, other, successor_ready],
                    in_rotation=frozenset({"1", "2", "3"}), sessions={"1": 2}, now=20, drain_timeout=60, renew_before=300)
    assert handover.submit == () and handover.draining == {"1": 80.0}               # now it drains


def test_a_job_warned_by_slurm_is_drained_at_once():
    warned = dataclasses.replace(backend(1), warned=True)
    p = plan(MODELS, Desired(up=True, replicas={"a": 1}), [warned], in_rotation=frozenset({"1"}),
             sessions={"1": 1}, now=0, drain_timeout=60)
    assert p.submit == ("a",) and p.draining == {"1": 60.0}
    assert [s.draining for s in p.servers] == [True]


def test_the_effective_renew_before_is_the_floor_or_what_startups_took():
    assert effective_renew_before(600, []) == 600
    assert effective_renew_before(600, [100, 300]) == 600
    assert effective_renew_before(60, [100, 300]) == 450      # 1.5 x the slowest recent startup


def test_up_says_which_backends_join_later(deployment):
    """`up` returns at one ready backend per model; its summary names the ones still loading."""
    from hpcserve.control.status import still_coming
    desired = Desired(up=True, replicas={"a": 2, "b": 1})
    assert still_coming(deployment, desired, (backend(1), backend(2), backend(3, "b"))) == ""
    tail = still_coming(deployment, desired, (backend(1), backend(2, health=Health.LOADING), backend(3, "b")))
    assert "a 1/2 ready" in tail and "b " not in tail and "hpcserve reconcile" in tail
