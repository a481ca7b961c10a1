"""Probing llama-servers over HTTP: /health (ready or loading), /slots (busy slots) and, before a
server serves, /props with and without the backend key (llama.props.admit). hpcserve.control.observe
joins these answers with Slurm's view of the jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses

import httpx

from ..config import Model
from ..core.pool import Health, Replica
from . import props


async def probe_all(replicas: list[Replica], key: str | None, timeout: float, slots: bool,
                    check: dict[str, Model]) -> list[Replica]:
    """`replicas` with what their llama-servers answered, in the same order.

    Args:
        replicas: replicas with their endpoints (those without one are returned as they are).
        key: the backend key (for /slots and /props); None skips both.
        timeout: seconds per HTTP request (connect and read).
        slots: read /slots of ready replicas (busy and total slots).
        check: job id -> its model, for the replicas to check before they serve (/props).
    """
    # At most 50 probes at a time, each within `timeout` (connect and read). Measured with 512
    # replicas (benchmarks, scenario e): handing httpx all 512 at once cost 9 ms of CPU per probe
    # in its connection pool's bookkeeping, and a wait for a free connection counted in the timeout
    # marked healthy replicas unreachable.
    gate = asyncio.Semaphore(50)

    async def probe(client: httpx.AsyncClient, replica: Replica) -> Replica:
        async with gate:
            return await _probe(client, replica, key, slots, check.get(replica.job.job_id))

    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        return list(await asyncio.gather(*(probe(client, b) for b in replicas)))


async def _probe(client: httpx.AsyncClient, replica: Replica, key: str | None, slots: bool,
                 model: Model | None) -> Replica:
    if replica.endpoint is None:
        return replica
    base = f"http://{replica.endpoint}"
    try:
        response = await client.get(f"{base}/health")
    except httpx.HTTPError:
        return dataclasses.replace(replica, health=Health.UNREACHABLE)
    health = {200: Health.READY, 503: Health.LOADING}.get(response.status_code, Health.UNREACHABLE)
    replica = dataclasses.replace(replica, health=health)
    if health is not Health.READY or not key:
        return replica
    if model is not None:
        with_key = await _get_json(client, f"{base}/props", key)
        try:
            without_key: int | None = (await client.get(f"{base}/props")).status_code
        except httpx.HTTPError:
            without_key = None
        verdict = props.admit(model, with_key, without_key)
        if verdict is None:
            return dataclasses.replace(replica, health=Health.UNREACHABLE)
        replica = dataclasses.replace(replica, build=verdict.build, refusal=verdict.refusal,
                                      health=Health.REFUSED if verdict.refusal else Health.READY)
    if slots and replica.health is Health.READY:
        data = await _get_json(client, f"{base}/slots", key)
        if isinstance(data, list):
            busy = sum(1 for slot in data if isinstance(slot, dict) and slot.get("is_processing"))
            replica = dataclasses.replace(replica, slots_busy=busy, slots_total=len(data))
    return replica


async def _get_json(client: httpx.AsyncClient, url: str, key: str) -> object:
    """The JSON answer of GET `url` with the backend key, None on any failure or a status not 200."""
    try:
        response = await client.get(url, headers={"Authorization": f"Bearer {key}"})
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
