"""The promises of one reconcile step (reconcile.py's module docstring), checked with a fake
scheduler and a recording HAProxy: the order of the apply, and that a failure at each point leaves
jobs, HAProxy and the state files as they were. (The same step against real Slurm and HAProxy:
tests/integration and tests/e2e.)"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest

from hpcserve import config
from hpcserve.core.jobs import Job, JobState
from hpcserve.core.pool import Desired, Server
from hpcserve.errors import HAProxyError, HpcserveError, SlurmError, TemplateError, WaitTimeout
from hpcserve.control.reconcile import Reconciler
from hpcserve.slurm import Scheduler
from hpcserve.state import StateDir, StepRecord
from tests.conftest import minimal


class _Health(http.server.BaseHTTPRequestHandler):
    """/health 200; /props as a llama-server with the deployment's defaults (4 slots, 4096 tokens
    of context) answers it: 401 without a key."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/props":
            keyed = self.headers.get("Authorization", "").startswith("Bearer ")
            body = json.dumps({"total_slots": 4, "default_generation_settings": {"n_ctx": 1024},
                               "build_info": "b11434-test"}).encode()
            self.send_response(200 if keyed else 401)
            self.end_headers()
            self.wfile.write(body if keyed else b"{}")
            return
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_port() -> Iterator[int]:
    """A port where GET /health answers 200, as a loaded llama-server does."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


class FakeScheduler(Scheduler):
    """Slurm as a list of jobs; every change is appended to `log` with whether the desired state
    was already persisted at that moment."""

    def __init__(self, log: list, state: StateDir, jobs: list[Job] | None = None):
        self.log, self.state, self.listed = log, state, list(jobs or [])
        self.fail = self.cancel_fails = False

    def _record(self, *event) -> None:
        self.log.append((*event, self.state.desired_file.exists()))

    def submit(self, script: str) -> str:
        name = next(line.split("=", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH --job-name="))
        job_id = str(100 + len(self.listed))
        self.listed.append(Job(job_id, name.strip("'"), JobState.PENDING, None, "", 3600, None, "Priority"))
        self._record("submit", name.strip("'").rsplit(":", 1)[1])
        return job_id

    def test_submit(self, script: str) -> str:
        return "ok"

    def jobs(self, name_prefix: str) -> list[Job]:
        if self.fail:
            raise SlurmError("squeue exited 1: slurm_load_jobs error: Unable to contact slurm controller")
        return [j for j in self.listed if j.name.startswith(name_prefix)]

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids and self.cancel_fails:
            raise SlurmError("scancel exited 1: Unable to contact slurm controller")
        if job_ids:
            self._record("cancel", tuple(job_ids))

    def node_addresses(self) -> dict[str, str]:
        return {}


class RecordingHAProxy:
    """HAProxy as the reconcile step sees it; `sessions` is what `show stat` would say."""

    def __init__(self, log: list, state: StateDir):
        self.log, self.state = log, state
        self.is_running, self.fail, self.sessions = False, False, {}

    def __call__(self, deployment: config.Deployment, key: str) -> RecordingHAProxy:
        return self

    def server_sessions(self) -> dict[str, int]:
        return dict(self.sessions)

    def running(self) -> bool:
        return self.is_running

    def update(self, servers: list[Server]) -> str:
        if self.fail:
            raise HAProxyError("haproxy -c refused the new config")
        self.log.append(("haproxy", tuple((s.job_id, s.draining) for s in servers), self.state.desired_file.exists()))
        change, self.is_running = ("reloaded" if self.is_running else "started"), True
        return change

    def stop(self) -> None:
        self.log.append(("haproxy stop", (), self.state.desired_file.exists()))
        self.is_running = False


def ready_job(job_id: str, model: str, port: int, time_left: int = 3600) -> Job:
    return Job(job_id, f"hpcserve:t:{model}", JobState.RUNNING, None, f"endpoint=127.0.0.1:{port}",
               7200, time_left, "None", submit_time=time.time() - 60)


@pytest.fixture
def pool(gguf, tmp_path):
    """(reconciler, scheduler, haproxy, log) for a deployment of models a and b."""
    def make(jobs: list[Job], model_b: dict | None = None,
             **overrides) -> tuple[Reconciler, FakeScheduler, RecordingHAProxy, list]:
        raw = minimal(gguf, tmp_path, **overrides)
        raw["models"] = [{"name": "a", "gguf": str(gguf)}, {"name": "b", "gguf": str(gguf), **(model_b or {})}]
        deployment = config.parse(raw, base=tmp_path)
        log: list = []
        state = StateDir(deployment.state_dir)
        scheduler, haproxy = FakeScheduler(log, state, jobs), RecordingHAProxy(log, state)
        return Reconciler(deployment, scheduler, haproxy=haproxy), scheduler, haproxy, log
    return make


def test_haproxy_changes_first_then_jobs_are_cancelled_then_submitted_then_the_state_is_kept(pool, health_port):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port), ready_job("2", "a", health_port)])
    outcome = reconciler.step(Desired(up=True, replicas={"a": 1, "b": 1}), drain_timeout=0)
    assert [event[0] for event in log] == ["haproxy", "cancel", "submit"]
    assert log[0][1] == (("2", False),) and log[1][1] == ("1",) and log[2][1] == "b"
    assert not any(persisted for *_, persisted in log)            # the desired state is written last
    assert reconciler.state.read_desired() == Desired(up=True, replicas={"a": 1, "b": 1})
    assert outcome.submitted == (("b", "102"),) and reconciler.in_rotation() == frozenset({"2"})


def test_a_repeated_step_changes_nothing(pool, health_port):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port)])
    reconciler.step(Desired(up=True, replicas={"a": 1}))
    del log[:]
    outcome = reconciler.step(Desired(up=True, replicas={"a": 1}))
    assert [event[0] for event in log] == ["haproxy"] and outcome.plan.submit == () and outcome.plan.cancel == ()


def test_when_squeue_fails_nothing_is_changed(pool, health_port):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port)])
    reconciler.step(Desired(up=True, replicas={"a": 1}))
    before = (reconciler.state.desired_file.read_text(), reconciler.in_rotation())
    del log[:]
    scheduler.fail = True
    with pytest.raises(SlurmError):
        reconciler.step(Desired(up=True, replicas={"a": 0}), drain_timeout=0)
    assert log == [] and haproxy.is_running
    assert (reconciler.state.desired_file.read_text(), reconciler.in_rotation()) == before


def test_when_haproxy_refuses_its_config_no_job_is_touched(pool, health_port):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port), ready_job("2", "a", health_port)])
    haproxy.fail = True
    with pytest.raises(HAProxyError):
        reconciler.step(Desired(up=True, replicas={"a": 1, "b": 1}), drain_timeout=0)
    assert log == [] and not reconciler.state.desired_file.exists()


def test_a_broken_template_stops_the_step_before_anything_changes(pool, health_port, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "llama-server.sbatch.j2").write_text("#!/bin/bash\n{{ model.no_such_field.x }}\n")
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port), ready_job("2", "a", health_port)],
                                               templates_dir=str(site))
    with pytest.raises(TemplateError, match="llama-server.sbatch.j2:2"):
        reconciler.step(Desired(up=True, replicas={"a": 1, "b": 1}), drain_timeout=0)
    assert log == [] and not haproxy.is_running and not reconciler.state.desired_file.exists()


def test_a_serving_surplus_drains_before_it_is_cancelled(pool, health_port):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port, time_left=1000),
                                                ready_job("2", "a", health_port)])
    reconciler.step(Desired(up=True, replicas={"a": 2}))
    del log[:]
    haproxy.sessions = {"1": 3, "2": 1}
    reconciler.step(Desired(up=True, replicas={"a": 1}), drain_timeout=60)
    assert log == [("haproxy", (("1", True), ("2", False)), True)]     # drained: weight 0, no scancel
    del log[:]
    haproxy.sessions = {"1": 0, "2": 1}
    reconciler.step(Desired(up=True, replicas={"a": 1}), drain_timeout=60)
    assert [e[:2] for e in log] == [("haproxy", (("2", False),)), ("cancel", ("1",))]


def test_down_stops_haproxy_and_cancels_every_job(pool, health_port):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port)])
    reconciler.step(Desired(up=True, replicas={"a": 1}))
    del log[:]
    reconciler.step(Desired(up=False, replicas={"a": 1}), drain_timeout=0)
    assert [e[:2] for e in log] == [("haproxy stop", ()), ("cancel", ("1",))] and not haproxy.is_running
    assert reconciler.in_rotation() == frozenset()


def test_the_step_record_is_written_when_haproxy_changes_and_at_the_end_and_not_when_nothing_changed(
        pool, health_port, monkeypatch):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port), ready_job("2", "a", health_port)])
    writes: list[tuple[StepRecord, int]] = []
    original = StateDir.write_step
    monkeypatch.setattr(StateDir, "write_step",
                        lambda self, record: (writes.append((record, len(log))), original(self, record)))
    reconciler.step(Desired(up=True, replicas={"a": 2, "b": 1}))
    # Membership on disk right after the HAProxy change, before sbatch; the rest once at the end.
    assert [(r.in_rotation, n) for r, n in writes] == [(frozenset({"1", "2"}), 1), (frozenset({"1", "2"}), 2)]
    assert not writes[0][0].startups.get("jobs") and writes[1][0].startups["jobs"] == ["1", "2"]
    del writes[:]
    reconciler.step(Desired(up=True, replicas={"a": 2, "b": 1}))
    assert writes == []                                                  # nothing new: no write
    assert reconciler.state.read_step().in_rotation == frozenset({"1", "2"})


def test_when_scancel_fails_the_record_still_names_the_servers_haproxy_has(pool, health_port):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port), ready_job("2", "a", health_port)])
    reconciler.step(Desired(up=True, replicas={"a": 2}))
    scheduler.cancel_fails = True
    with pytest.raises(SlurmError, match="scancel"):
        reconciler.step(Desired(up=True, replicas={"a": 1}), drain_timeout=0)
    record = reconciler.state.read_step()
    assert record.in_rotation == frozenset({"2"}) == {job for job, _ in log[-1][1]}   # HAProxy lost job 1
    assert reconciler.state.read_desired() == Desired(up=True, replicas={"a": 2})     # not applied in full
    scheduler.cancel_fails = False
    reconciler.step(Desired(up=True, replicas={"a": 1}), drain_timeout=0)
    assert log[-1][:2] == ("cancel", ("1",))


def test_the_older_per_item_records_are_read_once_and_replaced(pool, health_port):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port), ready_job("2", "a", health_port)])
    root = reconciler.state.root
    root.mkdir(parents=True, exist_ok=True)
    (root / "servers.json").write_text('["1", "2"]\n')
    (root / "draining.json").write_text('{"2": 4102444800.0}\n')
    (root / "startups.json").write_text('{"jobs": ["1"], "seconds": [30.0]}\n')
    assert reconciler.state.read_step() == StepRecord(frozenset({"1", "2"}), {"2": 4102444800.0},
                                                      {"jobs": ["1"], "seconds": [30.0]})
    haproxy.is_running, haproxy.sessions = True, {"2": 1}
    reconciler.step(Desired(up=True, replicas={"a": 1}), drain_timeout=60)
    assert log[-1][:2] == ("haproxy", (("1", False), ("2", True)))     # job 2 still drains, as recorded
    assert sorted(p.name for p in root.glob("*.json")) == ["desired.json", "step.json"]
    (root / "step.json").write_text("[1, 2]")
    with pytest.raises(HpcserveError, match="step.json: unreadable"):
        reconciler.step(Desired(up=True, replicas={"a": 1}))


# --- the waits built on Reconciler.run_until ------------------------------------------------------

def test_wait_ready_steps_until_the_new_job_is_ready(pool, health_port, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    reconciler, scheduler, haproxy, log = pool([])
    outcome = reconciler.locked_step(lambda _d: Desired(up=True, replicas={"a": 1}))
    lines: list[str] = []
    steps = [0]
    original = scheduler.jobs

    def jobs(prefix: str) -> list[Job]:     # the job starts and announces its endpoint at the 3rd step
        steps[0] += 1
        if steps[0] == 3:
            scheduler.listed[0] = ready_job(scheduler.listed[0].job_id, "a", health_port)
        return original(prefix)

    scheduler.jobs = jobs
    done = reconciler.wait_ready({"a": 1}, outcome, timeout=60, on_progress=lines.append)
    assert [b.health.value for b in done.replicas] == ["ready"] and steps[0] == 3
    assert lines[0] == "a 0/1 ready (no job)"          # what the first step saw, before its submit
    assert lines[1:] and all(line == "a 0/1 ready (1 pending)" for line in lines[1:])
    assert [event[0] for event in log].count("submit") == 1          # waiting submits nothing more


def test_wait_ready_ends_when_a_submitted_job_failed(pool, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    reconciler, scheduler, haproxy, log = pool([])
    outcome = reconciler.locked_step(lambda _d: Desired(up=True, replicas={"a": 1}))
    job = scheduler.listed[0]
    scheduler.listed[0] = Job(job.job_id, job.name, JobState.FAILED, "n1", "", 3600, None, "NonZeroExitCode")
    with pytest.raises(HpcserveError, match=f"job {job.job_id} \\(a\\) ended FAILED before it was ready"):
        reconciler.wait_ready({"a": 1}, outcome, timeout=60)


def test_wait_ready_times_out_naming_the_progress(pool):
    reconciler, scheduler, haproxy, log = pool([])
    outcome = reconciler.locked_step(lambda _d: Desired(up=True, replicas={"a": 1}))
    with pytest.raises(WaitTimeout, match=r"no ready replica within 0.01 s \(a 0/1 ready \(1 pending\)\)"):
        reconciler.wait_ready({"a": 1}, outcome, timeout=0.01)


def test_finish_drains_steps_until_the_draining_server_is_cancelled(pool, health_port, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port), ready_job("2", "a", health_port)])
    reconciler.step(Desired(up=True, replicas={"a": 2}))
    haproxy.sessions = {"1": 1, "2": 1}
    outcome = reconciler.step(Desired(up=True, replicas={"a": 1}), drain_timeout=600)
    [leaving] = outcome.plan.draining
    assert not outcome.plan.cancel
    progress: list[str] = []

    def idle_after_two(line: str) -> None:
        progress.append(line)
        if len(progress) == 2:
            haproxy.sessions = {"1": 1, "2": 1, leaving: 0}

    done = reconciler.finish_drains(outcome, drain_timeout=600, on_progress=idle_after_two)
    assert not done.plan.draining and [c.job_id for c in done.plan.cancel] == [leaving]
    assert len(progress) == 2 and progress[0].startswith(f"job {leaving} (1 session(s), ")


def test_wait_ended_names_the_jobs_still_ending(pool):
    reconciler, scheduler, haproxy, log = pool([Job("7", "hpcserve:t:a", JobState.RUNNING, "n1", "", 60, 0, "None")])
    with pytest.raises(WaitTimeout, match="1 job\\(s\\) still ending after 0.01 s: 7"):
        reconciler.wait_ended(0.01)
    scheduler.listed = [Job("7", "hpcserve:t:a", JobState.CANCELLED, "n1", "", 60, 0, "None")]
    reconciler.wait_ended(0.01)


def test_a_step_reports_each_change(pool, health_port):
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port)])
    lines: list[str] = []
    reconciler._report = lines.append
    reconciler.step(Desired(up=True, replicas={"a": 1, "b": 1}))
    assert lines == ["submitted job 101 for model b", "HAProxy started: 1 server(s) in rotation"]


def test_a_server_whose_props_disagree_is_kept_out_and_up_says_why(pool, health_port, monkeypatch):
    """The fake llama-server reports 4 slots; model b asks for 2: its job answers /health but never
    enters HAProxy (no churn: nothing more is submitted), the wait names the field, and the
    admitted server of model a keeps its build in the step record."""
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    reconciler, scheduler, haproxy, log = pool([ready_job("1", "a", health_port), ready_job("2", "b", health_port)],
                                               model_b={"parallel": 2})
    outcome = reconciler.step(Desired(up=True, replicas={"a": 1, "b": 1}))
    health = {b.job.job_id: (b.health.value, b.refusal) for b in outcome.replicas}
    assert health["1"] == ("ready", None)
    assert health["2"][0] == "refused" and "4 slots (/props total_slots)" in health["2"][1]
    assert outcome.plan.submit == () and reconciler.in_rotation() == frozenset({"1"})
    assert reconciler.state.read_step().builds == {"1": "b11434"}
    # A job whose server is refused counts as one of the replicas (no resubmission) and ends `up`'s wait.
    outcome = reconciler.locked_step(lambda d: Desired(up=True, replicas={"a": 1, "b": 2}))
    with pytest.raises(HpcserveError, match=r"job 102 \(b\) is not put in rotation: .*parallel: 2"):
        scheduler.listed[-1] = ready_job("102", "b", health_port)
        reconciler.wait_ready({"b": 2}, outcome, timeout=60)
    assert reconciler.in_rotation() == frozenset({"1"})
