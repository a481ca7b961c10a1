"""Reproduces the open affinity overfill on HAProxy 3.0.11 (docs/testing.md, "Exact under stress"); not a test.

HAProxy with hpcserve's config and affinity on, two simulated llama-servers of 4 slots at 20
tokens/s, 24 streaming clients each with its own conversation (30-token answers), so that sticky
requests wait in each server's own queue; after 3 s job2 leaves the pool (HAProxy.update with it
draining: `set server ... state maint`, or with `drain` as the second argument, `state drain`).
Prints job2's peaks from inside the simulator: max_waiting 1 is a request over its slots.

Measured 2026-12-07: HAProxy 3.0.11 (Debian 13 root) max_waiting 1 in 3 of 3 runs with maint and
2 of 2 with drain; HAProxy 2.6.12 (host) 0 in 3 of 3 with maint. With leastconn (no stick table,
no request in a server's own queue) the stress harness saw none on either release.

    .venv/bin/python tests/repro/leaving_server_overfill.py [RUNS] [drain]
    scripts/release-root.sh shell trixie /opt/hpcserve-venv/bin/python tests/repro/leaving_server_overfill.py 3
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpcserve.core.pool import Server  # noqa: E402
from tests.integration.test_affinity import HEADER, _address, affinity_pool  # noqa: E402


def run(tokens: int = 30, clients: int = 24, slots: int = 4) -> dict:
    """One run; job2's /sim/stats after it (peaks since job2 started to leave)."""
    tmp = Path(tempfile.mkdtemp(dir="/tmp"))
    gguf = tmp / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with affinity_pool(tmp, gguf, slots=slots, servers=2, token_rate=20) as (proxy, url):
        stop = time.monotonic() + 8

        def loop(i: int) -> None:
            with httpx.Client(timeout=120) as client:
                while time.monotonic() < stop:
                    client.post(url, headers={HEADER: f"conv-{i}"},
                                json={"model": "m", "max_tokens": tokens, "stream": True,
                                      "messages": [{"role": "user", "content": "x"}]})
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(3)
        servers = [Server("m", "1", *_address(proxy, "job1")), Server("m", "2", *_address(proxy, "job2"))]
        stats = f"http://127.0.0.1:{servers[1].port}/sim/stats"
        httpx.get(stats, params={"reset": 1})
        proxy.update([dataclasses.replace(s, draining=s.name == "job2") for s in servers])
        for t in threads:
            t.join()
        return httpx.get(stats).json()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "drain":
        import hpcserve.haproxy.membership as membership
        membership.leaving_state = lambda _deployment: "drain"   # type: ignore[assignment]
    for n in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        peaks = run()
        print(f"run {n}: job2 max_busy {peaks['max_busy']} max_waiting {peaks['max_waiting']}", flush=True)
