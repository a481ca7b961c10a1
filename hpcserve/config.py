"""The deployment file (YAML): schema, defaults and validation.

A deployment names one pool: its models (each served by llama-server jobs), the Slurm settings its
jobs are submitted with, and the HAProxy frontend that is its one URL. `load()` turns a file into a
validated `Deployment` or raises `ConfigError` naming the field and what was expected.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (sbatch(1), --time).
TIME_LIMIT_PATTERN = r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$"
MEMORY_PATTERN = r"^\d+[KMGT]?$"  # sbatch(1), --mem: a number with an optional unit suffix


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently become a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
    gpus: GPUs = Field(default_factory=GPUs)
    cpus: int = Field(default=4, ge=1, le=1024, description="--cpus-per-task")
    memory: str = Field(default="16G", pattern=MEMORY_PATTERN, description="--mem")
    autoscale: Autoscale | None = Field(default=None, description="policy of `hpcserve autoscale`")

    @field_validator("command")
    @classmethod
    def _command_words(cls, value: str) -> str:
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"expected a command line, {exc}") from None
        if not words:
            raise ValueError("expected a llama-server path or command line, got an empty string")
        return value

    @property
    def command_argv(self) -> list[str]:
        """The llama-server command as an argv list."""
        return shlex.split(self.command)


class Slurm(_Strict):
    """How the jobs are submitted (sbatch(1) options)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
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
            if not item.startswith("--") or "\n" in item:
                raise ValueError(f"expected sbatch options such as '--exclusive', got {item!r}")
        return value

    @field_validator("setup")
    @classmethod
    def _setup_lines(cls, value: list[str]) -> list[str]:
        for item in value:
            if "\n" in item:
                raise ValueError(f"expected one shell line per item, got {item!r}")
        return value


class HAProxy(_Strict):
    """The frontend: the one URL of the pool, and the timeouts that fit llama.cpp traffic."""

    bind: str = Field(default="127.0.0.1", description="address the frontend listens on")
    port: int = Field(default=8000, ge=1025, le=65535, description="unprivileged port")
    command: str = Field(default="haproxy", description="the haproxy binary")
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
                                                "next one goes elsewhere; above 1, leastconn also queues other "
                                                "requests on servers instead of the backend (HAProxy 2.6 maxqueue)")

    @property
    def stats_port_or_default(self) -> int:
        """The stats/Prometheus port: `stats_port`, or the frontend port + 1."""
        return self.stats_port if self.stats_port is not None else self.port + 1

    @model_validator(mode="after")
    def _distinct_ports(self) -> HAProxy:
        if self.stats_port_or_default == self.port:
            raise ValueError("stats_port must differ from port")
        return self


class Local(_Strict):
    """The workstation launcher (scheduler: local): backends are local processes, no Slurm."""

    gpus: list[int] = Field(default_factory=list,
                            description="GPU indices handed out via CUDA_VISIBLE_DEVICES; [] = CPU only")
    gpus_per_backend: int = Field(default=1, ge=1)


class WebUI(_Strict):
    """OpenWebUI in front of the pool (`hpcserve webui`)."""

    host: str = Field(default="127.0.0.1", description="address OpenWebUI listens on")
    port: int = Field(default=8080, ge=1025, le=65535)
    command: str = Field(default="open-webui", description="the open-webui program (a path, or a name on PATH)")
    partition: str | None = Field(default=None, description="CPU partition for `hpcserve webui --sbatch`")
    cpus: int = Field(default=2, ge=1, description="--cpus-per-task of the OpenWebUI job")
    memory: str = Field(default="4G", pattern=MEMORY_PATTERN, description="--mem of the OpenWebUI job")
    time_limit: str = Field(default="7-00:00:00", pattern=TIME_LIMIT_PATTERN)
    admin_email: str = Field(default="admin@localhost", description="the admin account created at first start")


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
    templates_dir: Path | None = Field(default=None, description="site templates that override ours")

    @model_validator(mode="after")
    def _unique_model_names(self) -> Deployment:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {', '.join(duplicates)}")
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
        """The OpenAI base URL of the pool, e.g. http://127.0.0.1:8000/v1."""
        host = self.haproxy.bind if self.haproxy.bind not in ("0.0.0.0", "::", "*") else "127.0.0.1"
        return f"http://{host}:{self.haproxy.port}/v1"


def default_state_dir(name: str) -> Path:
    """~/.hpcserve/NAME: a home directory is on the shared filesystem of most clusters."""
    return Path.home() / ".hpcserve" / name


