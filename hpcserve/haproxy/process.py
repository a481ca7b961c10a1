"""Running the deployment's HAProxy: validate, start, reload, stop, and `update()`, which decides
between a runtime change (membership.py) and a reload. Unprivileged, master-worker.

Facts relied on (HAProxy 2.6 management guide and tests on this machine, ../shared/DESIGN.md):
`haproxy -c -f FILE` validates a config without binding; `-W -D -S SOCK` runs a daemonised master
whose CLI takes `reload` and `show proc`; a failed reload is silent in 2.6 except for the master's
"[failed: N]" counter, so every reload is checked there and rolled back; the reload keeps
in-flight streams on the old worker until they end or hard-stop-after expires; `-c` does not
catch a port already in use, so that is checked before starting.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shlex
import signal
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from . import accesslog
from .. import proc, releases
from ..config import Deployment
from ..core.membership import map_text, within_slots
from ..core.pool import Server, job_id_of
from ..errors import CommandError, HAProxyError, HpcserveError
from ..state import HAProxyFiles, write_private, write_private_if_changed
from . import runtime
from .membership import Membership
from .config import models_list, paths, render

KEY_ENV = "HPCSERVE_BACKEND_KEY"  # haproxy.cfg reads the backend key from this variable


@dataclasses.dataclass(frozen=True)
class Stats:
    """One `show stat` of the current worker.

    Attributes:
        servers: server name ("job" + job id) -> its counters.
        backends: backend name -> its totals (queued: requests waiting in the backend's queue).
    """

    servers: Mapping[str, runtime.ServerStats]
    backends: Mapping[str, runtime.ServerStats]


class HAProxy:
    """The HAProxy of one deployment.

    Args:
        deployment: the deployment (bind address, port, binary, state directory).
        backend_key: the key HAProxy adds to every forwarded request (passed through its
            environment, never its command line or config file).
        key_map: returns the key map's entries (digest -> "name|class|..."; access/keys.py
            key_map), None when the frontend is open; read at each update, apply and sync_keys.
            Without it only what reads HAProxy works (status, stats); writing a config of a
            deployment with keys raises HpcserveError.
    """

    def __init__(self, deployment: Deployment, backend_key: str,
                 key_map: Callable[[], dict[str, str] | None] | None = None):
        self.deployment = deployment
        self._key_map = key_map
        self.paths: HAProxyFiles = paths(deployment)
        self._argv0 = shlex.split(deployment.haproxy.command)
        self._env = {**os.environ, KEY_ENV: backend_key}
        self.membership = Membership(deployment, self.paths, lambda: self.release)

    @property
    def release(self) -> releases.Release | None:
        """This HAProxy's release from `haproxy -v`, read once per process.

        Raises:
            CommandError: haproxy could not be run.
        """
        return releases.haproxy(self.deployment.haproxy.command)

    @property
    def log_file(self) -> Path:
        return self.paths.log_file

    def pid(self) -> int | None:
        """The master's pid if this deployment's HAProxy runs, else None."""
        try:
            pid = int(self.paths.pid_file.read_text().split()[0])
            process = psutil.Process(pid)
            if str(self.paths.config) in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE:
                return pid
        except (OSError, ValueError, IndexError, psutil.Error):
            pass
        return None

    def running(self) -> bool:
        return self.pid() is not None

    def live_config(self) -> str | None:
        """The config HAProxy was last given, or None before the first start."""
        try:
            return self.paths.config.read_text()
        except FileNotFoundError:
            return None

    def validate(self, text: str) -> None:
        """Check `text` with `haproxy -c` (in a private temporary file).

        Raises:
            HAProxyError: HAProxy rejects it; the message carries HAProxy's first alert.
        """
        self._write_served_files()
        candidate = self.paths.candidate_config
        write_private(candidate, text)
        self.paths.server_state_file.touch(mode=0o600, exist_ok=True)
        try:
            proc.run([*self._argv0, "-c", "-f", str(candidate)], env=self._env, timeout=30)
        except CommandError as exc:
            alerts = [line for line in (exc.stderr + exc.stdout).splitlines() if "ALERT" in line]
            raise HAProxyError(f"haproxy rejected the new config, the running one stays: "
                               f"{(alerts or [str(exc)])[0].strip()}") from None
        finally:
            candidate.unlink(missing_ok=True)

    def update(self, servers: list[Server], settle_timeout: float = 30.0, room_timeout: float = 30.0) -> str:
        """Make HAProxy serve `servers` with the deployment's config, disturbing as little as possible.

        A reload starts a new worker and leaves the old one holding its streams (up to
        hard-stop-after), so frequent reloads pile up workers. Only a structural change (the
        config without its servers differs from the running one) reloads; a change of
        membership or drain goes through the runtime API, and the same membership is written to
        the file, so a restart or a later reload finds it. A reload also applies the membership
        through the runtime API first: the new worker restores each server's state from the
        server-state-file, where a saved weight wins over the config's whenever their initial
        weights agree (HAProxy 2.6 source, server_state.c: "a configuration file change has
        precedence over a unix socket change" only when iweight differs; servers added at runtime
        start at weight 0, like a draining server in the file), so the file must already say
        "drain" (or weight 0, see leaving_state) for a server leaving in this very change.

        A new worker knows nothing of the streams its predecessor still serves (nor of the queue
        the predecessor goes on dispatching), so after a reload each server would take its full
        slots again on top of them. The slots of a server are therefore shared out: before the
        reload `Membership.make_room()` frees one slot of every full server, the new worker starts
        with each server's maxconn lowered by what the running workers can still fill
        (`Membership.old_worker_claims()`), and `Membership.settle()` hands the slots over as the
        old workers' queues, streams and client connections end. Where no slot of a server freed
        within `room_timeout` (streams longer than that, or a server of one slot the running
        worker refills at once), the reload does not happen: HAProxyError, and the next step
        tries again (the lowered maxconn stays, so a slot that frees meanwhile stays free).

        Args:
            servers: the membership.
            settle_timeout: seconds to wait after a reload for old workers' streams to end
                (the next call goes on settling if they have not).
            room_timeout: seconds to wait before a reload for a stream on each full server to end.
        Returns:
            "started", "reloaded", "runtime" (changed through the runtime API) or "unchanged".
        Raises:
            HAProxyError: validation, start, reload or a runtime command failed; the file keeps the
                previous config (a runtime change already made is repaired by the next step).
        """
        text = render(self.deployment, servers)
        base = render(self.deployment, [])
        if self.deployment.haproxy.affinity_header:   # what a new worker loads (Membership.sync: the running one)
            write_private_if_changed(self.paths.leaving_map_file, map_text(self.membership.leaving_map(servers)))
        try:
            accesslog.ensure_writer(self.deployment)
        except OSError as exc:
            raise HAProxyError(str(exc)) from None
        running = self.running()
        if running and text == self.live_config():
            self.membership.sync(servers)   # the file is right; a server marked DOWN may return
            self.sync_keys()
            self.membership.settle(servers, timeout=0)
            return "unchanged"
        try:
            same_base = running and self.paths.base_config.read_text() == base
        except FileNotFoundError:
            same_base = False
        if not running:
            self.apply(text)
            write_private(self.paths.base_config, base)
            return "started"
        if not same_base:
            self.validate(text)
            # The running worker first: the new one loads its server states (drain, weight) from
            # the server-state-file, and the old one must stop sending its queue to leaving servers.
            self.membership.sync(servers)
            self.membership.make_room(servers, timeout=room_timeout)
            claims = self.membership.old_worker_claims(servers, current=True)
            full = self.membership.full(servers, claims)
            if full:
                raise HAProxyError(
                    f"not reloaded: every slot of {', '.join(sorted(full))} stayed busy for {room_timeout:g} s, and a new "
                    "HAProxy worker would send one request more (it would wait inside llama-server); the "
                    "running config stays and the next step tries again")
            self.apply(render(self.deployment, within_slots(servers, self.membership.slots, claims)))
            write_private(self.paths.config, text)  # the steady state, for restarts and later reloads
            write_private(self.paths.base_config, base)
            self.membership.settle(servers, timeout=settle_timeout)
            return "reloaded"
        self.validate(text)
        self.membership.sync(servers)
        self.sync_keys()
        write_private(self.paths.config, text)
        self.membership.settle(servers, timeout=0)
        return "runtime"

    def stats(self) -> Stats | None:
        """The current worker's counters, from one `show stat`: None when HAProxy is not running or
        did not answer (the one reader of HAProxy's load for status, autoscale and batch)."""
        if not self.running():
            return None
        try:
            text = runtime.command(self.paths.admin_socket, "show stat")
        except HAProxyError:
            return None
        return Stats(servers={s.server: s for s in runtime.parse_stat(text)},
                     backends={s.backend: s for s in runtime.parse_stat(text, rows="BACKEND")})

    def dropped_log_lines(self) -> int | None:
        """Access log lines the current worker could not send since it started (DroppedLogs of
        `show info`: the writer's socket queue was full): requests missing from the access log and
        from `hpcserve usage`. None when HAProxy does not run or did not answer."""
        if not self.running():
            return None
        try:
            return int(runtime.show_info(self.paths.admin_socket).get("DroppedLogs", "0"))
        except (HAProxyError, ValueError):
            return None

    def server_sessions(self) -> dict[str, int] | None:
        """Job id -> sessions of its server in every worker, old ones included: {} when HAProxy is
        not running (nothing can be in flight), None when it runs but did not answer (unknown: a
        drain then waits for its deadline)."""
        if not self.running():
            return {}
        try:
            held = self.membership.held_sessions(old_only=False)
        except HAProxyError:
            return None
        return {job_id: n for name, n in held.items() if (job_id := job_id_of(name)) is not None}

    def _write_served_files(self) -> None:
        """The files the config makes HAProxy serve or match: the models list, the key map."""
        write_private_if_changed(self.paths.models_file, models_list(self.deployment))
        # With OpenWebUI groups named, access/webui_groups.py keeps these two (the groups' members too).
        if not self.deployment.accounting.webui_group_accounts or not self.paths.webui_accounts_map_file.exists():
            write_private_if_changed(self.paths.webui_accounts_map_file,
                                     map_text(self.deployment.accounting.webui_accounts))
        if not self.deployment.webui.batch_groups or not self.paths.webui_batch_map_file.exists():
            write_private_if_changed(self.paths.webui_batch_map_file,
                                     map_text(batch_entries(self.deployment.webui.batch_users)))
        self._write_key_map()
        for runtime_map in (self.paths.leaving_map_file, self.paths.fair_share_map_file, self.paths.quota_map_file):
            if not runtime_map.exists():    # the config matches them (when affinity, fair share are on)
                write_private(runtime_map, "")
        # Older hpcserve kept the keys ("Bearer KEY" lines), then their hashes, in these: gone now.
        for old in ("frontend-keys.lst", "frontend-key-hashes.lst"):
            (self.paths.root / old).unlink(missing_ok=True)

    def _write_key_map(self) -> dict[str, str] | None:
        if self._key_map is None:
            if self.deployment.haproxy.auth == "open":
                return None
            raise HpcserveError(f"internal: HAProxy of {self.deployment.name} made without its key map")
        entries = self._key_map()
        if entries is not None:
            write_private_if_changed(self.paths.keys_map_file, map_text(entries))
        return entries

    def sync_keys(self) -> int:
        """Make the key map file and the running workers' key maps hold the accepted keys
        (the key_map given): a key added, changed or revoked counts from the next request, no reload.

        Old workers (from before a reload) are changed too: they still answer requests on their
        open keep-alive connections. Returns the number of runtime commands sent.

        Each key's entry of the frontend's stick table (the per-key limits count there) is made
        here too, before the key's first request: HAProxy 3.0.11 with 2 or more threads lets a
        new key's first burst past its limits when the requests make the entry themselves
        (benchmarks/stress.py: 1 in 300 bursts of 8 over max_concurrent 3, 11 in 300 over a
        rate of 3 per minute; with the entries made first, none over max_concurrent, and the
        rate's rarer race across threads is why haproxy.threads defaults to 1). The table keeps
        the entries (no `expire`), and a new worker gets them at its start (apply).

        Raises:
            HAProxyError: the runtime API refused a change.
            ConfigError: the api_keys_file cannot be read; HpcserveError: keys.json is unreadable.
        """
        entries = self._write_key_map()
        if entries is None:
            return 0
        return self._sync_map(self.paths.keys_map_file, entries, table=KEY_TABLE)

    def sync_fair_share(self, delays: dict[str, int]) -> int:
        """Make the fair-share map (Slurm account -> queue delay in ms, core.fairshare.delays) hold
        `delays`, in its file and in every running worker, old ones included: no reload. Returns
        the number of runtime commands sent.

        Raises:
            HAProxyError: the runtime API refused a change.
        """
        entries = {account: str(ms) for account, ms in sorted(delays.items())}
        write_private_if_changed(self.paths.fair_share_map_file, map_text(entries))
        return self._sync_map(self.paths.fair_share_map_file, entries)

    def sync_webui_batch(self, emails: list[str]) -> int:
        """Make the map of OpenWebUI users whose requests queue as batch hold `emails` (lower case),
        in its file and in every running worker, old ones included: no reload. Returns the number
        of runtime commands sent.

        Raises:
            HAProxyError: the runtime API refused a change.
        """
        entries = batch_entries(emails)
        write_private_if_changed(self.paths.webui_batch_map_file, map_text(entries))
        return self._sync_map(self.paths.webui_batch_map_file, entries)

    def sync_webui_accounts(self, accounts: dict[str, str]) -> int:
        """Make the map of OpenWebUI users' Slurm accounts (e-mail -> account) hold `accounts`, in
        its file and in every running worker: no reload. Returns the number of runtime commands sent.

        Raises:
            HAProxyError: the runtime API refused a change.
        """
        write_private_if_changed(self.paths.webui_accounts_map_file, map_text(accounts))
        return self._sync_map(self.paths.webui_accounts_map_file, accounts)

    def _sync_map(self, path: Path, entries: dict[str, str], table: str | None = None) -> int:
        """runtime.sync_map on this HAProxy, and with `table` that stick table's entries made for
        the map's key names (table_commands); the number of runtime commands sent (0: not running)."""
        if not self.running():
            return 0

        def entries_of_table(target: str) -> list[str]:
            if table is None:
                return []
            return table_commands(table, runtime.show_table(self.paths.master_socket, table, prefix=target), entries)
        return runtime.sync_map(self.paths.master_socket, path, entries, also=entries_of_table)

    def apply(self, text: str) -> bool:
        """Make `text` the running config: validate it, then start HAProxy or reload it.

        Returns:
            True when something changed (a start or a reload), False when `text` is what runs.
        Raises:
            HAProxyError: validation, start or reload failed; the previous config is back in
                place (and running, if it was); or the new workers refused a key (sync_keys).
        """
        running = self.running()
        if running and text == self.live_config():
            return False
        self.validate(text)
        previous = self.live_config()
        write_private(self.paths.config, text)
        try:
            self.reload() if running else self.start()
        except HAProxyError:
            if previous is None:
                self.paths.config.unlink(missing_ok=True)
            else:
                write_private(self.paths.config, previous)
                if running:
                    self._try_reload()
            raise
        # The new worker's key entries (sync_keys), and the old workers' maps: they answer the
        # requests of their open connections.
        self.sync_keys()
        return True

    def check_ports(self) -> None:
        """Raise HAProxyError, naming the field, if the frontend or the stats port is taken.

        Raises:
            HAProxyError: something listens on haproxy.bind:port or 127.0.0.1:stats_port.
        """
        settings = self.deployment.haproxy
        check_port_free(settings.bind, settings.port, "haproxy.port")
        check_port_free("127.0.0.1", settings.stats_port_or_default, "haproxy.stats_port")

    def start(self) -> None:
        """Start the master (daemonised) with the config file in place.

        Raises:
            HAProxyError: the release is older than hpcserve needs (releases.MIN_HAPROXY), the
                frontend or stats port is in use, or haproxy failed to start.
        """
        try:
            refusal = releases.haproxy_refusal(self.release)
        except CommandError as exc:
            raise HAProxyError(f"haproxy.command: {exc}") from None
        if refusal:
            raise HAProxyError(refusal)
        self.check_ports()
        self.paths.server_state_file.touch(mode=0o600, exist_ok=True)
        argv = [*self._argv0, "-W", "-D", "-S", f"{self.paths.master_socket},mode,600",
                "-p", str(self.paths.pid_file), "-f", str(self.paths.config)]
        pipe = None
        if self.deployment.haproxy.access_log:
            # The access log's pipe as HAProxy's descriptor 3 (`log fd@3`; accesslog.py), the open
            # file of open_pipe (non-blocking: a full pipe drops a line, never stalls a worker).
            try:
                opened = accesslog.open_pipe(self.paths.access_log_fifo)
                # Moved to 10 or above: in a process whose descriptor 3 was free the pipe opened as 3,
                # and `exec haproxy 3<&3 3<&-` closed it: HAProxy then wrote its log lines to
                # whatever it opened next as descriptor 3 (a socket; measured on 2.6.12).
                pipe = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, 10)
                os.close(opened)
            except OSError as exc:
                raise HAProxyError(f"the access log pipe {self.paths.access_log_fifo}: {exc.strerror or exc}") from None
            argv = ["/bin/bash", "-c", f'exec "$@" 3<&{pipe} {pipe}<&-', "haproxy", *argv]   # bash: fd numbers over 9
        try:
            proc.run(argv, env=self._env, timeout=30, output=self.log_file, pass_fds=(pipe,) if pipe is not None else ())
        except CommandError as exc:
            alerts = [line for line in exc.stderr.splitlines() if "ALERT" in line]
            raise HAProxyError(f"haproxy did not start: {(alerts or [str(exc)])[-1].strip()} "
                               f"(see {self.log_file})") from None
        finally:
            if pipe is not None:
                os.close(pipe)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # The socket file appears before the master accepts on it: wait for an answer.
            if self.running():
                try:
                    if runtime.show_proc(self.paths.master_socket).workers:
                        return
                except HAProxyError:
                    pass
            time.sleep(0.1)
        raise HAProxyError(f"haproxy started but its master is not answering (see {self.log_file})")

    def reload(self, timeout: float = 15.0) -> None:
        """Reload the running master with the config file, and check that the reload took.

        Server states are saved first (server-state-file), so drain and maint survive it.

        Raises:
            HAProxyError: the master reported a failed reload, or none happened within `timeout` s,
                or (access log on) the master does not hold the access log's pipe as its
                descriptor 3 (started by an older hpcserve): nothing is reloaded then.
        """
        pid = self.pid()
        if self.deployment.haproxy.access_log and pid is not None \
                and not accesslog.holds_pipe(pid, self.paths.access_log_fifo):
            # Its descriptor 3 is something else: the new config's `log fd@3` would write there.
            raise HAProxyError("the running HAProxy was started without the access log's pipe (by an older "
                               "hpcserve); not reloaded: `hpcserve down` and `hpcserve up` start it with the pipe")
        before = runtime.show_proc(self.paths.master_socket)
        self.save_server_state()
        counts = self._rate_counts(before.workers)
        runtime.command(self.paths.master_socket, "reload")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                now = runtime.show_proc(self.paths.master_socket)
            except HAProxyError:
                continue  # the master re-executes itself: its socket is briefly away
            if now.failed_reloads > before.failed_reloads:
                raise HAProxyError(f"haproxy reload failed, the previous config stays (see {self.log_file})")
            if now.reloads > before.reloads and now.workers:
                self._carry_rates(counts, now.workers)
                return
        raise HAProxyError(f"haproxy did not reload within {timeout:g} s (see {self.log_file})")

    def _rate_counts(self, workers: tuple[int, ...]) -> dict[str, dict[str, int]]:
        """What the current workers admitted per key and per OpenWebUI user in the last minute
        (RATE_TABLES: table -> name -> gpc0_rate + gpc1_rate), read before a reload; {} where a
        table is missing or the worker does not answer (the counts then start over, as before)."""
        counts: dict[str, dict[str, int]] = {}
        for pid in workers:
            for table in RATE_TABLES:
                try:
                    entries = runtime.show_table(self.paths.master_socket, table, prefix=f"@!{pid} ")
                except HAProxyError:
                    continue
                for name, counters in entries.items():
                    admitted = counters.get("gpc0_rate(60000)", 0) + counters.get("gpc1_rate(60000)", 0)
                    if admitted > 0:
                        counts.setdefault(table, {})[name] = counts.get(table, {}).get(name, 0) + admitted
        return counts

    def _carry_rates(self, counts: dict[str, dict[str, int]], workers: tuple[int, ...]) -> None:
        """Give the new workers' rate counters what the old worker admitted (rate_carry_commands),
        best effort: a refused command leaves that count at 0, as it was before this existed."""
        for pid in workers:
            for table, admitted in counts.items():
                for line in rate_carry_commands(table, admitted):
                    try:
                        runtime.command(self.paths.master_socket, f"@!{pid} {line}")
                    except HAProxyError:
                        break

    def _try_reload(self) -> None:
        try:
            self.reload()
        except HAProxyError:
            pass  # the old worker still serves the old config; the caller reports the first error

    def save_server_state(self) -> None:
        """Write the current worker's server states to the server-state-file (best effort)."""
        try:
            state = runtime.command(self.paths.admin_socket, "show servers state")
        except HAProxyError:
            return
        if state.startswith("1\n"):
            write_private(self.paths.server_state_file, state)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop HAProxy: soft stop (the streams in flight finish), then terminate once no worker
        has a stream left, or after `timeout` seconds.

        Idle keep-alive client connections (OpenWebUI's, an openai client's) are no stream: the
        config's `option idle-close-on-response` keeps them open through a soft stop until the
        client sends again (HAProxy 2.6 configuration manual), which would hold the soft stop for
        the whole `timeout` (measured: 30.5 s with one idle client). So the workers' streams are
        counted through the master CLI (`@!PID show sess`, less the CLI's own) and, once none is
        left, the idle connections are closed by terminating.
        """
        pid = self.pid()
        if pid is None:
            return
        try:
            master = psutil.Process(pid)
            family = [master, *master.children(recursive=True)]
            master.send_signal(signal.SIGUSR1)
        except psutil.NoSuchProcess:
            family = []     # it ended between pid() and here
        deadline = time.monotonic() + timeout
        alive = family
        while alive and time.monotonic() < deadline:
            alive = proc.wait_ended(alive, min(0.1, max(0.0, deadline - time.monotonic())))
            if alive and self._streams_in_flight() == 0:
                break
        proc.terminate(alive)
        for path in (self.paths.pid_file, self.paths.master_socket, self.paths.admin_socket, self.paths.base_config):
            path.unlink(missing_ok=True)
        accesslog.stop_writer(self.deployment)   # after HAProxy: it has the last lines

    def _streams_in_flight(self) -> int | None:
        """Streams of all workers, current and old, but the CLI's own; None when unknown."""
        try:
            info = runtime.show_proc(self.paths.master_socket)
            return sum(streams(runtime.command(self.paths.master_socket, f"@!{worker} show sess"))
                       for worker in (*info.workers, *info.old_workers))
        except HAProxyError:
            return None


def streams(show_sess: str) -> int:
    """Streams in a `show sess` answer, less the CLI's own (frontend GLOBAL)."""
    return sum(1 for line in show_sess.splitlines() if line.startswith("0x") and " fe=GLOBAL " not in line)


KEY_TABLE = "openai"  # the frontend whose stick table counts per key (templates/haproxy.cfg.j2)
#: The stick tables whose gpc0_rate(60s) counts admitted requests per name for a rate limit:
#: per key (the frontend's) and per OpenWebUI user (templates/haproxy.cfg.j2).
RATE_TABLES = (KEY_TABLE, "openwebui_users")
#: Names a runtime API command can carry as one word (key names; e-mails).
_CARRIED_NAME = re.compile(r"[A-Za-z0-9@._+:-]{1,256}")


def batch_entries(emails: list[str]) -> dict[str, str]:
    """The batch map's entries: e-mail (lower case) -> "batch", one per OpenWebUI user."""
    return {email.lower(): "batch" for email in emails}


def rate_carry_commands(table: str, admitted: Mapping[str, int]) -> list[str]:
    """Runtime API commands that set each name's carried count (gpc1_rate, which the rate limits
    add to gpc0_rate) in a new worker's stick table `table` to what the old worker admitted.

    HAProxy's `set table <t> key <k> data.<rate> <v>` sets a rate counter's current period to v
    (and its previous to 0: src/stick_table.c, "We set both the current and previous values"),
    so a carried count holds for a full period from the reload and fades out over the next: a
    key may wait up to a minute longer than without the reload, never less. Names that are not
    one plain word are left out (their counts start over).

    Args:
        table: the stick table's name (RATE_TABLES).
        admitted: name -> requests admitted in the last minute (gpc0_rate + gpc1_rate).
    Returns:
        one command per name with a count above 0, sorted by name.
    """
    return [f"set table {table} key {name} data.gpc1_rate {count}"
            for name, count in sorted(admitted.items()) if count > 0 and _CARRIED_NAME.fullmatch(name)]


def table_commands(table: str, tracked: Mapping[str, object], wanted: dict[str, str]) -> list[str]:
    """Runtime API commands that make an entry in stick table `table` for each key name of the key
    map `wanted` (digest -> "name|class|..."; keys.Key.map_value) that `tracked` (the table's
    entries by key) lacks. `set table <table> key <key>` without data makes the entry and sets no
    counter (HAProxy 2.6 management guide, `set table`); an entry no key uses any more stays
    until the next start (a handful of bytes each)."""
    names = sorted({value.split("|", 1)[0] for value in wanted.values()} - set(tracked))
    return [f"set table {table} key {name}" for name in names]


def check_port_free(bind: str, port: int, field: str) -> None:
    """Raise HAProxyError, naming the deployment file's `field`, if something listens on `bind`:`port`.

    SO_REUSEADDR is set so that connections in TIME_WAIT do not count; a listener does.
    """
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind if bind not in ("*", "") else "0.0.0.0", port))
        except OSError as exc:
            raise HAProxyError(f"{field}: {bind}:{port} is not available ({exc.strerror}); "
                               "choose another port in the deployment file") from None
