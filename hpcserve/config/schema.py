"""The deployment file's schema: pydantic models with defaults and validation of each field.

A deployment names one pool: its models (each served by llama-server jobs), the Slurm settings its
jobs are submitted with, and the HAProxy frontend that is its one URL. Reading a file into a
validated `Deployment` is loading.py's.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Slurm partition, account and QOS names (a comma-separated list where sbatch(1) accepts one). They
# land in "#SBATCH --partition=VALUE" lines: no whitespace, quote, "#", "%", "$" or control character
# can end the directive or reach a shell.
SLURM_NAMES_PATTERN = r"^[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*$"
# sbatch(1) --constraint: features joined by & | , with [ ] ( ) and *count.
CONSTRAINT_PATTERN = r"^[A-Za-z0-9_.,:&|\[\]()*!-]+$"
# An extra #SBATCH option: --name or --name=value, the value without whitespace or quotes (sbatch
# splits a directive at whitespace) and without control characters.
DIRECTIVE_PATTERN = r"^--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.,:=@/+%*&|\[\]()!~^-]*)?$"
# The state directory lands in #SBATCH --output, in job scripts and in haproxy.cfg (sockets, files):
# plain path characters only. "%" is refused because Slurm expands it in --output (sbatch(1),
# filename pattern), whitespace and "#" because they end an haproxy.cfg word or start a comment.
PATH_PATTERN = r"^[A-Za-z0-9_./@+,=~-]+$"
HOST_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$"  # a DNS name (RFC 1123 labels)
EMAIL_PATTERN = r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+$"
#: Bind addresses that listen on every interface.
ANY_ADDRESSES = ("0.0.0.0", "::", "*")
#: The largest deployment file hpcserve reads (bytes): a real one is a few KB.
MAX_FILE_BYTES = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _host(value: str, field: str) -> str:
    """An IPv4/IPv6 address, "*" or a DNS name; raises ValueError naming what was expected."""
    if value == "*":
        return value
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if re.fullmatch(HOST_PATTERN, value):
        return value
    raise ValueError(f"expected an IP address or host name for {field}, got {value!r}")
# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (sbatch(1), --time).
TIME_LIMIT_PATTERN = r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$"
MEMORY_PATTERN = r"^\d+[KMGT]?$"  # sbatch(1), --mem: a number with an optional unit suffix


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently become a default)."""

    # Infinity and NaN are no durations or sizes: refused like any other out-of-range number.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GPUs(_Strict):
    """GPUs per replica, requested as Slurm gres `gpu[:type]:count` (0 = CPU only)."""

    type: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    count: int = Field(default=1, ge=0, le=64)

    @property
    def gres(self) -> str | None:
        """The `--gres` value, e.g. "gpu:a100:1", or None when no GPU is requested."""
        if self.count == 0:
            return None
        return f"gpu:{self.type}:{self.count}" if self.type else f"gpu:{self.count}"


class Autoscale(_Strict):
    """How `hpcserve autoscale` sizes a model's pool (one decision per run, e.g. from cron).

    The need is (sessions + queued requests) / (slots per replica x target_utilization), in
    replicas, from HAProxy's counters. A change happens only when the need has differed from the
    desired replicas for the whole delay, at most max_step replicas at a time, and not within
    cooldown seconds of the last change: a steady load at the threshold does not flap.
    """

    min: int = Field(default=1, ge=0, description="replicas; 0 allows scale to zero")
    max: int = Field(default=4, ge=1, le=1024)
    target_utilization: float = Field(default=0.75, gt=0, le=1,
                                      description="wanted (sessions + queued) / slots")
    scale_up_delay: float = Field(default=30, ge=0, description="seconds the need must persist")
    scale_down_delay: float = Field(default=300, ge=0, description="seconds the lower need must persist")
    cooldown: float = Field(default=60, ge=0, description="seconds after a change before the next")
    max_step: int = Field(default=2, ge=1, description="replicas added or removed at once")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscale:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


