"""HAProxy's memory with the request buffer hpcserve sizes for whole-body routing.

tune.bufsize holds a whole request (headers + haproxy.max_request_body, see
hpcserve.haproxy.config.buffer_size), so every stream may hold buffers of that size. This prints
the peak RSS of the deployment's HAProxy (master and worker, from psutil) while N concurrent
streamed chat completions with long prompts pass through it, for several body limits, against
one simulated llama-server with enough slots that nothing queues. Figures, not assertions.

`--unfinished` measures instead what a client without a key holds: N connections that each send
a request line and one header of --header-kib KiB and never end their headers. HAProxy reads
headers into the same buffer and checks the key only once they are complete (HAProxy 2.6 manual:
http-request rules run on a whole header block), so each such connection holds up to
tune.bufsize - tune.maxrewrite for `timeout http-request` (30 s), and maxconn of them that much.

    .venv/bin/python -m benchmarks.buffers [--streams 200] [--prompt-kib 400]
    .venv/bin/python -m benchmarks.buffers --unfinished [--connections 200] [--header-kib 900]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.common import start_haproxy
from benchmarks.systems import port_of, start_simulators
from benchmarks.workload import Backend
from hpcserve.haproxy.config import buffer_size


def haproxy_rss(proxy) -> int:
    """Bytes of resident memory of the HAProxy master and its workers."""
    master = psutil.Process(proxy.pid())
    return sum(p.memory_info().rss for p in [master, *master.children(recursive=True)])


async def streams(url: str, count: int, prompt_bytes: int, tokens: int) -> list[int]:
    body = json.dumps({"model": "m", "stream": True, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "w" * prompt_bytes}]}).encode()
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one() -> int:
            async with client.stream("POST", url, content=body,
                                     headers={"Content-Type": "application/json"}) as response:
                async for _ in response.aiter_lines():
                    pass
                return response.status_code
        return list(await asyncio.gather(*(one() for _ in range(count))))


def measure(folder: Path, max_body: int, count: int, prompt_bytes: int) -> dict:
    sims = start_simulators([Backend(count + 8, 20.0, prefill_rate=1e9)], folder / "sims")
    proxy, port = start_haproxy(folder / "haproxy", [port_of(sims[0].urls[0])], parallel=count + 8,
                                max_request_body=max_body)
    try:
        idle = haproxy_rss(proxy)
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], haproxy_rss(proxy))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        statuses = asyncio.run(streams(f"http://127.0.0.1:{port}/v1/chat/completions", count, prompt_bytes, 100))
        done.set()
        sampler.join()
        return {"max_request_body": max_body, "bufsize": buffer_size(proxy.deployment), "streams": count,
                "ok": statuses.count(200), "seconds": round(time.monotonic() - started, 1),
                "idle_rss_mib": round(idle / 2**20, 1), "peak_rss_mib": round(peak[0] / 2**20, 1),
                "per_stream_kib": round((peak[0] - idle) / count / 1024, 1)}
    finally:
        proxy.stop(timeout=10)
        for sim in sims:
            sim.process.terminate()


def unfinished(folder: Path, max_body: int, count: int, header_bytes: int) -> dict:
    """HAProxy's RSS (API keys on, no server needed) before and while `count` connections each hold
    an unfinished header block of `header_bytes`; the connections are closed at the end."""
    proxy, port = start_haproxy(folder / "haproxy", [], auth="keys", max_request_body=max_body)
    sockets: list[socket.socket] = []
    try:
        idle = haproxy_rss(proxy)
        block = b"POST /v1/chat/completions HTTP/1.1\r\nHost: pool\r\nX-Pad: " + b"a" * header_bytes
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(block)                        # no CRLF CRLF: the headers never end
            sockets.append(s)
        held, last = idle, -1
        deadline = time.monotonic() + 20
        while held != last and time.monotonic() < deadline:   # until HAProxy has read it all
            last, held = held, haproxy_rss(proxy)
            time.sleep(0.5)
        answered = 0
        for s in sockets:                           # refused early (a 400 or a close) or still held
            s.setblocking(False)
            try:
                answered += bool(s.recv(1, socket.MSG_PEEK))
            except BlockingIOError:
                pass
            except OSError:
                answered += 1
        return {"max_request_body": max_body, "bufsize": buffer_size(proxy.deployment), "connections": count,
                "header_bytes": header_bytes, "answered_early": answered, "idle_rss_mib": round(idle / 2**20, 1),
                "held_rss_mib": round(held / 2**20, 1), "per_connection_kib": round((held - idle) / count / 1024, 1),
                "maxconn": proxy.deployment.haproxy.maxconn}
    finally:
        for s in sockets:
            s.close()
        proxy.stop(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--prompt-kib", type=int, default=400, help="prompt size (KiB) for the 512 KiB limit")
    parser.add_argument("--unfinished", action="store_true", help="unfinished header blocks without a key instead")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--header-kib", type=int, default=900, help="header bytes each connection sends (KiB)")
    args = parser.parse_args()
    if args.unfinished:
        print("| max_request_body | tune.bufsize | header sent | connections | answered early | HAProxy RSS idle MiB "
              "| held MiB | per connection KiB | at maxconn GiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for max_body in (64 << 10, 1 << 20):      # the floor; the reference config's 1 MiB
            sent = min(args.header_kib << 10, max_body)
            with tempfile.TemporaryDirectory(prefix="hpcserve-preauth-") as folder:
                r = unfinished(Path(folder), max_body, args.connections, sent)
            print(f"| {max_body >> 10} KiB | {r['bufsize']} | {sent >> 10} KiB | {r['connections']} | "
                  f"{r['answered_early']} | {r['idle_rss_mib']} | {r['held_rss_mib']} | {r['per_connection_kib']} | "
                  f"{r['per_connection_kib'] * r['maxconn'] / 2**20:.1f} |", flush=True)
        return
    print("| max_request_body | tune.bufsize | prompt | streams | ok | HAProxy RSS idle MiB | peak MiB | per stream KiB |")
    print("|---|---|---|---|---|---|---|---|")
    # 64 KiB: the floor (contexts up to 4k tokens); 512 KiB: a 32k-token context; 2 MiB: 128k tokens.
    for max_body in (64 << 10, 512 << 10, 2 << 20):
        prompt = min(args.prompt_kib << 10, max_body - 1024)
        with tempfile.TemporaryDirectory() as folder:
            r = measure(Path(folder), max_body, args.streams, prompt)
        print(f"| {max_body >> 10} KiB | {r['bufsize']} | {prompt >> 10} KiB | {r['streams']} | {r['ok']} | "
              f"{r['idle_rss_mib']} | {r['peak_rss_mib']} | {r['per_stream_kib']} |", flush=True)


if __name__ == "__main__":
    main()
