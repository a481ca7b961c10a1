"""Prompt-cache affinity with the real HAProxy and two simulated llama-servers (no Slurm)."""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from hpcserve.haproxy import runtime
from hpcserve.core.pool import Server
from tests.conftest import free_port, haproxy_for, minimal, simulator

pytestmark = pytest.mark.haproxy
HEADER = "X-OpenWebUI-Chat-Id"


@contextlib.contextmanager
def affinity_pool(tmp_path, gguf, slots: int, servers: int = 2, token_rate: float = 50):
    """HAProxy with affinity on (affinity_max_queue 1) over `servers` simulators of `slots` slots;
    yields (the proxy, the chat completions URL) once every server is UP."""
    with contextlib.ExitStack() as sims:
        pool = [Server("m", str(i), "127.0.0.1",
                       sims.enter_context(simulator(tmp_path / f"sim{i}.log", slots, token_rate=token_rate, key="k")))
                for i in range(1, servers + 1)]
        raw = minimal(gguf, tmp_path, haproxy={"port": free_port(), "stats_port": free_port(),
                                               "affinity_header": HEADER, "affinity_max_queue": 1})
        raw["models"][0]["parallel"] = slots
        proxy = haproxy_for(raw, tmp_path)
        proxy.update(pool)
        deadline = time.monotonic() + 20
        while sum(s.status.startswith("UP") for s in runtime.show_stat(proxy.paths.admin_socket)) < servers:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield proxy, f"http://127.0.0.1:{proxy.deployment.haproxy.port}/v1/chat/completions"
        proxy.stop(timeout=5)


@pytest.fixture
def pool(request, haproxy_bin, gguf, tmp_path):
    with affinity_pool(tmp_path, gguf, slots=getattr(request, "param", 2)) as running:
        yield running


def served(proxy) -> dict[str, int]:
    return {s.server: s.total for s in runtime.show_stat(proxy.paths.admin_socket)}