#: llama-server options that hpcserve sets itself or that decide what the pool relies on, refused in
#: models[].extra_args with what to use instead (llama-server --help of b11434 names each; the short
#: forms are its aliases).
_SET_BY_HPCSERVE = "set by hpcserve from the deployment file"
SHAPE_ARGS: dict[str, str] = {
    **dict.fromkeys(("-m", "--model"), f"{_SET_BY_HPCSERVE}: use gguf"),
    **dict.fromkeys(("-a", "--alias"), f"{_SET_BY_HPCSERVE}: the model's name is the alias clients use"),
    **dict.fromkeys(("--host", "--port"), f"{_SET_BY_HPCSERVE}: the job binds port 0 on every "
                                          "address and announces the port the kernel picked"),
    **dict.fromkeys(("-np", "--parallel"), f"{_SET_BY_HPCSERVE}: use parallel (HAProxy's maxconn follows it)"),
    **dict.fromkeys(("-c", "--ctx-size"), f"{_SET_BY_HPCSERVE}: use context_size"),
    **dict.fromkeys(("-cram", "--cache-ram"), f"{_SET_BY_HPCSERVE}: use cache_ram (counted in memory)"),
    **dict.fromkeys(("--api-key", "--api-key-file"), "the backend key reaches llama-server through its "
                    "environment, set by hpcserve; a key on the command line is visible to every user in ps"),
    **dict.fromkeys(("--ui", "--webui"), "llama-server's own web UI is off (--no-webui): users reach the pool "
                    "through HAProxy and OpenWebUI"),
    "--sleep-idle-seconds": "an idle llama-server that sleeps unloads its model while HAProxy routes to it",
}


class Model(_Strict):
    """One model of the pool and how each of its replicas (one Slurm job each) runs llama-server."""

    name: str = Field(pattern=NAME_PATTERN, description="the OpenAI `model` id clients use")
    gguf: Path = Field(description="the GGUF file, on a filesystem the compute nodes share")
    command: str = Field(default="llama-server", description="llama-server path or command line")
    replicas: int = Field(default=1, ge=0, le=1024)
    context_size: int = Field(default=4096, ge=0, description="tokens, shared by all slots (--ctx-size)")
    parallel: int = Field(default=4, ge=1, le=256, description="llama-server slots (--parallel)")
    gpu_layers: int | Literal["auto", "all"] = Field(default="all", description="--n-gpu-layers")
    threads: int | None = Field(default=None, ge=1, description="--threads; default: the job's CPUs")
    extra_args: list[str] = Field(default_factory=list, description="more llama-server arguments")
    prompt_cache: Literal["off", "shared"] = Field(
        default="off", description="off: llama-server reuses no prompt prefix (--no-cache-prompt; "
                                   "requests may not turn it on), so no key learns what another sent; "
                                   "shared: prefixes are reused across all keys (faster multi-turn "
                                   "chats; cached_tokens and timing tell a key whether another sent a "
                                   "prompt)")
    cache_ram: int = Field(default=0, ge=0, description="MiB of host RAM for llama-server's prompt cache "
                                                         "(--cache-ram; 0: off), counted in memory")
    gpus: GPUs = Field(default_factory=GPUs)
    cpus: int = Field(default=4, ge=1, le=1024, description="--cpus-per-task")
    memory: str = Field(default="16G", pattern=MEMORY_PATTERN, description="--mem")
    autoscale: Autoscale | None = Field(default=None, description="policy of `hpcserve autoscale`")

    @field_validator("command")
    @classmethod
    def _command_words(cls, value: str) -> str:
        return _command_line(value, "a llama-server path or command line")

    @field_validator("extra_args")
    @classmethod
    def _arguments(cls, value: list[str]) -> list[str]:
        # Each becomes one quoted word of the job script; a script cannot hold a NUL byte, and a line
        # break inside an argument is never meant.
        for item in value:
            if _CONTROL.search(item):
                raise ValueError(f"expected llama-server arguments without control characters, got {item!r}")
            flag = item.split("=", 1)[0]
            if flag in SHAPE_ARGS:
                raise ValueError(f"{item!r}: {SHAPE_ARGS[flag]}")
        return value

    @model_validator(mode="after")
    def _cache_within_memory(self) -> Model:
        if self.cache_ram and self.cache_ram >= self.memory_mb:
            raise ValueError(f"cache_ram ({self.cache_ram} MiB) must be less than memory ({self.memory}): "
                             "llama-server's prompt cache lives in the job's host memory")
        return self

    @property
    def command_argv(self) -> list[str]:
        """The llama-server command as an argv list."""
        return shlex.split(self.command)

    @property
    def memory_mb(self) -> int:
        """`memory` in MB (sbatch(1) --mem: a unit suffix K, M, G or T; M when there is none)."""
        match = re.fullmatch(r"(\d+)([KMGT]?)", self.memory)
        if match is None:   # ruled out by the field's validation
            raise ValueError(f"memory: {self.memory!r} is not a number with an optional K, M, G or T")
        number, unit = match.groups()
        return int(number) * {"K": 1, "": 1 << 10, "M": 1 << 10, "G": 1 << 20, "T": 1 << 30}[unit] >> 10


