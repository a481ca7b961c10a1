"""The pure core (hpcserve/core): it imports nothing outside the standard library and itself, and
its membership and slot rules give the HAProxy runtime commands the adapter sends."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

import hpcserve.core
from hpcserve.core.membership import (MembershipChange, free_slots, into_rotation, leaving_map, map_commands, membership_change,
                                      within_slots, worker_claim)
from hpcserve.core.pool import Server, job_id_of, server_name

CORE = Path(hpcserve.core.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in a file: level 0 is absolute, 1 is `from .x`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_the_core_imports_only_the_standard_library_and_itself():
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 5, "the core's modules were not found"
    outside = [f"{path.name}: {'.' * level}{module}" for path in files for level, module in _imports(path)
               if (level == 0 and module.split(".")[0] not in sys.stdlib_module_names) or level > 1]
    assert outside == []


PACKAGE = CORE.parent
#: What the adapters (a folder per outside system) may import of hpcserve: the pure core and the
#: plumbing below everything, and their own folder; never the layers that use them (control/,
#: access/, site/, clients/, cli/).
BASE = {"core", "config", "state", "proc", "templates", "errors", "releases"}
ADAPTERS = ("slurm", "haproxy", "llama")
#: Known exceptions: none (the key map is handed to the HAProxy adapter: access.keys.serving_haproxy).
EXCEPTIONS: set[tuple[str, str]] = set()


def _hpcserve_imports(path: Path, package: tuple[str, ...]) -> set[str]:
    """The top-level hpcserve packages or modules that `path`, a module of hpcserve's subpackage
    `package` (e.g. ("haproxy",)), imports."""
    found = set()
    for level, module in _imports(path):
        if level == 0:
            parts = module.split(".")
            if parts[0] == "hpcserve" and len(parts) > 1:
                found.add(parts[1])
        else:
            base = list(package[:len(package) - (level - 1)])
            parts = base + ([m for m in module.split(".") if m] if module else [])
            if parts:
                found.add(parts[0])
    return found


def test_adapters_import_only_the_core_the_plumbing_and_themselves():
    checked = 0
    wrong = []
    for adapter in ADAPTERS:
        for path in sorted((PACKAGE / adapter).glob("*.py")):
            checked += 1
            name = str(path.relative_to(PACKAGE))
            wrong += [f"{name}: {m}" for m in _hpcserve_imports(path, (adapter,)) - BASE - {adapter}
                      if (name, m) not in EXCEPTIONS]
    assert checked >= 12 and wrong == []


def test_only_the_plumbing_is_left_loose_in_the_package():
    """Everything else lives in a folder per outside system or per group of commands."""
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert loose == {"errors", "proc", "releases", "state", "templates"}


def test_the_layering_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from ..control import reconcile\nfrom . import runtime\nfrom hpcserve.access import keys\n"
                   "from ..core.pool import Server\n")
    assert _hpcserve_imports(bad, ("haproxy",)) - BASE - {"haproxy"} == {"control", "access"}


def test_the_purity_check_sees_an_outside_import(tmp_path):
    """The check above can fail: a third-party import and a climb out of the package are seen."""
    bad = tmp_path / "bad.py"
    bad.write_text("import httpx\nfrom ..config import Deployment\nfrom .pool import Server\nimport json\n")
    assert _imports(bad) == [(0, "httpx"), (2, "config"), (1, "pool"), (0, "json")]
    assert "httpx" not in sys.stdlib_module_names and "json" in sys.stdlib_module_names


@dataclasses.dataclass(frozen=True)
class Live:
    """A live server as the runtime API reports it (the fields core.membership reads)."""

    down: bool = False
    draining: bool = False
    in_maintenance: bool = False
    weight: int = 1


def server(job_id: str, draining: bool = False, healthy: bool = True) -> Server:
    return Server("m", job_id, "10.0.0.1", 5000, draining=draining, healthy=healthy)


def change(wanted: list[Server], live: dict[str, Live], *, state: str = "drain",
           weight_last: bool = False) -> MembershipChange:
    return membership_change({("model_m", s.name): s for s in wanted},
                             {("model_m", name): ls for name, ls in live.items()},
                             leaving_state=state, weight_last=weight_last, options=lambda s: "check")


def test_a_new_server_is_added_out_of_rotation_then_put_in():
    result = change([server("7")], {})
    assert result.added == ("add server model_m/job7 10.0.0.1:5000 check weight 0 id 7",
                            "enable health model_m/job7")
    assert result.commands == ("set server model_m/job7 weight 1", "set server model_m/job7 state ready")


def test_where_haproxy_2744_is_unfixed_the_weight_comes_last():
    assert change([server("7")], {}, weight_last=True).commands == (
        "set server model_m/job7 weight 0", "set server model_m/job7 state ready", "set server model_m/job7 weight 1")
    assert into_rotation("b/s", weight_last=True)[-1] == "set server b/s weight 1"
    assert into_rotation("b/s", weight_last=False)[-1] == "set server b/s state ready"


def test_a_leaving_server_is_drained():
    result = change([server("7", draining=True)], {"job7": Live()})
    assert result.added == () and result.commands == ("set server model_m/job7 state drain",)


def test_with_affinity_leaving_means_weight_0_and_the_leaving_map_never_a_state_change():
    """leaving_state "weight": the server keeps its state (a state change with a request in its own
    queue overfilled it on HAProxy 3.0.11); the leaving map moves its conversations."""
    result = change([server("7", draining=True)], {"job7": Live()}, state="weight")
    assert result.commands == ("set server model_m/job7 weight 0",)
    assert change([server("7", draining=True)], {"job7": Live(weight=0)}, state="weight").commands == ()
    back = change([server("7")], {"job7": Live(weight=0)}, state="weight", weight_last=True).commands
    assert back[-1] == "set server model_m/job7 weight 1"
    assert leaving_map({("model_m", "job7"): server("7", draining=True), ("model_m", "job8"): server("8")}) == {
        "model_m/job7": "1"}
    assert map_commands("/s/leaving.map", {"model_m/job6": "1"}, {"model_m/job7": "1"}) == [
        "del map /s/leaving.map model_m/job6", "add map /s/leaving.map model_m/job7 1"]


def test_a_server_back_from_drain_returns_to_rotation():
    assert change([server("7")], {"job7": Live(draining=True)}).commands == (
        "set server model_m/job7 weight 1", "set server model_m/job7 state ready")


def test_a_server_no_longer_wanted_goes_to_maintenance_then_is_deleted():
    result = change([], {"job7": Live()})
    assert result.commands == ("set server model_m/job7 state maint", "del server model_m/job7")


def test_a_down_server_seen_healthy_is_brought_up_and_an_unhealthy_one_is_not():
    assert change([server("7")], {"job7": Live(down=True)}).commands == ("set server model_m/job7 health up",)
    assert change([server("7", healthy=False)], {"job7": Live(down=True)}).commands == ()
    assert change([server("7", draining=True)], {"job7": Live(down=True, draining=True)}).commands == ()


def test_the_same_membership_sends_nothing():
    assert change([server("7"), server("8")], {"job7": Live(), "job8": Live()}) == MembershipChange()


@pytest.mark.parametrize("slots, claimed, expected", [(4, 0, 4), (4, 3, 1), (4, 4, 1), (4, 9, 1)])
def test_free_slots_never_reach_zero_which_haproxy_reads_as_no_limit(slots, claimed, expected):
    assert free_slots(slots, claimed) == expected


def test_within_slots_lowers_only_claimed_serving_servers():
    servers = [server("1"), server("2"), server("3", draining=True)]
    lowered = within_slots(servers, lambda s: 4, {"job1": 3, "job3": 2})
    assert [s.maxconn for s in lowered] == [1, None, None]


@pytest.mark.parametrize("limit, sessions, old, queued, connections, expected", [
    (4, 2, True, 0, 2, 4),     # an old worker answers one more request on each connection it holds
    (4, 2, True, 0, 3, 4),     # ... up to its maxconn
    (4, 2, False, 0, 2, 4),    # the current worker fills its maxconn
    (4, 1, True, 0, 1, 2),     # one stream and its connection: that connection may bring one more
    (4, 0, True, 0, 0, 0),     # nothing left that could arrive: it claims nothing
    (4, 2, True, 3, 0, 4),     # its queue refills every slot its maxconn allows
    (4, 1, True, 1, 0, 2),     # ... as far as the queue goes
    (2, 3, True, 0, 3, 3),     # more sessions than maxconn: it claims them all
])
def test_a_worker_claims_what_it_can_still_fill(limit, sessions, old, queued, connections, expected):
    assert worker_claim(limit, sessions, old=old, queued=queued, connections=connections) == expected


def test_server_names_round_trip_and_refuse_other_names():
    assert server_name("1234") == "job1234" and job_id_of("job1234") == "1234"
    assert job_id_of("BACKEND") is None and job_id_of("jobx") is None and job_id_of("wake") is None
