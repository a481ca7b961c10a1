"""The llama-server builds this machine cannot run, through their captured answers.

tests/replay/llama-bNUMBER/ holds `curl -i` answers of one build (tests/replay/capture_llama.py);
the simulator, told to answer as that build, must give the same status and shape to each request
it emulates. The build scripts/setup.sh installed here is compared live by test_simulator.py; this
file covers every captured build, so both the AVX-512 wheel (b10434) and the source build (b11434)
are checked on any CPU. Every captured answer is either compared or named in NOT_EMULATED with the
reason (test_every_capture_is_compared_or_named).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import pytest

from hpcserve.llama import builds
from tests.integration.test_simulator import shape, start
from tests.replay.capture_llama import KEY, REQUESTS as CAPTURE_REQUESTS

REPLAY = Path(__file__).resolve().parent.parent / "replay"
CAPTURED = sorted(REPLAY.glob("llama-b*"))
# Captured, compared otherwise or not at all, and why.
NOT_EMULATED = {
    "props-key": "full /props; the fields hpcserve reads are compared in test_props_fields",
    "metrics-key": "/metrics: hpcserve reads HAProxy's metrics, not llama-server's",
}
# Capture file -> the request it answers: what capture_llama.py sent, less NOT_EMULATED.
REQUESTS = {name: request for name, request in CAPTURE_REQUESTS.items() if name not in NOT_EMULATED}
AUTH = {"Authorization": f"Bearer {KEY}"}


def parse_capture(path: Path) -> tuple[int, dict | list]:
    """(status, JSON body) of a `curl -i` capture."""
    head, _, body = path.read_text().partition("\n\n")
    return int(head.split()[1]), json.loads(body)


def build_of(folder: Path) -> builds.Build:
    """The build a capture folder holds: its `--version`, or the package that installed it
    ("installed by: PyPI NAME VERSION", written by capture_llama.py where `--version` names none)."""
    text = (folder / "version.txt").read_text()
    build = builds.parse_version(text)
    installed = re.search(r"^installed by: PyPI (\S+) (\S+)$", text, re.MULTILINE)
    if installed and (build is None or build.number is None):
        build = builds.from_distribution(installed.group(1), installed.group(2))
    assert build is not None and f"llama-b{build.number}" == folder.name, folder
    return build


@pytest.fixture(scope="module", params=CAPTURED, ids=[f.name for f in CAPTURED])
def replayed(request, tmp_path_factory):
    """(capture folder, simulator URL answering as that build)."""
    folder = request.param
    log = tmp_path_factory.mktemp(folder.name) / "sim.log"
    process, url = start([sys.executable, "-m", "hpcserve.llama.simulator", "--model", ".cache/models/gemma3-270m-q4_k_m.gguf",
                          "--port", "0", "-c", "1024", "-np", "2", "--sim-load-time", "0",
                          "--sim-build", build_of(folder).name], log, key=KEY)
    yield folder, url
    process.terminate()
    process.wait(10)


def test_every_capture_is_compared_or_named():
    assert CAPTURED, "no captured builds in tests/replay"
    for folder in CAPTURED:
        names = {p.stem for p in folder.glob("*.http")}
        assert names == set(REQUESTS) | set(NOT_EMULATED), folder


def test_the_captured_builds_are_the_two_setup_installs():
    assert {build_of(f).number for f in CAPTURED} >= {10434, 11434}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_same_status_and_shape_as_the_build(replayed, name):
    folder, url = replayed
    status, body = parse_capture(folder / f"{name}.http")
    method, path, payload, headers = REQUESTS[name]
    response = httpx.request(method, url + path, json=payload, headers=headers, timeout=30)
    assert (response.status_code, shape(response.json())) == (status, shape(body)), f"{folder.name} {name}"


def test_props_fields(replayed):
    """/props of the build and of the simulator: the build (build_info) and slots hpcserve reads."""
    folder, url = replayed
    _, real = parse_capture(folder / "props-key.http")
    sim = httpx.get(url + "/props", headers=AUTH, timeout=10).json()
    assert builds.parse_build_info(sim["build_info"]).number == build_of(folder).number  # type: ignore[union-attr]
    # A build without git names no number ("b0-unknown"); the package that installed it did.
    assert builds.parse_build_info(real["build_info"]).number in (None, build_of(folder).number)  # type: ignore[union-attr]
    assert sim["total_slots"] == real["total_slots"] == 2
    assert set(sim["default_generation_settings"]) <= set(real["default_generation_settings"])

