"""Slurm accounts in the pool, on the local cluster's real slurmdbd (MariaDB) and real HAProxy over
simulated backends: keys belong to accounts slurmdbd knows, HAProxy's queue serves accounts in
the order of Slurm's fair share, and a stopped slurmdbd stops nothing but what needs it.

The local cluster (scripts/local-slurm.sh) has the accounts physics and chemistry; physics is the
default account of the user that runs the tests, so every replica job of the suite charges it,
while chemistry gets only the Batch API test's short CPU job: physics's fair-share factor is the
lower one (physics_has_used_more waits for it where a fresh cluster has not charged physics yet).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from hpcserve.access import accounts
from hpcserve.core.billing import slot_seconds
from hpcserve.core.pool import Server
from hpcserve.haproxy import runtime
from hpcserve.slurm.accounting import Accounting, AccountingUnavailable
from tests.conftest import ROOT, free_port, haproxy_for, minimal, missing, write_deployment
from tests.integration.test_institute import _with_webui_key, pool

pytestmark = [pytest.mark.haproxy, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurmdbd(slurm_env) -> Accounting:
    """The local cluster's accounting, answering (its accounts as local-slurm.sh makes them)."""
    accounting = Accounting(env=slurm_env)
    try:
        known = accounting.accounts()
    except AccountingUnavailable as exc:
        missing(f"slurmdbd of the local cluster (scripts/local-slurm.sh start): {exc}")
    if not {"physics", "chemistry"} <= set(known):
        missing(f"the accounts physics and chemistry in slurmdbd (scripts/local-slurm.sh start), found {known}")
    return accounting


def _level_fs(accounting: Accounting) -> dict[str, float]:
    """Each account's Level Fairshare (its shares over its usage among its siblings; inf: unused)."""
    return {share.account: share.level_fs for share in accounting.shares() if share.level_fs is not None}


def physics_has_used_more(accounting: Accounting, slurm_env: dict[str, str], timeout: float = 150) -> None:
    """Wait until sshare shows physics's Level Fairshare below chemistry's (equal shares: physics
    used more). Slurm adds a running job's usage at each PriorityCalcPeriod (1 minute on the local
    cluster), so when the suite's jobs have not charged physics yet, a job of physics runs across
    one such tick."""
    level_fs = _level_fs(accounting)
    if level_fs["physics"] < level_fs["chemistry"]:
        return
    job = subprocess.run(["sbatch", "--parsable", "--account=physics", "--partition=cpu", "-c", "1", "--mem=100",
                          "-J", "hpcserve-test-usage", "--time=5", "--output=/dev/null", "--wrap", "sleep 200"],
                         env=slurm_env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + timeout
        while level_fs["physics"] >= level_fs["chemistry"]:
            assert time.monotonic() < deadline, f"sshare showed no usage of physics's job {job}: {level_fs}"
            time.sleep(2)
            level_fs = _level_fs(accounting)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, check=False)