def _command_line(value: str, what: str) -> str:
    """`value` if it splits into shell words (it is run as an argv list, each word quoted)."""
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"expected {what}, {exc} in {value!r}") from None
    if not words:
        raise ValueError(f"expected {what}, got an empty string")
    if _CONTROL.search(value):
        raise ValueError(f"expected {what} without control characters, got {value!r}")
    return value


class Slurm(_Strict):
    """How the jobs are submitted (sbatch(1) options)."""

    partition: str | None = Field(default=None, pattern=SLURM_NAMES_PATTERN)
    account: str | None = Field(default=None, pattern=SLURM_NAMES_PATTERN)
    qos: str | None = Field(default=None, pattern=SLURM_NAMES_PATTERN)
    constraint: str | None = Field(default=None, pattern=CONSTRAINT_PATTERN)
    time_limit: str = Field(default="1-00:00:00", pattern=TIME_LIMIT_PATTERN)
    extra_directives: list[str] = Field(default_factory=list,
                                        description="more #SBATCH options, e.g. --exclusive")
    setup: list[str] = Field(default_factory=list,
                             description="shell lines run before llama-server, e.g. module load cuda")
    renew_before: float = Field(default=600, ge=0,
                                description="seconds before its time limit a backend's successor is "
                                            "submitted, at least (hpcserve learns more if queue waits need it)")
    signal_before: int = Field(default=120, ge=0, le=65535,
                               description="seconds before the end Slurm warns the job with USR1 (--signal)")

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(DIRECTIVE_PATTERN, item):
                raise ValueError(f"expected sbatch options such as '--exclusive' or '--mail-type=END' "
                                 f"(no whitespace, quotes or control characters), got {item!r}")
        return value

    @field_validator("setup")
    @classmethod
    def _setup_lines(cls, value: list[str]) -> list[str]:
        # Shell lines by design (the site's module loads): one line each, no control character.
        for item in value:
            if _CONTROL.search(item):
                raise ValueError(f"expected one shell line per item, without control characters, got {item!r}")
        return value


