"""HAProxy membership as arithmetic: which runtime commands turn the live servers into the wanted
ones, and how the slots of a server are shared between HAProxy workers. Pure, no I/O; the HAProxy
adapter (hpcserve/haproxy/process.py) reads the live state and sends what these functions return.

Sources: HAProxy 2.6 management guide (`add server`, `set server ... state|weight|health`,
`del server`, `set maxconn server`); HAProxy issue #2744 for the order of weight and state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from .pool import Server


class LiveServer(Protocol):
    """A server as the running worker has it (haproxy.runtime.LiveServer, from `show servers state`)."""

    @property
    def down(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def in_maintenance(self) -> bool: ...
    @property
    def weight(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class MembershipChange:
    """The runtime API commands of one membership change, in the order they must be sent.

    Attributes:
        added: `add server` and `enable health` of each new server (sent first).
        commands: state, weight and health changes, then `del server` of each server to remove
            (a `del server` HAProxy refuses because connections remain is not an error: the server
            stays in maintenance and the next change deletes it).

    Only the current worker takes them: a worker from before a reload (stopping) answers "Proxy
    is disabled." to every change of its servers (`set server`, `set maxconn server`; measured
    on HAProxy 2.6.12, 3.0.11 and 3.2.26: tests/replay/haproxy-*/old-worker-set-server.txt). It
    goes on dispatching its own queue to every server it had, a leaving one included, until that
    queue is empty; a drain therefore waits for the old workers' sessions too
    (HAProxy.server_sessions).
    """

    added: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()


def into_rotation(where: str, weight_last: bool) -> list[str]:
    """The runtime commands that put server `where` ("backend/server") into rotation.

    Where HAProxy #2744 is unfixed (weight_last), a server that leaves maintenance with its weight
    set may take up to twice its maxconn from the backend queue, so it gets weight 0, its state,
    then weight 1; elsewhere its weight first, then its state (see releases.fixes_queue_overshoot).
    """
    if weight_last:
        return [f"set server {where} weight 0", f"set server {where} state ready", f"set server {where} weight 1"]
    return [f"set server {where} weight 1", f"set server {where} state ready"]


def is_leaving(server: LiveServer, state: str) -> bool:
    """The running worker has `server` out of rotation the way `state` ("drain" or "weight") puts it."""
    return server.weight == 0 if state == "weight" else server.draining


def leave(backend: str, server: Server, state: str) -> list[str]:
    """The runtime commands that take `server` of `backend` out of rotation the way `state` says.

    "drain": `set server ... state drain`. "weight" (affinity on): weight 0, its state kept; its
    conversations move because the stick table's match skips the servers of the leaving map
    (leaving_map, sent by the HAProxy adapter before these commands): a drained server, and one
    of weight 0, still take persistent requests (HAProxy 2.6 management guide, `set server`). Not a
    state change: on HAProxy 3.0.11, `state maint` or `state drain` sent while a request waits in
    the server's own queue and its slots are full gave it that request at once, one over its
    maxconn (`show stat` scur 5 with maxconn 4, in 3 of 3 runs; 2.6.12: none;
    tests/repro/leaving_server_overfill.py).
    """
    where = f"{backend}/{server.name}"
    return [f"set server {where} weight 0"] if state == "weight" else [f"set server {where} state {state}"]


def leaving_map(wanted: Mapping[tuple[str, str], Server]) -> dict[str, str]:
    """The leaving map HAProxy matches against (key "BACKEND/SERVER", value "1") for the servers of
    `wanted` ((backend, server name) -> Server) that drain."""
    return {f"{backend}/{name}": "1" for (backend, name), server in sorted(wanted.items()) if server.draining}


def map_text(entries: Mapping[str, str]) -> str:
    """A map file HAProxy loads: one "key value" line per entry, sorted (the same entries give the
    same text, so an unchanged map leaves its file alone)."""
    return "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))


def map_commands(map_file: str, live: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    """Runtime API commands that turn the map `live` (key -> value) into `wanted`: removals first,
    then changes, then additions (HAProxy 2.6 management guide: del map, set map, add map)."""
    commands = [f"del map {map_file} {k}" for k in sorted(live.keys() - wanted.keys())]
    commands += [f"set map {map_file} {k} {v}" for k, v in sorted(wanted.items()) if k in live and live[k] != v]
    commands += [f"add map {map_file} {k} {v}" for k, v in sorted(wanted.items()) if k not in live]
    return commands


def membership_change(wanted: Mapping[tuple[str, str], Server], live: Mapping[tuple[str, str], LiveServer], *,
                      leaving_state: str, weight_last: bool,
                      options: Callable[[Server], str]) -> MembershipChange:
    """The commands that make the live servers of our backends match `wanted`.

    Args:
        wanted: (HAProxy backend, server name) -> the server as the plan wants it.
        live: (backend, server name) -> the server as the running worker has it, for our
            backends only.
        leaving_state: "drain" or "weight": how a server leaves rotation (haproxy.config.leaving_state,
            leave()).
        weight_last: HAProxy #2744 is unfixed on this release (see into_rotation).
        options: the `add server` options of a server (haproxy.config.server_options of its model).
    Returns:
        A MembershipChange. A new server is added with weight 0 and its health check enabled, then
        put into rotation (or straight out of it when it is draining). A live server whose leaving
        differs from the wanted one is taken out (leave()) or put back; a live server marked DOWN
        that hpcserve saw healthy gets `health up`; a server no longer wanted goes to maintenance
        and is deleted.
    """
    added: list[str] = []
    commands: list[str] = []
    for (backend, name), server in sorted(wanted.items()):
        where = f"{backend}/{name}"
        current = live.get((backend, name))
        if current is None:
            added += [f"add server {where} {server.address}:{server.port} {options(server)} weight 0 "
                      f"id {server.id}", f"enable health {where}"]
        elif is_leaving(current, leaving_state) == server.draining:
            if current.down and server.healthy and not server.draining:
                commands.append(f"set server {where} health up")   # see haproxy.config.server_options
            continue
        commands += (leave(backend, server, leaving_state) if server.draining else
                     into_rotation(where, weight_last))
    gone = sorted(live.keys() - wanted.keys())
    for backend, name in gone:
        commands += [f"set server {backend}/{name} state maint", f"del server {backend}/{name}"]
    return MembershipChange(tuple(added), tuple(commands))


def free_slots(slots: int, claimed: int) -> int:
    """The maxconn a server gets in the current worker when other workers claim `claimed` of its
    `slots` (llama-server --parallel): what is left, and 1 at least.

    Not 0, which HAProxy reads as "no limit" (HAProxy 2.6 configuration manual, `maxconn` of a
    server), nor weight 0: a server with weight 0 is not eligible, and when every server of a
    backend is full (a reload at saturation) the new worker would answer 503 at once instead of
    queueing. Where other workers claim every slot, a server would so get one request more than
    its slots, waiting inside llama-server: HAProxy.update does not reload then.
    """
    return max(1, slots - claimed)


def within_slots(servers: Sequence[Server], slots: Callable[[Server], int],
                 claims: Mapping[str, int]) -> list[Server]:
    """`servers` with maxconn lowered by the slots other workers claim (server name -> slots), by
    free_slots(); draining servers and servers nobody else claims are unchanged."""
    return [dataclasses.replace(s, maxconn=free_slots(slots(s), claims[s.name]))
            if claims.get(s.name) and not s.draining else s for s in servers]


def worker_claim(limit: int, sessions: int, *, old: bool, queued: int, connections: int) -> int:
    """The slots a worker can still fill on a server.

    The current worker refills every slot its maxconn allows: it claims max(sessions, maxconn).
    An old worker (from before a reload) accepts no new connection, but it still answers requests:
    those in its backend's queue, and one more on each client connection it holds (with `option
    idle-close-on-response` a stopping worker answers the next request of an idle keep-alive
    connection, then closes it: HAProxy 2.6 configuration manual). Any of them may come to this
    server, so it claims max(sessions, min(maxconn, sessions + queued + connections)); its maxconn
    bounds it, and it cannot be lowered (a stopping worker refuses `set maxconn server`, see
    MembershipChange). An old worker with no stream, queue or connection left claims nothing.

    Args:
        limit: the worker's maxconn on the server now (`show stat` slim).
        sessions: its sessions on the server now (scur).
        old: the worker is an old one.
        queued: requests in its backend's queue (qcur).
        connections: client connections it holds open (its frontends' scur), busy or idle.
    """
    if old:
        return max(sessions, min(limit, sessions + queued + connections))
    return max(sessions, limit)
