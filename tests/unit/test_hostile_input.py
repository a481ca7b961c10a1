"""Hostile and broken input: every value that reaches an #SBATCH line, a shell line or haproxy.cfg
is refused (exit 2, one line naming the field) or lands there inert; broken files and batch inputs
give one-line errors, never a traceback."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcserve.site import check as check_mod
from hpcserve import config
from hpcserve.slurm import jobscript
from hpcserve.errors import ConfigError
from hpcserve.haproxy import config as haproxy_config
from hpcserve.state import StateDir
from tests.conftest import minimal, write_deployment


def hpcserve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True,
                          env=env or {**os.environ, "SLURM_CONF": "/nonexistent"}, timeout=60)


def refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2 with one line on stderr that contains `words`, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# --- broken deployment files ------------------------------------------------------------------

def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "hpcserve.yaml"
    path.write_bytes(b"name: t\nmodels: [{name: m, gguf: x\xff.gguf}]\n")
    refused(hpcserve("-f", str(path), "render"), "expected UTF-8 text")


def test_nesting_too_deep_for_the_parser(tmp_path):
    path = tmp_path / "hpcserve.yaml"
    path.write_text("name: " + "[" * 20000 + "]" * 20000 + "\n")
    refused(hpcserve("-f", str(path), "render"), "hpcserve.yaml")


def test_an_alias_bomb_is_refused_at_its_first_alias(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    path = tmp_path / "hpcserve.yaml"
    path.write_text("\n".join(lines) + "\nname: t\n")
    refused(hpcserve("-f", str(path), "render"), "line 2", "aliases (*name) are not accepted")


def test_a_file_over_the_size_limit(tmp_path):
    path = tmp_path / "hpcserve.yaml"
    path.write_text("# " + "x" * config.MAX_FILE_BYTES + "\nname: t\n")
    refused(hpcserve("-f", str(path), "render"), f"at most {config.MAX_FILE_BYTES} bytes")


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_infinite_and_nan_numbers(tmp_path, gguf, value):
    path = tmp_path / "hpcserve.yaml"
    path.write_text(yaml.safe_dump(minimal(gguf, tmp_path)) + f"haproxy: {{timeout_queue: {value}}}\n")
    refused(hpcserve("-f", str(path), "render"), "haproxy.timeout_queue", "a finite number")


def test_an_unbalanced_quote_in_the_haproxy_command(tmp_path, gguf):
    path = write_deployment(tmp_path, minimal(gguf, tmp_path, haproxy={"command": "haproxy 'oops"}))
    refused(hpcserve("-f", str(path), "status"), "haproxy.command", "No closing quotation")


@pytest.mark.parametrize("content", ["", "short\n", "x" * 31, "a b" * 20])
def test_a_backend_or_api_key_that_is_not_a_key(tmp_path, gguf, content):
    path = write_deployment(tmp_path, minimal(gguf, tmp_path))
    state = StateDir(tmp_path / "state")
    state.ensure()
    state.key_file.write_text(content)
    state.key_file.chmod(0o600)
    refused(hpcserve("-f", str(path), "reconcile"), "backend.key", "expected a random key of at least 32")
    state.key_file.unlink()
    state.api_key_file.write_text(content)
    state.api_key_file.chmod(0o600)
    with pytest.raises(ConfigError, match="api.key"):
        state.api_key()


def test_keys_made_by_hpcserve_are_long_and_private(tmp_path):
    state = StateDir(tmp_path / "state")
    key = state.api_key()
    assert len(key) >= 43 and state.api_key() == key
    assert stat.S_IMODE(state.api_key_file.stat().st_mode) == 0o600


def test_the_file_option_after_the_command(tmp_path, gguf):
    path = write_deployment(tmp_path, minimal(gguf, tmp_path), name="site.yaml")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-m", "hpcserve", "render", "-f", str(path), "--json"],
                            capture_output=True, text=True, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "haproxy.cfg" in yaml.safe_load(result.stdout)


# --- hpcserve batch input ---------------------------------------------------------------------

@pytest.fixture
def batch_pool(tmp_path, gguf):
    return write_deployment(tmp_path, minimal(gguf, tmp_path))


@pytest.mark.parametrize("rows, template, words", [
    (b'{"id": 1, "text": "caf\xe9"}\n', "Classify: {text}", ["rows.jsonl:1", "expected UTF-8"]),
    (b'{"id": 1, "text": "a"}\n', "Classify: {}", ["--template", "named fields"]),
    (b'{"id": 1, "text": "a"}\n', "Classify: {0}", ["--template", "named fields"]),
    (b'{"id": 1, "text": "a"}\n', "Classify: {text", ["--template"]),
    (b'{"id": 1, "n": "seven"}\n', "Count: {n:d}", ["rows.jsonl:1", "cannot be filled"]),
    (b'{"custom_id": "a", "body": {"temperature": NaN}}\n', None, ["rows.jsonl:1", "NaN is not a JSON number"]),
])
def test_batch_input_errors_are_one_line(tmp_path, batch_pool, rows, template, words):
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_bytes(rows)
    args = ["-f", str(batch_pool), "batch", "--input", str(rows_file), "--output", str(tmp_path / "out.jsonl")]
    refused(hpcserve(*args, *(["--template", template] if template else [])), *words)
    assert not (tmp_path / "out.jsonl").exists()


def test_batch_refuses_to_write_over_its_input(tmp_path, batch_pool):
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text('{"id": 1, "text": "a"}\n')
    link = tmp_path / "same.jsonl"
    link.symlink_to(rows_file)
    for output in (rows_file, link):
        result = hpcserve("-f", str(batch_pool), "batch", "--input", str(rows_file), "--output", str(output),
                          "--template", "{text}")
        assert result.returncode == 2 and "--output must not be the --input file" in result.stderr
    assert rows_file.read_text() == '{"id": 1, "text": "a"}\n'


# --- every string field, generated: refused, or inert where it lands ----------------------------

MARK = "HPCSERVE_INJECTED"
PAYLOADS = ["\n", "\r", "\x00", "'", '"', "$(touch {mark})", "`touch {mark}`", "; touch {mark}", "#", "%j",
            " ", "\\", "${IFS}", "é", "\u2028", "\nbind 0.0.0.0:1\n", "&& touch {mark}", "|", "*", "{{", "{#"]


def hostile() -> st.SearchStrategy[str]:
    """Strings built from plain text and the pieces that break shell lines, #SBATCH and haproxy.cfg."""
    piece = st.one_of(st.sampled_from(PAYLOADS), st.text(alphabet="abcXYZ019._-/:=,", min_size=1, max_size=6))
    return st.lists(piece, min_size=1, max_size=5).map("".join)


