"""Reading a deployment file: YAML without aliases, size-bounded, into a validated `Deployment`,
or `ConfigError` naming the field and what was expected."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .schema import MAX_FILE_BYTES, PATH_PATTERN, Deployment, default_state_dir


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
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: expected a deployment file of at most {MAX_FILE_BYTES} bytes, "
                              f"it has {size}")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the deployment file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: expected UTF-8 text, byte {exc.start} is not") from None
    raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys name, models, slurm, haproxy")
    return parse(raw, base=path.resolve().parent, source=str(path))


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: a deployment file needs none, and a few
    nested aliases expand to gigabytes (the "billion laughs" of YAML)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not accepted in a deployment file; write the value out",
                                       problem_mark=event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document in `text`, read with the alias-free safe loader.

    Raises:
        ConfigError: not YAML, an alias, or nested too deeply; the message names `source` and the line.
    """
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}:{where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: expected a deployment file, the YAML is nested too deeply") from None


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
    if not re.fullmatch(PATH_PATTERN, str(deployment.state_dir)):
        raise ConfigError(f"{source}: state_dir: expected a path of letters, digits and _ . / @ + , = ~ - only "
                          f"(it is written into #SBATCH lines and haproxy.cfg), got {str(deployment.state_dir)!r}")
    # StateDir.ensure() makes the folder private (mode 0700): never a folder others rely on reading.
    if os.path.realpath(deployment.state_dir) in ("/", os.path.realpath(Path.home())):
        raise ConfigError(f"{source}: state_dir: expected a folder of hpcserve's own (it is made private, "
                          f"mode 0700), not {str(deployment.state_dir)!r}")
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
#: The longest socket name hpcserve puts in the state directory (state.HAProxyFiles.master_socket).
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
    "path_type": "a path", "int_from_float": "an integer", "finite_number": "a finite number",
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
