"""The Batch API without Slurm or HAProxy: its HTTP service (Starlette's test client, the caller's
key in the header HAProxy sets), its store and the lifecycle of a batch over a Slurm stand-in;
the job's runner over a stand-in pool. The real path (openai client, HAProxy, Slurm) is
tests/e2e/test_batches.py."""

from __future__ import annotations

import dataclasses
import json
import socket
import time

import pytest
from starlette.testclient import TestClient

from hpcserve import config
from hpcserve.batches import objects
from hpcserve.batches.service import KEY_HEADER, BatchAPI, app
from hpcserve.core.jobs import Job, JobState
from hpcserve.errors import HpcserveError, SlurmError
from hpcserve.slurm import Scheduler
from tests.conftest import minimal


class Slurm(Scheduler):
    """Slurm as a list of jobs: submitted ones run until the test ends them."""

    def __init__(self):
        self.listed: list[Job] = []
        self.scripts: list[str] = []
        self.cancelled: list[str] = []
        self.refuse = False

    def submit(self, script: str) -> str:
        if self.refuse:
            raise SlurmError("sbatch: error: invalid partition specified: nope")
        name = next(line.split("=", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH --job-name="))
        job_id = str(500 + len(self.listed))
        self.listed.append(Job(job_id, name, JobState.RUNNING, "gpu1", "", 3600, 3000, "None"))
        self.scripts.append(script)
        return job_id

    def end(self, job_id: str) -> None:
        self.listed = [dataclasses.replace(j, state=JobState.COMPLETED) if j.job_id == job_id else j
                       for j in self.listed]

    def test_submit(self, script: str) -> str:
        return "ok"

    def jobs(self, name_prefix: str) -> list[Job]:
        return [j for j in self.listed if j.name.startswith(name_prefix)]

    def cancel(self, job_ids: list[str]) -> None:
        self.cancelled += job_ids
        for job_id in job_ids:
            self.end(job_id)

    def node_addresses(self) -> dict[str, str]:
        return {}


@pytest.fixture
def service(tmp_path, gguf):
    raw = minimal(gguf, tmp_path, haproxy={"auth": "keys"})
    raw["batches"] = {"enabled": True, "max_file_bytes": 4096, "max_rows": 5}
    deployment = config.parse(raw, base=tmp_path)
    slurm = Slurm()
    api = BatchAPI(deployment, lambda: slurm, python="/opt/venv/bin/python")
    with TestClient(app(api)) as client:
        yield api, slurm, client


def line(custom_id: str, model: str = "m", url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}}) + "\n"


def upload(client, key: str, text: str, purpose: str = "batch"):
    return client.post("/v1/files", headers={KEY_HEADER: key}, data={"purpose": purpose},
                       files={"file": ("rows.jsonl", text.encode(), "application/jsonl")})


def test_a_file_is_checked_line_by_line_and_kept_for_its_key_only(service):
    api, _, client = service
    answer = upload(client, "alice", line("a") + line("b"))
    assert answer.status_code == 200, answer.text
    made = answer.json()
    assert made["object"] == "file" and made["purpose"] == "batch" and made["id"].startswith("file-")
    assert api.store.file_path(made["id"]).stat().st_mode & 0o077 == 0
    alice, bob = {KEY_HEADER: "alice"}, {KEY_HEADER: "bob"}
    assert client.get(f"/v1/files/{made['id']}/content", headers=alice).text == line("a") + line("b")
    for method, path in (("GET", f"/v1/files/{made['id']}"), ("GET", f"/v1/files/{made['id']}/content"),
                         ("DELETE", f"/v1/files/{made['id']}")):
        refused = client.request(method, path, headers=bob)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert client.get("/v1/files", headers=bob).json()["data"] == []
    assert [f["id"] for f in client.get("/v1/files", headers={KEY_HEADER: "owner"}).json()["data"]] == [made["id"]]
    assert client.get("/v1/files").status_code == 401            # no key name: not through HAProxy
    assert client.delete(f"/v1/files/{made['id']}", headers=alice).json()["deleted"] is True
    assert not api.store.file_path(made["id"]).exists() and client.get("/v1/files", headers=alice).json()["data"] == []


