"""The frontend against untrusted clients, with the real haproxy binary and simulated backends:
only the OpenAI API, keys by default, routing on the whole body, body limits (413) and the body
wait (408), one client's share of the frontend (429), and queued requests of departed clients."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from hpcserve.haproxy import config as haproxy_config
from hpcserve.haproxy import runtime
from hpcserve.core.pool import Server
from hpcserve.state import StateDir
from tests.conftest import LLAMA_SERVER, free_port, haproxy_for, minimal, simulator

pytestmark = pytest.mark.haproxy

KEY = "backend-key"


@contextlib.contextmanager
def two_model_pool(tmp_path: Path, gguf: Path, slots: int = 2, token_rate: float = 200, **haproxy):
    """HAProxy over two models ("big", "small"), one simulator each; yields (proxy, base URL)."""
    raw = minimal(gguf, tmp_path, haproxy={"port": free_port(), "stats_port": free_port(), **haproxy})
    raw["models"] = [{"name": "big", "gguf": str(gguf), "parallel": slots},
                     {"name": "small", "gguf": str(gguf), "parallel": slots}]
    proxy = haproxy_for(raw, tmp_path, key=KEY)
    # Prefill at 10M tokens/s: megabyte prompts are about routing here, not about prefill time.
    with simulator(tmp_path / "big.log", slots, token_rate, KEY, alias="big", prefill_rate=1e7) as big, \
            simulator(tmp_path / "small.log", slots, token_rate, KEY, alias="small", prefill_rate=1e7) as small:
        proxy.apply(haproxy_config.render(proxy.deployment, [Server("big", "1", "127.0.0.1", big),
                                                             Server("small", "2", "127.0.0.1", small)]))
        try:
            yield proxy, f"http://127.0.0.1:{proxy.deployment.haproxy.port}"
        finally:
            proxy.stop(timeout=5)


def sessions(proxy) -> dict[str, int]:
    """Server name -> requests HAProxy has in service on it now (scur)."""
    return {s.server: s.sessions for s in runtime.show_stat(proxy.paths.admin_socket)}


def test_only_the_openai_api_reaches_a_backend(tmp_path, gguf):
    with two_model_pool(tmp_path, gguf) as (proxy, base):
        for method, path in [("GET", "/slots"), ("POST", "/slots/0?action=erase"), ("GET", "/props"),
                             ("POST", "/props"), ("GET", "/metrics"), ("GET", "/lora-adapters"),
                             ("GET", "/health"), ("POST", "/v1/chat/completions/../../props"),
                             ("POST", "/v1//chat/completions"), ("GET", "/sim/stats")]:
            answer = httpx.request(method, base + path, json={"model": "big"})
            assert answer.status_code == 404, (method, path)
            assert answer.json()["error"]["code"] == "not_found", (method, path)
        wrong_method = httpx.get(f"{base}/v1/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert httpx.post(f"{base}/v1/models").status_code == 405
        assert {s.total for s in runtime.show_stat(proxy.paths.admin_socket)} == {0}   # none was forwarded
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        for path in ("/v1/chat/completions", "/chat/completions"):
            answer = httpx.post(base + path, json={"model": "small", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200 and answer.json()["model"] == "small"
        assert client.completions.create(model="big", prompt="x", max_tokens=2).model == "big"
        assert [m.id for m in client.models.list()] == ["big", "small"]


def test_every_request_needs_a_key_by_default(haproxy_bin, gguf, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# a researcher\nresearcher-key-0123456789abcdefghij\n")
    raw = minimal(gguf, tmp_path, haproxy={"port": free_port(), "stats_port": free_port(), "auth": "keys",
                                           "api_keys_file": str(keys)})
    proxy = haproxy_for(raw, tmp_path, key=KEY)
    owner = StateDir(proxy.deployment.state_dir).api_key()
    try:
        proxy.apply(haproxy_config.render(proxy.deployment, []))
        url = f"http://127.0.0.1:{proxy.deployment.haproxy.port}/v1/models"
        stats = f"http://127.0.0.1:{proxy.deployment.haproxy.stats_port_or_default}"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {owner}"},
                        {"Authorization": f"Bearer {owner[:-1]}"}):
            answer = httpx.get(url, headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"
        for key in (owner, "researcher-key-0123456789abcdefghij"):
            assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        # The stats page and Prometheus exporter ask for a key too: every user reaches 127.0.0.1.
        assert httpx.get(f"{stats}/metrics").status_code == 401
        assert httpx.get(f"{stats}/metrics", headers={"Authorization": f"Bearer {owner}"}).status_code == 200
        # Only hashes are on disk: no key in the file HAProxy matches against, nor in haproxy.cfg.
        on_disk = proxy.paths.keys_map_file.read_text() + proxy.paths.config.read_text()
        assert owner not in on_disk and "researcher-key-0123456789abcdefghij" not in on_disk
    finally:
        proxy.stop(timeout=5)
    assert proxy.paths.keys_map_file.read_text().count("\n") == 2
    from hpcserve.config import HAProxy as Settings
    assert Settings().auth == "keys"   # what a deployment file that says nothing gets


def _chat_body(model: str | None, size: int, model_first: bool) -> dict:
    messages = [{"role": "user", "content": "w " * (size // 2)}]
    if model is None:
        return {"messages": messages, "max_tokens": 2}
    if model_first:
        return {"model": model, "messages": messages, "max_tokens": 2}
    return {"messages": messages, "max_tokens": 2, "model": model}


def test_routing_reads_the_whole_body(tmp_path, gguf):
    """Prompts of 1 KB to 1 MB reach the model they name, with "model" first or last (the openai
    client writes it after "messages"), sent whole or chunked; never another model's answer."""
    with two_model_pool(tmp_path, gguf, max_request_body=2 << 20) as (_proxy, base):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        for size in (1 << 10, 20 << 10, 200 << 10, 1 << 20):
            for model in ("big", "small"):
                reply = client.chat.completions.create(model=model, max_tokens=2,
                                                       messages=[{"role": "user", "content": "w " * (size // 2)}])
                assert reply.model == model, (size, model)
                for first in (True, False):
                    body = json.dumps(_chat_body(model, size, first)).encode()
                    assert httpx.post(f"{base}/v1/chat/completions", content=body, timeout=60).json()["model"] == model
                chunks = [body[i:i + 8192] for i in range(0, len(body), 8192)]
                chunked = httpx.post(f"{base}/v1/chat/completions", content=iter(chunks), timeout=60)
                assert chunked.json()["model"] == model, ("chunked", size)
        # No "model", or a body that is not JSON: the first model (the deployment's default).
        assert httpx.post(f"{base}/v1/chat/completions", json=_chat_body(None, 50000, True)).json()["model"] == "big"
        not_json = httpx.post(f"{base}/v1/chat/completions", content=b"{not json" + b"x" * 30000)
        assert not_json.status_code == 400   # the default model's llama-server refuses it
        unknown = httpx.post(f"{base}/v1/chat/completions", json=_chat_body("gpt-4", 50000, False))
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def served(proxy) -> int:
    """Requests every server of `proxy`'s current worker has been sent (stot)."""
    text = runtime.command(proxy.paths.admin_socket, "show stat")
    return sum(int(row.split(",")[7]) for row in text.splitlines() if row.startswith(("model_big,job", "model_small,job")))


def test_padded_headers_get_431_before_the_key_and_routing_sees_the_whole_body(haproxy_bin, gguf, tmp_path):
    """Headers over haproxy.max_header_bytes (16 KiB) get 431 before anything else, with a key or
    without: ~40 KB of headers once filled the buffer, the body wait proceeded on a cut body and a
    request naming "small" was answered by "big". Headers under the cap and the largest body
    still fit together and reach the model they name."""
    with two_model_pool(tmp_path, gguf, auth="keys") as (proxy, base):
        key = StateDir(proxy.deployment.state_dir).api_key()
        proxy.sync_keys()
        body = _chat_body("small", 60000, False)
        before = served(proxy)
        for auth in ({}, {"Authorization": f"Bearer {key}"}):
            padded = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30,
                                headers={**auth, **{f"X-Pad-{i}": "a" * 4000 for i in range(10)}})
            assert padded.status_code == 431, padded.text
            assert padded.json()["error"]["code"] == "request_header_fields_too_large"
        assert served(proxy) == before                            # no server saw them
        near = httpx.post(f"{base}/v1/chat/completions", json=_chat_body("small", proxy.deployment.max_request_body - 200, False),
                          timeout=60, headers={"Authorization": f"Bearer {key}",
                                                    **{f"X-Pad-{i}": "a" * 4900 for i in range(3)}})
        assert near.status_code == 200 and near.json()["model"] == "small", near.text


@pytest.mark.parametrize("field, value", [("n", 4), ("n_cmpl", 2), ("id_slot", 0), ("n", "2")])
def test_a_request_for_more_than_one_slot_or_a_chosen_slot_is_refused(tmp_path, gguf, field, value):
    """`n` (and llama-server's `n_cmpl`) would take as many slots while maxconn, the per-key limits
    and the usage count one request; `id_slot` picks the slot whose cache another key left. 400 in
    the OpenAI error shape, naming the field; n 1 and id_slot -1 (llama-server's defaults) pass."""
    with two_model_pool(tmp_path, gguf) as (proxy, base):
        before = served(proxy)
        refused = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                             json={**_chat_body("big", 100, True), field: value})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text
        assert served(proxy) == before
        fine = {"n": 1, "n_cmpl": 1, "id_slot": -1}[field]
        assert httpx.post(f"{base}/v1/chat/completions", timeout=30,
                          json={**_chat_body("big", 100, True), field: fine}).status_code == 200


def test_the_field_checks_hold_on_bodies_built_to_exhaust_the_regex_engine(tmp_path, gguf):
    """1.8 MB of backslashes before an escaped `n`, and 1.8 MB of spaces between `"n":` and its
    value: with backtracking patterns the first ran into PCRE2's match limit and passed (2.6.12);
    the possessive ones refuse both, and a large ordinary body still passes."""
    with two_model_pool(tmp_path, gguf, max_request_body=4 << 20) as (proxy, base):
        url, headers = f"{base}/v1/chat/completions", {"Content-Type": "application/json"}
        messages = '"messages":[{"role":"user","content":"%s"}]'
        tricks = {"escaped n after backslashes": '{"model":"big",' + messages % ("\\\\" * 450_000) + ',"\\u006e":2}',
                  "n after spaces": '{"model":"big",' + messages % "hi" + ',"n":' + " " * 1_800_000 + "2}"}
        before = served(proxy)
        for name, body in tricks.items():
            answer = httpx.post(url, content=body.encode(), headers=headers, timeout=60)
            assert answer.status_code == 400, (name, answer.text[:200])
        assert served(proxy) == before
        ordinary = '{"model":"big","max_tokens":2,' + messages % ("word " * 300_000) + "}"
        assert httpx.post(url, content=ordinary.encode(), headers=headers, timeout=60).status_code == 200


def test_http2_is_not_served_on_the_clear_text_frontend(tmp_path, gguf):
    """An HTTP/2 client (prior knowledge, as `curl --http2-prior-knowledge`) gets no HTTP/2: the
    slots an old worker may fill are counted one request per client connection."""
    with two_model_pool(tmp_path, gguf) as (proxy, base):
        with socket.create_connection(("127.0.0.1", proxy.deployment.haproxy.port), timeout=10) as conn:
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(4096):
                    answer += chunk
        # An HTTP/2 server answers with a SETTINGS frame (type 4); this one says HTTP/1.1 or closes.
        assert not (len(answer) >= 9 and answer[3] == 4), answer[:40]
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:40]
        assert httpx.get(f"{base}/v1/models").status_code == 200


def test_a_body_over_the_limit_gets_413_and_reaches_no_server(tmp_path, gguf):
    with two_model_pool(tmp_path, gguf, max_request_body=65536) as (proxy, base):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="small", messages=[{"role": "user", "content": "w" * 70000}])
        assert refused.value.status_code == 413
        assert refused.value.body["code"] == "request_too_large" and "65536 bytes" in refused.value.body["message"]
        body = json.dumps(_chat_body("small", 70000, True)).encode()
        chunked = httpx.post(f"{base}/v1/chat/completions", content=iter([body[:30000], body[30000:]]))
        assert chunked.status_code == 413
        # Just below the limit, whole: served.
        fits = client.chat.completions.create(model="small", max_tokens=2,
                                              messages=[{"role": "user", "content": "w" * 64000}])
        assert fits.model == "small"
        assert sum(s.total for s in runtime.show_stat(proxy.paths.admin_socket)) == 1