def chat(url: str, conversation: str | None, tokens: int = 2) -> None:
    headers = {HEADER: conversation} if conversation else {}
    response = httpx.post(url, headers=headers, timeout=60, json={"model": "m", "max_tokens": tokens,
                                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200


@pytest.mark.parametrize("pool", [8], indirect=True)   # slots enough that no turn has to wait
def test_a_conversation_stays_on_its_server_and_conversations_spread(pool):
    proxy, url = pool
    with ThreadPoolExecutor(8) as executor:   # 8 conversations at once, 5 turns each
        list(executor.map(lambda c: [chat(url, f"conv-{c}") for _ in range(5)], range(8)))
    table = runtime.command(proxy.paths.admin_socket, "show table model_m")
    owners = dict(re.findall(r"key=(conv-\d+) .*server_key=(job\d+)", table))
    assert len(owners) == 8 and set(owners.values()) == {"job1", "job2"}   # spread over both
    # every later turn went where the first did: the per-server totals match the owners
    expected = collections.Counter(owners.values())
    assert served(proxy) == {name: 5 * n for name, n in expected.items()}


def test_one_busy_conversation_cannot_overload_its_server(pool):
    """20 requests of one conversation at once: once one waits in its server's queue the next go to the other server."""
    proxy, url = pool
    with ThreadPoolExecutor(20) as executor:
        list(executor.map(lambda _: chat(url, "hot", tokens=20), range(20)))
    assert all(n >= 4 for n in served(proxy).values()), served(proxy)


def test_while_servers_are_full_no_request_is_refused(haproxy_bin, gguf, tmp_path):
    """24 clients sending at once to 4 servers of 1 slot (1-token answers), 6 of them in 3
    conversations, for 20 s (~5,000 requests): every request is answered 200.

    With the bound as the servers' maxqueue 1 (before), two requests could pick the same full
    server at once (leastconn takes a server while served + queue < maxconn + maxqueue) and the
    second found its queue full: HAProxy refuses a request not sent there by the stick table (503
    "SQ", backend.c srv_redispatch_connect). Measured on HAProxy 2.6 with that config: this test
    failed with 2 such 503s of 16,963 requests in 60 s (and two 40 s runs of like loads had 2
    each), so it catches the bug most times, not every time; with the bound as a condition on the stick
    rule, none. Seen first as 1 in ~4,100 requests of the 200-stream e2e test. 20 s (40 s until
    2026-12-07, to keep .ci/run's time) still sends more requests than the one in ~4,100 that first
    showed the fault; the stress harness runs the long version of such loads.
    """
    statuses: collections.Counter[int] = collections.Counter()
    with affinity_pool(tmp_path, gguf, slots=1, servers=4, token_rate=2000) as (proxy, url):
        deadline = time.monotonic() + 20

        def loop(conversation: str | None) -> None:
            with httpx.Client(timeout=60) as client:
                while time.monotonic() < deadline:
                    response = client.post(url, headers={HEADER: conversation} if conversation else {},
                                           json={"model": "m", "max_tokens": 1,
                                                 "messages": [{"role": "user", "content": "hi"}]})
                    statuses[response.status_code] += 1

        loops = [None] * 18 + [f"conv-{c % 3}" for c in range(6)]
        with ThreadPoolExecutor(len(loops)) as executor:
            list(executor.map(loop, loops))
        stat = list(csv.DictReader(runtime.command(proxy.paths.admin_socket, "show stat").lstrip("# ").splitlines()))
    assert set(statuses) == {200}, statuses
    # the servers' own queues held requests (the conversations'), beside the backend's
    assert max(int(row["qmax"]) for row in stat if row["svname"].startswith("job")) >= 1


def test_a_leaving_server_takes_no_request_of_its_conversations(pool):
    """A drained server would still take sticky requests (HAProxy manual, `set server state`):
    with affinity a leaving server gets weight 0 and loses its stick-table entries, so its
    conversations move to another server while the stream it serves ends normally."""
    proxy, url = pool
    chat(url, "c")
    table = runtime.command(proxy.paths.admin_socket, "show table model_m")
    owner = re.search(r"key=c .*server_key=(job\d+)", table).group(1)
    with ThreadPoolExecutor(1) as executor:
        streaming = executor.submit(chat, url, "c", 100)   # 2 s at 50 tokens/s, on the owner
        time.sleep(0.5)
        servers = [Server("m", "1", *_address(proxy, "job1")), Server("m", "2", *_address(proxy, "job2"))]
        leaving = [dataclasses.replace(s, draining=s.name == owner) for s in servers]
        assert proxy.update(leaving) == "runtime"
        before = served(proxy)
        for _ in range(3):
            chat(url, "c")
        streaming.result()   # the stream in flight on the leaving server completed (200)
    after = served(proxy)
    assert after[owner] == before[owner] and sum(after.values()) == sum(before.values()) + 3, (before, after)
    live = next(s for s in runtime.show_servers(proxy.paths.admin_socket) if s.name == owner)
    assert live.weight == 0 and not live.in_maintenance and not live.draining
    assert runtime.show_map(proxy.paths.admin_socket, proxy.paths.leaving_map_file) == {f"model_m/{owner}": "1"}
    assert proxy.paths.leaving_map_file.read_text() == f"model_m/{owner} 1\n"     # for a new worker
    # Back in the pool (a scale-up while it was leaving): its weight back, new conversations reach it.
    assert proxy.update(servers) == "runtime"
    assert all(s.weight == 1 and not s.in_maintenance for s in runtime.show_servers(proxy.paths.admin_socket))
    assert runtime.show_map(proxy.paths.admin_socket, proxy.paths.leaving_map_file) == {}
    assert proxy.update(servers) == "unchanged"
    with ThreadPoolExecutor(4) as executor:
        list(executor.map(lambda c: chat(url, f"new-{c}", 20), range(4)))
    assert served(proxy)[owner] > after[owner]


def _address(proxy, name: str) -> tuple[str, int]:
    live = next(s for s in runtime.show_servers(proxy.paths.admin_socket) if s.name == name)
    return live.address, live.port