@pytest.mark.parametrize("text, message", [
    (line("a") + "{cut\n", "line 2: not a JSON object"),
    ("[1]\n", "line 1: expected a JSON object"),
    (line("a") + line("a"), "line 2: custom_id 'a' appears twice"),
    (line("a", model="gpt-4"), "line 1: body.model 'gpt-4' is not served here"),
    (line("a", url="/v1/embeddings"), "line 1: url must be one of"),
    (line("a") + line("b", url="/v1/completions"), "line 2: url /v1/completions differs"),
    (line("a").replace('"POST"', '"GET"'), 'line 1: method must be "POST"'),
    ("".join(line(str(i)) for i in range(6)), "line 6: more than 5 requests"),
    ("\n\n", "the file holds no request"),
    (line("a") + " " * 5000, "larger than this deployment accepts (4096 bytes)"),
])
def test_a_bad_file_is_refused_naming_its_first_bad_line(service, text, message):
    api, _, client = service
    refused = upload(client, "alice", text)
    assert refused.status_code in (400, 413) and message in refused.json()["error"]["message"], refused.json()
    assert client.get("/v1/files", headers={KEY_HEADER: "alice"}).json()["data"] == []
    assert [p.name for p in api.store.files_dir.iterdir()] == []        # nothing left behind
    assert upload(client, "alice", line("a"), purpose="fine-tune").status_code == 400


def test_a_batch_runs_as_a_job_and_ends_with_its_output_and_error_files(service):
    from hpcserve.access import keys
    api, slurm, client = service
    keys.KeyRegistry(api.deployment).add("alice", max_concurrent=5, account="chemistry")
    alice = {KEY_HEADER: "alice"}
    file_id = upload(client, "alice", line("a") + line("b") + line("c")).json()["id"]
    made = client.post("/v1/batches", headers=alice, json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                          "completion_window": "24h", "metadata": {"project": "x"}})
    assert made.status_code == 200, made.text
    batch = made.json()
    assert batch["status"] == "in_progress" and batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    in_use = client.delete(f"/v1/files/{file_id}", headers=alice)
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "file_in_use"
    [script] = slurm.scripts
    folder = api.store.run_dir(batch["id"])
    assert f"#SBATCH --job-name=hpcserve-batch:t:{batch['id']}" in script and "#SBATCH --requeue" in script
    assert f"exec /opt/venv/bin/python -m hpcserve.batches.runner {folder}" in script
    assert "#SBATCH --account=chemistry" in script        # the key's Slurm account, not the pool's
    token = (folder / "token").read_text().strip()
    assert token not in script and folder.joinpath("token").stat().st_mode & 0o077 == 0
    # The token is accepted as alice's, at batch priority and within her limits, while the batch runs.
    def token_keys():
        return [(k.name, k.priority_class, k.max_concurrent, k.source)
                for k in keys.accepted_keys(api.deployment) if k.sha256 == keys.digest(token)]
    assert token_keys() == [("alice", "batch", 5, "batch")]

    # The job's progress, then its end: the answered rows in the output file, the failed in the error file.
    (folder / "progress.json").write_text(json.dumps({"completed": 1, "failed": 0}))
    assert client.get(f"/v1/batches/{batch['id']}", headers=alice).json()["request_counts"]["completed"] == 1
    results = [{"id": "r", "custom_id": c, "response": {"status_code": 200, "body": {}}, "error": None} for c in "ab"]
    results.append({"id": "r", "custom_id": "c", "response": None, "error": {"code": "503", "message": "busy"}})
    (folder / "output.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    (folder / "done.json").write_text(json.dumps({"completed": 2, "failed": 1, "total": 3}))
    slurm.end(slurm.listed[0].job_id)
    done = client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
    assert done["status"] == "completed" and done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert done["metadata"] == {"project": "x"} and done["completed_at"] >= done["created_at"]
    output = client.get(f"/v1/files/{done['output_file_id']}/content", headers=alice).text
    errors = client.get(f"/v1/files/{done['error_file_id']}/content", headers=alice).text
    assert [json.loads(x)["custom_id"] for x in output.splitlines()] == ["a", "b"]
    assert [json.loads(x)["custom_id"] for x in errors.splitlines()] == ["c"]
    assert token_keys() == []                       # gone with the batch
    assert not api.store.claim_end(batch["id"])     # ended: no second finalizing (two refreshes at once)
    assert len(client.get("/v1/files", headers=alice).json()["data"]) == 3   # the input, output, errors
    assert client.get(f"/v1/batches/{batch['id']}", headers={KEY_HEADER: "bob"}).status_code == 404
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=alice).status_code == 409


