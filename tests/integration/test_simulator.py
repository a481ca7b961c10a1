"""The llama-server simulator answers like the real llama-server: the same requests to both, and
the same shapes and field names back (values differ: the simulator's text is not a model's). The
simulator answers as the real server's build (named by conftest.llama_server_build, given as
--sim-build), so these pass
against whichever build scripts/setup.sh installed; tests/integration/test_llama_builds.py checks
the builds this machine cannot run against their captured answers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hpcserve import config
from hpcserve.llama import builds
from hpcserve.llama import props as llama_props
from tests.conftest import LLAMA_SERVER, llama_server_build, missing

KEY = "shape-test-key"


def start(argv: list[str], log: Path, key: str = KEY) -> tuple[subprocess.Popen, str]:
    """Start a server that logs llama-server's "listening" line; (process, base URL)."""
    with open(log, "w") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "LLAMA_API_KEY": key})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"listening on http://[^ ]*:(\d+)", log.read_text())
        if match:
            return process, f"http://127.0.0.1:{match.group(1)}"
        assert process.poll() is None, log.read_text()
        time.sleep(0.02)
    raise AssertionError("no listening line")


def shape(value):
    """The structure of a JSON value: key names all the way down, list items merged."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        merged = {}
        for item in value:
            s = shape(item)
            merged = {**merged, **s} if isinstance(s, dict) else s
        return [merged] if value else []
    return "value"


def events(text: str) -> list:
    """The shapes of a stream's events, repeats collapsed (a real model may stop early)."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            event = data if data == "[DONE]" else shape(json.loads(data))
            if not out or out[-1] != event:
                out.append(event)
    return out


def wait_ready(url: str) -> dict | None:
    """Poll /health until 200; return the 503 "loading" answer if one was seen."""
    loading = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health")
        except httpx.HTTPError:
            continue
        if response.status_code == 503:
            loading = response.json()
        if response.status_code == 200:
            return loading
        time.sleep(0.005)
    raise AssertionError(f"{url} never became ready")


@pytest.fixture(scope="module")
def servers(real_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    build = llama_server_build()
    if build is None or build.number is None:
        missing(f"the build of {LLAMA_SERVER} (neither its --version nor a known package names it)")
    common = ["--model", str(real_model), "--alias", "m", "--host", "127.0.0.1", "--parallel", "2",
              "--ctx-size", "1024"]
    # The real server is polled from the moment it starts, on a port chosen here: it answers 503
    # while loading, before it logs its "listening" line.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(folder / "real.log", "w") as sink:
        real = subprocess.Popen([str(LLAMA_SERVER), *common, "--port", str(port)], stdout=sink,
                                stderr=subprocess.STDOUT, env={**os.environ, "LLAMA_API_KEY": KEY})
    real_url = f"http://127.0.0.1:{port}"
    loading = {"real": wait_ready(real_url)}
    sim, sim_url = start([sys.executable, "-m", "hpcserve.llama.simulator", *common, "--port", "0", "--sim-load-time", "0.3",
                          "--sim-build", build.name],
                         folder / "sim.log")
    loading["sim"] = wait_ready(sim_url)
    yield {"real": real_url, "sim": sim_url, "loading": loading}
    for process in (real, sim):
        process.terminate()
        process.wait(10)


AUTH = {"Authorization": f"Bearer {KEY}"}
# ignore_eos (a llama-server option; the simulator ignores it): the real model could otherwise
# end at its first token, and a stream without a content chunk has another shape.
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, "ignore_eos": True}

REQUESTS = {
    "health": ("GET", "/health", None, {}),
    "models": ("GET", "/v1/models", None, {}),
    "models with key": ("GET", "/v1/models", None, AUTH),
    "slots before any request": ("GET", "/slots", None, AUTH),
    "chat": ("POST", "/v1/chat/completions", CHAT, AUTH),
    "chat streamed": ("POST", "/v1/chat/completions", {**CHAT, "stream": True}, AUTH),
    "chat streamed with usage": ("POST", "/v1/chat/completions",
                                 {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, AUTH),
    "completion": ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True}, AUTH),
    "completion streamed": ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "stream": True,
                                                         "ignore_eos": True}, AUTH),
    "chat n=2": ("POST", "/v1/chat/completions", {**CHAT, "n": 2}, AUTH),
    "n above the slots": ("POST", "/v1/chat/completions", {**CHAT, "n": 3}, AUTH),
    "no key": ("POST", "/v1/chat/completions", CHAT, {}),
    "wrong key": ("GET", "/slots", None, {"Authorization": "Bearer nope"}),
    "bad messages": ("POST", "/v1/chat/completions", {"messages": "not a list"}, AUTH),
    "unknown path": ("GET", "/no/such/endpoint", None, AUTH),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_same_status_and_shape(servers, name):
    method, path, body, headers = REQUESTS[name]
    answers = {}
    for which in ("real", "sim"):
        response = httpx.request(method, servers[which] + path, json=body, headers=headers, timeout=60)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        answers[which] = (response.status_code, events(response.text) if streamed else shape(response.json()))
    assert answers["sim"] == answers["real"]


