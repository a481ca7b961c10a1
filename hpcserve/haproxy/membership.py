"""The servers of a running HAProxy, changed through its runtime API, and their slots shared
between the workers a reload leaves behind.

Membership: a server is added, drained, returned to rotation or deleted without a reload (the
commands come from core.membership.membership_change). Slot sharing: a reload starts a new worker
that knows nothing of the streams and queue its predecessors still serve, so each server's
maxconn is split between them (core.membership has the arithmetic; these methods read the
workers' `show stat` through the master CLI's "@!PID" prefix and lower the current worker's
`maxconn server`: a stopping worker refuses every change of its servers, see
core.membership.MembershipChange).
Facts relied on: HAProxy 2.6 management guide (add/del server, set server state/weight, set
maxconn server, the master CLI), and the measurements cited in each method.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .. import releases
from ..config import Deployment
from ..core.membership import free_slots, leaving_map, map_commands, membership_change, worker_claim
from ..core.pool import Server
from ..errors import CommandError, HAProxyError
from . import runtime
from ..state import HAProxyFiles
from .config import backend_name, leaving_state, server_options

log = logging.getLogger(__name__)


class Membership:
    """The runtime side of one deployment's HAProxy: its servers and their maxconn per worker.

    Args:
        deployment: the deployment (its models give each server's slots).
        paths: the HAProxy files (admin and master sockets).
        release: returns the running HAProxy's release (or None if unknown); raises CommandError
            when `haproxy -v` fails.
    """

    def __init__(self, deployment: Deployment, paths: HAProxyFiles,
                 release: Callable[[], releases.Release | None]):
        self.deployment = deployment
        self.paths = paths
        self._release = release

    def wanted(self, servers: list[Server]) -> dict[tuple[str, str], Server]:
        """(HAProxy backend, server name) -> server, for the servers of this deployment's models."""
        models = {m.name: m for m in self.deployment.models}
        return {(backend_name(models[s.model]), s.name): s for s in servers if s.model in models}

    def leaving_map(self, servers: list[Server]) -> dict[str, str]:
        """The leaving map for `servers` (core.membership.leaving_map): what the file holds."""
        return leaving_map(self.wanted(servers))

    def slots(self, server: Server) -> int:
        """The slots (llama-server --parallel) of `server`'s model."""
        return self.deployment.model(server.model).parallel

    def held_sessions(self, old_only: bool = True) -> dict[str, int]:
        """Server name -> sessions held by the old workers (or by every worker: old_only=False).

        Raises:
            HAProxyError: the master did not answer, or relayed no whole `show stat` of a worker
                (runtime.parse_worker_stats).
        """
        info = runtime.show_proc(self.paths.master_socket)
        held: dict[str, int] = {}
        for pid in info.old_workers + (() if old_only else info.workers):
            for stat in runtime.worker_stats(self.paths.master_socket, pid).servers:
                held[stat.server] = held.get(stat.server, 0) + stat.sessions
        return held

    def old_worker_claims(self, servers: list[Server], current: bool = False) -> dict[str, int]:
        """Server name -> slots of `servers` the old workers (and the current one: current=True)
        can still fill (core.membership.worker_claim has the rule).

        Raises:
            HAProxyError: the master did not answer, or relayed no whole `show stat` of a worker
                (runtime.parse_worker_stats).
        """
        return self._claims_and_limits(servers, current)[0]

    def _claims_and_limits(self, servers: list[Server], current: bool
                           ) -> tuple[dict[str, int], dict[str, list[tuple[int, int, str]]], set[str]]:
        """From one `show stat` of each worker (through the master): the claims of
        old_worker_claims(), server name -> (maxconn, pid, backend) of each current worker, and
        the names of the servers an old worker claims slots of."""
        info = runtime.show_proc(self.paths.master_socket)
        ours = {s.name for s in servers}
        claimed: dict[str, int] = {}
        limits: dict[str, list[tuple[int, int, str]]] = {}
        held_by_old: set[str] = set()
        for pid in info.old_workers + (info.workers if current else ()):
            worker = runtime.worker_stats(self.paths.master_socket, pid)
            for stat in worker.servers:
                if stat.server not in ours:
                    continue
                queue = worker.backends.get(stat.backend)
                claim = worker_claim(stat.limit, stat.sessions, old=pid in info.old_workers,
                                     queued=queue.queued if queue else 0, connections=worker.connections)
                claimed[stat.server] = claimed.get(stat.server, 0) + claim
                if pid in info.old_workers:
                    held_by_old.add(stat.server)
                else:
                    limits.setdefault(stat.server, []).append((stat.limit, pid, stat.backend))
        return claimed, limits, held_by_old

    def full(self, servers: list[Server], claims: dict[str, int]) -> set[str]:
        """The names of the serving servers (of this deployment's models, not draining) whose
        slots `claims` (server name -> slots the workers can fill; old_worker_claims) all take."""
        models = {m.name for m in self.deployment.models}
        return {s.name for s in servers if not s.draining and s.model in models
                and claims.get(s.name, 0) >= self.slots(s)}

    def make_room(self, servers: list[Server], timeout: float) -> bool:
        """Before a reload: free one slot of every serving server the running workers fill.

        On such a server, lowers by one the current worker's maxconn (not below 1: a server of
        one slot cannot be shared), then waits, polling every 0.2 s, until a stream above it has
        ended, at most `timeout` seconds; where old workers hold the slots (their maxconn cannot
        be lowered), it waits for their streams, queue and client connections to end. Returns
        True when every serving server has a free slot for the next worker. A `set maxconn server`
        that gets an answer (a refusal) is sent again at the next poll, and so is a read that
        fails (no answer, or a worker's `show stat` cut short, as one is while the worker exits):
        ending the wait there let a reload at saturation give a full server one request more than
        its slots (tests/integration/test_haproxy.py, the unreadable answer).
        """
        deadline = time.monotonic() + timeout
        lowered: set[str] = set()
        targets: dict[str, int] = {}    # server name -> the maxconn asked for
        master = self.paths.master_socket
        while True:
            try:
                claims, limits, held_by_old = self._claims_and_limits(servers, current=True)
                full = self.full(servers, claims)
                if not full:
                    return True
                if time.monotonic() >= deadline:
                    return False
                refused: set[str] = set()
                for name in full - lowered:
                    limit, pid, backend = max(limits.get(name, []), default=(0, 0, ""))
                    if limit > 1 or name in targets:
                        target = targets.setdefault(name, limit - 1)
                        answer = runtime.command(master, f"@!{pid} set maxconn server {backend}/{name} {target}")
                        # An answer is a refusal (or the master could not reach the worker): the same
                        # target again at the next poll.
                        (refused if answer.strip() else lowered).add(name)
                if not full & (lowered | held_by_old | refused):
                    return False  # only the current worker fills them, at maxconn 1: nothing to wait for
            except HAProxyError as exc:
                log.debug("make_room: %s; trying again at the next poll", exc)
                if time.monotonic() >= deadline:
                    return False
            time.sleep(0.2)

    def settle(self, servers: list[Server], timeout: float) -> bool:
        """Give each server of the current worker the slots old workers no longer claim.

        Polls every 0.2 s until no old worker is left or `timeout` seconds passed (0: one pass).
        Returns True when settled (every serving server back at maxconn = slots).
        A pass that meets an error of the runtime API (no answer, or a worker's `show stat` cut
        short, as one does while it exits) raises no maxconn and is tried again at the next poll;
        one still failing at the deadline returns False quietly: the next step settles again.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                claims = self.old_worker_claims(servers)
                current = {s.server: s for s in runtime.show_stat(self.paths.admin_socket)}
                models = {m.name: m for m in self.deployment.models}
                for server in servers:
                    stat = current.get(server.name)
                    if server.draining or stat is None or server.model not in models:
                        continue
                    where = f"{backend_name(models[server.model])}/{server.name}"
                    free = free_slots(self.slots(server), claims.get(server.name, 0))
                    if stat.limit != free:
                        runtime.command(self.paths.admin_socket, f"set maxconn server {where} {free}")
                if not runtime.show_proc(self.paths.master_socket).old_workers:
                    return True
            except HAProxyError as exc:
                log.debug("settle: %s; trying again at the next poll", exc)
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def sync(self, servers: list[Server]) -> None:
        """Add, drain, un-drain and delete servers of the running worker to match `servers`.

        With affinity, the leaving map of the running worker is made to match `servers` too
        (core.membership.leave). A new server (or one back from drain) enters rotation in one of
        two ways, by release
        (releases.fixes_queue_overshoot). Where HAProxy issue #2744 is unfixed (Debian's 2.6.12 and
        3.0.11 among them), a server that leaves maintenance with its weight set may take up to
        twice its maxconn from the backend queue (measured once on 2.6.12 under 200 queued streams,
        maxconn 8), so it gets weight 0, its state, and only then weight 1. The price, measured on
        2.6.12 and 3.0.11 (tests/integration/test_haproxy.py): raising the weight takes nothing
        from the backend queue, so requests already waiting stay for the other servers and the
        returning server gets new arrivals only. Where #2744 is fixed, it gets its weight first and
        then its state: it takes up to maxconn of the waiting requests at once. A server to
        delete is put in maintenance first; HAProxy refuses
        `del server` while connections remain, so such a server stays in maintenance (taking no
        request) and the next step deletes it.

        Raises:
            HAProxyError: the runtime API refused a command (other than a busy `del server`).
        """
        models = {m.name: m for m in self.deployment.models}
        ours = {backend_name(m) for m in self.deployment.models}
        wanted = self.wanted(servers)
        live = {(ls.backend, ls.name): ls for ls in runtime.show_servers(self.paths.admin_socket)
                if ls.backend in ours}
        try:
            weight_last = not releases.fixes_queue_overshoot(self._release())
        except CommandError:    # `haproxy -v` failed now: the way that is safe on every release
            weight_last = True
        state = leaving_state(self.deployment)
        change = membership_change(wanted, live, leaving_state=state, weight_last=weight_last,
                                   options=lambda s: server_options(self.deployment, models[s.model]))
        marks: list[str] = []
        if state == "weight":
            # The leaving map first: a server's conversations stop sticking to it before its weight
            # drops (and one returning to rotation is unmarked with its weight set again).
            live_map = runtime.show_map(self.paths.admin_socket, self.paths.leaving_map_file)
            if live_map is not None:   # None: a worker whose config predates the map (the reload brings it)
                marks = map_commands(str(self.paths.leaving_map_file), live_map, leaving_map(wanted))
        self._send(list(change.added) + marks + list(change.commands))

    def _send(self, commands: list[str]) -> None:
        for line in commands:
            answer = runtime.command(self.paths.admin_socket, line).strip()
            if line.startswith("del server") and "connections" in answer:
                continue  # still in use: it stays in maintenance, the next step deletes it
            if answer and not answer.startswith(("New server registered", "Server deleted")):
                raise HAProxyError(f"HAProxy refused '{line}': {answer.splitlines()[0]}")
