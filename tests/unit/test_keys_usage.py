"""Keys (registry, HAProxy map, runtime diff) and usage accounting, without HAProxy."""

from __future__ import annotations

import dataclasses
import os
import time
import json

import pytest

from hpcserve import config
from hpcserve.access import keys, usage
from hpcserve.errors import ConfigError, HpcserveError
from hpcserve.core.membership import map_commands, map_text
from hpcserve.state import StateDir
from tests.conftest import minimal


def deployment(tmp_path, gguf, **haproxy):
    raw = minimal(gguf, tmp_path, haproxy={"auth": "keys", **haproxy})
    raw["models"][0].update(parallel=4, gpus={"count": 2})
    raw["models"].append({"name": "cpu", "gguf": str(gguf), "parallel": 2, "gpus": {"count": 0}})
    return config.parse(raw, base=tmp_path)


def test_registry_keeps_digests_and_refuses_bad_names(tmp_path, gguf):
    d = deployment(tmp_path, gguf)
    registry = keys.KeyRegistry(d)
    entry, secret = registry.add("alice", "batch", 8, 600)
    assert entry.sha256 == keys.digest(secret) and secret not in registry.file.read_text()
    assert registry.file.stat().st_mode & 0o077 == 0
    assert entry.map_value(d) == "alice|batch|8|600|0|1|-"
    for name in ("owner", "openwebui", "file-1234", "a b", "a|b", "a;b", "", "-x", "x" * 64, "al\nice"):
        with pytest.raises(ConfigError, match="NAME"):
            registry.add(name)
    with pytest.raises(ConfigError, match="exists"):
        registry.add("alice")
    with pytest.raises(ConfigError, match="--class"):
        registry.add("bob", "urgent")
    assert registry.change("alice", rate_per_minute=0).map_value(d) == "alice|batch|8|0|0|1|-"
    assert registry.change("alice", priority_class="interactive").max_concurrent == 8
    with pytest.raises(ConfigError, match="no named key 'owner'.*own keys"):
        registry.revoke("owner")
    registry.revoke("alice")
    assert registry.named() == []
    registry.file.write_text("{not json")
    with pytest.raises(HpcserveError, match="unreadable key registry"):
        registry.named()


def test_rates_and_retry_after():
    assert [keys.parse_rate(t) for t in ("600", "600/min", "10/s", " 5 / minute ", "0")] == [600, 600, 600, 5, 0]
    for bad in ("5/h", "-1", "1.5", "ten", "2000000"):
        with pytest.raises(ValueError):
            keys.parse_rate(bad)
    key = keys.Key("k", "0" * 64, rate_per_minute=7)
    assert key.map_value(deployment_stub()).endswith("|7|0|9|-")   # ceil(60 / 7)


def deployment_stub():
    class HAProxy:
        max_requests_per_client = 256

    class Stub:
        haproxy = HAProxy()
    return Stub()


def test_key_map_holds_every_accepted_key_once(tmp_path, gguf):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# old style\nfile-key-0123456789abcdefghijklmn\nfile-key-0123456789abcdefghijklmn\n")
    d = deployment(tmp_path, gguf, api_keys_file=str(keys_file))
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "api.key").write_text("o" * 43 + "\n")
    (tmp_path / "state" / "api.key").chmod(0o600)
    keys.KeyRegistry(d).add("alice")
    entries = keys.key_map(d)
    names = sorted(v.split("|")[0] for v in entries.values())
    assert names == ["alice", "file-" + keys.digest("file-key-0123456789abcdefghijklmn")[:8], "owner"]
    assert map_text(entries).count("\n") == 3 and "o" * 43 not in map_text(entries)
    open_pool = deployment(tmp_path, gguf, auth="open")
    assert keys.key_map(open_pool) is None and keys.accepted_keys(open_pool) == []


def test_a_short_legacy_key_is_refused(tmp_path, gguf):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("a-guessable-key\n" + "x" * 40 + "\n")
    d = deployment(tmp_path, gguf, api_keys_file=str(keys_file))
    with pytest.raises(ConfigError, match=r"api_keys_file: 1 key\(s\) shorter than 32 characters \(the shortest has 15\)"):
        keys.key_map(d)