def test_files_expire_as_openais_do(service):
    """A batch input file expires after batches.file_expiry (30 days, OpenAI's default) or what its
    upload asks (expires_after, 1 hour to 30 days); outputs when the batch asks
    (output_expires_after). An expired file is gone for its key at once (404, not listed) and
    deleted by the service's sweep, unless a batch that has not ended reads it."""
    api, slurm, client = service
    alice = {KEY_HEADER: "alice"}
    default = upload(client, "alice", line("a")).json()
    assert default["expires_at"] == default["created_at"] + 30 * 86400
    asked = client.post("/v1/files", headers=alice, files={"file": ("r.jsonl", line("a").encode())},
                        data={"purpose": "batch", "expires_after[anchor]": "created_at",
                              "expires_after[seconds]": "3600"}).json()
    assert asked["expires_at"] == asked["created_at"] + 3600
    for fields, message in (({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}, "anchor"),
                            ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"}, "3600 to 2592000")):
        refused = client.post("/v1/files", headers=alice, files={"file": ("r.jsonl", line("a").encode())},
                              data={"purpose": "batch", **fields})
        assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.json()
    create = {"input_file_id": asked["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    bad = client.post("/v1/batches", headers=alice, json={**create, "output_expires_after": {"anchor": "created_at"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "output_expires_after"
    batch = client.post("/v1/batches", headers=alice, json={
        **create, "output_expires_after": {"anchor": "created_at", "seconds": 7200}}).json()

    with api.store._db() as db:      # both inputs' time is up
        db.execute("UPDATE files SET expires_at = ? WHERE id IN (?, ?)", (int(time.time()) - 1, default["id"], asked["id"]))
    assert client.get(f"/v1/files/{default['id']}", headers=alice).status_code == 404
    assert client.get("/v1/files", headers=alice).json()["data"] == []
    api.store.expire_files()             # (the service's own sweep, every 15 s, may have run first)
    assert not api.store.file_path(default["id"]).exists()
    assert api.store.file_path(asked["id"]).exists()          # the running batch's input stays on disk
    folder = api.store.run_dir(batch["id"])
    (folder / "output.jsonl").write_text(json.dumps(
        {"id": "r", "custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None}) + "\n")
    (folder / "done.json").write_text("{}")
    done = client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
    output = client.get(f"/v1/files/{done['output_file_id']}", headers=alice).json()
    assert output["expires_at"] == output["created_at"] + 7200
    api.store.expire_files()
    assert not api.store.file_path(asked["id"]).exists()      # its batch has ended


def test_a_store_of_an_older_release_gets_the_new_columns(tmp_path, gguf):
    import sqlite3

    from hpcserve.batches.store import Store
    deployment = config.parse(minimal(gguf, tmp_path, batches={"enabled": True}), base=tmp_path)
    store = Store(deployment)
    store.files_dir.mkdir(parents=True)
    with sqlite3.connect(store.root / "batches.db") as db:     # the first release's table
        db.execute("CREATE TABLE files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT "
                   "NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at "
                   "INTEGER NOT NULL)")
        db.execute("INSERT INTO files (id, owner, filename, purpose, bytes, created_at) "
                   "VALUES ('file-old', 'alice', 'r.jsonl', 'batch', 1, 1)")
    assert store.file("file-old", "alice")["expires_at"] is None
    assert store.add_file("file-new", "alice", "r.jsonl", "batch", 1, 3600)["expires_at"] is not None


def test_a_large_batch_runs_on_gpus_of_its_own_as_a_job_array(tmp_path, gguf):
    """batches.own_capacity: a batch of min_rows or more is a job array (batch-gpu.sbatch.j2), each
    element a llama-server of the model on a replica's GPUs, loopback only, behind a key of the
    batch's own (0600, in no script) and no pool token; the elements' progress adds up, the batch
    completes once every element is done, its output holding every shard's lines. A smaller batch
    still goes through the pool."""
    from hpcserve.access import keys
    raw = minimal(gguf, tmp_path, haproxy={"auth": "keys"}, slurm={"partition": "gpu", "account": "physics"})
    raw["models"][0]["gpus"] = {"type": "a100", "count": 2}
    raw["models"].append({"name": "n", "gguf": str(gguf)})
    raw["batches"] = {"enabled": True, "own_capacity": {"min_rows": 3, "jobs": 2, "time_limit": "2:00:00"}}
    deployment = config.parse(raw, base=tmp_path)
    slurm = Slurm()
    api = BatchAPI(deployment, lambda: slurm, python="/opt/venv/bin/python")
    keys.KeyRegistry(deployment).add("alice", account="chemistry")
    alice = {KEY_HEADER: "alice"}
    with TestClient(app(api)) as client:
        file_id = upload(client, "alice", line("a") + line("b") + line("c")).json()["id"]
        create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch = client.post("/v1/batches", headers=alice, json=create).json()
        assert batch["status"] == "in_progress", batch
        [script] = slurm.scripts
        folder = api.store.run_dir(batch["id"])
        for directive in ("--array=0-1", "--gres=gpu:a100:2", "--partition=gpu", "--account=chemistry",
                          "--time=2:00:00", "--requeue", f"--job-name=hpcserve-batch:t:{batch['id']}"):
            assert f"#SBATCH {directive}\n" in script, directive
        assert "--host 127.0.0.1" in script and f"key_file={folder}/server-key" in script
        assert f'-m hpcserve.batches.runner {folder} --shard "$SLURM_ARRAY_TASK_ID"' in script
        server_key = (folder / "server-key").read_text().strip()
        assert server_key not in script and (folder / "server-key").stat().st_mode & 0o077 == 0
        assert not (folder / "token").exists()
        assert [k for k in keys.accepted_keys(deployment) if k.source == "batch"] == []    # no way into the pool

        # Slurm lists the array's elements; their progress adds up; done once both are.
        slurm.listed = [dataclasses.replace(slurm.listed[0], job_id=f"500_{i}") for i in range(2)]
        for index, ids in ((0, "ac"), (1, "b")):
            (folder / f"progress-{index}.json").write_text(json.dumps({"completed": len(ids), "failed": 0}))
            (folder / f"output-{index}.jsonl").write_text("".join(json.dumps(
                {"id": "r", "custom_id": c, "response": {"status_code": 200, "body": {}}, "error": None}) + "\n"
                for c in ids))
        (folder / "done-0.json").write_text("{}")
        slurm.listed[0] = dataclasses.replace(slurm.listed[0], state=JobState.COMPLETED)
        running = client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
        assert running["status"] == "in_progress" and running["request_counts"]["completed"] == 3
        (folder / "done-1.json").write_text("{}")
        done = client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
        assert done["status"] == "completed" and done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        output = client.get(f"/v1/files/{done['output_file_id']}/content", headers=alice).text
        assert sorted(json.loads(x)["custom_id"] for x in output.splitlines()) == ["a", "b", "c"]

        # Below min_rows: through the pool, with a token.
        small = upload(client, "alice", line("a") + line("b")).json()["id"]
        client.post("/v1/batches", headers=alice, json={**create, "input_file_id": small})
        assert "--array" not in slurm.scripts[1] and "-m hpcserve.batches.runner" in slurm.scripts[1]
        # Rows of two models: through the pool too, which routes each row by its model (one
        # element's llama-server would answer every row as its one model).
        mixed = upload(client, "alice", line("a") + line("b", model="n") + line("c")).json()["id"]
        assert client.post("/v1/batches", headers=alice, json={**create, "input_file_id": mixed}).status_code == 200
        assert "--array" not in slurm.scripts[2]


def test_an_array_is_there_while_any_element_is():
    from hpcserve.batches.service import _job_state
    def job(job_id, state):
        return Job(job_id, "x", state, None, "", 60, 60, "None")
    assert _job_state([job("7_[0-3]", JobState.PENDING)], "7") == (JobState.PENDING, True)
    assert _job_state([job("7_0", JobState.COMPLETED), job("7_1", JobState.RUNNING)], "7") == (JobState.RUNNING, True)
    assert _job_state([job("7_0", JobState.COMPLETED), job("71", JobState.RUNNING)], "7") == (JobState.COMPLETED, False)
    assert _job_state([], "7") == (None, False)


def test_a_cancelled_batch_keeps_what_finished_and_a_job_that_died_fails_it(service):
    api, slurm, client = service
    alice = {KEY_HEADER: "alice"}
    file_id = upload(client, "alice", line("a") + line("b")).json()["id"]
    create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    first = client.post("/v1/batches", headers=alice, json=create).json()
    (api.store.run_dir(first["id"]) / "output.jsonl").write_text(json.dumps(
        {"id": "r", "custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None}) + "\n")
    cancelled = client.post(f"/v1/batches/{first['id']}/cancel", headers=alice).json()
    assert slurm.cancelled == [slurm.listed[0].job_id]
    assert cancelled["status"] == "cancelled" and cancelled["request_counts"]["completed"] == 1
    assert cancelled["output_file_id"] and cancelled["error_file_id"] is None

    second = client.post("/v1/batches", headers=alice, json=create).json()
    slurm.end(slurm.listed[1].job_id)          # killed, not requeued: no done.json
    # An ended state may be a requeue passing: the batch fails once the job has stayed ended a minute.
    assert client.get(f"/v1/batches/{second['id']}", headers=alice).json()["status"] == "in_progress"
    marker = api.store.run_dir(second["id"]) / "job-ended-since"
    marker.write_text(str(int(marker.read_text()) - 61))
    failed = client.get(f"/v1/batches/{second['id']}", headers=alice).json()
    assert failed["status"] == "failed" and failed["errors"]["data"][0]["code"] == "job_ended"

    third = client.post("/v1/batches", headers=alice, json=create).json()
    api.store.update_batch(third["id"], status="in_progress")
    with api.store._db() as db:                 # its 24 hours are up
        db.execute("UPDATE batches SET expires_at = ? WHERE id = ?", (int(time.time()) - 1, third["id"]))
    expired = client.get(f"/v1/batches/{third['id']}", headers=alice).json()
    assert expired["status"] == "expired" and slurm.cancelled[-1] == slurm.listed[2].job_id

    slurm.refuse = True                          # sbatch refuses: the batch fails, saying why
    refused = client.post("/v1/batches", headers=alice, json=create).json()
    assert refused["status"] == "failed" and "invalid partition" in refused["errors"]["data"][0]["message"]
    listed = client.get("/v1/batches?limit=2", headers=alice).json()
    assert [b["id"] for b in listed["data"]] == [refused["id"], third["id"]] and listed["has_more"]
    after = client.get(f"/v1/batches?limit=2&after={third['id']}", headers=alice).json()
    assert [b["id"] for b in after["data"]] == [second["id"], first["id"]] and not after["has_more"]


def test_a_batch_left_finalizing_by_a_service_that_died_is_finished_by_the_next(service):
    """A service killed while it finalized a batch leaves it "finalizing": another refresh leaves
    it to that finalizer for 2 minutes, then finishes it as it would have ended (completed with its
    output; a cancelled one cancelled, not failed)."""
    api, slurm, client = service
    alice = {KEY_HEADER: "alice"}
    file_id = upload(client, "alice", line("a")).json()["id"]
    create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    done, cancelled = (client.post("/v1/batches", headers=alice, json=create).json() for _ in range(2))
    (api.store.run_dir(done["id"]) / "output.jsonl").write_text(json.dumps(
        {"id": "r", "custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None}) + "\n")
    (api.store.run_dir(done["id"]) / "done.json").write_text("{}")
    api.store.update_batch(cancelled["id"], cancelling_at=int(time.time()))
    slurm.end(slurm.listed[1].job_id)
    for batch in (done, cancelled):
        assert api.store.claim_end(batch["id"])           # the finalizer that then died
    assert {client.get(f"/v1/batches/{b['id']}", headers=alice).json()["status"] for b in (done, cancelled)} \
        == {"finalizing"}                                 # another's claim is fresh: left to it
    with api.store._db() as db:
        db.execute("UPDATE batches SET finalizing_at = finalizing_at - 121")
    finished = client.get(f"/v1/batches/{done['id']}", headers=alice).json()
    assert finished["status"] == "completed" and finished["output_file_id"]
    assert client.get(f"/v1/batches/{cancelled['id']}", headers=alice).json()["status"] == "cancelled"


@pytest.mark.parametrize("body, param", [
    ({"endpoint": "/v1/chat/completions", "completion_window": "24h"}, None),
    ({"input_file_id": "F", "endpoint": "/v1/embeddings", "completion_window": "24h"}, "endpoint"),
    ({"input_file_id": "F", "endpoint": "/v1/chat/completions", "completion_window": "1h"}, "completion_window"),
    ({"input_file_id": "F", "endpoint": "/v1/completions", "completion_window": "24h"}, "endpoint"),
    ({"input_file_id": "F", "endpoint": "/v1/chat/completions", "completion_window": "24h",
      "metadata": {"k": "v" * 600}}, "metadata"),
])
def test_a_bad_batch_request_is_refused_naming_the_field(service, body, param):
    _, slurm, client = service
    file_id = upload(client, "alice", line("a")).json()["id"]
    body = {k: (file_id if v == "F" else v) for k, v in body.items()}
    refused = client.post("/v1/batches", headers={KEY_HEADER: "alice"}, json=body)
    assert refused.status_code == (404 if param is None else 400), refused.text
    assert refused.json()["error"]["param"] == param and slurm.scripts == []


@pytest.fixture
def stand_in_server():
    """A stand-in pool or llama-server: (port, the (Authorization, X-Priority-Class, message) of
    each chat completion it answered). /health answers 503 twice (loading), then 200."""
    import http.server
    import threading

    seen: list[tuple] = []
    health = iter([503, 503])

    class Server(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.headers["Authorization"], self.headers["X-Priority-Class"], body["messages"][0]["content"]))
            self.reply(200, json.dumps({"choices": [], "model": body["model"]}).encode())

        def do_GET(self):
            self.reply(next(health, 200) if self.path == "/health" else 404, b"{}")

        def reply(self, status: int, data: bytes):
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port, seen
    server.shutdown()


def test_the_runner_sends_each_row_once_and_resumes(tmp_path, stand_in_server):
    """runner.run over a stand-in pool: every row gets a line; a second run (a requeued job)
    sends nothing again and writes done.json."""
    from hpcserve.batches import runner
    port, seen = stand_in_server
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(line(f"r{i}").replace('"hi"', f'"row {i}"') for i in range(7)))
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    (folder / "run.json").write_text(json.dumps({"input": str(rows), "url": f"http://127.0.0.1:{port}/v1",
                                                  "model": "m", "concurrency": 3}))
    (folder / "token").write_text("tok\n")
    (folder / "token").chmod(0o600)
    (folder / "output.jsonl").write_text(json.dumps({"id": "x", "custom_id": "r0", "response": None,
                                                      "error": None}) + "\n{\"cut")   # a job killed mid-line
    assert runner.run(folder) == 0
    assert sorted(text for _, _, text in seen) == [f"row {i}" for i in range(1, 7)]
    assert {(auth, cls) for auth, cls, _ in seen} == {("Bearer tok", "batch")}
    out = [json.loads(x)["custom_id"] for x in (folder / "output.jsonl").read_text().splitlines()]
    assert sorted(out) == [f"r{i}" for i in range(7)]
    assert json.loads((folder / "done.json").read_text()) == {"completed": 7, "failed": 0, "total": 7}
    assert runner.run(folder) == 0 and len(seen) == 6      # requeued after the end: nothing sent again

    # A pool on loopback, the job on another node: its 127.0.0.1 may be another user's server.
    (folder / "run.json").write_text(json.dumps({"input": str(rows), "url": f"http://127.0.0.1:{port}/v1",
                                                  "model": "m", "concurrency": 3, "login_host": "login1"}))
    (folder / "done.json").unlink()
    (folder / "output.jsonl").write_text("")
    assert runner.run(folder) == 1 and len(seen) == 6      # nothing sent: the token stays home
    assert runner.reaches_the_pool("http://login1.cluster:8000/v1", "login1")
    assert not runner.reaches_the_pool("http://localhost:8000/v1", "login1")
    assert runner.reaches_the_pool("http://[::1]:8000/v1", socket.gethostname())


def test_each_element_of_an_own_capacity_batch_sends_its_shard_to_its_own_server(tmp_path, stand_in_server):
    """runner.main with --shard and --url (an element of batch-gpu.sbatch.j2's job array): it waits
    for the server's /health, sends only its shard's rows with the server's key and no priority
    class; the shards together answer every row once; a requeued element resends nothing."""
    from hpcserve.batches import runner
    port, seen = stand_in_server
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(line(f"r{i}").replace('"hi"', f'"row {i}"') for i in range(7)))
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    (folder / "run.json").write_text(json.dumps({"input": str(rows), "model": "m", "concurrency": 2, "shards": 3}))
    (folder / "server-key").write_text("own\n")
    (folder / "server-key").chmod(0o600)
    url = f"http://127.0.0.1:{port}"
    assert runner.main([str(folder), "--shard", "1", "--url", url]) == 0
    assert sorted(text for _, _, text in seen) == ["row 1", "row 4"] and {a for a, _, _ in seen} == {"Bearer own"}
    assert {cls for _, cls, _ in seen} == {None}            # its own server: no pool queue to order
    for index in (0, 2, 1):
        assert runner.main([str(folder), "--shard", str(index), "--url", url]) == 0
    assert sorted(text for _, _, text in seen) == sorted(f"row {i}" for i in range(7))   # each row once
    assert [json.loads(s.done.read_text())["total"] for s in runner.shards(folder)] == [3, 2, 2]
    with pytest.raises(SystemExit):
        runner.main([str(folder), "--shard", "1"])            # --shard without --url
    assert runner.main([str(folder), "--shard", "3", "--url", url]) == 1   # no such shard: said, not a traceback
    import socket
    with socket.socket() as closed:      # a port nothing listens on: the element's server has ended
        closed.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(HpcserveError, match="refuses connections: it has ended"):
        runner.wait_ready(gone, timeout=60)


def test_check_input_counts_rows_and_names_the_endpoint():
    summary = objects.check_input([line("a").encode(), b"\n", line("b", model="n").encode()], ["m", "n"], 10)
    assert summary == objects.InputSummary(2, "/v1/chat/completions", frozenset({"m", "n"}))


def test_a_full_state_directory_is_an_openai_error_and_records_nothing(service, monkeypatch):
    api, _, client = service
    real_replace = __import__("os").replace

    def full(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("hpcserve.batches.service.os.replace", full)
    refused = upload(client, "alice", line("a"))
    assert refused.status_code == 507 and "No space left on device" in refused.json()["error"]["message"]
    monkeypatch.setattr("hpcserve.batches.service.os.replace", real_replace)
    assert client.get("/v1/files", headers={KEY_HEADER: "alice"}).json()["data"] == []
    assert [p.name for p in api.store.files_dir.iterdir()] == []
