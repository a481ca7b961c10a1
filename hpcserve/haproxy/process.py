"""Running the deployment's HAProxy: validate, start, reload, stop. Unprivileged, master-worker.

Facts relied on (HAProxy 2.6 management guide and tests on this machine, ../shared/DESIGN.md):
`haproxy -c -f FILE` validates a config without binding; `-W -D -S SOCK` runs a daemonised master
whose CLI takes `reload` and `show proc`; a failed reload is silent in 2.6 except for the master's
"[failed: N]" counter, so every reload is checked there and rolled back; the reload keeps
in-flight streams on the old worker until they end or hard-stop-after expires; `-c` does not
catch a port already in use, so that is checked before starting.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import time
from pathlib import Path

import psutil

from .. import accesslog, keys, proc, releases
from ..config import Deployment
from ..core.membership import free_slots, membership_change, within_slots, worker_claim
from ..core.pool import Server, job_id_of
from ..errors import CommandError, HAProxyError
from ..state import write_private
from . import runtime
from .config import Paths, backend_name, leaving_state, models_list, paths, render, server_options

KEY_ENV = "HPCSERVE_BACKEND_KEY"  # haproxy.cfg reads the backend key from this variable


class HAProxy:
    """The HAProxy of one deployment.

    Args:
        deployment: the deployment (bind address, port, binary, state directory).
        backend_key: the key HAProxy adds to every forwarded request (passed through its
            environment, never its command line or config file).
    """

    def __init__(self, deployment: Deployment, backend_key: str):
        self.deployment = deployment
        self.paths: Paths = paths(deployment)
        self._argv0 = shlex.split(deployment.haproxy.command)
        self._env = {**os.environ, KEY_ENV: backend_key}

    @property
    def release(self) -> releases.Release | None:
        """This HAProxy's release from `haproxy -v`, read once per process.

        Raises:
            CommandError: haproxy could not be run.
        """
        return releases.haproxy(self.deployment.haproxy.command)

    @property
    def log_file(self):
        return self.deployment.state_dir / "logs" / "haproxy.log"

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
        candidate = self.paths.root / "haproxy.cfg.new"
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

    @property
    def _base_file(self):
        return self.paths.root / "haproxy-base.cfg"

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
        "drain" (or "maint", see leaving_state) for a server leaving in this very change.

        A new worker knows nothing of the streams its predecessor still serves (nor of the queue
        the predecessor goes on dispatching), so after a reload each server would take its full
        slots again on top of them. The slots of a server are therefore shared out: before the
        reload `make_room()` frees one slot of every full server, the new worker starts with
        each server's maxconn lowered by what the running workers can still fill (`claims()`),
        and `settle()` hands the slots over as the old workers' queues and streams end.

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
        try:
            accesslog.ensure_writer(self.deployment)
        except OSError as exc:
            raise HAProxyError(str(exc)) from None
        running = self.running()
        if running and text == self.live_config():
            self.sync_servers(servers)   # the file is right; a server marked DOWN may return
            self.sync_keys()
            self.settle(servers, timeout=0)
            return "unchanged"
        try:
            same_base = running and self._base_file.read_text() == base
        except FileNotFoundError:
            same_base = False
        if not running:
            self.apply(text)
            write_private(self._base_file, base)
            return "started"
        if not same_base:
            self.validate(text)
            # The running worker first: the new one loads its server states (drain, weight) from
            # the server-state-file, and the old one must stop sending its queue to leaving servers.
            self.sync_servers(servers)
            self.make_room(servers, timeout=room_timeout)
            claims = self.claims(servers, current=True)
            self.apply(render(self.deployment, within_slots(servers, self._slots, claims)))  # make_room freed one first
            write_private(self.paths.config, text)  # the steady state, for restarts and later reloads
            write_private(self._base_file, base)
            self.sync_keys()   # the old workers' maps, for requests on their open connections
            self.settle(servers, timeout=settle_timeout)
            return "reloaded"
        self.validate(text)
        self.sync_servers(servers)
        self.sync_keys()
        write_private(self.paths.config, text)
        self.settle(servers, timeout=0)
        return "runtime"

    def _slots(self, server: Server) -> int:
        return self.deployment.model(server.model).parallel

    def held_sessions(self, old_only: bool = True) -> dict[str, int]:
        """Server name -> sessions held by the old workers (or by every worker: old_only=False).

        Raises:
            HAProxyError: the master did not answer.
        """
        info = runtime.show_proc(self.paths.master_socket)
        held: dict[str, int] = {}
        for pid in info.old_workers + (() if old_only else info.workers):
            for stat in runtime.worker_stats(self.paths.master_socket, pid)[0]:
                held[stat.server] = held.get(stat.server, 0) + stat.sessions
        return held

    def claims(self, servers: list[Server], current: bool = False) -> dict[str, int]:
        """Server name -> slots the old workers (and the current one: current=True) can fill, after
        capping each old worker's maxconn (core.membership.worker_claim has the rule).

        Raises:
            HAProxyError: the master did not answer.
        """
        return self._cap_old_workers(servers, current)[0]

    def _cap_old_workers(self, servers: list[Server], current: bool
                         ) -> tuple[dict[str, int], dict[str, list[tuple[int, int, str]]]]:
        """Cap the maxconn of each old worker on `servers` (`set maxconn server`, through the
        master), from one `show stat` of each worker; return claims() and server name -> (maxconn
        after the cap, worker pid, backend) of each worker read."""
        info = runtime.show_proc(self.paths.master_socket)
        ours = {s.name for s in servers}
        claimed: dict[str, int] = {}
        limits: dict[str, list[tuple[int, int, str]]] = {}
        for pid in info.old_workers + (info.workers if current else ()):
            stats, backends = runtime.worker_stats(self.paths.master_socket, pid)
            for stat in stats:
                if stat.server not in ours:
                    continue
                queue = backends.get(stat.backend)
                limit, claim = worker_claim(stat.limit, stat.sessions, old=pid in info.old_workers,
                                            queued=queue.queued if queue else 0)
                if limit != stat.limit:
                    runtime.command(self.paths.master_socket,
                                    f"@!{pid} set maxconn server {stat.backend}/{stat.server} {limit}")
                claimed[stat.server] = claimed.get(stat.server, 0) + claim
                limits.setdefault(stat.server, []).append((limit, pid, stat.backend))
        return claimed, limits

    def make_room(self, servers: list[Server], timeout: float) -> bool:
        """Before a reload: free one slot of every serving server the running workers fill.

        On such a server, lowers by one the maxconn of the worker that has the most (not below 1:
        a server of one slot held by one worker cannot be shared), then waits, polling every
        0.2 s, until a stream above it has ended, at most `timeout` seconds. Returns True when
        every serving server has a free slot for the next worker. Errors of the runtime API end
        the wait quietly (the reload then shares what it can).
        """
        deadline = time.monotonic() + timeout
        lowered: set[str] = set()
        master = self.paths.master_socket
        models = {m.name for m in self.deployment.models}
        try:
            while True:
                claims, limits = self._cap_old_workers(servers, current=True)
                full = {s.name for s in servers if not s.draining and s.model in models
                        and claims.get(s.name, 0) >= self._slots(s)}
                if not full:
                    return True
                if time.monotonic() >= deadline:
                    return False
                for name in full - lowered:
                    limit, pid, backend = max(limits.get(name, []), default=(0, 0, ""))
                    if limit > 1:
                        runtime.command(master, f"@!{pid} set maxconn server {backend}/{name} {limit - 1}")
                        lowered.add(name)
                if not full & lowered:
                    return False  # every full server is at maxconn 1 in each worker: nothing to wait for
                time.sleep(0.2)
        except HAProxyError:
            return False

    def settle(self, servers: list[Server], timeout: float) -> bool:
        """Give each server of the current worker the slots old workers no longer claim.

        Polls every 0.2 s until no old worker is left or `timeout` seconds passed (0: one pass).
        Returns True when settled (every serving server back at maxconn = slots).
        Errors of the runtime API end the wait quietly: the next step settles again.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                claims = self.claims(servers)
                current = {s.server: s for s in runtime.show_stat(self.paths.admin_socket)}
                models = {m.name: m for m in self.deployment.models}
                for server in servers:
                    stat = current.get(server.name)
                    if server.draining or stat is None or server.model not in models:
                        continue
                    where = f"{backend_name(models[server.model])}/{server.name}"
                    free = free_slots(self._slots(server), claims.get(server.name, 0))
                    if stat.limit != free:
                        runtime.command(self.paths.admin_socket, f"set maxconn server {where} {free}")
                if not runtime.show_proc(self.paths.master_socket).old_workers:
                    return True
            except HAProxyError:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def sync_servers(self, servers: list[Server]) -> None:
        """Add, drain, un-drain and delete servers of the running worker to match `servers`.

        A new server (or one back from drain) enters rotation in one of two ways, by release
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
        wanted = {(backend_name(models[s.model]), s.name): s for s in servers if s.model in models}
        live = {(ls.backend, ls.name): ls for ls in runtime.show_servers(self.paths.admin_socket)
                if ls.backend in ours}
        try:
            weight_last = not releases.fixes_queue_overshoot(self.release)
        except CommandError:    # `haproxy -v` failed now: the way that is safe on every release
            weight_last = True
        change = membership_change(wanted, live, leaving_state=leaving_state(self.deployment),
                                   weight_last=weight_last,
                                   options=lambda s: server_options(self.deployment, models[s.model]))
        self._send(list(change.added + change.commands))
        if change.old_workers:
            for pid in runtime.show_proc(self.paths.master_socket).old_workers:
                for line in change.old_workers:
                    runtime.command(self.paths.master_socket, f"@!{pid} {line}")  # gone there: no matter

    def _send(self, commands: list[str]) -> None:
        for line in commands:
            answer = runtime.command(self.paths.admin_socket, line).strip()
            if line.startswith("del server") and "connections" in answer:
                continue  # still in use: it stays in maintenance, the next step deletes it
            if answer and not answer.startswith(("New server registered", "Server deleted")):
                raise HAProxyError(f"HAProxy refused '{line}': {answer.splitlines()[0]}")

    def server_sessions(self) -> dict[str, int] | None:
        """Job id -> sessions of its server in every worker, old ones included: {} when HAProxy is
        not running (nothing can be in flight), None when it runs but did not answer (unknown: a
        drain then waits for its deadline)."""
        if not self.running():
            return {}
        try:
            held = self.held_sessions(old_only=False)
        except HAProxyError:
            return None
        return {job_id: n for name, n in held.items() if (job_id := job_id_of(name)) is not None}

    def _write_served_files(self) -> None:
        """The files the config makes HAProxy serve or match: the models list, the key map."""
        _write_if_changed(self.paths.models_file, models_list(self.deployment))
        self._write_key_map()
        # Older hpcserve kept the keys ("Bearer KEY" lines), then their hashes, in these: gone now.
        for old in ("frontend-keys.lst", "frontend-key-hashes.lst"):
            (self.paths.root / old).unlink(missing_ok=True)

    def _write_key_map(self) -> dict[str, str] | None:
        entries = keys.key_map(self.deployment)
        if entries is not None:
            _write_if_changed(self.paths.keys_map_file, keys.map_text(entries))
        return entries

    def sync_keys(self) -> int:
        """Make the key map file and the running workers' key maps hold the accepted keys
        (keys.key_map): a key added, changed or revoked counts from the next request, no reload.

        Old workers (from before a reload) are changed too: they still answer requests on their
        open keep-alive connections. Returns the number of runtime commands sent.

        Raises:
            HAProxyError: the runtime API refused a change.
            ConfigError: the api_keys_file cannot be read; HpcserveError: keys.json is unreadable.
        """
        entries = self._write_key_map()
        if entries is None or not self.running():
            return 0
        info = runtime.show_proc(self.paths.master_socket)
        sent = 0
        for pid in info.workers + info.old_workers:
            target = f"@!{pid} "
            live = runtime.show_map(self.paths.master_socket, self.paths.keys_map_file, prefix=target)
            if live is None:
                continue  # this worker's config has no key map (auth was open)
            for line in keys_commands(str(self.paths.keys_map_file), live, entries):
                answer = runtime.command(self.paths.master_socket, target + line).strip()
                sent += 1
                if answer and pid in info.workers:
                    raise HAProxyError(f"HAProxy refused to change the key map: {answer.splitlines()[0]}")
        return sent

    def apply(self, text: str) -> bool:
        """Make `text` the running config: validate it, then start HAProxy or reload it.

        Returns:
            True when something changed (a start or a reload), False when `text` is what runs.
        Raises:
            HAProxyError: validation, start or reload failed; the previous config is back in
                place (and running, if it was).
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
        try:
            proc.run(argv, env=self._env, timeout=30, output=self.log_file)
        except CommandError as exc:
            alerts = [line for line in exc.stderr.splitlines() if "ALERT" in line]
            raise HAProxyError(f"haproxy did not start: {(alerts or [str(exc)])[-1].strip()} "
                               f"(see {self.log_file})") from None
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
            HAProxyError: the master reported a failed reload, or none happened within `timeout` s.
        """
        before = runtime.show_proc(self.paths.master_socket)
        self.save_server_state()
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
                return
        raise HAProxyError(f"haproxy did not reload within {timeout:g} s (see {self.log_file})")

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
        """Stop HAProxy: soft stop (finish what is in flight), then terminate after `timeout` s."""
        pid = self.pid()
        if pid is None:
            return
        master = psutil.Process(pid)
        family = [master, *master.children(recursive=True)]
        master.send_signal(signal.SIGUSR1)
        _, alive = psutil.wait_procs(family, timeout=timeout)
        for process in alive:
            process.terminate()
        _, alive = psutil.wait_procs(alive, timeout=5)
        for process in alive:
            process.kill()
        for path in (self.paths.pid_file, self.paths.master_socket, self.paths.admin_socket, self._base_file):
            path.unlink(missing_ok=True)
        accesslog.stop_writer(self.deployment)   # after HAProxy: it has the last lines


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` to `path` (0600, atomically) unless it holds that already: HAProxy reads these
    files at each reload, and an unchanged file keeps its time."""
    if not path.exists() or path.read_text() != text:
        write_private(path, text)


def keys_commands(map_file: str, live: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """Runtime API commands that turn the key map `live` into `wanted` (digest -> value): revocations
    first, then changes, then additions (HAProxy 2.6 management guide: del map, set map, add map)."""
    commands = [f"del map {map_file} {k}" for k in sorted(live.keys() - wanted.keys())]
    commands += [f"set map {map_file} {k} {v}" for k, v in sorted(wanted.items()) if k in live and live[k] != v]
    commands += [f"add map {map_file} {k} {v}" for k, v in sorted(wanted.items()) if k not in live]
    return commands


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