@pytest.mark.parametrize("bad", ["symlink", "mode", "directory"])
def test_a_secret_file_others_could_read_or_choose_is_refused(tmp_path, bad):
    """backend.key / api.key / OpenWebUI's secrets: a regular file of this user, mode 0600, or
    nothing is read (another user's symlink or file would hand them the key, or choose it)."""
    root = tmp_path / "state"
    root.mkdir(mode=0o700)
    path = StateDir(root).key_file
    if bad == "symlink":
        (tmp_path / "chosen").write_text("c" * 43 + "\n")
        (tmp_path / "chosen").chmod(0o600)
        path.symlink_to(tmp_path / "chosen")
    elif bad == "mode":
        path.write_text("k" * 43 + "\n")
        path.chmod(0o644)
    else:
        path.mkdir()
    with pytest.raises(ConfigError, match=str(path)):
        StateDir(root).backend_key()
    if bad == "mode":
        path.chmod(0o600)
        assert StateDir(root).backend_key() == "k" * 43


def test_a_state_dir_others_could_replace_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)                                   # world-writable, not sticky
    with pytest.raises(ConfigError, match=f"state_dir: {shared} is writable by every user and not sticky"):
        StateDir(shared / "state").ensure()
    shared.chmod(0o1777)                                  # sticky, as /tmp: only the owner renames
    StateDir(shared / "state").ensure()
    assert (shared / "state").stat().st_mode & 0o777 == 0o700


def test_runtime_commands_turn_the_live_map_into_the_wanted_one():
    live = {"a" * 64: "alice|interactive|256|0|0|1", "b" * 64: "bob|batch|4|0|0|1"}
    wanted = {"a" * 64: "alice|interactive|256|60|0|1", "c" * 64: "carol|batch|256|0|0|1"}
    assert map_commands("/s/keys.map", live, wanted) == [
        f"del map /s/keys.map {'b' * 64}",
        f"set map /s/keys.map {'a' * 64} alice|interactive|256|60|0|1",
        f"add map /s/keys.map {'c' * 64} carol|batch|256|0|0|1"]
    assert map_commands("/s/keys.map", wanted, wanted) == []


def record(**fields):
    base = {"time": 1000.0, "key": "alice", "user": "-", "class": "interactive", "model": "m", "backend": "model_m",
            "server": "job7", "status": 200, "TR": 0, "Tw": 0, "Tc": 0, "Tr": 10, "Ta": 1000, "bytes_out": 100,
            "ts": "--"}
    return {**base, **fields}


def test_gpu_hours_by_hand(tmp_path, gguf):
    """m: 2 GPUs, 4 slots; cpu: no GPU. Slot time = Ta - TR - Tw - Tc."""
    d = deployment(tmp_path, gguf)
    records = [
        record(Ta=3_600_000 + 500, TR=300, Tw=150, Tc=50),          # 3600 s on a slot of m
        record(Ta=1_800_000, key="bob"),                             # 1800 s
        record(Ta=7_200_000, backend="model_cpu", key="bob"),        # 7200 s on cpu: 0 GPU-hours
        record(status=429, server="<NOSRV>", Tw=-1, Tc=-1, Tr=-1, Ta=0, backend="openai", model="-"),
        record(status=200, ts="CD", Ta=360_000),                     # cut by its client after 360 s
        record(time=5000.0, Ta=3_600_000),                           # outside [0, 2000)
    ]
    rows = {r.name: r for r in usage.summarize(records, d, by="key", since=0, until=2000)}
    # alice: (3600 + 360) s x 2 GPUs / 4 slots = 1980 GPU-s = 0.55 GPU-h; bob: 1800 x 2 / 4 = 0.25 GPU-h
    assert rows["alice"].gpu_hours == pytest.approx(0.55) and rows["alice"].slot_seconds == pytest.approx(3960)
    assert rows["bob"].gpu_hours == pytest.approx(0.25) and rows["bob"].slot_seconds == pytest.approx(9000)
    assert (rows["alice"].requests, rows["alice"].ok, rows["alice"].errors) == (3, 1, {"rate_limited": 1, "client_aborted": 1})
    assert rows["alice"].queue_p50_ms == 150 / 2 and rows["alice"].queue_p99_ms == pytest.approx(148.5)
    by_model = {r.name: r for r in usage.summarize(records, d, by="model")}
    assert set(by_model) == {"m", "cpu", "-"} and by_model["cpu"].gpu_hours == 0
    # By Slurm account: a line without one (from before accounts) counts as "-".
    records[1]["account"] = "physics"
    by_account = {r.name: r for r in usage.summarize(records, d, by="account", since=0, until=2000)}
    assert by_account["physics"].gpu_hours == pytest.approx(0.25) and set(by_account) == {"physics", "-"}
    with pytest.raises(ValueError):
        usage.summarize(records, d, by="project")


