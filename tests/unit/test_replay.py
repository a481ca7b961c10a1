"""hpcserve's readers of HAProxy's runtime API against answers captured from real HAProxy 2.6.12
(Debian 12), 3.0.11 (Debian 13) and 3.2.26 (sid): tests/replay/capture_haproxy.py made them, with
two servers of maxconn 1, three requests (one queued), job2 in drain and one reload whose old
worker still holds its streams, and what that old worker answers to changes of its servers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hpcserve.core.membership import worker_claim
from hpcserve.errors import HAProxyError
from hpcserve.haproxy.runtime import parse_proc, parse_servers_state, parse_stat, parse_worker_stats

REPLAY = Path(__file__).resolve().parent.parent / "replay"
RELEASES = sorted(p.name for p in REPLAY.glob("haproxy-*"))


def test_every_release_of_the_matrix_has_its_answers():
    assert RELEASES == ["haproxy-2.6.12", "haproxy-3.0.11", "haproxy-3.2.26"]


@pytest.fixture(params=RELEASES)
def answers(request) -> dict[str, str]:
    return {p.stem: p.read_text() for p in (REPLAY / request.param).glob("*.txt")}


def test_show_proc_names_the_current_and_the_old_worker(answers):
    text = answers["show-proc"]
    info = parse_proc(text)
    pids = [int(m) for m in re.findall(r"^(\d+)\s+worker", text, re.MULTILINE)]
    assert (info.reloads, info.failed_reloads) == (1, 0)
    assert len(info.workers) == len(info.old_workers) == 1 and sorted(info.workers + info.old_workers) == sorted(pids)


def test_the_old_workers_show_stat_has_its_streams_and_its_queue(answers):
    worker = parse_worker_stats(7, answers["show-stat-old-worker"])
    servers = {s.server: s for s in worker.servers}
    backend = worker.backends["model_m"]
    assert servers == {s.server: s for s in parse_stat(answers["show-stat-old-worker"])}
    assert set(servers) == {"job1", "job2"} and backend.queued == 1
    assert [(s.sessions, s.limit) for s in servers.values()] == [(1, 1), (1, 1)]
    assert servers["job2"].status == "DRAIN" and servers["job1"].weight == 1
    connections = worker.connections
    assert connections >= 3     # the clients of its 2 streams and its queued request
    # An old worker with a queue refills its slots: it claims all of them (core.membership).
    assert worker_claim(servers["job1"].limit, servers["job1"].sessions, old=True, queued=backend.queued,
                        connections=connections) == 1


@pytest.mark.parametrize("cut", ["", "\n", "middle", "no blank line"])
def test_a_cut_or_empty_worker_answer_is_an_error_not_a_worker_holding_nothing(answers, cut):
    """Read as "no row", a cut answer would hand the old worker's slots to the new one."""
    text = answers["show-stat-old-worker"]
    text = {"middle": text[:len(text) // 2], "no blank line": text.rstrip("\n") + "\n"}.get(cut, cut)
    with pytest.raises(HAProxyError, match="worker 7"):
        parse_worker_stats(7, text)


def test_a_worker_gone_since_show_proc_holds_nothing():
    worker = parse_worker_stats(7, "Can't find the target PID matching the prefix '@!7'\n")
    assert (worker.servers, worker.backends, worker.connections) == ([], {}, 0)


def test_a_stopping_worker_refuses_every_change_of_its_servers(answers):
    """Why hpcserve sends no drain or maxconn to old workers (core.membership.MembershipChange):
    a release that starts accepting them fails here, and the drain of old workers is worth
    adding back."""
    lines = answers["old-worker-set-server"].strip().split("\n\n")
    assert [line.split("\n")[0] for line in lines] == ["set server model_m/job1 state drain",
                                                     "set maxconn server model_m/job1 2"]
    assert all(line.split("\n")[1] == "Proxy is disabled." for line in lines)


def test_the_new_worker_starts_with_no_session(answers):
    servers = parse_stat(answers["show-stat"])
    assert {s.server for s in servers} == {"job1", "job2"} and all(s.sessions == 0 for s in servers)


def test_show_servers_state_gives_address_port_and_drain(answers):
    live = {s.name: s for s in parse_servers_state(answers["show-servers-state"])}
    assert set(live) == {"job1", "job2"} and {s.backend for s in live.values()} == {"model_m"}
    assert live["job2"].draining and not live["job1"].draining
    assert not any(s.down or s.in_maintenance for s in live.values())
    assert live["job1"].address == "127.0.0.1" and live["job1"].port == live["job2"].port > 0
