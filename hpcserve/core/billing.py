"""What one request of the access log costs (pure): the slot-seconds it held and the GPU-seconds
they are billed as, by `hpcserve usage`, the quotas and the chargeback alike.

A request that reached a backend held one of the `parallel` slots of a job that holds `gpus.count`
GPUs, from the moment HAProxy connected to it until the response ended: its GPU-seconds are that
time x gpus.count / parallel. The time comes from HAProxy's timers in the access log (HAProxy 2.6
configuration manual 8.4 "Timing events"): Ta (whole request, first header byte to last response
byte) minus TR (receiving the request, body included), Tw (queue) and Tc (connect), all in ms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: One access log line, parsed: the fields of the log-format in templates/haproxy.cfg.j2.
Record = dict[str, Any]


def model_of(record: Record) -> str:
    """The model that served the request (its backend "model_NAME"), else the model it named, else "-"."""
    backend = str(record.get("backend", ""))
    if backend.startswith("model_"):
        return backend[len("model_"):]
    if backend.startswith("wake_"):
        return backend[len("wake_"):]
    return str(record.get("model", "-"))


def account_of(record: Record) -> str:
    """The Slurm account the request counted for ("-": none, or a line from before accounts)."""
    return str(record.get("account") or "-")


def slot_seconds(record: Record) -> float:
    """Seconds the request held a backend slot (0 when it never reached one)."""
    if not str(record.get("server", "")).startswith("job"):
        return 0.0
    times = [int(record.get(k, -1)) for k in ("Ta", "TR", "Tw", "Tc")]
    if any(t < 0 for t in times):
        return 0.0
    total, received, queued, connect = times
    return max(0, total - received - queued - connect) / 1000


def gpu_seconds(record: Record, gpus_per_slot: Mapping[str, float]) -> float:
    """GPU-seconds of the request: slot_seconds x its model's GPUs per slot (gpus.count / parallel;
    `gpus_per_slot` maps model name -> that; a model missing there costs 0)."""
    held = slot_seconds(record)
    return held * gpus_per_slot.get(model_of(record), 0.0) if held else 0.0