def test_records_read_rotated_files_oldest_first_and_skip_broken_lines(tmp_path, gguf):
    from hpcserve.haproxy import accesslog
    d = deployment(tmp_path, gguf)
    logs = tmp_path / "state" / "logs"
    logs.mkdir(parents=True)
    for suffix, t in ((".2", 1), (".1", 2), ("", 3), (".10", 0)):
        (logs / f"access.log{suffix}").write_text(json.dumps(record(time=t)) + "\n{cut\n[1]\n")
    assert [r["time"] for r in accesslog.records(d)] == [0, 1, 2, 3]


def test_records_read_expired_then_billed_then_refused_files(tmp_path, gguf):
    from hpcserve.haproxy import accesslog
    d = deployment(tmp_path, gguf)
    logs = tmp_path / "state" / "logs"
    (logs / "expired").mkdir(parents=True)
    for name, t in (("expired/access-900.log", 1), ("expired/access-1000.log", 2), ("access.log.1", 3),
                    ("access.log", 4), ("expired/unbilled-7.log", 5), ("unbilled.log.1", 6), ("unbilled.log", 7),
                    ("expired/other.log", 99)):
        (logs / name).write_text(json.dumps(record(time=t)) + "\n")
    assert [r["time"] for r in accesslog.records(d)] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("prefix", ["access", "unbilled"])
def test_the_oldest_log_expires_instead_of_being_deleted(tmp_path, prefix):
    """Billed lines and HAProxy's own answers (refusals) alike: a rotation never deletes a line."""
    import logging
    from hpcserve.haproxy.accesslog import KeepingHandler
    handler = KeepingHandler(tmp_path / f"{prefix}.log", 100, 1, tmp_path / "expired", prefix=prefix)
    for i in range(12):   # 60-byte lines, 100 bytes a file: a rollover every line or two
        handler.emit(logging.makeLogRecord({"msg": f"{i:02d}" + "x" * 57, "args": None}))
    handler.close()
    kept = sorted(tmp_path.glob(f"{prefix}.log*")) + sorted((tmp_path / "expired").iterdir())
    lines = sorted(line for path in kept for line in path.read_text().splitlines())
    assert [line[:2] for line in lines] == [f"{i:02d}" for i in range(12)]   # not one line deleted
    assert len(list((tmp_path / "expired").glob(f"{prefix}-*.log"))) >= 5


def test_only_requests_that_reached_a_replica_are_billed_lines():
    from hpcserve.haproxy.accesslog import reached_replica
    assert reached_replica(record(server="job12"))
    assert not any(reached_replica(record(server=s)) for s in ("<NOSRV>", "", "-", "openwebui_users"))


