"""Rendered sbatch scripts and haproxy.cfg: golden files, shell quoting, strict templates.

The golden files are the ready-to-read examples in sbatch/ and haproxy/, rendered from
examples/reference-site.yaml; regenerate them with HPCSERVE_UPDATE_GOLDEN=1 after a template change.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcserve import config, templates
from hpcserve.slurm import jobscript
from hpcserve.core.pool import Server
from hpcserve.errors import TemplateError
from hpcserve.haproxy import config as haproxy_config
from tests.conftest import ROOT, minimal, write_deployment

EXAMPLE = ROOT / "examples" / "reference-site.yaml"


def reference_site() -> config.Deployment:
    return config.parse(yaml.safe_load(EXAMPLE.read_text()), base=EXAMPLE.parent, check_files=False)


def check_golden(path: Path, text: str) -> None:
    if os.environ.get("HPCSERVE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs from the rendering; HPCSERVE_UPDATE_GOLDEN=1 updates it"


@pytest.mark.parametrize("index", [0, 1])
def test_sbatch_golden(index):
    d = reference_site()
    model = d.models[index]
    check_golden(ROOT / "sbatch" / f"reference-site-{model.name}.sbatch", jobscript.render(d, model))


def test_haproxy_golden():
    d = reference_site()
    servers = [Server("llama-3.1-70b-instruct", "81234", "10.1.0.11", 41877),
               Server("llama-3.1-70b-instruct", "81235", "10.1.0.12", 38021),
               Server("qwen2.5-7b-instruct", "81240", "10.1.0.13", 40111)]
    check_golden(ROOT / "haproxy" / "reference-site.cfg", haproxy_config.render(d, servers))


def test_sbatch_has_every_requested_directive():
    d = reference_site()
    script = jobscript.render(d, d.models[0])
    for directive in ("--job-name=hpcserve:research-llm:llama-3.1-70b-instruct", "--gres=gpu:a100:2",
                      "--cpus-per-task=16", "--mem=128G", "--time=2-00:00:00", "--partition=gpu",
                      "--account=llm-service", "--qos=long", "--constraint=a100", "--requeue",
                      "--mail-type=FAIL"):
        assert f"#SBATCH {directive}\n" in script
    assert "module load llama.cpp/cuda-12.4\n" in script


def test_no_gres_line_for_a_cpu_only_model(gguf, tmp_path):
    raw = minimal(gguf, tmp_path)
    raw["models"][0]["gpus"] = {"count": 0}
    d = config.parse(raw, base=tmp_path)
    assert "--gres" not in jobscript.render(d, d.models[0])


def test_hostile_values_reach_llama_server_verbatim(tmp_path):
    """Every value is shell-quoted: spaces, $(...), ; and quotes arrive as one argument each."""
    folder = tmp_path / "my models $(touch PWNED); x"
    folder.mkdir()
    gguf = folder / "it's.gguf"
    gguf.write_bytes(b"GGUF")
    raw = minimal(gguf, tmp_path)
    raw["models"][0]["extra_args"] = ["--system-prompt", "be nice; rm -rf / `id`", "--x=\"$HOME\""]
    raw["models"][0]["command"] = "llama-server --flag 'two words'"
    d = config.parse(raw, base=tmp_path)
    script = jobscript.render(d, d.models[0])
    block = re.search(r"^server_argv=\(\n.*?^\)\n", script, re.MULTILINE | re.DOTALL).group(0)
    result = subprocess.run(["bash", "-c", block + 'printf "%s\\n" "${server_argv[@]}"'],
                            capture_output=True, text=True, cwd=tmp_path, check=True)
    args = result.stdout.splitlines()
    assert args[:3] == ["llama-server", "--flag", "two words"]
    assert args[args.index("--model") + 1] == str(gguf)
    assert args[-3:] == ["--system-prompt", "be nice; rm -rf / `id`", "--x=\"$HOME\""]
    assert not (tmp_path / "PWNED").exists()
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_the_key_never_appears_in_the_script(gguf, tmp_path):
    d = config.parse(minimal(gguf, tmp_path), base=tmp_path)
    script = jobscript.render(d, d.models[0])
    assert "LLAMA_API_KEY=\"$(< \"$key_file\")\"" in script and "--api-key" not in script


def test_site_template_overrides_and_undefined_values_fail(gguf, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / jobscript.TEMPLATE).write_text("#!/bin/bash\n# site {{ model.name }}\n")
    raw = minimal(gguf, tmp_path, templates_dir=str(site))
    d = config.parse(raw, base=tmp_path)
    assert jobscript.render(d, d.models[0]) == "#!/bin/bash\n# site m\n"
    (site / jobscript.TEMPLATE).write_text("#!/bin/bash\n\n{{ no_such_value }}\n")
    with pytest.raises(TemplateError, match=rf"^template {site / jobscript.TEMPLATE}:3: 'no_such_value' is undefined$"):
        jobscript.render(d, d.models[0])


@pytest.mark.parametrize("text, message", [
    ("#!/bin/bash\n{% if model.name %}\n", r":2: Unexpected end of template"),
    ("#!/bin/bash\n# {{ model.name | no_such_filter }}\n", r":2: No filter named 'no_such_filter'"),
    ("#!/bin/bash\n\n\n{{ 1 // 0 }}\n", r":4: integer division or modulo by zero"),
    ("#!/bin/bash\n{{ model.no_such_field.x }}\n", r":2: .*no_such_field"),
])
def test_a_broken_site_template_is_one_error_naming_its_file_and_line(gguf, tmp_path, text, message):
    """Syntax, unknown filters, errors while rendering: each a TemplateError (exit code 2)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / jobscript.TEMPLATE).write_text(text)
    d = config.parse(minimal(gguf, tmp_path, templates_dir=str(site)), base=tmp_path)
    with pytest.raises(TemplateError, match=f"^template {re.escape(str(site / jobscript.TEMPLATE))}{message}") as caught:
        jobscript.render(d, d.models[0])
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_a_missing_template_names_where_it_was_looked_for(tmp_path):
    with pytest.raises(TemplateError, match=r"^template nothing\.j2: not found in .*templates"):
        templates.render("nothing.j2", tmp_path)


