"""The deployment's state directory, private to its owner, and the one place that names its files.

Everything hpcserve must remember between commands lives here (Slurm holds the rest), so a crashed
command loses nothing: files are replaced atomically (write to a temporary file, fsync, rename) and
created 0600 inside a 0700 directory, because the backend key and HAProxy's sockets are secrets.

Layout (STATE_DIR/...):
    desired.json   what the user asked for        step.json   what the last reconcile step left (StepRecord)
    autoscale.json   the autoscaler's memory
    decisions.jsonl   autoscale decisions          keys.json   named API keys (keys.py)
    backend.key api.key   secrets                   lock        one changing command at a time
    haproxy.cfg haproxy-base.cfg haproxy.sock haproxy-master.sock haproxy.pid haproxy.state
    models.json keys.map   HAProxy's files (HAProxyFiles)
    logs/     job output, llama-server, HAProxy, access log (+ its socket and writer), OpenWebUI, autoscale
    sbatch/   the last job script submitted per model      local/   the workstation launcher's jobs
    webui/    OpenWebUI's data, secret key, admin password  check/   hpcserve check's job markers
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import filelock

from .core.pool import Desired
from .errors import ConfigError, DeploymentBusy, HpcserveError


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What the last reconcile step left behind, written once per step (StateDir.write_step).

    Attributes:
        in_rotation: job ids of the servers in the live HAProxy config.
        draining: job id -> drain deadline (epoch seconds) of the servers being drained.
        startups: {"jobs": [job id, ...] seen ready (last 50), "seconds": [startup s, ...] (last 20)}.
        builds: job id -> the llama-server build its /props named when it was admitted ("b11434"),
            for the jobs still active.
    """

    in_rotation: frozenset[str] = frozenset()
    draining: Mapping[str, float] = dataclasses.field(default_factory=dict)
    startups: Mapping[str, list] = dataclasses.field(default_factory=dict)
    builds: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"in_rotation": sorted(self.in_rotation), "draining": dict(sorted(self.draining.items())),
                "startups": dict(self.startups), "builds": dict(sorted(self.builds.items()))}


@dataclasses.dataclass(frozen=True)
class HAProxyFiles:
    """Files of a deployment's HAProxy, all inside its private state directory `root`."""

    root: Path

    @property
    def config(self) -> Path:
        """The config HAProxy runs (the live membership written in)."""
        return self.root / "haproxy.cfg"

    @property
    def base_config(self) -> Path:
        """The config rendered without servers: a change of it alone needs a reload."""
        return self.root / "haproxy-base.cfg"

    @property
    def candidate_config(self) -> Path:
        """Where a config is written for `haproxy -c` before it replaces `config`."""
        return self.root / "haproxy.cfg.new"

    @property
    def admin_socket(self) -> Path:
        """The runtime API socket of the current worker (stats socket ... level admin)."""
        return self.root / "haproxy.sock"

    @property
    def master_socket(self) -> Path:
        """The master CLI socket (-S): reload, show proc."""
        return self.root / "haproxy-master.sock"

    @property
    def pid_file(self) -> Path:
        return self.root / "haproxy.pid"

    @property
    def server_state_file(self) -> Path:
        return self.root / "haproxy.state"

    @property
    def fair_share_map_file(self) -> Path:
        """Slurm account -> queue delay in ms (core/fairshare.py), refreshed by each reconcile."""
        return self.root / "fairshare.map"

    @property
    def models_file(self) -> Path:
        """GET /v1/models as HAProxy answers it (written by hpcserve, see haproxy.config.models_list)."""
        return self.root / "models.json"

    @property
    def webui_batch_map_file(self) -> Path:
        """OpenWebUI user (e-mail, lower case) -> "batch": webui.batch_users and the members of
        webui.batch_groups (access/webui_groups.py), refreshed by each reconcile."""
        return self.root / "webui-batch.map"

    @property
    def webui_accounts_map_file(self) -> Path:
        """OpenWebUI user (e-mail, lower case) -> Slurm account (accounting.webui_accounts)."""
        return self.root / "webui-accounts.map"

    @property
    def quota_map_file(self) -> Path:
        """Slurm account -> "OVER|RESET|REMAINING|RESET_ISO" for each quota (core/quota.py), kept by
        the access log writer as lines arrive and by `hpcserve quota`."""
        return self.root / "quota.map"

    @property
    def keys_map_file(self) -> Path:
        """HAProxy's map of accepted API keys, SHA-256 -> name and limits (keys.key_map); no key in it."""
        return self.root / "keys.map"

    @property
    def leaving_map_file(self) -> Path:
        """HAProxy's map of the servers leaving the pool ("BACKEND/SERVER 1" lines), which the
        affinity stick table no longer sends conversations to (core.membership.leave)."""
        return self.root / "leaving.map"

    @property
    def access_log_fifo(self) -> Path:
        """The named pipe HAProxy writes its access log lines to, its file descriptor 3 (accesslog.py)."""
        return self.root / "logs" / "access.fifo"

    @property
    def log_file(self) -> Path:
        """HAProxy's own output (start-up alerts)."""
        return self.root / "logs" / "haproxy.log"