def test_keys_belong_to_accounts_that_slurmdbd_knows(tmp_path, gguf, slurmdbd):
    with pool(tmp_path, gguf) as p:
        phys = p.add_key("phys", "--account", "physics")
        p.add_key("plain")          # no --account: the owner's default account in slurmdbd
        listed = {k["name"]: k for k in json.loads(p.hpcserve("keys", "list", "--json").stdout)}
        assert listed["phys"]["account"] == "physics" and listed["plain"]["account"] == "physics"
        # An account slurmdbd does not have: refused, naming the option and the accounts there are.
        refused = p.hpcserve("keys", "add", "typo", "--account", "physiks")
        assert refused.returncode == 2 and "--account" in refused.stderr and "chemistry" in refused.stderr
        assert "Traceback" not in refused.stderr and "typo" not in p.hpcserve("keys", "list").stdout
        assert p.hpcserve("keys", "add", "bad", "--account", "a|b").returncode == 2   # never into the map
        # Changed at runtime, like the class and limits: the next request counts for chemistry.
        changed = p.hpcserve("keys", "set", "phys", "--account", "chemistry", "--json")
        assert changed.returncode == 0 and json.loads(changed.stdout)["account"] == "chemistry"
        reply = httpx.post(f"{p.url}/v1/chat/completions", headers={"Authorization": f"Bearer {phys}"},
                           json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200
        (line,) = p.records(1)
        assert (line["key"], line["account"]) == ("phys", "chemistry")
        rows = json.loads(p.hpcserve("usage", "--by", "account", "--json").stdout)["rows"]
        assert [(r["name"], r["requests"]) for r in rows] == [("chemistry", 1)]


def test_an_openwebui_user_counts_for_the_account_the_admin_gave(tmp_path, gguf, slurmdbd):
    """accounting.webui_accounts: Ann's chats (OpenWebUI's key naming her) count for chemistry, Bob's
    for OpenWebUI's key's account; a user named by another key is not believed."""
    with pool(tmp_path, gguf, accounting={"webui_accounts": {"Ann@Example.org": "chemistry"}}) as p:
        webui_key = _with_webui_key(p)
        other = p.add_key("mallory", "--account", "physics")

        def ask(key: str, user: str) -> int:
            return httpx.post(f"{p.url}/v1/chat/completions", timeout=30,
                              headers={"Authorization": f"Bearer {key}", "X-OpenWebUI-User-Email": user},
                              json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
                              ).status_code
        assert [ask(webui_key, "ann@example.org"), ask(webui_key, "bob@example.org"),
                ask(other, "ann@example.org")] == [200] * 3
        lines = p.records(3)
        assert [(r["user"], r["account"]) for r in lines] == [("ann@example.org", "chemistry"),
                                                              ("bob@example.org", "-"), ("-", "physics")]


def test_with_slurmdbd_stopped_the_pool_serves_and_says_accounting_is_unavailable(tmp_path, gguf, slurmdbd,
                                                                                     slurm_env):
    with pool(tmp_path, gguf) as p:
        phys = p.add_key("phys", "--account", "physics")
        script = ROOT / "scripts" / "local-slurm.sh"
        subprocess.run([str(script), "stop-dbd"], check=True, capture_output=True)
        try:
            reply = httpx.post(f"{p.url}/v1/chat/completions", headers={"Authorization": f"Bearer {phys}"},
                               json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200
            # Fair share goes on from slurmctld's copy; slurmdbd's absence is recorded and shown.
            state = accounts.refresh(p.proxy.deployment, p.proxy, slurmdbd, force=True)
            assert state.error is None and state.slurmdbd_error and "slurmdbd" in state.slurmdbd_error
            status = json.loads(p.hpcserve("status", "--json").stdout)
            assert status["fair_share"]["slurmdbd_error"] == state.slurmdbd_error
            assert "accounting unavailable" in p.hpcserve("status").stderr
            check = p.hpcserve("check", "--json")
            (line,) = [c for c in json.loads(check.stdout)["checks"] if c["name"] == "accounting"]
            assert line["status"] == "warn" and "slurmdbd" in line["detail"]
            # What needs slurmdbd says so, changes nothing, and exits 3 (Slurm).
            refused = p.hpcserve("keys", "add", "later", "--account", "chemistry")
            assert refused.returncode == 3 and "cannot check account" in refused.stderr
            assert "Traceback" not in refused.stderr and "later" not in p.hpcserve("keys", "list").stdout
        finally:
            subprocess.run([str(script), "start"], check=True, capture_output=True)
        assert accounts.refresh(p.proxy.deployment, p.proxy, slurmdbd, force=True).slurmdbd_error is None


def test_a_quota_that_runs_out_refuses_the_accounts_next_requests_until_raised(tmp_path, gguf, slurmdbd):
    """A quota of 2 GPU-seconds a day for physics; each request holds a slot of a 1-GPU, 2-slot
    server about 0.5 s (0.25 GPU-s). Requests one after the other: the header counts down, the
    quota runs out, physics gets 429 insufficient_quota with the renewal time while chemistry is
    served; raised, physics is served from the next request, without a reload."""
    with pool(tmp_path, gguf, servers=1, slots=2, token_rate=20) as p:
        phys = p.add_key("phys", "--account", "physics")
        chem = p.add_key("chem", "--account", "chemistry")
        result = p.hpcserve("quota", "set", "physics", "2s", "--per", "day", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"account": "physics", "gpu_seconds": 2.0, "period": "day"}
        assert p.hpcserve("quota", "set", "physics", "2 parsecs").returncode == 2
        assert p.hpcserve("quota", "set", "nosuch", "2h").returncode == 2
        reloads = p.reloads()

        def ask(key: str) -> httpx.Response:
            return httpx.post(f"{p.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                              json={"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]})

        served, remaining = 0, []
        for _ in range(40):
            reply = ask(phys)
            if reply.status_code != 200:
                break
            served += 1
            remaining.append(float(reply.headers["X-Quota-Remaining-GPU-Hours"]))
        assert reply.status_code == 429, reply.text
        error = reply.json()["error"]
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
        renews = datetime.datetime.now(datetime.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) \
            + datetime.timedelta(days=1)
        assert renews.strftime("%Y-%m-%dT%H:%M:%SZ") in error["message"] == error["message"]
        assert reply.headers["X-Quota-Reset"] == renews.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert abs(int(reply.headers["Retry-After"]) - (renews.timestamp() - time.time())) < 5
        assert remaining[0] > remaining[-1] and remaining == sorted(remaining, reverse=True)
        # The overshoot: requests are admitted until the line that used the quota up arrives; one
        # after the other, at most the one sent as that line was counted.
        lines = p.records(served + 1)                 # the 200s and the 429
        used = sum(slot_seconds(r) for r in lines if r["key"] == "phys") / 2   # 1 GPU, 2 slots
        per_request = used / served
        assert 2.0 <= used <= 2.0 + per_request + 0.05, (used, per_request, served)
        assert ask(chem).status_code == 200        # another account is served
        report = {r["account"]: r for r in json.loads(p.hpcserve("quota", "--json").stdout)}
        assert report["physics"]["over"] and report["physics"]["used_gpu_hours"] == pytest.approx(used / 3600, abs=1e-6)
        # The writer's own count (what HAProxy's map follows) is `usage`'s, line for line (its file
        # is saved at most every second while lines arrive, and when they pause).
        def counted() -> float:
            counts = json.loads((p.proxy.paths.root / "logs" / "quota-counts.json").read_text())
            return sum(counts["used"]["day"]["physics"].values()) / 2
        deadline = time.monotonic() + 10
        while counted() != pytest.approx(used, abs=1e-6):
            assert time.monotonic() < deadline, (counted(), used)
            time.sleep(0.1)
        raised = p.hpcserve("quota", "set", "physics", "1h", "--per", "day")
        assert raised.returncode == 0, raised.stderr
        again = ask(phys)
        assert again.status_code == 200 and 0.99 < float(again.headers["X-Quota-Remaining-GPU-Hours"]) < 1
        assert p.hpcserve("quota", "unset", "physics").returncode == 0
        assert "X-Quota-Remaining-GPU-Hours" not in ask(phys).headers
        assert p.reloads() == reloads