class HAProxy(_Strict):
    """The frontend: the one URL of the pool, and the timeouts that fit llama.cpp traffic."""

    bind: str = Field(default="127.0.0.1", description="address the frontend listens on")
    port: int = Field(default=8000, ge=1025, le=65535, description="unprivileged port")
    command: str = Field(default="haproxy", description="the haproxy binary")
    auth: Literal["keys", "open"] = Field(
        default="keys", description="keys (default): every request needs an API key (the owner key "
                                    "STATE_DIR/api.key, or one of api_keys_file); open: anyone who reaches "
                                    "bind:port may use the pool")
    max_request_body: int | None = Field(
        default=None, ge=1024, le=64 << 20,
        description="bytes; a larger request gets 413. Default: 16 bytes per token of the largest "
                    "context_size (at least 64 KiB), which holds any prompt that fits the context")
    body_timeout: float = Field(default=30, gt=0, le=3600,
                                description="seconds a request's whole body may take to arrive; then 408")
    max_header_bytes: int = Field(default=16384, ge=4096, le=1 << 20,
                                  description="bytes of request headers (all of them); larger gets 431 before "
                                              "the key is checked")
    max_requests_per_client: int = Field(
        default=256, ge=1, le=100000,
        description="requests one API key (or, with auth: open, one source address) may have in "
                    "service or queued at once; more get 429")
    maxconn: int = Field(default=4096, ge=16, le=1000000,
                         description="connections the frontend accepts at once (HAProxy maxconn)")
    threads: int = Field(default=1, ge=1, le=64,
                         description="HAProxy worker threads (nbthread). 1 (default) keeps the per-key rate "
                                     "limit exact: with more, two threads may both admit a key's last request "
                                     "of its minute (1 in 1,000 bursts at 4 threads, HAProxy 3.0.11)")
    timeout_connect: float = Field(default=5, gt=0, description="seconds")
    timeout_client: float = Field(default=600, gt=0, description="seconds of client silence")
    timeout_server: float = Field(default=600, gt=0, description="seconds of backend silence")
    timeout_queue: float = Field(default=60, gt=0, description="seconds a request may wait for a slot")
    check_interval: float = Field(default=2, gt=0, description="seconds between /health checks")
    hard_stop_after: float = Field(default=3600, gt=0,
                                   description="seconds an old worker may keep streams after a reload")
    drain_timeout: float = Field(default=300, ge=0,
                                 description="seconds a leaving server may finish its requests before scancel")
    retry_after: int = Field(default=10, ge=1, description="Retry-After seconds in a 503 answer")
    stats_port: int | None = Field(default=None, ge=1025, le=65535,
                                   description="127.0.0.1 port for /stats and Prometheus /metrics; default port + 1")
    api_keys_file: Path | None = Field(default=None,
                                       description="file of frontend API keys, one per line; none = open")
    affinity_header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+$",
                                        description="conversation key for prompt-cache affinity, e.g. "
                                                    "X-OpenWebUI-Chat-Id; null (default) = off")
    affinity_expire: float = Field(default=1800, gt=0, description="seconds a conversation stays on its server")
    affinity_max_queue: int = Field(default=1, ge=1,
                                    description="requests a conversation's server may have waiting before the "
                                                "next one goes to the least busy server")

    batch_delay: float | None = Field(
        default=None, gt=0, le=524,
        description="seconds: a queued request of a batch key (or one that asked for X-Priority-Class: "
                    "batch) is served after interactive requests that arrive up to this much later, "
                    "never after later ones; default: half of timeout_queue")
    access_log: bool = Field(default=True, description="one JSON line per request in STATE_DIR/logs/access.log")
    access_log_max_bytes: int = Field(default=100 << 20, ge=1 << 16,
                                      description="bytes of access.log before it is rotated to access.log.1")
    access_log_files: int = Field(default=10, ge=1, le=1000,
                                  description="rotated access logs kept (access.log.1 ... access.log.N, "
                                              "and as many unbilled.log); older billed ones are folded into "
                                              "the usage ledger, not deleted")

    @property
    def batch_delay_or_default(self) -> float:
        """`batch_delay` in seconds, or half of timeout_queue."""
        return self.batch_delay if self.batch_delay is not None else self.timeout_queue / 2

    @property
    def stats_port_or_default(self) -> int:
        """The stats/Prometheus port: `stats_port`, or the frontend port + 1."""
        return self.stats_port if self.stats_port is not None else self.port + 1

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        return _host(value, "the frontend address")

    @field_validator("command")
    @classmethod
    def _command_words(cls, value: str) -> str:
        return _command_line(value, "the haproxy binary")

    @model_validator(mode="after")
    def _distinct_ports(self) -> HAProxy:
        if self.stats_port_or_default == self.port:
            raise ValueError("stats_port must differ from port")
        if self.batch_delay is not None and self.batch_delay >= self.timeout_queue:
            raise ValueError(f"batch_delay ({self.batch_delay:g} s) must be shorter than timeout_queue "
                             f"({self.timeout_queue:g} s), or a batch request could wait in the queue "
                             "until it times out")
        if self.max_requests_per_client > self.maxconn:
            raise ValueError(f"max_requests_per_client ({self.max_requests_per_client}) must not exceed "
                             f"maxconn ({self.maxconn})")
        return self


