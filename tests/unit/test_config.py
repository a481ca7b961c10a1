"""The deployment file: defaults, and one clear error naming the field for each kind of mistake."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpcserve import config
from hpcserve.errors import ConfigError
from tests.conftest import minimal, write_deployment


def test_minimal_file_gets_defaults(load, gguf, tmp_path):
    d = load(minimal(gguf, tmp_path))
    m = d.models[0]
    assert (m.replicas, m.parallel, m.context_size, m.cpus, m.memory) == (1, 4, 4096, 4, "16G")
    assert m.gpus.gres == "gpu:1"
    assert d.haproxy.port == 8000 and d.slurm.time_limit == "1-00:00:00"
    assert d.url == "http://127.0.0.1:8000/v1"


def test_state_dir_defaults_to_home(gguf, tmp_path):
    raw = minimal(gguf, tmp_path)
    del raw["state_dir"]
    d = config.parse(raw, base=tmp_path)
    assert d.state_dir == config.default_state_dir("t")


def test_relative_paths_are_taken_from_the_files_folder(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.gguf").write_bytes(b"GGUF")
    server = tmp_path / "bin" / "llama-server"
    server.parent.mkdir()
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    d = config.load(write_deployment(tmp_path, {
        "name": "t", "state_dir": "state",
        "models": [{"name": "m", "gguf": "models/x.gguf", "command": "bin/llama-server --verbose"}]}))
    assert d.state_dir == tmp_path / "state"
    assert d.models[0].gguf == tmp_path / "models" / "x.gguf"
    assert d.models[0].command_argv == [str(server), "--verbose"]


@pytest.mark.parametrize("change, expected", [
    ({"colour": "blue"}, "colour: unknown key; expected one of: name, state_dir, scheduler, models, slurm, haproxy, local"),
    ({"scheduler": "pbs"}, "scheduler: expected 'slurm' or 'local', got 'pbs'"),
    ({"models": [{"name": "m", "gguf": "X", "paralel": 4}]}, "models[0].paralel: unknown key; expected one of: name, gguf"),
    ({"models": [{"name": "m", "gguf": "X", "parallel": "four"}]}, "models[0].parallel: expected an integer, got 'four'"),
    ({"models": [{"name": "m", "gguf": "X", "replicas": -1}]}, "models[0].replicas: Input should be greater than or equal to 0"),
    ({"models": [{"name": "m", "gguf": "X", "gpus": {"count": "two"}}]}, "models[0].gpus.count: expected an integer"),
    ({"models": []}, "models: List should have at least 1 item"),
    ({"models": [{"name": "bad name", "gguf": "X"}]}, "models[0].name: got 'bad name', expected a value matching"),
    ({"slurm": {"time_limit": "one day"}}, "slurm.time_limit: got 'one day'"),
    ({"slurm": {"extra_directives": ["exclusive"]}}, "slurm.extra_directives: expected sbatch options such as '--exclusive'"),
    ({"haproxy": {"port": 80}}, "haproxy.port: Input should be greater than or equal to 1025"),
    ({"haproxy": {"port": "http"}}, "haproxy.port: expected an integer, got 'http'"),
    ({"models": [{"name": "m", "gguf": "X", "gpu_layers": "most"}]}, "models[0].gpu_layers"),
    ({"models": [{"name": "m", "gguf": "X"}, {"name": "m", "gguf": "X"}]}, "model names must be unique, repeated: m"),
    # What decides the pool's shape is the deployment's own fields, never a second value in extra_args.
    ({"models": [{"name": "m", "gguf": "X", "extra_args": ["-np", "8"]}]}, "models[0].extra_args: '-np': set by hpcserve from the deployment file: use parallel"),
    ({"models": [{"name": "m", "gguf": "X", "extra_args": ["--ctx-size=8192"]}]}, "models[0].extra_args: '--ctx-size=8192': set by hpcserve from the deployment file: use context_size"),
    ({"models": [{"name": "m", "gguf": "X", "extra_args": ["--api-key", "s3cret"]}]}, "visible to every user in ps"),
    ({"models": [{"name": "m", "gguf": "X", "extra_args": ["--port", "8080"]}]}, "the job binds port 0"),
    ({"models": [{"name": "m", "gguf": "X", "extra_args": ["--webui"]}]}, "(--no-webui)"),
    ({"models": [{"name": "m", "gguf": "X", "extra_args": ["--sleep-idle-seconds", "60"]}]}, "unloads its model"),
    ({"models": [{"name": "m", "gguf": "X", "cache_ram": 2048, "memory": "2G"}]}, "models[0]: cache_ram (2048 MiB) must be less than memory (2G)"),
    ({"batches": {"own_capacity": {"jobs": 4}}}, "batches.own_capacity.min_rows: required key is missing"),
    ({"batches": {"own_capacity": {"min_rows": 0}}}, "batches.own_capacity.min_rows: Input should be greater than or equal to 1"),
    ({"scheduler": "local", "batches": {"own_capacity": {"min_rows": 10}}}, "batches.own_capacity: a batch's own GPUs are a Slurm job array"),
])
def test_invalid_fields_are_named(load, gguf, tmp_path, change, expected):
    raw = minimal(gguf, tmp_path)
    raw.update(change)
    for model in raw["models"]:
        if model.get("gguf") == "X":
            model["gguf"] = str(gguf)
    with pytest.raises(ConfigError) as info:
        load(raw)
    assert expected in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "hpcserve.yaml") + ": ")
    assert "\n" not in str(info.value)


def test_missing_gguf_is_named(load, gguf, tmp_path):
    raw = minimal(gguf, tmp_path)
    raw["models"][0]["gguf"] = str(tmp_path / "nope.gguf")
    with pytest.raises(ConfigError, match=r"models\[0\]\.gguf: expected an existing GGUF file, .*nope.gguf does not exist"):
        load(raw)


def test_command_path_must_be_executable(load, gguf, tmp_path):
    raw = minimal(gguf, tmp_path)
    raw["models"][0]["command"] = str(gguf)  # exists, not executable
    with pytest.raises(ConfigError, match=r"models\[0\]\.command: expected an executable llama-server"):
        load(raw)


def test_bare_command_name_is_not_checked(load, gguf, tmp_path):
    """A bare name may only exist on compute nodes after `module load`."""
    raw = minimal(gguf, tmp_path)
    raw["models"][0]["command"] = "llama-server-from-a-module"
    assert load(raw).models[0].command_argv == ["llama-server-from-a-module"]


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "hpcserve.yaml"
    path.write_text("name: t\nmodels:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"hpcserve.yaml: line \d+: not valid YAML"):
        config.load(path)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "hpcserve.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        config.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the deployment file"):
        config.load(tmp_path / "absent.yaml")


def test_cli_reports_a_bad_file_in_one_line_with_exit_2(tmp_path, gguf):
    path = write_deployment(tmp_path, minimal(gguf, tmp_path, colour="blue"))
    result = subprocess.run([sys.executable, "-m", "hpcserve", "-f", str(path), "render"],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "colour: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["local.yaml", "workstation.yaml", "reference-site.yaml"])
def test_example_files_are_valid(name):
    import yaml

    from tests.conftest import ROOT
    path = ROOT / "examples" / name
    deployment = config.parse(yaml.safe_load(path.read_text()), base=path.parent, check_files=False)
    assert deployment.models


def test_state_dir_leaves_room_for_haproxys_sockets(gguf, tmp_path):
    """HAProxy refuses socket paths over 97 characters; the deployment file is refused up front."""
    from hpcserve.state import HAProxyFiles
    room = config.HAPROXY_SOCKET_PATH_MAX - len(config.LONGEST_SOCKET_NAME) - 1
    longest = tmp_path / ("s" * (room - len(str(tmp_path)) - 1))
    assert len(str(longest)) == room
    d = config.parse(minimal(gguf, tmp_path, state_dir=str(longest)), base=tmp_path)
    sockets = [getattr(HAProxyFiles(d.state_dir), n) for n in dir(HAProxyFiles) if n.endswith("_socket")]
    assert sockets and max(len(str(s)) for s in sockets) == config.HAPROXY_SOCKET_PATH_MAX
    with pytest.raises(ConfigError, match=rf"state_dir: expected a path of at most {room} characters"):
        config.parse(minimal(gguf, tmp_path, state_dir=str(longest) + "s"), base=tmp_path)


@pytest.mark.parametrize("state_dir", ["/", "/tmp/..", "HOME", "HOME/"])
def test_state_dir_is_never_the_root_or_the_home_folder_which_it_would_make_private(gguf, tmp_path, monkeypatch,
                                                                                   state_dir):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="state_dir: expected a folder of hpcserve's own"):
        config.parse(minimal(gguf, tmp_path, state_dir=state_dir.replace("HOME", str(tmp_path / "home"))),
                     base=tmp_path)
    assert config.parse(minimal(gguf, tmp_path, state_dir=str(tmp_path / "home" / "hpcserve")), base=tmp_path)