class StateDir:
    """The files of one deployment under `root` (no I/O until a method is called)."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def haproxy(self) -> HAProxyFiles:
        return HAProxyFiles(self.root)

    @property
    def logs_dir(self) -> Path:
        """Job output (job-ID.out), llama-server logs, HAProxy's, the access log, OpenWebUI's."""
        return self.root / "logs"

    @property
    def access_log(self) -> Path:
        """The access log of requests that reached a replica (rotated ones: access.log.1 ... .N, the
        highest the oldest; older ones wait in expired_logs_dir to be folded into the usage ledger;
        accesslog.py)."""
        return self.logs_dir / "access.log"

    @property
    def unbilled_log(self) -> Path:
        """The access log of requests HAProxy answered itself (the model list, 429, 400, 404, 413,
        503: no replica held a slot for them), rotated apart (unbilled.log.1 ... .N, then expired_logs_dir
        and the usage ledger, as the billed ones) so that a flood of refusals cannot rotate the billed
        lines away (accesslog.py)."""
        return self.logs_dir / "unbilled.log"

    @property
    def batches_socket(self) -> Path:
        """The Batch API service's Unix socket, which HAProxy forwards /v1/files and /v1/batches to
        (batches/service.py)."""
        return self.root / "batches.sock"

    @property
    def expired_logs_dir(self) -> Path:
        """Access logs rotated past access_log_files, each access-<ns>.log (billed) or
        unbilled-<ns>.log, until the usage ledger has their totals (access/ledger.py)."""
        return self.logs_dir / "expired"

    @property
    def usage_ledger(self) -> Path:
        """Hourly usage totals of the expired access logs, one JSON line per folded file
        (access/ledger.py)."""
        return self.logs_dir / "usage-ledger.jsonl"

    @property
    def access_writer_files(self) -> tuple[Path, Path]:
        """The access log writer's pid file and its error output."""
        return self.logs_dir / "access-writer.pid", self.logs_dir / "access-writer.err"

    @property
    def webui_log(self) -> Path:
        return self.logs_dir / "webui.log"

    @property
    def autoscale_log(self) -> Path:
        """Where the crontab line of `hpcserve autoscale --print-cron` appends."""
        return self.logs_dir / "autoscale.log"

    @property
    def sbatch_dir(self) -> Path:
        """The last job script submitted for each model (MODEL.sbatch), for the admin to read."""
        return self.root / "sbatch"

    @property
    def decisions_file(self) -> Path:
        """Autoscale decisions, one JSON object per line."""
        return self.root / "decisions.jsonl"

    @property
    def webui_groups_file(self) -> Path:
        """What the last read of OpenWebUI's batch groups found (access/webui_groups.py)."""
        return self.root / "webui-groups.json"

    @property
    def fair_share_file(self) -> Path:
        """What the pool's fair share last did (access/accounts.py FairShareState)."""
        return self.root / "fairshare.json"

    @property
    def quotas_file(self) -> Path:
        """The GPU-hour quotas per account and the models' GPUs per slot (`hpcserve quota`; read
        by the access log writer: haproxy/quotas.py)."""
        return self.root / "quotas.json"

    @property
    def quota_counts_file(self) -> Path:
        """What each account used in the current day, week and month (core.quota.Counts), kept by
        the access log writer."""
        return self.logs_dir / "quota-counts.json"

    @property
    def keys_file(self) -> Path:
        """The named API keys (keys.py)."""
        return self.root / "keys.json"

    @property
    def local_dir(self) -> Path:
        """The workstation launcher's job records (slurm/local.py)."""
        return self.root / "local"

    @property
    def webui_dir(self) -> Path:
        """OpenWebUI's data folder, secret key and admin password."""
        return self.root / "webui"

    @property
    def check_dir(self) -> Path:
        """Markers of `hpcserve check`'s job."""
        return self.root / "check"

    @property
    def desired_file(self) -> Path:
        return self.root / "desired.json"

    @property
    def key_file(self) -> Path:
        return self.root / "backend.key"

    @property
    def api_key_file(self) -> Path:
        """The owner's frontend API key (0600): accepted by HAProxy unless haproxy.auth is open."""
        return self.root / "api.key"

    @property
    def lock_file(self) -> Path:
        return self.root / "lock"

    def ensure(self) -> None:
        """Create the directory (0700) and its logs/ and sbatch/ folders.

        Raises:
            ConfigError: it cannot be created (the message names state_dir).
        """
        try:
            for path in (self.root, self.logs_dir, self.sbatch_dir):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        except OSError as exc:
            raise ConfigError(f"state_dir: cannot create {self.root} ({exc.strerror})") from None
        check_owned_path(self.root)

    def lock(self, timeout: float = 600.0) -> filelock.FileLock:
        """An exclusive lock on the deployment: one command changes it at a time.

        Use as a context manager; it raises filelock.Timeout after `timeout` seconds.
        """
        self.ensure()
        return filelock.FileLock(str(self.lock_file), timeout=timeout, mode=0o600)

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 600.0) -> Iterator[None]:
        """Hold the deployment's lock (lock()) for the `with` block.

        Raises:
            DeploymentBusy: another command held it for `timeout` seconds (the message names the lock file).
        """
        try:
            with self.lock(timeout=timeout):
                yield
        except filelock.Timeout:
            raise DeploymentBusy(f"another hpcserve command holds {self.lock_file}; try again later") from None

    def read_desired(self) -> Desired:
        """The desired state, or Desired() (down, no replicas) when none was written yet.

        Raises:
            HpcserveError: the file exists but is not what hpcserve writes.
        """
        try:
            data = json.loads(self.desired_file.read_text())
            return Desired(up=bool(data["up"]), replicas={str(k): int(v) for k, v in data["replicas"].items()})
        except FileNotFoundError:
            return Desired()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HpcserveError(f"{self.desired_file}: unreadable desired state ({exc}); "
                                "fix or remove it and run the command again") from None

    def write_desired(self, desired: Desired) -> None:
        """Replace the desired state atomically."""
        write_private(self.desired_file, json.dumps(dataclasses.asdict(desired), indent=2, sort_keys=True) + "\n")

    @property
    def step_file(self) -> Path:
        return self.root / "step.json"

    # The records hpcserve 0.x kept before step.json, read once for an upgrade, removed by write_step.
    _LEGACY_STEP_FILES = ("servers.json", "draining.json", "startups.json")

    def read_step(self) -> StepRecord:
        """The record of the last reconcile step (StepRecord() before the first); from the older
        servers.json, draining.json and startups.json when step.json was not written yet.

        Raises:
            HpcserveError: the record exists but is not what hpcserve writes (losing it would
                forget which servers HAProxy routes to and which are draining).
        """
        try:
            if self.step_file.exists():
                data = json.loads(self.step_file.read_text())
                return StepRecord(frozenset(str(j) for j in data["in_rotation"]),
                                  {str(k): float(v) for k, v in data["draining"].items()},
                                  _startups(data.get("startups")),
                                  {str(k): str(v) for k, v in data.get("builds", {}).items()})
            servers, draining, startups = (self.root / name for name in self._LEGACY_STEP_FILES)
            return StepRecord(frozenset(str(j) for j in json.loads(servers.read_text())) if servers.exists()
                              else frozenset(),
                              {str(k): float(v) for k, v in json.loads(draining.read_text()).items()}
                              if draining.exists() else {},
                              _startups(self.read_json("startups", {})))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HpcserveError(f"{self.step_file}: unreadable record of the last step ({exc}); "
                                "fix or remove it and run the command again") from None

    def write_step(self, record: StepRecord) -> None:
        """Replace the step record atomically (and drop the older per-item files)."""
        write_private(self.step_file, json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
        for name in self._LEGACY_STEP_FILES:
            (self.root / name).unlink(missing_ok=True)

    def read_json(self, name: str, default: object) -> object:
        """A JSON record of this state directory (`name`.json), or `default` when absent or unreadable.

        For records whose loss costs only a little history (the autoscaler's memory, startup times).
        """
        try:
            return json.loads((self.root / f"{name}.json").read_text())
        except (FileNotFoundError, ValueError):
            return default

    def write_json(self, name: str, data: object) -> None:
        """Replace the record `name`.json atomically."""
        write_private(self.root / f"{name}.json", json.dumps(data, indent=2, sort_keys=True) + "\n")

    def backend_key(self) -> str:
        """The deployment's backend key, created (random, 256 bits, 0600) on first use.

        Raises:
            ConfigError: the file holds something shorter than a key hpcserve makes.
        """
        return self._key(self.key_file, "every running backend job read it at its start; after "
                                        "removing it, `hpcserve down` and `up` again")

    def api_key(self) -> str:
        """The owner's frontend API key, created (random, 256 bits, 0600) on first use.

        Raises:
            ConfigError: the file holds something shorter than a key hpcserve makes.
        """
        return self._key(self.api_key_file, "remove it and the next command makes a new one")

    def _key(self, path: Path, fix: str) -> str:
        """The key in `path` (made on first use), checked to be one: hpcserve writes 43 characters."""
        self.ensure()
        key = secret_file(path)
        if len(key) < MIN_KEY_CHARS or any(c.isspace() or ord(c) < 32 for c in key):
            raise ConfigError(f"{path}: expected a random key of at least {MIN_KEY_CHARS} characters, the file "
                              f"holds {len(key)}; {fix}")
        return key

    def read_backend_key(self) -> str | None:
        """The backend key if it exists (never created here), else None (read_secret)."""
        return read_secret(self.key_file)

    def read_api_key(self) -> str | None:
        """The owner's frontend API key if it exists (never created here), else None (read_secret)."""
        return read_secret(self.api_key_file)


#: The shortest secret accepted in a key file (characters). hpcserve writes 43 (256 random bits).
MIN_KEY_CHARS = 32


def secret_file(path: Path, nbytes: int = 32) -> str:
    """The secret in `path`, made on first use: `nbytes` random bytes, URL-safe text, in a file
    created 0600 with O_EXCL, so that of two commands racing to make it, both use the first one's.
    The folder must exist.

    Raises:
        ConfigError: the file exists but is not a regular file of this user that only this user
            can read and write (a symlink, another user's file, or a group or world mode bit): a
            secret someone else can read, or has chosen, is refused (read_private).
    """
    try:
        return read_private(path).strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(nbytes)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # another command created it first: use theirs
        return read_private(path).strip()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def read_secret(path: Path) -> str | None:
    """The secret in `path` if the file exists and holds one, else None; never made here.

    Raises:
        ConfigError: the file is not a private regular file of this user (read_private).
    """
    try:
        return read_private(path).strip() or None
    except FileNotFoundError:
        return None


def read_private(path: Path) -> str:
    """The text of `path`, a regular file (not a symlink) owned by this user with no group or
    world permission bits.

    Raises:
        FileNotFoundError: there is no such file.
        ConfigError: it is a symlink, not a regular file, another user's, or its mode lets others in.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        if os.path.islink(path):
            raise ConfigError(f"{path}: a symlink where hpcserve keeps a secret; remove it (the next command "
                              "makes a new one)") from None
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: not a regular file where hpcserve keeps a secret; remove it (the next command "
                          "makes a new one)")
    with os.fdopen(fd, "r") as f:
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConfigError(f"{path}: a secret must be a regular file of user {os.getuid()} with mode 0600; this "
                              f"one is {'owned by user %d' % info.st_uid if info.st_uid != os.getuid() else ''}"
                              f"{' mode %04o' % stat.S_IMODE(info.st_mode) if info.st_mode & 0o077 else ''}; "
                              "remove it (the next command makes a new one) or fix it")
        return f.read()


def check_owned_path(root: Path) -> None:
    """Refuse a state directory another user could move or replace: `root` itself must belong to
    this user, and each folder above it to this user or root, none writable by others (the
    world) unless sticky (as /tmp: then only the owner of an entry may rename or remove it).
    Otherwise another user could swap the folder, and hpcserve would read keys and a key map
    they chose. Group-writable folders above are not refused (project spaces shared with a
    group are the rule on clusters): their group is trusted.

    Raises:
        ConfigError: naming the folder and what is wrong with it.
    """
    me = os.getuid()
    path = root.resolve()
    for folder in (path, *path.parents):
        try:
            info = folder.stat()
        except OSError as exc:
            raise ConfigError(f"state_dir: cannot check {folder} ({exc.strerror})") from None
        if folder == path and info.st_uid != me:
            raise ConfigError(f"state_dir: {folder} belongs to user {info.st_uid}, not to you (user {me}); "
                              "choose a folder of your own")
        if info.st_uid not in (me, 0):
            raise ConfigError(f"state_dir: {folder}, above the state directory, belongs to user {info.st_uid}, who "
                              "could replace what lies in it; choose a state_dir under folders of yours or root's")
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise ConfigError(f"state_dir: {folder} is writable by every user and not sticky: anyone could replace "
                              "the state directory; choose another state_dir, or chmod o-w (or +t) that folder")


def _startups(data: object) -> dict[str, list]:
    """The startups part of a step record, or an empty one when it is not what hpcserve writes
    (only history is lost: the next renewals fall back to the configured renew_before)."""
    if not isinstance(data, dict):
        return {}
    try:
        return {"jobs": [str(j) for j in data.get("jobs", [])], "seconds": [float(x) for x in data.get("seconds", [])]}
    except (TypeError, ValueError):
        return {}


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically with mode 0600 (see write_atomic)."""
    write_atomic(path, text, 0o600)


def write_private_if_changed(path: Path, text: str) -> None:
    """write_private, unless `path` holds `text` already: HAProxy reads its map and list files at
    each reload, and an unchanged file keeps its time."""
    if not path.exists() or path.read_text() != text:
        write_private(path, text)


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path` atomically with `mode` (temporary file in the same folder, rename):
    a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