class Local(_Strict):
    """The workstation launcher (scheduler: local): backends are local processes, no Slurm."""

    gpus: list[int] = Field(default_factory=list,
                            description="GPU indices handed out via CUDA_VISIBLE_DEVICES; [] = CPU only")
    gpus_per_backend: int = Field(default=1, ge=1)


def _group_name(name: str) -> None:
    """Raise ValueError unless `name` can be an OpenWebUI group's name (1 to 255 printable characters)."""
    if not name.strip() or len(name) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"expected OpenWebUI group names (1 to 255 printable characters), got {name!r}")


def _account_name(account: str, owner: str) -> None:
    """Raise ValueError unless `account` is a Slurm account name (what sacctmgr accepts), naming `owner`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", account):
        raise ValueError(f"expected a Slurm account name for {owner}, got {account!r}")


class WebUI(_Strict):
    """OpenWebUI in front of the pool (`hpcserve webui`)."""

    host: str = Field(default="127.0.0.1", description="address OpenWebUI listens on")
    port: int = Field(default=8080, ge=1025, le=65535)
    command: str = Field(default="open-webui", description="the open-webui program (a path, or a name on PATH)")
    partition: str | None = Field(default=None, pattern=SLURM_NAMES_PATTERN,
                                  description="CPU partition for `hpcserve webui --sbatch`")
    cpus: int = Field(default=2, ge=1, description="--cpus-per-task of the OpenWebUI job")
    memory: str = Field(default="4G", pattern=MEMORY_PATTERN, description="--mem of the OpenWebUI job")
    time_limit: str = Field(default="7-00:00:00", pattern=TIME_LIMIT_PATTERN)
    admin_email: str = Field(default="admin@localhost", pattern=EMAIL_PATTERN,
                             description="the admin account created at first start")
    user_max_concurrent: int = Field(default=8, ge=1, le=4096,
                                     description="requests one OpenWebUI user may have in service, queued or "
                                                 "uploading at once; beyond, 429 to that user only")
    user_requests_per_minute: int = Field(default=0, ge=0, le=100000,
                                          description="requests one OpenWebUI user may send per minute (0: no limit)")
    batch_users: list[str] = Field(default_factory=list,
                                   description="e-mails of OpenWebUI users whose requests queue as batch")
    batch_groups: list[str] = Field(default_factory=list,
                                    description="OpenWebUI groups whose members' requests queue as batch (read "
                                                "from OpenWebUI's API as its admin by each reconcile)")

    @field_validator("batch_users")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(EMAIL_PATTERN, item):
                raise ValueError(f"expected e-mail addresses such as ann@example.org, got {item!r}")
        return value

    @field_validator("batch_groups")
    @classmethod
    def _group_names(cls, value: list[str]) -> list[str]:
        for item in value:
            _group_name(item)
        return value

    @field_validator("host")
    @classmethod
    def _address(cls, value: str) -> str:
        return _host(value, "OpenWebUI's address")

    @field_validator("command")
    @classmethod
    def _command_word(cls, value: str) -> str:
        return _command_line(value, "the open-webui program")


class OwnCapacity(_Strict):
    """Large batches bring their own GPUs: a Slurm job array whose elements each start llama-server
    of the batch's model (as a replica would, on its GPUs: slurm.partition, gres) and send their
    shard of the rows to it, not to the pool (hpcserve/batches/runner.py)."""

    min_rows: int = Field(ge=1, le=50_000_000,
                          description="batches with at least this many rows run on their own GPUs")
    jobs: int = Field(default=4, ge=1, le=1024, description="elements of the job array (--array), each one "
                                                            "llama-server and a shard of the rows")
    partition: str | None = Field(default=None, pattern=SLURM_NAMES_PATTERN,
                                  description="partition of the array (default: slurm.partition, the replicas')")
    time_limit: str | None = Field(default=None, pattern=TIME_LIMIT_PATTERN,
                                   description="--time of each element (default: batches.time_limit)")


class Batches(_Strict):
    """The OpenAI Batch API (`/v1/files`, `/v1/batches`) behind the frontend, each batch a Slurm
    job (hpcserve/batches/)."""

    enabled: bool = Field(default=False, description="serve /v1/files and /v1/batches (a service HAProxy "
                                                    "reaches on a Unix socket in the state directory)")
    max_file_bytes: int = Field(default=200 << 20, ge=1 << 10, le=1 << 40,
                                description="largest batch input file accepted, bytes (413 above)")
    max_rows: int = Field(default=500_000, ge=1, le=50_000_000, description="rows per batch input file")
    partition: str | None = Field(default=None, pattern=SLURM_NAMES_PATTERN,
                                  description="partition of the batch jobs (default: Slurm's default)")
    cpus: int = Field(default=1, ge=1, description="--cpus-per-task of a batch job")
    memory: str = Field(default="1G", pattern=MEMORY_PATTERN, description="--mem of a batch job")
    time_limit: str = Field(default="1-00:00:00", pattern=TIME_LIMIT_PATTERN,
                            description="--time of a batch job (the completion window is 24 h)")
    concurrency: int = Field(default=8, ge=1, le=4096, description="requests in flight per batch job")
    file_expiry: int = Field(default=2_592_000, ge=0, le=2_592_000,
                             description="seconds an uploaded batch input file is kept unless its upload asks for "
                                         "less (expires_after); 0: until deleted. Default 30 days, OpenAI's")
    own_capacity: OwnCapacity | None = Field(
        default=None, description="large batches run on GPUs of their own (a job array), not through the pool; "
                                  "default: every batch goes through the pool")


class Accounting(_Strict):
    """Slurm accounts (slurmdbd) in the pool: keys belong to accounts (`hpcserve keys add --account`),
    and accounts are served in the order of their Slurm fair share (core/fairshare.py)."""

    fair_share_delay: float | None = Field(
        default=None, ge=0, le=262,
        description="seconds: requests of an account whose Slurm fair-share factor is 0 are queued as if they "
                    "arrived this much later than those of an account with factor 1 (linear between); 0 = "
                    "fair share off; must be shorter than haproxy.batch_delay; default: half of it")

    webui_accounts: dict[str, str] = Field(
        default_factory=dict,
        description="OpenWebUI users (e-mail) -> the Slurm account their requests count for (fair share, quotas, "
                    "usage); other users count for OpenWebUI's key's account (slurm.account)")

    webui_group_accounts: dict[str, str] = Field(
        default_factory=dict,
        description="OpenWebUI groups -> the Slurm account their members' requests count for (read from OpenWebUI "
                    "by each reconcile); a user's own entry in webui_accounts wins, then the first group listed")

    @field_validator("webui_accounts")
    @classmethod
    def _webui_accounts(cls, value: dict[str, str]) -> dict[str, str]:
        for email, account in value.items():
            if not re.fullmatch(EMAIL_PATTERN, email):
                raise ValueError(f"expected e-mail addresses such as ann@example.org as keys, got {email!r}")
            _account_name(account, email)
        return {email.lower(): account.lower() for email, account in value.items()}

    @field_validator("webui_group_accounts")
    @classmethod
    def _webui_group_accounts(cls, value: dict[str, str]) -> dict[str, str]:
        for group, account in value.items():
            _group_name(group)
            _account_name(account, group)
        return {group: account.lower() for group, account in value.items()}

    def accounts_named(self) -> set[str]:
        """Every Slurm account this section names (for `hpcserve check` against slurmdbd)."""
        return set(self.webui_accounts.values()) | set(self.webui_group_accounts.values())

    def fair_share_delay_or_default(self, haproxy: HAProxy) -> float:
        """`fair_share_delay` in seconds, or half of haproxy.batch_delay (its default included)."""
        return self.fair_share_delay if self.fair_share_delay is not None else haproxy.batch_delay_or_default / 2


class Deployment(_Strict):
    """A whole deployment file, validated; paths are absolute."""

    name: str = Field(pattern=NAME_PATTERN)
    state_dir: Path
    scheduler: Literal["slurm", "local"] = Field(default="slurm",
                                                 description="slurm, or local processes on this machine")
    models: list[Model] = Field(min_length=1)
    slurm: Slurm = Field(default_factory=Slurm)
    haproxy: HAProxy = Field(default_factory=HAProxy)
    local: Local = Field(default_factory=Local)
    webui: WebUI = Field(default_factory=WebUI)
    batches: Batches = Field(default_factory=Batches)
    accounting: Accounting = Field(default_factory=Accounting)
    templates_dir: Path | None = Field(default=None, description="site templates that override ours")

    @model_validator(mode="after")
    def _unique_model_names(self) -> Deployment:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {', '.join(duplicates)}")
        if self.accounting.fair_share_delay and self.accounting.fair_share_delay >= self.haproxy.batch_delay_or_default:
            raise ValueError(f"accounting.fair_share_delay ({self.accounting.fair_share_delay:g} s) must be shorter "
                             f"than haproxy.batch_delay ({self.haproxy.batch_delay_or_default:g} s), or a batch request "
                             "could go before an interactive one")
        if self.scheduler == "local" and self.batches.own_capacity is not None:
            raise ValueError("batches.own_capacity: a batch's own GPUs are a Slurm job array, which scheduler: local "
                             "does not have; remove it (batches go through the pool)")
        return self

    def model(self, name: str) -> Model:
        """The model called `name`.

        Raises:
            ConfigError: no model has that name (the message lists the names).
        """
        for model in self.models:
            if model.name == name:
                return model
        raise ConfigError(f"models: no model named {name!r}; expected one of: "
                          f"{', '.join(m.name for m in self.models)}")

    @property
    def url(self) -> str:
        """The OpenAI base URL of the pool on this host, e.g. http://127.0.0.1:8000/v1."""
        host = self.haproxy.bind if self.haproxy.bind not in ANY_ADDRESSES else "127.0.0.1"
        return f"http://{url_host(host)}:{self.haproxy.port}/v1"

    @property
    def max_request_body(self) -> int:
        """The largest request body the frontend accepts, in bytes (haproxy.max_request_body).

        Default: 16 bytes per token of the largest context_size (4096 when a model leaves it to
        llama-server), at least 64 KiB. A token is about 4 bytes of English text; JSON escaping of
        non-ASCII text ("\\uXXXX", 6 bytes a character) and the message framing stay within 16,
        so a prompt that fits the context fits the limit.
        """
        if self.haproxy.max_request_body is not None:
            return self.haproxy.max_request_body
        largest = max(m.context_size or 4096 for m in self.models)
        return max(64 << 10, 16 * largest)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this host's loopback only: 127.0.0.0/8, ::1, or
    "localhost", which no other host reaches."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def url_host(host: str) -> str:
    """`host` as it stands in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def default_state_dir(name: str) -> Path:
    """~/.hpcserve/NAME: a home directory is on the shared filesystem of most clusters."""
    return Path.home() / ".hpcserve" / name
