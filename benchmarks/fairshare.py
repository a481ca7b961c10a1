"""Fair share in HAProxy's queue: two Slurm accounts saturating the pool together, waits per account.

The accounts' places come from the running cluster's `sshare` (hpcserve.slurm.accounting, turned
into queue delays by hpcserve.core.fairshare.delays, the code a reconcile step runs): on the local
cluster (scripts/local-slurm.sh) physics has used the cluster and chemistry has not, so under Fair
Tree chemistry's factor is 1 and physics's 1/2, and physics's requests queue as if they had arrived
(1 - 1/2) x `accounting.fair_share_delay` later. The benchmark names the accounts' factors it read.

Two simulated llama-servers of 4 slots (8 in all; 10 tokens at 20 tokens/s: a request holds a
slot 0.5 s) behind hpcserve's HAProxy with API keys, one key per account. Each account runs
--clients closed-loop clients (streamed chats, one in flight each; 32 clients on 8 slots keep a
FIFO queue of about 24, a wait of about 1.5 s). Cases: `fair_share_delay` 0 (fair share off:
FIFO), 4 and 16 s, changed through the runtime map between cases (no reload, as a reconcile step
does). Each case runs --window seconds, --repeats times, interleaved; the first 3 s of each run are
left out. Printed per case and account: requests served, TTFT p50, p99 and max (median over
repeats with [min-max]); written to OUT/fairshare.json with the versions and the machine.

What to read: chemistry's TTFT falls and physics's grows with the delay; physics is never starved:
its max TTFT stays within its extra delay plus the FIFO wait (docs/accounts.md, "The bound").

    python -m benchmarks.fairshare [--window 20] [--repeats 3] [--out DIR]   # about 4 minutes here
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

from benchmarks.common import dated, percentile, provenance, start_haproxy
from benchmarks.systems import port_of, start_simulators
from benchmarks.workload import Backend
from hpcserve.access.keys import KeyRegistry
from hpcserve.core import fairshare
from hpcserve.slurm.accounting import Accounting, AccountingUnavailable

BODY = {"model": "m", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x"}]}
DELAYS_S = (0.0, 4.0, 16.0)   # accounting.fair_share_delay of each case
WARMUP_S = 3.0


async def run_case(url: str, keys: dict[str, str], clients: int, window: float) -> dict[str, list[float]]:
    """Each account's TTFTs (s) of the chats sent after the warm-up, `clients` closed-loop
    clients per account for `window` seconds."""
    ttfts: dict[str, list[float]] = {account: [] for account in keys}
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=2 * clients * len(keys))) as client:
        async def chats(account: str) -> None:
            while time.monotonic() - started < window:
                sent = time.monotonic()
                async with client.stream("POST", url, json=BODY,
                                         headers={"Authorization": f"Bearer {keys[account]}"}) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"{account}: HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                    first = None
                    async for line in response.aiter_lines():
                        if first is None and line.startswith("data: ") and '"content"' in line:
                            first = time.monotonic() - sent
                if first is None:
                    raise RuntimeError(f"{account}: an answer without a token")
                if sent - started >= WARMUP_S:
                    ttfts[account].append(first)

        await asyncio.gather(*(chats(account) for account in keys for _ in range(clients)))
    return ttfts


def _figures(ttfts: list[float]) -> dict:
    """served, TTFT p50, p99 and max (s) of one account's run; None for none served after the
    warm-up (a window shorter than the account's extra delay)."""
    if not ttfts:
        return {"served": 0, "ttft_p50": None, "ttft_p99": None, "ttft_max": None}
    return {"served": len(ttfts), "ttft_p50": round(percentile(ttfts, 50), 3),
            "ttft_p99": round(percentile(ttfts, 99), 3), "ttft_max": round(max(ttfts), 3)}


def _cell(values: list[float | None], digits: int = 2) -> str:
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return "-"
    return f"{statistics.median(known):.{digits}f} [{min(known):.{digits}f}-{max(known):.{digits}f}]"


@click.command()
@click.option("--accounts", default="physics,chemistry", show_default=True,
              help="Two Slurm accounts of the cluster's sshare, comma-separated.")
@click.option("--clients", type=click.IntRange(min=1), default=16, show_default=True, help="Clients per account.")
@click.option("--window", type=click.FloatRange(min=WARMUP_S + 2), default=20.0, show_default=True,
              help="Seconds per case and repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=dated("fairshare"), show_default=True)
def main(accounts: str, clients: int, window: float, repeats: int, out: Path) -> None:
    """Queue waits of two accounts by fair-share delay (see the module docstring)."""
    names = [a.strip() for a in accounts.split(",") if a.strip()]
    if len(names) != 2:
        raise click.BadParameter(f"two accounts, comma-separated; got {accounts!r}", param_hint="--accounts")
    try:
        shares = Accounting().shares()
    except AccountingUnavailable as exc:
        raise click.ClickException(f"{exc} (on this host: scripts/local-slurm.sh start)") from None
    factors = fairshare.factors(shares)
    unknown = [a for a in names if a not in factors]
    if unknown:
        raise click.BadParameter(f"not in sshare's tree: {', '.join(unknown)} (sshare has {', '.join(sorted(factors))})",
                                 param_hint="--accounts")
    click.echo("sshare: " + ", ".join(f"{a} factor {factors[a]:.2f} (LevelFS {s.level_fs})"
                                      for s in shares for a in names if s.account == a), err=True)
    if factors[names[0]] == factors[names[1]]:
        click.echo("warning: both accounts have the same factor: every case is FIFO "
                   "(run a job under one of them across a PriorityCalcPeriod first)", err=True)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hpcserve-fairshare-"))   # HAProxy's sockets need a short path
    click.echo(f"HAProxy and simulator files: {work}", err=True)
    sims = start_simulators([Backend(4, 20.0, prefill_rate=1e6)] * 2, work / "sims")
    results: dict[str, list[dict]] = {f"{d:g}": [] for d in DELAYS_S}
    proxy = None
    try:
        proxy, port = start_haproxy(work / "haproxy", [port_of(s.urls[0]) for s in sims], parallel=4, auth="keys",
                                    batch_delay=30, timeout_queue=120, max_requests_per_client=1000,
                                    accounting={"fair_share_delay": max(DELAYS_S)})
        registry = KeyRegistry(proxy.deployment)
        keys = {a: registry.add(f"bench-{a}", max_concurrent=1000, account=a)[1] for a in names}
        proxy.sync_keys()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for r in range(repeats):
            for delay in DELAYS_S[r % len(DELAYS_S):] + DELAYS_S[:r % len(DELAYS_S)]:   # rotated per repeat
                wanted = fairshare.delays(shares, round(delay * 1000))
                case_delays = {a: wanted[a] for a in names}
                proxy.sync_fair_share(case_delays)
                figures = {a: _figures(t) for a, t in asyncio.run(run_case(url, keys, clients, window)).items()}
                results[f"{delay:g}"].append({"delays_ms": case_delays, **figures})
                click.echo(f"repeat {r + 1}, fair_share_delay {delay:g} s: " + "; ".join(
                    f"{a} {f['served']} served, TTFT p50 {f['ttft_p50']} s" for a, f in figures.items()), err=True)
    finally:
        if proxy is not None:
            proxy.stop(timeout=5)
        for sim in sims:
            sim.stop()
    (out / "fairshare.json").write_text(json.dumps({
        "meta": {**provenance(), "accounts": {a: factors[a] for a in names}, "clients": clients, "window": window,
                 "repeats": repeats, "slots": 8, "service_s": 0.5, "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
        "results": results}, indent=1) + "\n")
    click.echo(f"{clients} clients per account on 8 slots of 0.5 s; median over {repeats} runs [min-max]")
    click.echo(f"{'fair_share_delay':>16} {'account':>10} {'delay ms':>9} {'served':>18} {'TTFT p50 s':>18} "
               f"{'TTFT p99 s':>18} {'TTFT max s':>18}")
    for case, runs in results.items():
        for a in names:
            cells = [_cell([run[a][q] for run in runs], 0 if q == "served" else 2)
                     for q in ("served", "ttft_p50", "ttft_p99", "ttft_max")]
            click.echo(f"{case + ' s':>16} {a:>10} {runs[0]['delays_ms'][a]:>9} " + " ".join(f"{c:>18}" for c in cells))
    click.echo(f"wrote {out / 'fairshare.json'}")


if __name__ == "__main__":
    sys.exit(main())
