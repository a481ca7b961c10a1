"""`hpcserve init` and `hpcserve check` on real Slurm clusters: the local one (scripts/local-slurm.sh)
and three other layouts started by these tests (tests/slurm_layouts.py): several GPU partitions
with a CPU default, untyped gres with a 30-minute MaxTime, no GPUs at all. On each, init writes a
file that `check --job` passes; then every check is made to fail once, for real."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcserve.site import check as check_mod
from hpcserve.slurm import layout as layout_mod
from tests.conftest import LLAMA_SERVER, free_port_pair, llama_server_build, missing
from tests.slurm_layouts import Cluster, NodeSpec, PartitionSpec, available

pytestmark = [pytest.mark.slurm, pytest.mark.haproxy]


def hpcserve(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcserve", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def init(env: dict[str, str], folder: Path, *args: str) -> dict:
    """Run init non-interactively into folder/hpcserve.yaml; return the written file's values."""
    folder.mkdir(parents=True, exist_ok=True)
    result = hpcserve("init", "--non-interactive", "--llama-server", str(LLAMA_SERVER), "--state-dir",
                      str(folder / "state"), "--port", str(free_port_pair()), *args, env=env, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return yaml.safe_load((folder / "hpcserve.yaml").read_text())


def check(env: dict[str, str], folder: Path, *args: str, file: str = "hpcserve.yaml") -> tuple[int, dict[str, dict]]:
    """(exit code, {check name: check}) of `check --json` in folder."""
    result = hpcserve("-f", file, "--json", "check", *args, env=env, cwd=folder, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert report["failures"] == result.returncode
    return result.returncode, {c["name"]: c for c in report["checks"]}


def failed(checks: dict[str, dict]) -> set[str]:
    return {name for name, c in checks.items() if c["status"] == "fail"}


def edit(folder: Path, change, file: str = "hpcserve.yaml") -> str:
    """Write a copy of folder/hpcserve.yaml changed by `change(dict)`; return its name."""
    raw = yaml.safe_load((folder / "hpcserve.yaml").read_text())
    change(raw)
    (folder / file).write_text(yaml.safe_dump(raw))
    return file


@pytest.fixture(scope="module")
def model(real_model) -> str:
    return str(real_model)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Three clusters of other layouts, started for this module."""
    if not available():
        missing("root, slurmctld, slurmd and unshare (scripts/local-slurm.sh install)")
    root = tmp_path_factory.mktemp("sites")
    clusters = {
        # A CPU default partition and two GPU partitions of different types and limits.
        "a": Cluster(root / "a", "site-a",
                     [NodeSpec("c1", 32, 128000), NodeSpec("v1", 40, 192000, 4, "v100"),
                      NodeSpec("h1", 64, 512000, 8, "h100")],
                     [PartitionSpec("compute", ("c1",), default=True, max_time="3-00:00:00"),
                      PartitionSpec("gpu-v100", ("v1",), max_time="12:00:00"),
                      PartitionSpec("gpu-h100", ("h1",), max_time="2-00:00:00")]),
        # Untyped gres, a 30-minute MaxTime, and nodes that do not see the folder "hidden".
        "b": Cluster(root / "b", "site-b", [NodeSpec("g1", 16, 96000, 2), NodeSpec("g2", 16, 96000, 2)],
                     [PartitionSpec("gpgpu", ("g1", "g2"), default=True, max_time="30")],
                     hidden=root / "hidden"),
        # No GPU anywhere.
        "c": Cluster(root / "c", "site-c", [NodeSpec("n1", 8, 16000)],
                     [PartitionSpec("batch", ("n1",), default=True, max_time="04:00:00")]),
    }
    started = []
    try:
        for cluster in clusters.values():
            started.append(cluster.start())
        yield clusters
    finally:
        for cluster in started:
            cluster.stop()


def test_init_on_the_local_cluster_writes_a_file_that_check_job_passes(slurm_env, model, tmp_path):
    raw = init(slurm_env, tmp_path, "--gguf", model, "--context-size", "2048", "--parallel", "2")
    m = raw["models"][0]
    assert (m["name"], m["gguf"], m["replicas"]) == ("gemma3-270m", model, 1)
    # gpu (the default, 8 a100 per node of 16 CPUs and 64000 MB): one GPU's share of a node.
    assert raw["slurm"] == {"partition": "gpu", "time_limit": "1-00:00:00"}
    assert (m["gpus"], m["cpus"], m["memory"]) == ({"type": "a100", "count": 1}, 2, "8000M")
    text = (tmp_path / "hpcserve.yaml").read_text()
    assert "# 4 node(s), 32 GPUs; other GPU partitions: cpu" in text and "check --job" in text
    code, checks = check(slurm_env, tmp_path, "--job")
    assert code == 0, checks
    assert {"sbatch:gemma3-270m", "haproxy", "haproxy.cfg", "ports", "gguf:gemma3-270m", "state_dir", "job",
            "node:setup", "node:gguf:gemma3-270m", "node:llama-server:gemma3-270m", "node:state_dir",
            "node:reachable"} <= set(checks)
    # The build the node's llama-server names, as hpcserve reads it (the one setup installed here).
    assert checks["node:llama-server:gemma3-270m"]["status"] == "pass"
    assert f"(llama.cpp {llama_server_build().name}" in checks["node:llama-server:gemma3-270m"]["detail"]
    # No check job is left behind, and init does not overwrite a file.
    jobs = subprocess.run(["squeue", "--me", "-h", "-o", "%j"], env=slurm_env, capture_output=True, text=True).stdout
    assert "hpcserve-check" not in jobs
    again = hpcserve("init", "--non-interactive", "--gguf", model, env=slurm_env, cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr


def test_init_picks_the_largest_gpu_partition_of_a_site_whose_default_has_none(sites, model, tmp_path):
    env = sites["a"].env
    raw = init(env, tmp_path / "auto", "--gguf", model, "--model-name", "gemma")
    m = raw["models"][0]
    assert raw["slurm"] == {"partition": "gpu-h100", "time_limit": "1-00:00:00"}
    # h1: 64 CPUs and 512000 MB for 8 h100.
    assert (m["gpus"], m["cpus"], m["memory"]) == ({"type": "h100", "count": 1}, 8, "64000M")
    code, checks = check(env, tmp_path / "auto", "--job")
    assert code == 0, checks

    raw = init(env, tmp_path / "v100", "--gguf", model, "--partition", "gpu-v100", "--gpus", "2")
    m = raw["models"][0]
    # MaxTime 12 h is shorter than a day; v1: 40 CPUs and 192000 MB for 4 v100, two of them.
    assert raw["slurm"] == {"partition": "gpu-v100", "time_limit": "0-12:00:00"}
    assert (m["gpus"], m["cpus"], m["memory"]) == ({"type": "v100", "count": 2}, 20, "96000M")
    code, checks = check(env, tmp_path / "v100", "--job")
    assert code == 0, checks

    # What does not fit is refused by name, and no file is written.
    for args, words in [(("--partition", "gpu-v100", "--time-limit", "1-00:00:00"), ("--time-limit", "0-12:00:00")),
                        (("--partition", "gpu-h100", "--gpus", "9"), ("--gpus", "at most 8")),
                        (("--partition", "nope"), ("--partition", "compute, gpu-h100, gpu-v100")),
                        (("--partition", "gpu-h100", "--gpu-type", "v100"), ("--gpu-type", "h100"))]:
        folder = tmp_path / "refused"
        folder.mkdir(exist_ok=True)
        result = hpcserve("init", "--non-interactive", "--gguf", model, *args, env=env, cwd=folder)
        assert result.returncode == 2, result.stderr
        assert all(w in result.stderr for w in words), result.stderr
        assert "Traceback" not in result.stderr and not (folder / "hpcserve.yaml").exists()


def test_init_on_untyped_gres_with_a_short_time_limit(sites, model, tmp_path):
    env = sites["b"].env
    raw = init(env, tmp_path, "--gguf", model)
    m = raw["models"][0]
    # 30 minutes of MaxTime: the successor of a replica is submitted a quarter before its end.
    assert raw["slurm"] == {"partition": "gpgpu", "time_limit": "0-00:30:00", "renew_before": 450}
    assert (m["gpus"], m["cpus"], m["memory"]) == ({"count": 1}, 8, "48000M")
    code, checks = check(env, tmp_path, "--job")
    assert code == 0, checks
    rendered = hpcserve("render", "--what", "sbatch", env=env, cwd=tmp_path).stdout
    assert "#SBATCH --gres=gpu:1\n" in rendered and "#SBATCH --time=0-00:30:00\n" in rendered


def test_init_on_a_cluster_without_gpus_serves_from_cpus(sites, model, tmp_path):
    env = sites["c"].env
    raw = init(env, tmp_path, "--gguf", model)
    m = raw["models"][0]
    assert raw["slurm"] == {"partition": "batch", "time_limit": "0-04:00:00"}
    assert (m["gpus"], m["gpu_layers"], m["cpus"], m["memory"]) == ({"count": 0}, 0, 2, "4000M")
    assert "no gres gpu in partition batch" in (tmp_path / "hpcserve.yaml").read_text()
    code, checks = check(env, tmp_path, "--job")
    assert code == 0, checks


def test_each_check_before_a_job_fails_on_what_it_checks(slurm_env, model, tmp_path):
    init(slurm_env, tmp_path, "--gguf", model)

    def broken(name: str, change) -> dict[str, dict]:
        code, checks = check(slurm_env, tmp_path, file=edit(tmp_path, change, f"{name}.yaml"))
        assert code == len(failed(checks)) >= 1
        return checks

    checks = broken("partition", lambda raw: raw["slurm"].update(partition="nope"))
    assert failed(checks) == {"sbatch:gemma3-270m"}
    assert "Invalid partition name" in checks["sbatch:gemma3-270m"]["detail"]
    assert checks["sbatch:gemma3-270m"]["fix"] == "slurm.partition: one of cpu, gpu"

    checks = broken("gres", lambda raw: raw["models"][0]["gpus"].update(count=9))
    assert failed(checks) == {"sbatch:gemma3-270m"}
    assert "gpus asks for 9 a100 GPU(s) per node (GPUs there: 32 a100)" in checks["sbatch:gemma3-270m"]["fix"]

    checks = broken("memory", lambda raw: raw["models"][0].update(memory="100G"))
    assert "memory 100G is more than a node has" in checks["sbatch:gemma3-270m"]["fix"]

    checks = broken("no-haproxy", lambda raw: raw["haproxy"].update(command="/nonexistent/haproxy"))
    assert failed(checks) == {"haproxy"} and "apt install haproxy" in checks["haproxy"]["fix"]

    old = tmp_path / "haproxy-2.4"
    old.write_text("#!/bin/sh\necho 'HAProxy version 2.4.22-f8e3218 2023/02/14 - https://haproxy.org/'\n")
    old.chmod(0o755)
    checks = broken("old-haproxy", lambda raw: raw["haproxy"].update(command=str(old)))
    assert failed(checks) == {"haproxy"}
    assert checks["haproxy"]["detail"].endswith(
        "HAProxy 2.4.22: hpcserve needs 2.6 or newer (its haproxy.cfg uses option idle-close-on-response "
        "(HAProxy 2.6) and it adds servers with health checks at runtime (2.5); RHEL 9's 2.4 has neither)")

    site = tmp_path / "site"
    site.mkdir()
    from hpcserve import templates
    (site / "haproxy.cfg.j2").write_text((templates.packaged_dir() / "haproxy.cfg.j2").read_text()
                                         + "\nbackend broken\n    balance no-such-algorithm\n")
    checks = broken("bad-cfg", lambda raw: raw.update(templates_dir=str(site)))
    assert failed(checks) == {"haproxy.cfg"} and "balance only supports" in checks["haproxy.cfg"]["detail"]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        checks = broken("port", lambda raw: raw["haproxy"].update(port=port))
        assert failed(checks) == {"ports"} and f"127.0.0.1:{port} is not available" in checks["ports"]["detail"]

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    checks = broken("not-gguf", lambda raw: raw["models"][0].update(gguf=str(not_gguf)))
    assert failed(checks) == {"gguf:gemma3-270m"} and "not a GGUF file" in checks["gguf:gemma3-270m"]["detail"]

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    checks = broken("state", lambda raw: raw.update(state_dir=str(blocker / "state")))
    assert "state_dir" in failed(checks) and "cannot create" in checks["state_dir"]["detail"]


def test_up_runs_the_checks_first_and_changes_nothing_when_one_fails(slurm_env, model, tmp_path):
    init(slurm_env, tmp_path, "--gguf", model)
    file = edit(tmp_path, lambda raw: raw["slurm"].update(partition="nope"), "bad.yaml")
    result = hpcserve("-f", file, "up", "--timeout", "30", env=slurm_env, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hpcserve: error: sbatch:gemma3-270m: sbatch --test-only refused it")
    assert "(fix: slurm.partition: one of cpu, gpu)" in last
    state = tmp_path / "state"
    assert not (state / "desired.json").exists() and not (state / "haproxy.pid").exists()


def test_each_check_on_the_compute_node_fails_on_what_it_checks(sites, slurm_env, model, tmp_path):
    # Nodes of site b do not see the folder "hidden": a state directory there is not shared.
    hidden = sites["b"].hidden
    raw = init(sites["b"].env, hidden / "pool", "--gguf", model)
    assert raw["state_dir"].startswith(str(hidden))
    code, checks = check(sites["b"].env, hidden / "pool", "--job")
    # From the login node it looks shared (the nodes are this host); only the job can tell.
    assert checks["state_dir"]["status"] == "pass"
    assert code == 1 and failed(checks) == {"node:state_dir"}, checks
    assert "is not the login node's" in checks["node:state_dir"]["detail"]

    init(slurm_env, tmp_path, "--gguf", model)

    def broken(name: str, change, *args: str) -> dict[str, dict]:
        code, checks = check(slurm_env, tmp_path, "--job", *args, file=edit(tmp_path, change, f"{name}.yaml"))
        assert code == len(failed(checks)) >= 1
        return checks

    checks = broken("setup", lambda raw: raw["slurm"].update(setup=["true", "module load cuda/12.4 # token=s3cret"]))
    # Named by its index: the comment that carries the report is visible to every user.
    assert failed(checks) == {"node:setup"} and checks["node:setup"]["detail"] == "slurm.setup[1] exited 127"

    checks = broken("command", lambda raw: raw["models"][0].update(command="llama-server-of-another-site"))
    assert failed(checks) == {"node:llama-server:gemma3-270m"}
    assert "exited 127" in checks["node:llama-server:gemma3-270m"]["detail"]

    # python3 that does not start: no listener, so reachability cannot be shown.
    checks = broken("python", lambda raw: raw["slurm"].update(setup=["hash -p /bin/false python3"]))
    assert failed(checks) == {"node:reachable"} and "python3" in checks["node:reachable"]["fix"]

    checks = broken("exits", lambda raw: raw["slurm"].update(setup=["exit 3"]))
    assert failed(checks) == {"job"} and "ended without a report" in checks["job"]["detail"]


def test_a_check_job_that_cannot_start_is_reported_and_cancelled(sites, model, tmp_path):
    env = sites["c"].env
    init(env, tmp_path, "--gguf", model)
    # Another job holds the only node's CPUs and memory: the check job waits behind it.
    blocker = subprocess.run(["sbatch", "--parsable", "-c", "8", "--mem=16000", "--output=/dev/null", "--wrap", "sleep 300"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    try:
        code, checks = check(env, tmp_path, "--job", "--timeout", "10")
    finally:
        subprocess.run(["scancel", blocker], env=env, check=True)
    assert code == 1 and failed(checks) == {"job"}
    assert "did not report within 10 s: PENDING" in checks["job"]["detail"]
    jobs = subprocess.run(["squeue", "-h", "-t", "pending,running", "-o", "%j"], env=env, capture_output=True,
                          text=True).stdout
    assert "hpcserve-check" not in jobs


def test_a_node_that_refuses_the_connection_fails_reachability(slurm_env):
    """The login node's side of the reachability check against a real closed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # bound, never listening: connections are refused
        job = type("J", (), {"node": "gpu1"})()
        result = check_mod._reach(f"hpcserve-check listen=localhost:{port} results=", job,
                                  _NoAddresses(), "nonce")
    assert result.status == "fail" and "cannot connect to localhost" in result.detail and "firewall" in result.fix


class _NoAddresses:
    def node_addresses(self) -> dict[str, str]:
        return {}


def test_the_layout_reader_sees_what_slurm_conf_says(sites):
    layout = layout_mod.read(sites["a"].env)
    assert [(p.name, p.default, p.max_time_s, p.gpu_types()) for p in layout.partitions] == [
        ("compute", True, 3 * 86400, {}), ("gpu-h100", False, 2 * 86400, {"h100": 8}),
        ("gpu-v100", False, 12 * 3600, {"v100": 4})]
    assert layout.associations is None    # no slurmdbd: sacctmgr does not answer
    node = layout.partition("gpu-h100").nodes[0]
    assert (node.name, node.cpus, node.memory_mb) == ("h1", 64, 512000)


def test_init_asks_what_slurm_cannot_tell_on_a_terminal(slurm_env, model, tmp_path):
    """On a terminal, init asks for the partition (two have GPUs here), the model file, its name and
    the replicas; Enter takes the default shown."""
    import os
    import pty
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "hpcserve", "init", "--state-dir", str(tmp_path / "state")],
                               stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=slurm_env,
                               cwd=tmp_path, text=True)
    os.close(follower)
    os.write(leader, f"cpu\n{model}\n\n3\n".encode())
    out, err = process.communicate(timeout=120)
    os.close(leader)
    assert process.returncode == 0, err
    assert "partition for the replicas (cpu, gpu) [gpu]" in err and "model name [gemma3-270m]" in err
    raw = yaml.safe_load((tmp_path / "hpcserve.yaml").read_text())
    assert raw["slurm"]["partition"] == "cpu"
    assert (raw["models"][0]["gguf"], raw["models"][0]["name"], raw["models"][0]["replicas"]) == (model, "gemma3-270m", 3)


def test_init_refuses_flags_that_would_reach_a_job_script_or_the_file(slurm_env, model, tmp_path):
    """init's answers go through the deployment file's validation before a file exists: a value
    that could end an #SBATCH line, a YAML scalar or a shell line is refused, naming the field."""
    for args, field in [(("--account", "phys;touch /tmp/x"), "slurm.account"),
                        (("--qos", "normal --wrap=id"), "slurm.qos"),
                        (("--setup", "module load cuda\nid"), "slurm.setup"),
                        (("--model-name", 'm"\nname: evil'), "models[0].name"),
                        (("--name", "a b"), "name"),
                        (("--bind", "127.0.0.1:9000\n  bind *"), "haproxy.bind")]:
        result = hpcserve("init", "--non-interactive", "--gguf", model, *args, env=slurm_env, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert f"hpcserve.yaml: {field}: " in result.stderr and "expected" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "hpcserve.yaml").exists()
