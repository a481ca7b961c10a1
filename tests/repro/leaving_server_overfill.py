"""Reproduces the overfill of a leaving server on HAProxy 3.0.11 (docs/testing.md, "Exact under
stress"); not a test.

Two simulated llama-servers of 4 slots at 20 tokens/s, 24 streaming clients each with its own
conversation (30-token answers) stuck to a server by a stick table, so that requests wait in each
server's own queue; after 3 s server 2 leaves. It prints the peaks of server 2 from inside the
simulator (max_waiting 1: a request over its slots) and HAProxy's own sessions on it (scur over its
maxconn 4).

    .venv/bin/python tests/repro/leaving_server_overfill.py [RUNS] [MODE]
    scripts/release-root.sh shell trixie /opt/hpcserve-venv/bin/python tests/repro/leaving_server_overfill.py 3 maint

MODE: "hpcserve" (default: hpcserve's config and HAProxy.update, which leaves by weight 0 and the
leaving map), or "maint" / "drain" / "weight": the minimal config tests/repro/maint_overfill.cfg
(no hpcserve in the path) and one runtime command `set server b/s2 state maint|drain` or
`weight 0`.

Measured 2026-12-07: HAProxy 3.0.11 (Debian 13 root): maint and drain overfill in every run (scur 5
within 4 ms of the command, with one request in s2's queue); weight 0: none; hpcserve: none in 4
of 4 runs (before 2026-12-07 it sent `state maint`: 3 of 3). HAProxy 2.6.12 (host): none with maint,
none with hpcserve.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpcserve.core.pool import Server  # noqa: E402
from hpcserve.haproxy import runtime  # noqa: E402
from tests.conftest import free_port, simulator  # noqa: E402
from tests.integration.test_affinity import HEADER, _address, affinity_pool  # noqa: E402

CONFIG = Path(__file__).with_name("maint_overfill.cfg")


def load(url: str, header: str, clients: int = 24, seconds: float = 8) -> list[threading.Thread]:
    """`clients` threads, each sending its conversation's streamed chats for `seconds`."""
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < stop:
                client.post(url, headers={header: f"conv-{i}"}, json={
                    "model": "m", "max_tokens": 30, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    return threads


def watch(socket: Path, server: str, seconds: float) -> int:
    """HAProxy's highest sessions (scur) on `server` over `seconds`, sampled every few ms."""
    peak, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max([peak] + [s.sessions for s in runtime.show_stat(socket) if s.server == server])
    return peak


def run_hpcserve() -> tuple[dict, int]:
    tmp = Path(tempfile.mkdtemp(dir="/tmp"))
    gguf = tmp / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with affinity_pool(tmp, gguf, slots=4, servers=2, token_rate=20) as (proxy, url):
        threads = load(url, HEADER)
        time.sleep(3)
        servers = [Server("m", "1", *_address(proxy, "job1")), Server("m", "2", *_address(proxy, "job2"))]
        stats = f"http://127.0.0.1:{servers[1].port}/sim/stats"
        httpx.get(stats, params={"reset": 1})
        proxy.update([dataclasses.replace(s, draining=s.name == "job2") for s in servers])
        scur = watch(proxy.paths.admin_socket, "job2", 2)
        for t in threads:
            t.join()
        return httpx.get(stats).json(), scur


def run_minimal(command: str) -> tuple[dict, int]:
    tmp = Path(tempfile.mkdtemp(dir="/tmp"))
    with simulator(tmp / "s1.log", 4, 20, "") as port1, simulator(tmp / "s2.log", 4, 20, "") as port2:
        port, socket = free_port(), tmp / "admin.sock"
        (tmp / "haproxy.cfg").write_text(CONFIG.read_text().format(socket=socket, port=port, port1=port1, port2=port2))
        haproxy = subprocess.Popen(["haproxy", "-f", str(tmp / "haproxy.cfg")])
        try:
            while not socket.exists():
                time.sleep(0.05)
            threads = load(f"http://127.0.0.1:{port}/v1/chat/completions", "X-Conversation")
            time.sleep(3)
            stats = f"http://127.0.0.1:{port2}/sim/stats"
            httpx.get(stats, params={"reset": 1})
            runtime.command(socket, f"set server b/s2 {command}")
            scur = watch(socket, "s2", 2)
            for t in threads:
                t.join()
            return httpx.get(stats).json(), scur
        finally:
            haproxy.terminate()
            haproxy.wait(10)


if __name__ == "__main__":
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    mode = sys.argv[2] if len(sys.argv) > 2 else "hpcserve"
    for n in range(runs):
        if mode == "hpcserve":
            peaks, scur = run_hpcserve()
        else:
            peaks, scur = run_minimal({"maint": "state maint", "drain": "state drain", "weight": "weight 0"}[mode])
        print(f"run {n} ({mode}): leaving server max_busy {peaks['max_busy']} max_waiting {peaks['max_waiting']}, "
              f"HAProxy scur peak {scur} (maxconn 4)", flush=True)
