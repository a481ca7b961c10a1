"""The backend job script itself, run by bash with the workstation launcher's scontrol (no Slurm
needed) and a fake llama-server that is slow to start and to log its port."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from hpcserve import config
from hpcserve.slurm import jobscript
from hpcserve.slurm.local import SCONTROL_SHIM
from tests.conftest import minimal

FAKE_SERVER = """#!/bin/bash
trap 'echo stopping; exit 0' TERM
sleep 0.7
echo "main: server is listening on http://0.0.0.0:43210 - starting the main loop"
while true; do sleep 0.1; done
"""  # the handler comes first, as in llama-server: a SIGTERM right after the log line finds it


def shim_env(tmp_path, comment, **extra) -> dict:
    """The environment of a job of the workstation launcher: its scontrol first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(SCONTROL_SHIM)
    (bin_dir / "scontrol").chmod(0o700)
    return {**os.environ, **extra, "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HPCSERVE_COMMENT_FILE": str(comment)}


def test_the_launchers_scontrol_refuses_what_it_cannot_do(tmp_path):
    comment = tmp_path / "comment"
    refused = subprocess.run(["scontrol", "show", "job", "1"], env=shim_env(tmp_path, comment),
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "only 'update JobId=ID Comment=TEXT'" in refused.stderr
    assert not comment.exists()
    subprocess.run(["scontrol", "update", "JobId=3", "Comment=endpoint=h:1 leaving"],
                   env=shim_env(tmp_path, comment), check=True)
    assert comment.read_text() == "endpoint=h:1 leaving\n"


def test_the_job_waits_for_the_port_announces_it_and_stops_the_server(gguf, tmp_path):
    server = tmp_path / "fake-llama-server"
    server.write_text(FAKE_SERVER)
    server.chmod(0o755)
    raw = minimal(gguf, tmp_path, scheduler="local")
    raw["models"][0]["command"] = str(server)
    d = config.parse(raw, base=tmp_path)
    (d.state_dir / "logs").mkdir(parents=True)
    jobscript.key_file(d).write_text("k\n")
    comment = tmp_path / "comment"
    job = subprocess.Popen(["bash", "-c", jobscript.render(d, d.models[0])], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env=shim_env(tmp_path, comment, SLURM_JOB_ID="77"))
    deadline = time.monotonic() + 20
    while not comment.exists() or not comment.read_text().strip():
        assert time.monotonic() < deadline and job.poll() is None, job.stdout.read() if job.poll() is not None else ""
        time.sleep(0.1)
    assert comment.read_text().strip().endswith(":43210")
    os.killpg(job.pid, signal.SIGTERM)
    output, _ = job.communicate(timeout=20)
    assert "listening on" in output, output
    assert ("llama-server ended with status 0" in output
            or "llama-server ended after the signal (bash lost its exit status)" in output), output
    assert job.returncode == 0