# (path in the deployment dict, where it lands): the fields a site sets as strings.
FIELDS = [("slurm.partition", "sbatch"), ("slurm.account", "sbatch"), ("slurm.qos", "sbatch"),
          ("slurm.constraint", "sbatch"), ("slurm.time_limit", "sbatch"), ("slurm.extra_directives.0", "sbatch"),
          ("models.0.name", "both"), ("models.0.memory", "sbatch"), ("models.0.gpus.type", "sbatch"),
          ("models.0.extra_args.0", "argv"), ("models.0.gguf", "argv"), ("state_dir", "both"),
          ("name", "both"), ("haproxy.bind", "haproxy"), ("haproxy.affinity_header", "haproxy")]


def _set(raw: dict, path: str, value: str) -> None:
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if last.isdigit():
        node.append(value)
    else:
        node[last] = value


def _directives(script: str) -> list[str]:
    """The #SBATCH options sbatch reads: the comment block before the first command (sbatch(1))."""
    options = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            options.append(line[len("#SBATCH"):].strip())
        elif line.strip() and not line.startswith("#"):
            break
    return options


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    """A folder of stand-ins for what the job script runs: llama-server records its argv and says
    where it listens; scontrol and hostname answer as on a node."""
    folder = tmp_path_factory.mktemp("stubs")
    (folder / "llama-server").write_text('#!/bin/bash\n[ "$1" = --version ] && { echo "version: stub"; exit 0; }\n'
                                         'printf "%s\\0" "$@" > "$STUB_ARGV"\n'
                                         'echo "main: server is listening on http://0.0.0.0:5555 - starting"\nsleep 0.7\n')
    (folder / "scontrol").write_text("#!/bin/bash\nexit 0\n")
    # The check job's listener: says its port and ends at once.
    (folder / "python3").write_text("#!/bin/bash\necho 5555\n")
    (folder / "hostname").write_text("#!/bin/bash\necho node1\n")
    for stub in folder.iterdir():
        stub.chmod(0o755)
    return folder


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=hostile())
def test_every_string_field_is_refused_or_inert(tmp_path_factory, stubs, field, value):
    folder = tmp_path_factory.mktemp("d")
    mark = folder / MARK
    value = value.replace("{mark}", str(mark))
    gguf = folder / "model.gguf"
    gguf.write_bytes(b"GGUF")
    raw = minimal(gguf, folder, models=[{"name": "m", "gguf": str(gguf), "command": str(stubs / "llama-server"),
                                         "extra_args": ["--flash-attn", "on"], "gpus": {"count": 1, "type": "a100"}}],
                  slurm={"partition": "gpu", "extra_directives": ["--exclusive"]})
    path, lands = field
    if path == "models.0.gguf":
        gguf = folder / value.replace("\x00", "")
        try:
            gguf.parent.mkdir(parents=True, exist_ok=True)
            gguf.write_bytes(b"GGUF")
        except (OSError, ValueError):
            return   # not a file name this filesystem takes
        value = str(gguf)
    _set(raw, path, value)
    try:
        deployment = config.parse(raw, base=folder)
    except ConfigError as exc:
        assert str(exc).startswith("deployment: ") and "\n" not in str(exc)
        return
    model = deployment.models[0]
    script = jobscript.render(deployment, model)
    # sbatch reads exactly the directives it was meant to, each with the value it was given.
    expected = {f"--job-name=hpcserve:{deployment.name}:{model.name}", f"--partition={deployment.slurm.partition}",
                f"--mem={model.memory}", f"--time={deployment.slurm.time_limit}", f"--gres={model.gpus.gres}",
                f"--output={deployment.state_dir / 'logs'}/job-%j.out", *deployment.slurm.extra_directives}
    for key in ("account", "qos", "constraint"):
        if getattr(deployment.slurm, key):
            expected.add(f"--{key}={getattr(deployment.slurm, key)}")
    expected |= {"--open-mode=append", "--nodes=1", "--ntasks=1", f"--cpus-per-task={model.cpus}",
                 f"--signal=B:USR1@{deployment.slurm.signal_before}"}
    directives = _directives(script)
    assert sorted(directives) == sorted(expected), set(directives) ^ expected
    # The script runs what it was meant to: llama-server with exactly these arguments, nothing else.
    logs = deployment.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (deployment.state_dir / "backend.key").write_text("k" * 43 + "\n")
    argv_file = folder / "argv"
    result = subprocess.run(["bash", "-c", script], capture_output=True, timeout=30, cwd=folder,
                            env={"PATH": f"{stubs}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "STUB_ARGV": str(argv_file)})
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert not mark.exists(), f"{path}={value!r} ran a command"
    argv = argv_file.read_bytes().decode().split("\0")[:-1]
    assert argv[argv.index("--model") + 1] == str(model.gguf) and argv[-2:] == model.extra_args[-2:]
    assert argv[argv.index("--alias") + 1] == model.name
    # The check job's script (hpcserve check --job): a replica's directives with its own name, output
    # and time limit, and running it runs nothing it was not meant to.
    check_script = check_mod.job_script(deployment, folder / "marker", "nonce")
    own = {f"--job-name=hpcserve-check:{deployment.name}", "--output=/dev/null", "--time=10"}
    replica = expected - {f"--job-name=hpcserve:{deployment.name}:{model.name}", "--open-mode=append",
                          f"--output={deployment.state_dir / 'logs'}/job-%j.out", f"--time={deployment.slurm.time_limit}",
                          f"--signal=B:USR1@{deployment.slurm.signal_before}"}
    assert sorted(_directives(check_script)) == sorted(replica | own)
    result = subprocess.run(["bash", "-c", check_script], capture_output=True, timeout=30, cwd=folder,
                            env={"PATH": f"{stubs}:/usr/bin:/bin", "SLURM_JOB_ID": "7"})
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert not mark.exists(), f"{path}={value!r} ran a command in the check job"
    # haproxy.cfg: the one frontend bind and the stats bind, nothing smuggled in.
    cfg = haproxy_config.render(deployment, [])
    binds = [line.strip() for line in cfg.splitlines() if re.match(r"\s*bind\s", line)]
    assert binds == [f"bind {deployment.haproxy.bind}:{deployment.haproxy.port} proto h1",
                     f"bind 127.0.0.1:{deployment.haproxy.stats_port_or_default}"]
    assert all(not re.search(r"[\x00-\x08\x0b-\x1f]", line) for line in cfg.splitlines())
    for line in cfg.splitlines():
        directive = line.split("#")[0]    # a comment may hold a "/" too (a state_dir of "/")
        if str(deployment.state_dir) in directive:
            assert len(shlex.split(directive)) >= 2 and "#" not in str(deployment.state_dir)