def _slow_upload(port: int, declared: int, results: list, stop: threading.Event) -> None:
    """Headers of a chat completion declaring `declared` bytes, 20 KB of them at once, then one byte
    a second; appends (HTTP status, JSON body) of the answer, or (None, why)."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: pool\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head + b'{"model": "big", "messages": [{"role": "user", "content": "' + b"w" * 20000)
            sock.settimeout(1)
            answer = b""
            while not stop.is_set():
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    sock.sendall(b"w")
                    continue
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                    break
        status = int(answer.split(b" ", 2)[1]) if answer else None
        results.append((status, json.loads(answer.split(b"\r\n\r\n", 1)[1]) if answer else None))
    except OSError as exc:
        results.append((None, str(exc)))


def test_slow_uploads_never_hold_a_slot(tmp_path, gguf):
    """Issue 18's scenario: as many slow uploaders as the first model has slots (and more) while
    normal chats keep being answered at once; the uploaders get 408 after body_timeout and never
    appear as sessions on a server."""
    with two_model_pool(tmp_path, gguf, slots=2, body_timeout=6, max_request_body=1 << 20) as (proxy, base):
        port = proxy.deployment.haproxy.port
        results: list = []
        stop = threading.Event()
        uploaders = [threading.Thread(target=_slow_upload, args=(port, 300000, results, stop)) for _ in range(4)]
        started = time.monotonic()
        for thread in uploaders:
            thread.start()
        try:
            time.sleep(1)
            for model in ("big", "small", "big"):
                sent = time.monotonic()
                answer = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
                    "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
                assert answer.status_code == 200 and time.monotonic() - sent < 2, answer.text
                assert time.monotonic() - started < 6   # all while the uploads were still trickling
                assert sessions(proxy) == {"job1": 0, "job2": 0}
        finally:
            for thread in uploaders:
                thread.join(30)
            stop.set()
        assert [status for status, _ in results] == [408] * 4, results
        assert {body["error"]["code"] for _, body in results} == {"request_timeout"}
        served = {s.server: s.total for s in runtime.show_stat(proxy.paths.admin_socket)}
        assert served == {"job1": 2, "job2": 1}   # the three chats, no upload


def test_one_client_gets_429_beyond_its_share(haproxy_bin, gguf, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("client-a-0123456789abcdefghijklmnop\nclient-b-0123456789abcdefghijklmnop\n")
    with two_model_pool(tmp_path, gguf, slots=8, token_rate=10, auth="keys", api_keys_file=str(keys),
                        max_requests_per_client=3) as (_proxy, base):
        def chat(key: str, results: list) -> None:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)
            try:
                client.chat.completions.create(model="big", max_tokens=15,
                                               messages=[{"role": "user", "content": "x"}])
                results.append(200)
            except openai.APIStatusError as exc:
                results.append((exc.status_code, exc.body["code"], exc.response.headers.get("retry-after")))

        a: list = []
        b: list = []
        threads = ([threading.Thread(target=chat, args=("client-a-0123456789abcdefghijklmnop", a)) for _ in range(5)]
                   + [threading.Thread(target=chat, args=("client-b-0123456789abcdefghijklmnop", b)) for _ in range(2)])
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(a, key=str) == sorted([200] * 3 + [(429, "rate_limit_exceeded", "1")] * 2, key=str), a
        assert b == [200, 200]   # another client is not limited by the first one's requests


def test_a_large_upload_at_a_normal_rate_is_served(tmp_path, gguf):
    with two_model_pool(tmp_path, gguf, max_request_body=4 << 20, body_timeout=5) as (_proxy, base):
        body = json.dumps(_chat_body("small", 3 << 20, False)).encode()
        chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))

        def paced():
            for chunk in chunks:   # about 16 MB/s: well within the body timeout
                time.sleep(0.004)
                yield chunk
        answer = httpx.post(f"{base}/v1/chat/completions", content=paced(), timeout=60,
                            headers={"Content-Length": str(len(body)), "Content-Type": "application/json"})
        assert answer.status_code == 200 and answer.json()["model"] == "small"


def test_a_queued_request_whose_client_left_never_reaches_a_backend(tmp_path, gguf):
    """option abortonclose: with the one slot busy, a request waits in HAProxy's queue; its client
    closes the connection; when the slot frees, the request is dropped, not sent."""
    with two_model_pool(tmp_path, gguf, slots=1, token_rate=10) as (proxy, base):
        port = proxy.deployment.haproxy.port
        busy = threading.Thread(target=lambda: httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
            "model": "big", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}))
        busy.start()
        time.sleep(0.5)
        body = json.dumps({"model": "big", "max_tokens": 20, "messages": [{"role": "user", "content": "y"}]})
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            time.sleep(0.5)
            assert proxy.stats().backends["model_big"].queued == 1
        busy.join(30)
        time.sleep(0.5)
        served = {s.server: s.total for s in runtime.show_stat(proxy.paths.admin_socket)}
        assert served["job1"] == 1   # only the first request reached the backend


def _listener_pid(port: int) -> int:
    return next(c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN")


def _live(proxy) -> runtime.LiveServer:
    return next(s for s in runtime.show_servers(proxy.paths.admin_socket) if s.name == "job1")


def test_a_dead_backends_port_taken_by_another_user_gets_no_request(tmp_path, gguf):
    """llama-server dies; another cluster user binds its port and answers /health. HAProxy marks the
    server DOWN and keeps it DOWN (rise RISE_NEVER): no prompt and no backend key reach the port;
    the next reconcile step, which sees the job gone, removes the server. What remains: a port
    taken before HAProxy noticed the death (about fall x inter) keeps the server UP until then."""
    raw = minimal(gguf, tmp_path, haproxy={"port": free_port(), "stats_port": free_port(), "check_interval": 0.5})
    proxy = haproxy_for(raw, tmp_path, key=KEY)
    url = f"http://127.0.0.1:{proxy.deployment.haproxy.port}/v1/chat/completions"
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "secret prompt"}]}
    seen: list[tuple[str, str | None]] = []

    class Impostor(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    try:
        with simulator(tmp_path / "sim.log", 2, 200, KEY) as port:
            server = Server("m", "1", "127.0.0.1", port)
            proxy.update([server])
            assert httpx.post(url, json=body, timeout=10).status_code == 200
            died = time.monotonic()
            os.kill(_listener_pid(port), signal.SIGKILL)
            while not _live(proxy).down:
                assert time.monotonic() - died < 10
                time.sleep(0.05)
            noticed = time.monotonic() - died
            impostor = http.server.ThreadingHTTPServer(("127.0.0.1", port), Impostor)
            threading.Thread(target=impostor.serve_forever, daemon=True).start()
            try:
                for _ in range(16):   # 4 s: 8 check intervals, 4 times what rise 2 needed to return
                    assert httpx.post(url, json=body, timeout=10).status_code == 503
                    time.sleep(0.25)
                assert _live(proxy).down
                assert {path for path, _ in seen} == {"/health"} and {auth for _, auth in seen} == {None}
                proxy.update([])   # the next step: the job is gone
                assert runtime.show_servers(proxy.paths.admin_socket) == []
            finally:
                impostor.shutdown()
                impostor.server_close()
        print(f"\nHAProxy marked the dead backend DOWN {noticed:.2f} s after its death "
              f"(check every 0.5 s, fall 3)")
    finally:
        proxy.stop(timeout=5)


def test_a_down_server_whose_job_still_runs_returns_when_hpcserve_says_so(tmp_path, gguf):
    raw = minimal(gguf, tmp_path, haproxy={"port": free_port(), "stats_port": free_port(), "check_interval": 0.5})
    proxy = haproxy_for(raw, tmp_path, key=KEY)
    try:
        with simulator(tmp_path / "sim.log", 2, 200, KEY) as port:
            server = Server("m", "1", "127.0.0.1", port)
            proxy.update([server])
            backend = psutil.Process(_listener_pid(port))
            backend.suspend()   # a stalled backend: each check waits out timeout check (5 s)
            try:
                deadline = time.monotonic() + 40
                while not _live(proxy).down:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            finally:
                backend.resume()
            time.sleep(2)   # its checks pass again, and it stays DOWN
            assert _live(proxy).down
            proxy.update([dataclasses.replace(server, healthy=False)])   # hpcserve's probe failed too
            assert _live(proxy).down
            proxy.update([server])   # hpcserve saw the job RUNNING and /health answering
            assert not _live(proxy).down
    finally:
        proxy.stop(timeout=5)


def test_a_client_that_disconnects_frees_its_slot_on_real_llama_server(tmp_path, gguf, real_model, haproxy_bin):
    """A streamed chat completion asks for 2,000 tokens (over a minute on this machine); its client
    reads a few and closes the connection. HAProxy closes the server side, llama-server notices at
    its next write and frees the slot: /slots shows it idle long before the answer would have ended."""
    port = free_port()
    log = open(tmp_path / "llama.log", "w")
    server = subprocess.Popen([str(LLAMA_SERVER), "--model", str(real_model), "--alias", "m", "--host", "127.0.0.1",
                               "--port", str(port), "--parallel", "1", "--ctx-size", "4096", "--threads", "1"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LLAMA_API_KEY": KEY})
    proxy = haproxy_for(minimal(gguf, tmp_path, haproxy={"port": free_port(), "stats_port": free_port()}),
                        tmp_path, key=KEY)
    direct = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{direct}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.5)
        proxy.update([Server("m", "1", "127.0.0.1", port)])
        body = {"model": "m", "max_tokens": 2000, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        with httpx.stream("POST", f"http://127.0.0.1:{proxy.deployment.haproxy.port}/v1/chat/completions",
                          json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(5):
                next(lines)
            closed = time.monotonic()
        busy = lambda: any(s["is_processing"] for s in httpx.get(  # noqa: E731
            f"{direct}/slots", headers={"Authorization": f"Bearer {KEY}"}).json())
        while busy():
            assert time.monotonic() - closed < 20, "the slot still generates for a client that left"
            time.sleep(0.05)
        print(f"\nslot free {time.monotonic() - closed:.2f} s after the client closed its stream")
        assert runtime.show_stat(proxy.paths.admin_socket)[0].sessions == 0
    finally:
        proxy.stop(timeout=5)
        server.terminate()
        server.wait(10)
        log.close()


def _start_llama(real_model: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    """A real llama-server with the backend key, 2 slots and `flags`; (process, port) once /health is 200."""
    port = free_port()
    with open(log, "w") as sink:
        server = subprocess.Popen([str(LLAMA_SERVER), "--model", str(real_model), "--host", "127.0.0.1",
                                   "--port", str(port), "--parallel", "2", "--ctx-size", "2048", "--threads", "1",
                                   "--cache-ram", "0", *flags],
                                  stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "LLAMA_API_KEY": KEY})
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server, port
        assert time.monotonic() < deadline and server.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)


SECRET = ("The project codename is BLUE HERON; its budget of 4.2 million euros was approved by the board "
          "on Tuesday and must not be shared outside the steering group.")
# Bodies that llama-server (nlohmann::json) reads as n 2 while json_query reads n 1 or nothing.
N_TRICKS = {
    "duplicate key": '{{"model":"{m}","max_tokens":2,"n":1,"n":2,"messages":[{{"role":"user","content":"hi"}}]}}',
    "escaped key": '{{"model":"{m}","max_tokens":2,"\\u006e":2,"messages":[{{"role":"user","content":"hi"}}]}}',
    "past json_query's depth": '{{"model":"{m}","max_tokens":2,"x":' + "[" * 20 + "]" * 20
                               + ',"n":2,"messages":[{{"role":"user","content":"hi"}}]}}',
    "after a byte-order mark": '\ufeff{{"model":"{m}","max_tokens":2,"n":2,"messages":[{{"role":"user","content":"hi"}}]}}',
}


def test_body_tricks_and_another_keys_cached_prompt_on_real_llama_server(tmp_path, gguf, real_model, haproxy_bin):
    """Two real llama-servers behind HAProxy: model `private` with the default prompt_cache off (the
    job's --no-cache-prompt) and model `shared` (prompt_cache: shared).

    - Each body of N_TRICKS gets two choices from llama-server directly, and 400 naming `n` through
      HAProxy, reaching no server.
    - On `private`, a prompt sent twice is never served from cache, and a request that asks for the
      cache back (`cache_prompt`: true, also as a duplicate or an escaped key) gets 400: a second
      key sending the first one's secret prompt sees 0 cached tokens. On `shared` the same
      sequence shows the channel the setting closes: the second sender is served from cache."""
    private, private_port = _start_llama(real_model, tmp_path / "private.log", "--no-cache-prompt")
    shared, shared_port = _start_llama(real_model, tmp_path / "shared.log")
    raw = minimal(gguf, tmp_path, haproxy={"port": free_port(), "stats_port": free_port()})
    raw["models"] = [{"name": "private", "gguf": str(gguf), "parallel": 2, "context_size": 2048},
                     {"name": "shared", "gguf": str(gguf), "parallel": 2, "context_size": 2048,
                      "prompt_cache": "shared"}]
    proxy = haproxy_for(raw, tmp_path, key=KEY)
    base = f"http://127.0.0.1:{proxy.deployment.haproxy.port}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    try:
        proxy.update([Server("private", "1", "127.0.0.1", private_port), Server("shared", "2", "127.0.0.1", shared_port)])
        for name, template in N_TRICKS.items():
            body = template.format(m="private").encode()
            direct = httpx.post(f"http://127.0.0.1:{private_port}/v1/chat/completions", content=body,
                                headers=auth, timeout=60)
            assert len(direct.json()["choices"]) == 2, (name, direct.text)
            before = {s.server: s.total for s in runtime.show_stat(proxy.paths.admin_socket)}
            refused = httpx.post(base, content=body, headers={"Content-Type": "application/json"}, timeout=60)
            assert refused.status_code == 400, (name, refused.text)
            assert refused.json()["error"].get("param", "n") == "n", (name, refused.text)
            assert {s.server: s.total for s in runtime.show_stat(proxy.paths.admin_socket)} == before, name
        # A tool parameter named n is no request for n choices: it passes.
        tool = {"type": "function", "function": {"name": "pick", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer"}}}}}
        assert httpx.post(base, json={"model": "private", "max_tokens": 2, "tools": [tool],
                                      "messages": [{"role": "user", "content": "hi"}]}, timeout=60).status_code == 200

        def chat(model: str, **extra) -> httpx.Response:
            return httpx.post(base, timeout=60, json={"model": model, "max_tokens": 2, **extra, "messages": [
                {"role": "system", "content": SECRET}, {"role": "user", "content": "Summarise it in one line."}]})

        cached = {}
        for model in ("private", "shared"):
            first, again = chat(model), chat(model)     # one key, then another key guessing the prompt
            assert first.status_code == again.status_code == 200, again.text
            cached[model] = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached["private"] == 0 and cached["shared"] > 20, cached
        asks = [json.dumps({"model": "private", "cache_prompt": True, "messages": []}),
                '{"model":"private","cache_prompt":false,"cache_prompt":true,"messages":[]}',
                '{"model":"private","\\u0063ache_prompt":true,"messages":[]}']
        for body in asks:
            refused = httpx.post(base, content=body.encode(), headers={"Content-Type": "application/json"}, timeout=60)
            assert refused.status_code == 400, (body, refused.text)
        assert chat("private", cache_prompt=False).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert chat("shared", cache_prompt=True).status_code == 200      # shared: the field is the client's
    finally:
        proxy.stop(timeout=5)
        for server in (private, shared):
            server.terminate()
            server.wait(10)
