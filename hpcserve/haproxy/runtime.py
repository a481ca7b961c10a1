"""HAProxy's runtime API and master CLI over their UNIX sockets.

Source: HAProxy 2.6 management guide, sections 9.3 (runtime API: "show stat", "show servers
state") and 9.4 (master CLI: "show proc", "reload"). A command is one line; the answer ends when
HAProxy closes the connection after we close our side.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import re
import socket
from collections.abc import Callable
from pathlib import Path

import tenacity

from ..core.membership import map_commands
from ..errors import HAProxyError

log = logging.getLogger(__name__)


def command(socket_path: Path, line: str, timeout: float = 5.0) -> str:
    """Send one command to an HAProxy socket and return its whole answer.

    Raises:
        HAProxyError: the socket is missing, refuses, or does not answer within `timeout` seconds.
    """
    log.debug("%s: %s", socket_path.name, line)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(line.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        raise HAProxyError(f"HAProxy socket {socket_path}: {exc.strerror or exc}") from None
    return b"".join(chunks).decode(errors="replace")


@dataclasses.dataclass(frozen=True)
class ServerStats:
    """One server's counters from `show stat`.

    Attributes:
        backend, server: names in haproxy.cfg.
        status: "UP", "DOWN", "DRAIN", "MAINT", "no check", ...
        sessions: current sessions (scur): requests being served now.
        queued: requests waiting in this server's queue (qcur).
        total: sessions served since the worker started (stot).
        limit: the server's maxconn now (slim), 0 when unlimited.
        weight: its effective weight now.
        retries: times a connection to it was tried again (wretr), since the worker started.
    """

    backend: str
    server: str
    status: str
    sessions: int
    queued: int
    total: int
    limit: int = 0
    weight: int = 0
    retries: int = 0


def show_stat(socket_path: Path) -> list[ServerStats]:
    """Per-server counters of the current worker (servers only, not frontends or backend totals).

    Raises:
        HAProxyError: the runtime API did not answer.
    """
    return parse_stat(command(socket_path, "show stat"))


@dataclasses.dataclass(frozen=True)
class WorkerStats:
    """One worker's counters from a single `show stat`.

    Attributes:
        servers: its server rows.
        backends: backend name -> the backend's totals (queued: its queue, qcur).
        connections: client connections it holds open, idle keep-alive ones included (the sum of
            its frontends' scur: in HTTP mode a frontend session is one client connection).
    """

    servers: list[ServerStats]
    backends: dict[str, ServerStats]
    connections: int

    @classmethod
    def gone(cls) -> WorkerStats:
        """A worker that has exited: it holds nothing."""
        return cls(servers=[], backends={}, connections=0)


def worker_stats(master_socket: Path, pid: int, attempts: int = 10, pause: float = 0.1) -> WorkerStats:
    """One worker's counters, old workers included, through the master CLI's "@!PID" prefix
    (parse_worker_stats reads the answer).

    A worker on its way out answers nothing while `show proc` still names it (measured on 2.6.12:
    an empty answer, then the master drops it). So an answer that is no whole `show stat` (or a
    connection that broke off) is asked again, up to `attempts` times `pause` seconds apart, and a
    worker that `show proc` no longer names holds nothing: empty stats.

    Raises:
        HAProxyError: the master did not answer, or relayed no whole `show stat` of a worker it
            still names.
    """
    @tenacity.retry(retry=tenacity.retry_if_exception_type(_Unreadable), stop=tenacity.stop_after_attempt(attempts),
                    wait=tenacity.wait_fixed(pause), reraise=True)
    def ask() -> WorkerStats:
        try:
            return parse_worker_stats(pid, command(master_socket, f"@!{pid} show stat"))
        except HAProxyError as exc:     # cut, empty, or the connection reset as the worker left
            info = show_proc(master_socket)
            if pid not in info.workers + info.old_workers:
                return WorkerStats.gone()
            raise _Unreadable(str(exc)) from None
    return ask()


class _Unreadable(HAProxyError):
    """A worker that the master still names answered no whole `show stat` (worker_stats asks again)."""


def parse_worker_stats(pid: int, text: str) -> WorkerStats:
    """The master CLI's answer to "@!PID show stat" as a WorkerStats.

    A worker that exited since `show proc` named it (the master answers "Can't find the target PID
    matching the prefix", HAProxy 2.6 source, cli.c) holds nothing: empty stats. Any other answer
    must be a whole `show stat` (its "# pxname," header, and the blank line it ends with on 2.6 to
    3.2: tests/replay). Reading a cut or empty answer as "no row" would tell slot sharing that the
    worker holds none of its servers' slots, and hand them to the current worker on top of its
    streams.

    Raises:
        HAProxyError: `text` is neither of those.
    """
    if text.startswith("Can't find the target PID"):
        return WorkerStats.gone()
    if not (text.startswith("# pxname,") and text.endswith("\n\n")):
        raise HAProxyError(f"no whole 'show stat' from worker {pid} through the master: {text[:120]!r}")
    rows = _stat_rows(text)
    return WorkerStats(servers=[r for r in rows if r.server not in ("BACKEND", "FRONTEND")],
                       backends={r.backend: r for r in rows if r.server == "BACKEND"},
                       connections=sum(r.sessions for r in rows if r.server == "FRONTEND"))


def show_map(socket_path: Path, map_file: Path, prefix: str = "") -> dict[str, str] | None:
    """The entries (key -> value) of the map loaded from `map_file`, or None when the worker has no
    such map. `prefix` "@!PID " asks a worker through the master CLI (HAProxy 2.6 management guide:
    `show map <map>` lists "<entry id> <key> <value>" lines).

    Raises:
        HAProxyError: the socket did not answer.
    """
    text = command(socket_path, f"{prefix}show map {map_file}")
    if text.startswith("Unknown map identifier") or "Unknown" in text.split("\n", 1)[0]:
        return None
    entries = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0].startswith("0x"):
            entries[parts[1]] = parts[2]
    return entries


def show_info(socket_path: Path) -> dict[str, str]:
    """The worker's `show info` fields (name -> value as text), e.g. "DroppedLogs" (log lines it
    could not send: the log socket's queue was full; HAProxy 2.6 management guide, `show info`).

    Raises:
        HAProxyError: the runtime API did not answer.
    """
    fields = {}
    for line in command(socket_path, "show info").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


def show_table(socket_path: Path, table: str, prefix: str = "") -> dict[str, dict[str, int]]:
    """The entries of stick table `table`: key -> {"use": trackers now, and each stored counter by
    its name as HAProxy prints it, e.g. "http_req_cnt", "gpc0_rate(60000)"} (HAProxy 2.6
    management guide, `show table <name>`: "0xADDR: key=K use=N exp=MS name=value ...").
    `prefix` "@!PID " asks a worker through the master CLI.

    Raises:
        HAProxyError: the runtime API did not answer.
    """
    entries: dict[str, dict[str, int]] = {}
    for line in command(socket_path, f"{prefix}show table {table}").splitlines():
        if not line.startswith("0x"):
            continue
        fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
        if "key" in fields:
            entries[fields.pop("key")] = {k: _int(v) for k, v in fields.items()}
    return entries


def parse_stat(text: str, rows: str = "servers") -> list[ServerStats]:
    """The server rows (or, with rows="BACKEND" or "FRONTEND", the backend or frontend rows) of a
    `show stat` CSV answer."""
    return [r for r in _stat_rows(text)
            if (r.server not in ("BACKEND", "FRONTEND") if rows == "servers" else r.server == rows)]


def _stat_rows(text: str) -> list[ServerStats]:
    """Every row of a `show stat` CSV answer: servers, and BACKEND and FRONTEND totals (server)."""
    return [ServerStats(backend=row["pxname"], server=row["svname"], status=row.get("status", ""),
                        sessions=_int(row.get("scur")), queued=_int(row.get("qcur")),
                        total=_int(row.get("stot")), limit=_int(row.get("slim")),
                        weight=_int(row.get("weight")), retries=_int(row.get("wretr")))
            for row in csv.DictReader(io.StringIO(text.lstrip("# "))) if row.get("svname") is not None]


@dataclasses.dataclass(frozen=True)
class LiveServer:
    """A server as the running worker has it (`show servers state`).

    Attributes:
        backend, name: where it is.
        address, port: where it sends requests.
        admin_state: srv_admin_state, HAProxy's admin flags (HAProxy 2.6 source, server-t.h):
            0x01 forced maintenance (`state maint`, and `disabled` in the config, which also sets
            0x04), 0x02/0x20 maintenance inherited/from DNS, 0x08 forced drain (`state drain`).
        op_state: srv_op_state (server-t.h): 0 stopped (DOWN), 1 starting, 2 running, 3 stopping.
        weight: srv_uweight, the weight set in the config or by `set server ... weight`.
    """

    backend: str
    name: str
    address: str
    port: int
    admin_state: int
    op_state: int = 2
    weight: int = 1

    @property
    def down(self) -> bool:
        """Its health checks (or the passive check) marked it DOWN."""
        return self.op_state == 0

    @property
    def draining(self) -> bool:
        """Put in drain (`set server state drain`)."""
        return bool(self.admin_state & 0x08)

    @property
    def in_maintenance(self) -> bool:
        """In maintenance: SRV_ADMF_MAINT (0x23). Not 0x04 alone, which `set server state ready`
        leaves behind on a server `disabled` in the config: it is running again (measured, 2.6.12)."""
        return bool(self.admin_state & 0x23)


def show_servers(socket_path: Path) -> list[LiveServer]:
    """Every server of the running worker, from `show servers state` (see parse_servers_state).

    Raises:
        HAProxyError: the runtime API did not answer, or not in format version 1.
    """
    return parse_servers_state(command(socket_path, "show servers state"))


def parse_servers_state(text: str) -> list[LiveServer]:
    """The servers of a `show servers state` answer (format version 1: be_id be_name srv_id
    srv_name srv_addr srv_op_state srv_admin_state srv_uweight ... srv_port is field 19; HAProxy 2.6
    management guide, and unchanged through 3.2: tests/replay).

    Raises:
        HAProxyError: the answer is not in format version 1.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "1":
        raise HAProxyError(f"unexpected answer to 'show servers state': {text[:200]!r}")
    servers = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < 19 or line.startswith("#"):
            continue
        servers.append(LiveServer(backend=fields[1], name=fields[3], address=fields[4],
                                  port=_int(fields[18]), admin_state=_int(fields[6]),
                                  op_state=_int(fields[5]), weight=_int(fields[7])))
    return servers


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    """The master's view (`show proc`).

    Attributes:
        reloads, failed_reloads: the master's counters.
        workers: pids of the current worker(s).
        old_workers: pids of workers from before a reload, still finishing their streams.
    """

    reloads: int
    failed_reloads: int
    workers: tuple[int, ...]
    old_workers: tuple[int, ...] = ()


def show_proc(master_socket: Path) -> ProcInfo:
    """Parse the master CLI's `show proc`.

    Raises:
        HAProxyError: the master did not answer or printed no master line.
    """
    return parse_proc(command(master_socket, "show proc"))


def parse_proc(text: str) -> ProcInfo:
    """The master CLI's `show proc` answer: reload counters and the pids of current and old
    workers (the "# workers" and "# old workers" sections; HAProxy 2.6 to 3.2: tests/replay).

    Raises:
        HAProxyError: the answer has no master line.
    """
    master = re.search(r"^\d+\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", text, re.MULTILINE)
    if not master:
        raise HAProxyError(f"unexpected answer to 'show proc': {text[:200]!r}")
    sections: dict[str, list[int]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("# "):
            section = line[2:].strip()
        elif re.match(r"^\d+\s+worker\s", line):
            sections.setdefault(section, []).append(int(line.split()[0]))
    return ProcInfo(reloads=int(master.group(1)), failed_reloads=int(master.group(2)),
                    workers=tuple(sections.get("workers", ())), old_workers=tuple(sections.get("old workers", ())))


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def sync_map(master_socket: Path, path: Path, entries: dict[str, str],
             also: Callable[[str], list[str]] = lambda _target: []) -> int:
    """Bring the map `path` (its name in the config) of every worker, old ones included (they
    answer the requests of their open connections after a reload), to `entries` (key -> value),
    through the master CLI: `add map`, `set map`, `del map` (HAProxy 2.6 management guide 9.3,
    9.4; core.membership.map_commands). `also(target)` gives more commands for the worker whose
    master CLI prefix is `target` ("@!PID "). A worker whose config has no such map is left alone.

    Returns:
        the number of commands sent.
    Raises:
        HAProxyError: the master did not answer, or a current worker refused a change (an old one
            may have stopped meanwhile: its answer is ignored).
    """
    info = show_proc(master_socket)
    sent = 0
    for pid in info.workers + info.old_workers:
        target = f"@!{pid} "
        live = show_map(master_socket, path, prefix=target)
        if live is None:
            continue
        for line in map_commands(str(path), live, entries) + also(target):
            answer = command(master_socket, target + line).strip()
            sent += 1
            if answer and pid in info.workers:
                raise HAProxyError(f"HAProxy refused to change {path.name}: {answer.splitlines()[0]}")
    return sent