def test_the_chargeback_adds_up_to_what_sacct_charged(tmp_path, gguf, slurmdbd, slurm_env):
    """A replica job of the pool (a real Slurm job holding 1 GPU, running the simulator) serves
    keys of physics and chemistry; after it ends, `usage --chargeback` splits the GPU-seconds sacct
    charged for it: the accounts' lines are their requests' slot time, idle the rest, and the lines
    add up to sacct's Elapsed x GPUs."""
    raw = minimal(gguf, tmp_path, haproxy={"port": free_port(), "stats_port": free_port(), "auth": "keys"})
    raw["models"][0].update(parallel=2, gpus={"count": 1})
    file = write_deployment(tmp_path, raw)
    proxy = haproxy_for(raw, tmp_path, key="backend-key")
    deployment = proxy.deployment
    port = free_port()
    since = time.time() - 1
    job = subprocess.run(
        ["sbatch", "--parsable", f"--job-name=hpcserve:{deployment.name}:m", "--gres=gpu:a100:1", "-c", "1",
         "--mem=500", "--time=10", f"--output={tmp_path}/job.out",
         "--wrap", f"exec {sys.executable} -m hpcserve.llama.simulator --port {port} --parallel 2 "
                   "--sim-load-time 0 --sim-token-rate 20 --sim-prefill-rate 1000000 --alias m"],
        env={**slurm_env, "LLAMA_API_KEY": "backend-key"}, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else job
            time.sleep(0.2)
        assert proxy.update([Server("m", job, "127.0.0.1", port)]) == "started"

        def hpcserve(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "hpcserve", "-f", str(file), *args], capture_output=True,
                                  text=True, env=slurm_env)

        keys = {}
        for name, account in (("phys", "physics"), ("chem", "chemistry")):
            added = hpcserve("keys", "add", name, "--account", account, "--json")
            assert added.returncode == 0, added.stderr
            keys[account] = json.loads(added.stdout)["key"]

        def ask(key: str, tokens: int) -> int:
            return httpx.post(f"http://127.0.0.1:{deployment.haproxy.port}/v1/chat/completions", timeout=30,
                              headers={"Authorization": f"Bearer {key}"},
                              json={"model": "m", "max_tokens": tokens, "messages": [{"role": "user", "content": "x"}]}
                              ).status_code

        with ThreadPoolExecutor(4) as pool_:
            codes = list(pool_.map(lambda args: ask(*args), [(keys["physics"], 20)] * 6 + [(keys["chemistry"], 10)] * 4))
        assert codes == [200] * 10
    finally:
        subprocess.run(["scancel", job], env=slurm_env, check=False)
        proxy.stop(timeout=5)
    deadline = time.monotonic() + 60
    while True:   # the job's end reaches slurmdbd a moment after it ended
        sacct = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "ElapsedRaw,AllocTRES,Start,End,Account"],
                               env=slurm_env, capture_output=True, text=True).stdout.strip()
        if sacct and sacct.split("|")[3] not in ("Unknown", ""):
            break
        assert time.monotonic() < deadline, sacct
        time.sleep(0.5)
    elapsed, tres, started, ended, pool_account = sacct.split("|")
    # sacct's times are whole seconds: slot time past its End (the last requests' final
    # milliseconds, the job cancelled right after) is not in what Slurm charged.
    run = [datetime.datetime.fromisoformat(t).timestamp() for t in (started, ended)]
    assert "gres/gpu=1" in tres
    until = time.time() + 1
    window = [datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds") for t in (since, until)]
    result = subprocess.run([sys.executable, "-m", "hpcserve", "-f", str(file), "usage", "--chargeback",
                             "--since", window[0], "--until", window[1], "--json"],
                            capture_output=True, text=True, env=slurm_env)
    assert result.returncode == 0, result.stderr
    split = json.loads(result.stdout)
    assert list(split["jobs"]) == [job] and split["pool_account"] == pool_account
    assert split["charged_gpu_seconds"] == pytest.approx(int(elapsed) * 1, abs=1e-6)    # sacct's, to the second
    assert sum(split["accounts"].values()) == pytest.approx(int(elapsed), abs=1e-6)
    lines = [json.loads(line) for line in (deployment.state_dir / "logs" / "access.log").read_text().splitlines()]
    for account in ("physics", "chemistry"):
        held = sum(max(0.0, min(r["time"] + r["Ta"] / 1000, run[1])
                       - max(r["time"] + (r["TR"] + r["Tw"] + r["Tc"]) / 1000, run[0]))
                   for r in lines if r["account"] == account and slot_seconds(r))
        assert split["accounts"][account] == pytest.approx(held / 2, abs=0.002)     # 1 GPU over 2 slots
    assert split["accounts"]["physics"] > split["accounts"]["chemistry"] > 0 and split["accounts"]["(idle)"] > 0
    csv_out = subprocess.run([sys.executable, "-m", "hpcserve", "-f", str(file), "usage", "--chargeback",
                              "--since", window[0], "--until", window[1], "--csv"],
                             capture_output=True, text=True, env=slurm_env).stdout.splitlines()
    assert csv_out[0] == "Cluster,Account,TRES Name,Used,Used (hours)"
    assert [row.split(",")[1] for row in csv_out[1:]] == ["physics", "chemistry", "(idle)"]


# Last in the file: on a fresh cluster (a release root) physics's first usage reaches sshare at the
# first fair-share tick after the cluster started (scripts/local-slurm.sh), while the tests above run.
def test_the_account_that_used_less_is_served_first(tmp_path, gguf, slurmdbd, slurm_env, capsys):
    """Two accounts' keys saturate one server of 2 slots together; chemistry, which has used
    nothing, waits less in HAProxy's queue than physics, and no physics request waits beyond
    the bound (its delay over chemistry's, plus the backlog one slot turnover drains)."""
    physics_has_used_more(slurmdbd, slurm_env)
    with pool(tmp_path, gguf, servers=1, slots=2, token_rate=20, batch_delay=8, timeout_queue=60) as p:
        keys = {"physics": p.add_key("phys", "--account", "physics"),
                "chemistry": p.add_key("chem", "--account", "chemistry")}
        deployment = p.proxy.deployment
        state = accounts.refresh(deployment, p.proxy, slurmdbd, force=True)
        assert state.error is None and state.delays["physics"] > state.delays["chemistry"], state
        live = runtime.show_map(p.proxy.paths.admin_socket, p.proxy.paths.fair_share_map_file)
        assert {account: int(ms) for account, ms in live.items()} == state.delays
        assert p.proxy.paths.fair_share_map_file.read_text().split() == [
            word for account, ms in sorted(state.delays.items()) for word in (account, str(ms))]

        async def load() -> list[int]:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
                stop = time.monotonic() + 8

                async def client_of(key: str) -> list[int]:
                    codes = []
                    while time.monotonic() < stop:
                        r = await client.post(f"{p.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                              json={"model": "m", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "x"}]})
                        codes.append(r.status_code)
                    return codes

                runs = await asyncio.gather(*(client_of(keys[a]) for a in ("physics", "chemistry") for _ in range(8)))
                return [c for codes in runs for c in codes]

        codes = asyncio.run(load())
        assert set(codes) == {200}
        records = p.records(len(codes))
        waits = {a: [r["Tw"] / 1000 for r in records if r["account"] == a] for a in ("physics", "chemistry")}
        turnover = max(r["Ta"] - r["TR"] - r["Tw"] - r["Tc"] for r in records) / 1000
        extra = (state.delays["physics"] - state.delays["chemistry"]) / 1000
        with capsys.disabled():
            print(f"\n  fair share: delay physics {state.delays['physics']} ms, chemistry {state.delays['chemistry']} ms; "
                  + "; ".join(f"{a} {len(w)} requests, queue wait p50 {statistics.median(w):.2f} s, max {max(w):.2f} s"
                              for a, w in waits.items()) + f" (slot turnover {turnover:.2f} s)")
        assert statistics.median(waits["chemistry"]) < statistics.median(waits["physics"])
        # The bound: a physics request is overtaken only by chemistry requests that arrived less
        # than `extra` after it; 16 clients on 2 slots keep at most 16 requests ahead of it.
        assert max(waits["physics"]) <= extra + 8 * turnover + 1, (max(waits["physics"]), extra, turnover)