def test_haproxy_config_is_stable_and_sorted(gguf, tmp_path):
    d = config.parse(minimal(gguf, tmp_path), base=tmp_path)
    a = [Server("m", "12", "n1", 1), Server("m", "9", "n2", 2)]
    text = haproxy_config.render(d, a)
    assert text == haproxy_config.render(d, list(reversed(a)))
    assert text.index("server job9 ") < text.index("server job12 ")
    assert "server job12 n1:1 id 12\n" in text
    assert "maxconn 4 " in text and "option http-no-delay" in text and "balance leastconn" in text


def test_server_lines_for_drain_and_reduced_maxconn(gguf, tmp_path):
    d = config.parse(minimal(gguf, tmp_path), base=tmp_path)
    text = haproxy_config.render(d, [Server("m", "1", "n", 1, draining=True), Server("m", "2", "n", 2, maxconn=3),
                                     Server("m", "4", "n", 4)])
    assert "server job1 n:1 id 1 weight 0\n" in text
    assert "server job2 n:2 id 2 maxconn 3\n" in text
    assert "server job4 n:4 id 4\n" in text


def test_a_leaving_server_has_weight_0_in_the_file_and_with_affinity_leaves_by_weight(gguf, tmp_path):
    """In the file a leaving server has weight 0 (a new worker's stick table starts empty); through
    the runtime API, with affinity, it leaves by weight and stick-table entries, not by a state
    change (core.membership.leave)."""
    d = config.parse(minimal(gguf, tmp_path, haproxy={"affinity_header": "X-Chat-Id"}), base=tmp_path)
    text = haproxy_config.render(d, [Server("m", "1", "n", 1, draining=True), Server("m", "2", "n", 2)])
    assert "server job1 n:1 id 1 weight 0\n" in text and "server job2 n:2 id 2\n" in text
    assert haproxy_config.leaving_state(d) == "weight"
    assert haproxy_config.leaving_state(config.parse(minimal(gguf, tmp_path), base=tmp_path)) == "drain"


def test_the_cli_reports_a_broken_template_in_one_line_with_exit_code_2(gguf, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / haproxy_config.TEMPLATE).write_text("global\n    maxconn {{ deployment.haproxy.no_such_field }}\n")
    path = write_deployment(tmp_path, minimal(gguf, tmp_path, templates_dir=str(site)))
    result = subprocess.run([sys.executable, "-m", "hpcserve", "-f", str(path), "render", "--what", "haproxy"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"hpcserve: error: template {site / haproxy_config.TEMPLATE}:2: 'hpcserve.config.schema.HAProxy object' has no "
        "attribute 'no_such_field'"]
