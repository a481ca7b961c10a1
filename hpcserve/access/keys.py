"""The frontend's API keys: who may use the pool, in which priority class, within which limits.

Four kinds of key are accepted (unless haproxy.auth is open), each under a name that the access log
and `hpcserve usage` account by (and the token of each running batch, under the name of the key
that made it: batches/store.py):

- named keys made by `hpcserve keys add` (STATE_DIR/keys.json holds their SHA-256, never the key);
- "owner": the deployment owner's key, STATE_DIR/api.key;
- "openwebui": the key OpenWebUI presents (STATE_DIR/webui/api.key); only requests with this key
  may name the OpenWebUI user they act for (X-OpenWebUI-User-Email), see haproxy.cfg.j2;
- "file-XXXXXXXX": each key of the older haproxy.api_keys_file (one key per line), by the first
  8 hex digits of its SHA-256.

HAProxy receives them as one map, SHA-256 (hex) -> "name|class|max_concurrent|rate|forwards_users|
retry_after|account" (`keys_map`), looks the presented bearer token up after hashing it
(`http_auth_bearer,sha2(256),hex,lower,map(FILE)`, HAProxy 2.6 configuration manual 7.3.1), and
hpcserve changes that map through the runtime API (`add map`, `set map`, `del map`, management
guide 9.3), so a key added, changed or revoked counts from the next request, without a reload.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import hashlib
import json
import math
import re
import secrets

from ..config import Deployment, read_api_keys
from ..errors import ConfigError, HpcserveError
from ..state import MIN_KEY_CHARS, StateDir, read_secret, write_private
from ..batches.store import Store as BatchStore
from ..clients.webui import key_file as webui_key_file
from ..haproxy.process import HAProxy
from ..slurm.accounting import Accounting, AccountingUnavailable

#: Priority classes: interactive requests leave HAProxy's queue before batch ones (see haproxy.batch_delay).
PRIORITY_CLASSES = ("interactive", "batch")
#: A key name: it lands in haproxy's map file, runtime commands and the access log.
KEY_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
#: Names hpcserve gives its own keys.
RESERVED_NAMES = ("owner", "openwebui")
#: The account of a request whose key has none (no slurmdbd when it was added): in the access log
#: and HAProxy's maps.
NO_ACCOUNT = "-"
#: The largest per-key limits accepted (requests at once; requests per minute).
MAX_CONCURRENT = 100000
MAX_RATE = 1000000


@dataclasses.dataclass(frozen=True)
class Key:
    """One accepted API key, known by its digest.

    Attributes:
        name: what the access log and usage reports call it.
        sha256: the SHA-256 of the key, lowercase hex (64 characters).
        priority_class: "interactive" or "batch" (PRIORITY_CLASSES).
        max_concurrent: requests of this key in service, queued or uploading at once; None: the
            deployment's haproxy.max_requests_per_client.
        rate_per_minute: requests per minute (HAProxy's sliding 60 s rate); 0: no limit.
        forwards_users: the key's client names its user in X-OpenWebUI-User-Email (OpenWebUI's key).
        source: "named", "owner", "openwebui", "file" or "batch" (a running batch's token).
        created: ISO 8601 time the key was added (named keys), else None.
        account: the Slurm account its requests count for (fair share, quotas, usage --by account);
            None: none known (NO_ACCOUNT).
    """

    name: str
    sha256: str
    priority_class: str = "interactive"
    max_concurrent: int | None = None
    rate_per_minute: int = 0
    forwards_users: bool = False
    source: str = "named"
    created: str | None = None
    account: str | None = None

    def limit(self, deployment: Deployment) -> int:
        """Requests at once this key may have (its own limit, or the deployment's default)."""
        return self.max_concurrent or deployment.haproxy.max_requests_per_client

    def map_value(self, deployment: Deployment) -> str:
        """The value of this key in HAProxy's key map: name|class|max_concurrent|rate|forwards|retry|account.

        retry is the Retry-After (seconds) of a 429 for the rate: one request's share of the minute.
        """
        retry = math.ceil(60 / self.rate_per_minute) if self.rate_per_minute else 1
        return (f"{self.name}|{self.priority_class}|{self.limit(deployment)}|{self.rate_per_minute}|"
                f"{int(self.forwards_users)}|{retry}|{self.account or NO_ACCOUNT}")


def digest(key: str) -> str:
    """The SHA-256 of `key` (UTF-8) as lowercase hex, as HAProxy computes it from the header."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_rate(text: str) -> int:
    """Requests per minute from "600", "600/min" or "10/s" (0 = no limit).

    Raises:
        ValueError: anything else, or more than MAX_RATE per minute.
    """
    match = re.fullmatch(r"\s*(\d+)\s*(?:/\s*(s|sec|second|m|min|minute))?\s*", text)
    if not match:
        raise ValueError(f"expected requests per minute such as 600/min or 10/s, got {text!r}")
    rate = int(match.group(1)) * (60 if match.group(2) in ("s", "sec", "second") else 1)
    if rate > MAX_RATE:
        raise ValueError(f"expected at most {MAX_RATE} requests per minute, got {rate}")
    return rate


class KeyRegistry:
    """The named keys of a deployment, in STATE_DIR/keys.json (0600: digests and limits only).

    The caller holds the deployment's lock (StateDir.lock) around a change.
    """

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.file = StateDir(deployment.state_dir).keys_file

    def named(self) -> list[Key]:
        """The named keys, by name.

        Raises:
            HpcserveError: the file exists but is not what hpcserve writes.
        """
        try:
            data = json.loads(self.file.read_text())
            return sorted((Key(**entry) for entry in data["keys"]), key=lambda k: k.name)
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            raise HpcserveError(f"{self.file}: unreadable key registry ({exc}); fix it from a backup, or "
                                "remove it and add the keys again") from None

    def _write(self, keys: list[Key]) -> None:
        StateDir(self.deployment.state_dir).ensure()
        entries = [dataclasses.asdict(k) for k in sorted(keys, key=lambda k: k.name)]
        write_private(self.file, json.dumps({"keys": entries}, indent=2) + "\n")

    def add(self, name: str, priority_class: str = "interactive", max_concurrent: int | None = None,
            rate_per_minute: int = 0, account: str | None = None) -> tuple[Key, str]:
        """Make a new random key (256 bits) called `name`; returns (its entry, the key itself), the
        only time the key exists outside its holder's hands.

        Args:
            account: its Slurm account, already checked (check_account).
        Raises:
            ConfigError: the name is malformed, reserved or taken, or a limit is out of range.
        """
        _check(name, priority_class, max_concurrent, rate_per_minute)
        keys = self.named()
        if any(k.name == name for k in keys):
            raise ConfigError(f"NAME: a key called {name!r} exists; revoke it first or choose another name")
        secret = secrets.token_urlsafe(32)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        entry = Key(name, digest(secret), priority_class, max_concurrent, rate_per_minute, created=created,
                    account=account)
        self._write([*keys, entry])
        return entry, secret

    def change(self, name: str, priority_class: str | None = None, max_concurrent: int | None = None,
               rate_per_minute: int | None = None, account: str | None = None) -> Key:
        """Change the class, limits or account (checked: check_account) of the named key `name`
        (None: unchanged); returns the new entry.

        Raises:
            ConfigError: no such named key, or a value out of range.
        """
        keys = self.named()
        current = self._find(keys, name)
        entry = dataclasses.replace(
            current, priority_class=priority_class or current.priority_class,
            max_concurrent=max_concurrent if max_concurrent is not None else current.max_concurrent,
            rate_per_minute=rate_per_minute if rate_per_minute is not None else current.rate_per_minute,
            account=account or current.account)
        _check(name, entry.priority_class, entry.max_concurrent, entry.rate_per_minute, new=False)
        self._write([entry if k.name == name else k for k in keys])
        return entry

    def revoke(self, name: str) -> Key:
        """Remove the named key `name`; returns its entry.

        Raises:
            ConfigError: no such named key (hpcserve's own keys are revoked by removing their file).
        """
        keys = self.named()
        entry = self._find(keys, name)
        self._write([k for k in keys if k.name != name])
        return entry

    def _find(self, keys: list[Key], name: str) -> Key:
        for key in keys:
            if key.name == name:
                return key
        hint = ("; hpcserve's own keys change with their files (STATE_DIR/api.key, STATE_DIR/webui/api.key) "
                "and the api_keys_file" if name in RESERVED_NAMES or name.startswith("file-") else "")
        raise ConfigError(f"NAME: no named key {name!r} (see `hpcserve keys list`){hint}")


def _check(name: str, priority_class: str, max_concurrent: int | None, rate: int, new: bool = True) -> None:
    if not re.fullmatch(KEY_NAME_PATTERN, name):
        raise ConfigError(f"NAME: expected 1-63 letters, digits, '.', '_' or '-' (starting with a letter or "
                          f"digit), got {name!r}")
    if new and (name in RESERVED_NAMES or name.startswith("file-")):
        raise ConfigError(f"NAME: {name!r} is reserved for hpcserve's own keys; choose another name")
    if priority_class not in PRIORITY_CLASSES:
        raise ConfigError(f"--class: expected one of {', '.join(PRIORITY_CLASSES)}, got {priority_class!r}")
    if max_concurrent is not None and not 1 <= max_concurrent <= MAX_CONCURRENT:
        raise ConfigError(f"--max-concurrent: expected 1 to {MAX_CONCURRENT}, got {max_concurrent}")
    if not 0 <= rate <= MAX_RATE:
        raise ConfigError(f"--rate: expected 0 to {MAX_RATE} requests per minute, got {rate}")


def check_account(deployment: Deployment, account: str | None,
                  accounting: Accounting | None = None, field: str = "--account") -> str | None:
    """The Slurm account a new or changed key gets: `account` if slurmdbd has associations under it;
    with None, the pool's (slurm.account, else the owner's default account in slurmdbd; None when
    accounting is unavailable: the key has no account, NO_ACCOUNT).

    Raises:
        ConfigError: `account` is malformed or unknown to slurmdbd (the message names `field` and
            lists the accounts).
        AccountingUnavailable: `account` was given but slurmdbd cannot be asked (not configured, down).
    """
    accounting = accounting or Accounting()
    if account is None:
        if deployment.slurm.account:
            return deployment.slurm.account
        try:
            return accounting.default_account(getpass.getuser())
        except AccountingUnavailable:
            return None
    if not re.fullmatch(SLURM_ACCOUNT_PATTERN, account):
        raise ConfigError(f"{field}: expected a Slurm account name (letters, digits, '.', '_' or '-'), got {account!r}")
    try:
        known = accounting.accounts()
    except AccountingUnavailable as exc:
        raise AccountingUnavailable(f"{field}: cannot check account {account!r}: {exc}") from None
    if account.lower() not in known:   # slurmdbd keeps account names in lower case
        raise ConfigError(f"{field}: slurmdbd has no account {account!r}; expected one of: {', '.join(known)} "
                          "(an admin adds one with `sacctmgr add account`)")
    return account.lower()


#: A Slurm account name as it can stand in HAProxy's map and the access log.
SLURM_ACCOUNT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


def accepted_keys(deployment: Deployment) -> list[Key]:
    """Every key the frontend accepts: the owner's and OpenWebUI's (when their files exist), those of
    haproxy.api_keys_file, and the named keys; [] when haproxy.auth is open.

    Raises:
        ConfigError: the api_keys_file cannot be read or holds no key (see config.read_api_keys).
        HpcserveError: keys.json is unreadable.
    """
    if deployment.haproxy.auth == "open":
        return []
    keys: list[Key] = []
    # hpcserve's own keys count for the pool's account (slurm.account) when the deployment names it.
    pool_account = deployment.slurm.account
    owner = StateDir(deployment.state_dir).read_api_key()
    if owner:
        keys.append(Key("owner", digest(owner), source="owner", account=pool_account))
    webui = read_secret(webui_key_file(deployment))
    if webui:
        keys.append(Key("openwebui", digest(webui), forwards_users=True, source="openwebui", account=pool_account))
    if deployment.haproxy.api_keys_file:
        try:
            file_keys = read_api_keys(deployment.haproxy.api_keys_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"haproxy.api_keys_file: {exc}") from None
        short = [key for key in file_keys if len(key) < MIN_KEY_CHARS]
        if short:
            raise ConfigError(f"haproxy.api_keys_file: {len(short)} key(s) shorter than {MIN_KEY_CHARS} characters "
                              f"(the shortest has {min(len(k) for k in short)}); a short key can be guessed: "
                              "replace them, e.g. with `hpcserve keys add NAME`")
        keys += [Key(f"file-{digest(key)[:8]}", digest(key), source="file", account=pool_account)
                 for key in file_keys]
    keys += KeyRegistry(deployment).named()
    # The token of each running batch (batches/store.py): the key that made the batch, in the
    # batch class, so the job's requests are that key's in the access log, usage and limits.
    by_name = {key.name: key for key in keys}
    for owner, sha256 in BatchStore(deployment).active_tokens():
        if owner in by_name:     # a revoked key's batches run no more
            keys.append(dataclasses.replace(by_name[owner], sha256=sha256, priority_class="batch",
                                            forwards_users=False, source="batch"))
    return keys


def key_map(deployment: Deployment) -> dict[str, str] | None:
    """HAProxy's key map: SHA-256 hex -> Key.map_value, for every accepted key; None when open.

    A digest listed twice (the same key in two places) keeps its first entry, in the order of
    accepted_keys.

    Raises:
        see accepted_keys.
    """
    if deployment.haproxy.auth == "open":
        return None
    entries: dict[str, str] = {}
    for key in accepted_keys(deployment):
        entries.setdefault(key.sha256, key.map_value(deployment))
    return entries


def serving_haproxy(deployment: Deployment, backend_key: str) -> HAProxy:
    """The deployment's HAProxy, with its key map read from the accepted keys (key_map) at each
    config write and key sync: the one to start, reload or change (HAProxy(deployment, "")
    reads only)."""
    return HAProxy(deployment, backend_key, key_map=lambda: key_map(deployment))