def test_n_fans_out_over_slots_like_the_real_server(servers):
    """`n: 2` streamed: both answer each choice with its own index, role, content and finish chunks
    (interleaved in an order of their own, so compared as sets of event shapes), and n above the
    slots is refused by both, naming the limit."""
    seen = {}
    for which in ("real", "sim"):
        response = httpx.post(servers[which] + "/v1/chat/completions", headers=AUTH, timeout=60,
                              json={**CHAT, "n": 2, "stream": True})
        chunks = [json.loads(block[len("data: "):]) for block in response.text.split("\n\n")
                  if block.startswith("data: {")]
        seen[which] = ({c["choices"][0]["index"] for c in chunks},
                       sorted({json.dumps(shape(c), sort_keys=True) for c in chunks}),
                       response.text.rstrip().endswith("data: [DONE]"))
    assert seen["sim"] == seen["real"] and seen["real"][0] == {0, 1}
    errors = [httpx.post(servers[w] + "/v1/chat/completions", headers=AUTH, timeout=60,
                         json={**CHAT, "n": 3}).json()["error"] for w in ("real", "sim")]
    # The wording is b11434's ("Field 'n': Value must be between 1 <= value <= 2, ..."); another
    # build may word it otherwise: the limit (the slots) must be named.
    assert errors[0]["type"] == errors[1]["type"] == "invalid_request_error"
    assert "2" in errors[0]["message"] and "2" in errors[1]["message"], errors


def test_loading_answer_has_the_same_shape(servers):
    if servers["loading"]["real"] is None:
        pytest.skip("the real llama-server loaded its model before the first /health answered")
    assert shape(servers["loading"]["sim"]) == shape(servers["loading"]["real"])
    assert servers["loading"]["sim"]["error"]["message"] == servers["loading"]["real"]["error"]["message"]


def test_simulator_queues_beyond_its_slots(servers):
    """Like llama-server, requests beyond --parallel wait inside the server (visible in /sim/stats)."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda _: httpx.post(servers["sim"] + "/v1/chat/completions", headers=AUTH, timeout=60,
                                           json={**CHAT, "max_tokens": 10}), range(5)))
    before = time.time()
    stats = httpx.get(servers["sim"] + "/sim/stats").json()
    assert stats["max_busy"] == 2 and stats["max_waiting"] >= 1
    assert stats["first_over"] is not None and stats["first_over"] <= before   # when a request first found no free slot


def test_props_has_what_hpcserve_reads_and_the_same_build(servers):
    """/props: the build (build_info) and slots (total_slots) hpcserve's status reads, the same
    build on both (the simulator answers as the real server's build)."""
    props = {which: httpx.get(servers[which] + "/props", headers=AUTH, timeout=10).json() for which in ("real", "sim")}
    real, sim = (builds.parse_build_info(props[w]["build_info"]) for w in ("real", "sim"))
    assert real is not None and sim is not None, props
    # A build without git names no number in build_info ("b0-unknown"): then the package named it.
    assert sim.number == llama_server_build().number and real.number in (None, sim.number)
    assert props["real"]["total_slots"] == props["sim"]["total_slots"] == 2
    assert "n_ctx" in props["real"]["default_generation_settings"]
    assert "n_ctx" in props["sim"]["default_generation_settings"]


def test_admission_reads_the_real_servers_shape_and_refuses_one_without_the_key(servers, real_model, tmp_path):
    """llama.props.admit on live answers: the real server (and the simulator) started with -np 2
    -c 1024 is admitted as parallel 2 / context 1024 and refused as parallel 4 or context 4096; a
    real llama-server started without LLAMA_API_KEY (a wrapper that drops the environment) answers
    /props to anyone and is refused."""
    for which in ("real", "sim"):
        with_key = httpx.get(servers[which] + "/props", headers=AUTH, timeout=10).json()
        without = httpx.get(servers[which] + "/props", timeout=10).status_code
        fits = llama_props.admit(config.Model(name="m", gguf=real_model, parallel=2, context_size=1024), with_key, without)
        assert fits is not None and fits.refusal is None, which
        for wrong in ({"parallel": 4, "context_size": 1024}, {"parallel": 2, "context_size": 4096}):
            verdict = llama_props.admit(config.Model(name="m", gguf=real_model, **wrong), with_key, without)
            assert verdict is not None and verdict.refusal, (which, wrong)
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_API_KEY"}
    with open(tmp_path / "keyless.log", "w") as sink:
        keyless = subprocess.Popen([str(LLAMA_SERVER), "--model", str(real_model), "--host", "127.0.0.1", "--port", "0",
                                    "--parallel", "2", "--ctx-size", "1024"], stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (match := re.search(r"listening on http://[^ ]*:(\d+)", (tmp_path / "keyless.log").read_text())):
            assert keyless.poll() is None and time.monotonic() < deadline, (tmp_path / "keyless.log").read_text()
            time.sleep(0.05)
        url = f"http://127.0.0.1:{match.group(1)}"
        wait_ready(url)
        verdict = llama_props.admit(config.Model(name="m", gguf=real_model, parallel=2, context_size=1024),
                                    httpx.get(url + "/props", timeout=10).json(), httpx.get(url + "/props", timeout=10).status_code)
        assert verdict is not None and "without the backend key (HTTP 200)" in (verdict.refusal or "")
    finally:
        keyless.terminate()
        keyless.wait(10)
