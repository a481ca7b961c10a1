"""The Batch API through the real HAProxy: its routes reach the service (on its Unix socket) only
with a key, as that key; the LLM path's body rules leave uploads alone; a client cannot claim
another key's name. Slurm is not needed here (tests/e2e/test_batches.py runs the jobs)."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

from hpcserve.access.keys import KeyRegistry
from hpcserve.batches import service
from hpcserve.core.pool import Server
from hpcserve.state import StateDir
from tests.conftest import free_port, haproxy_for, minimal, simulator

pytestmark = pytest.mark.haproxy

KEY = "backend-key"


def rows(count: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "m", "messages": [{"role": "user", "content": "x" * 50}]}}) + "\n"
                   for i in range(count)).encode()


def test_the_batch_api_answers_each_key_as_itself_behind_haproxy(tmp_path, gguf):
    raw = minimal(gguf, tmp_path, haproxy={"port": free_port(), "stats_port": free_port(), "auth": "keys"})
    raw["batches"] = {"enabled": True}
    raw["haproxy"]["max_request_body"] = 65536       # the LLM path's limit, far below an upload
    proxy = haproxy_for(raw, tmp_path, key=KEY)
    deployment = proxy.deployment
    registry = KeyRegistry(deployment)
    alice, bob = registry.add("alice")[1], registry.add("bob")[1]
    StateDir(deployment.state_dir).api_key()
    url = f"http://127.0.0.1:{deployment.haproxy.port}/v1"
    with simulator(tmp_path / "sim.log", 2, 200, KEY) as port:
        try:
            assert proxy.update([Server("m", "1", "127.0.0.1", port)]) == "started"
            assert service.ensure(deployment)
            as_alice = openai.OpenAI(base_url=url, api_key=alice, max_retries=0, timeout=30)
            as_bob = openai.OpenAI(base_url=url, api_key=bob, max_retries=0, timeout=30)
            # 300 KB: over the LLM path's 64 KiB body limit and its body rules, streamed to the service.
            big = as_alice.files.create(file=("rows.jsonl", io.BytesIO(rows(2000))), purpose="batch")
            assert big.bytes > 300_000
            # A chunked upload (no length known before it ends): 411.
            chunked = httpx.post(f"{url}/files", headers={"Authorization": f"Bearer {alice}"},
                                 content=iter([b"--x\r\n", b"--x--\r\n"]))
            assert chunked.status_code == 411
            # A client naming itself: HAProxy sets the header from the key, the client's is replaced.
            forged = httpx.get(f"{url}/files", headers={"Authorization": f"Bearer {bob}", service.KEY_HEADER: "alice"})
            assert forged.status_code == 200 and forged.json()["data"] == []
            assert [f.id for f in as_alice.files.list().data] == [big.id]
            with pytest.raises(openai.NotFoundError):
                as_bob.files.retrieve(big.id)
            # No key, a wrong key: 401 from HAProxy, the service never asked.
            assert httpx.get(f"{url}/files").status_code == 401
            assert httpx.get(f"{url}/files", headers={"Authorization": "Bearer nope"}).status_code == 401
            # Other paths stay closed; the chat path still has its limits.
            assert httpx.get(f"{url}/filesystem", headers={"Authorization": f"Bearer {alice}"}).status_code == 404
            chat = httpx.post(f"{url}/chat/completions", headers={"Authorization": f"Bearer {alice}"},
                              json={"model": "m", "messages": [{"role": "user", "content": "x" * 70000}]})
            assert chat.status_code == 413
            assert as_alice.chat.completions.create(model="m", max_tokens=2, messages=[
                {"role": "user", "content": "hi"}]).choices
            # The service down: its routes answer 503; the pool's chats go on.
            service.stop(deployment)
            assert httpx.get(f"{url}/files", headers={"Authorization": f"Bearer {alice}"}).status_code == 503
            assert as_alice.chat.completions.create(model="m", max_tokens=2, messages=[
                {"role": "user", "content": "hi"}]).choices
        finally:
            service.stop(deployment)
            proxy.stop(timeout=5)