def load(path: str | os.PathLike[str]) -> Deployment:
    """Read and validate a deployment file.

    Relative paths in it (gguf, state_dir, a command with a slash) are taken from the file's folder.
    The GGUF file must exist here (the login node shares it with the compute nodes); a command
    given as a path must be an executable file, while a bare name may come from a `module load`
    on the compute node and is not checked.

    Returns:
        Deployment with absolute paths.
    Raises:
        ConfigError: the file is missing or unreadable, not YAML, or a field is unknown, of the
            wrong type, out of range or names a missing file. The message starts with the file
            name and names the field, e.g. "hpcserve.yaml: models[0].parallel: expected ...".
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the deployment file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys name, models, slurm, haproxy")
    return parse(raw, base=path.resolve().parent, source=str(path))


def parse(raw: dict[str, Any], *, base: Path, source: str = "deployment",
          check_files: bool = True) -> Deployment:
    """Validate a deployment given as a dict (see `load`); `base` resolves relative paths.

    `check_files=False` skips the existence checks, for rendering a site's example elsewhere.
    """
    data = dict(raw)
    if "state_dir" not in data and isinstance(data.get("name"), str):
        data["state_dir"] = str(default_state_dir(data["name"]))
    try:
        deployment = Deployment.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    deployment = _absolute(deployment, base)
    _check_socket_room(deployment, source)
    if check_files:
        _check_files(deployment, source)
    return deployment


def _absolute(deployment: Deployment, base: Path) -> Deployment:
    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p)

    models = []
    for model in deployment.models:
        argv = model.command_argv
        if "/" in argv[0] and not os.path.isabs(os.path.expanduser(argv[0])):
            argv[0] = str(resolve(Path(argv[0])))
        models.append(model.model_copy(update={"gguf": resolve(model.gguf),
                                               "command": shlex.join(argv)}))
    templates_dir = resolve(deployment.templates_dir) if deployment.templates_dir else None
    haproxy = deployment.haproxy
    if haproxy.api_keys_file is not None:
        haproxy = haproxy.model_copy(update={"api_keys_file": resolve(haproxy.api_keys_file)})
    return deployment.model_copy(update={"state_dir": resolve(deployment.state_dir), "models": models,
                                         "templates_dir": templates_dir, "haproxy": haproxy})


#: HAProxy refuses a unix socket path longer than this many characters: "socket path '...' too
#: long (max 97)" (measured with HAProxy 2.6.12, `stats socket` with 97 and 98 characters).
HAPROXY_SOCKET_PATH_MAX = 97
#: The longest socket name hpcserve puts in the state directory (haproxy.config.Paths.master_socket).
LONGEST_SOCKET_NAME = "haproxy-master.sock"


def _check_socket_room(deployment: Deployment, source: str) -> None:
    longest = len(str(deployment.state_dir / LONGEST_SOCKET_NAME))
    if longest > HAPROXY_SOCKET_PATH_MAX:
        room = HAPROXY_SOCKET_PATH_MAX - len(LONGEST_SOCKET_NAME) - 1
        raise ConfigError(f"{source}: state_dir: expected a path of at most {room} characters (HAProxy's "
                          f"sockets live in it and a socket path may have {HAPROXY_SOCKET_PATH_MAX}), "
                          f"{deployment.state_dir} has {len(str(deployment.state_dir))}")


def _check_files(deployment: Deployment, source: str) -> None:
    keys = deployment.haproxy.api_keys_file
    if keys is not None:
        try:
            read_api_keys(keys)
        except OSError as exc:
            raise ConfigError(f"{source}: haproxy.api_keys_file: expected a readable file of keys, "
                              f"{keys}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"{source}: haproxy.api_keys_file: {exc}") from None
    if deployment.templates_dir and not deployment.templates_dir.is_dir():
        raise ConfigError(f"{source}: templates_dir: expected a folder of templates, "
                          f"{deployment.templates_dir} is not one")
    for i, model in enumerate(deployment.models):
        if not model.gguf.is_file():
            raise ConfigError(f"{source}: models[{i}].gguf: expected an existing GGUF file, "
                              f"{model.gguf} does not exist")
        program = model.command_argv[0]
        if "/" in program and not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise ConfigError(f"{source}: models[{i}].command: expected an executable llama-server, "
                              f"{program} is not an executable file")


def read_api_keys(path: Path) -> list[str]:
    """The frontend API keys in `path`: one per line; blank lines and lines starting with # skipped.

    Raises:
        OSError: the file cannot be read.
        ValueError: it holds no key, or a key with whitespace or quotes in it.
    """
    keys = [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"expected at least one key in {path}")
    for key in keys:
        if re.search(r"[\s'\"\\]", key):
            raise ValueError(f"a key in {path} contains whitespace or quotes")
    return keys


_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
    "float_parsing": "a number", "string_type": "a string", "list_type": "a list",
    "bool_type": "true or false", "dict_type": "a mapping", "model_type": "a mapping",
    "path_type": "a path", "int_from_float": "an integer",
}


def _describe(exc: ValidationError) -> str:
    messages = []
    for error in exc.errors():
        loc = _location(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            valid = _valid_keys(error["loc"][:-1])
            text = f"unknown key; expected one of: {', '.join(valid)}" if valid else "unknown key"
        elif kind == "missing":
            text = "required key is missing"
        elif kind in _TYPE_WORDS:
            text = f"expected {_TYPE_WORDS[kind]}, got {error['input']!r}"
        elif kind == "string_pattern_mismatch":
            text = f"got {error['input']!r}, expected a value matching {error['ctx']['pattern']}"
        elif kind == "literal_error":
            text = f"expected {error['ctx']['expected']}, got {error['input']!r}"
        else:
            text = error["msg"].removeprefix("Value error, ")
            if "input" in error and not isinstance(error["input"], (dict, list)):
                text += f" (got {error['input']!r})"
        messages.append(f"{loc}: {text}" if loc else text)
    shown = "; ".join(messages[:3])
    return shown + (f" (and {len(messages) - 3} more)" if len(messages) > 3 else "")


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.match(r"^(int|str|float|literal|function-)", str(part)) and out:
            continue  # pydantic's union-member markers, not part of the user's path
        else:
            out += ("." if out else "") + str(part)
    return out


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    cls: Any = Deployment
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        cls = args[0] if args and isinstance(args[0], type) and issubclass(args[0], BaseModel) else annotation
    return list(cls.model_fields) if hasattr(cls, "model_fields") else []