def _expire(d, name: str, records: list[dict]) -> None:
    folder = d.state_dir / "logs" / "expired"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_ledger_counts_expired_logs_as_the_lines_did_exactly_once(tmp_path, gguf):
    from hpcserve.access import ledger
    d = deployment(tmp_path, gguf)
    old = [record(time=3600 * 5 + i, key=k, Ta=1000 + i, bytes_out=10 * i, status=s, server=srv)
           for i, (k, s, srv) in enumerate([("alice", 200, "job7"), ("bob", 200, "job8"), ("alice", 429, "<NOSRV>"),
                                            ("alice", 200, "job7")])]
    old.append(record(time=3600 * 7, key="bob", model="cpu", backend="model_cpu"))
    _expire(d, "access-1.log", old)
    refusals = [record(time=3600 * 5 + 9, key="bob", status=429, server="<NOSRV>", Ta=1)]   # rotated unbilled.log
    _expire(d, "unbilled-1.log", refusals)
    old += refusals
    live = [record(time=3600 * 8, key="alice")]
    (d.state_dir / "logs" / "access.log").write_text(json.dumps(live[0]) + "\n")
    by_lines = usage.summarize(old + live, d)

    assert ledger.fold(d) == 2 and not list((d.state_dir / "logs" / "expired").iterdir())
    assert d.state_dir.joinpath("logs", "usage-ledger.jsonl").stat().st_mode & 0o077 == 0
    with ledger.reading(d) as (archived, records):
        by_ledger = usage.summarize(records, d, archived=archived)
    drop = ("queue_p50_ms", "queue_p99_ms")
    assert [{k: v for k, v in dataclasses.asdict(r).items() if k not in drop} for r in by_ledger] == \
        [{k: v for k, v in dataclasses.asdict(r).items() if k not in drop} for r in by_lines]
    # A fold cut after its append, before the delete: the file comes back, it is not counted twice.
    _expire(d, "access-1.log", old)
    _expire(d, "unbilled-1.log", refusals)
    assert ledger.fold(d) == 0 and not list((d.state_dir / "logs" / "expired").iterdir())
    with ledger.reading(d) as (archived, records):
        assert usage.summarize(records, d, archived=archived) == by_ledger
        # by the hour the requests started: [5h, 6h) holds the first four, not the 7h one
        window = {r.name: r.requests for r in usage.summarize(records, d, since=3600 * 5, until=3600 * 6,
                                                              archived=archived)}
    assert window == {"alice": 3, "bob": 2}      # bob's 429 too, from the expired unbilled.log


def test_a_ledger_line_cut_by_a_crash_is_skipped_and_its_file_folded_again(tmp_path, gguf):
    from hpcserve.access import ledger
    d = deployment(tmp_path, gguf)
    _expire(d, "access-2.log", [record()])
    (d.state_dir / "logs" / "usage-ledger.jsonl").write_text('{"file":"access-2.log","buck')
    assert ledger.fold(d) == 1
    with ledger.reading(d) as (archived, records):
        assert [r.requests for r in usage.summarize(records, d, archived=archived)] == [1]


def test_batch_delay_must_be_shorter_than_the_queue_timeout(tmp_path, gguf):
    assert deployment(tmp_path, gguf).haproxy.batch_delay_or_default == 30
    with pytest.raises(ConfigError, match="batch_delay"):
        deployment(tmp_path, gguf, batch_delay=60)
    assert deployment(tmp_path, gguf, batch_delay=5, timeout_queue=10).haproxy.batch_delay_or_default == 5


def test_a_writer_of_an_older_generation_is_replaced_and_no_line_lost(tmp_path, gguf):
    """A writer started by an older hpcserve (its pid file without a generation) does not count the
    quotas: the next step's ensure_writer stops it and starts this one; lines written meanwhile
    wait in the pipe and reach the log."""
    import psutil

    from hpcserve.haproxy import accesslog
    from hpcserve.state import StateDir
    d = deployment(tmp_path, gguf)
    StateDir(d.state_dir).ensure()
    assert accesslog.ensure_writer(d)
    old = accesslog.writer_pid(d)
    pid_file = StateDir(d.state_dir).access_writer_files[0]
    pid_file.write_text(f"{old}\n")                      # as an older hpcserve wrote it
    assert accesslog.writer_generation(d) == 1
    fifo = accesslog.open_pipe(accesslog.paths(d).access_log_fifo)   # held open as HAProxy holds it
    try:
        assert accesslog.ensure_writer(d)                # replaced
        new = accesslog.writer_pid(d)
        assert new != old and (not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE)
        assert accesslog.writer_generation(d) == accesslog.WRITER_GENERATION
        assert not accesslog.ensure_writer(d)            # this generation: kept
        os.write(fifo, (json.dumps(record(key="after")) + "\n").encode())
        deadline = time.monotonic() + 10
        while not any(r.get("key") == "after" for r in accesslog.records(d)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        accesslog.stop_writer(d)
        os.close(fifo)


def test_a_reload_carries_each_names_count_as_one_word_commands():
    from hpcserve.haproxy.process import rate_carry_commands
    got = rate_carry_commands("openai", {"rated": 7, "idle": 0, "ann@example.org": 2, "two words": 3,
                                         "semi;colon": 1, "x" * 257: 1})
    # Nothing a client named can add a command: names that are not one plain word start over.
    assert got == ["set table openai key ann@example.org data.gpc1_rate 2",
                   "set table openai key rated data.gpc1_rate 7"]
