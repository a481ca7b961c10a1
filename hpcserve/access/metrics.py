"""What a site's Prometheus gets beyond HAProxy's own exporter: the pool's replicas by state, and
the per-key counters of the frontend's stick table (which the exporter does not export).

HAProxy's exporter (the stats frontend's /metrics, HAProxy 2.6 "prometheus-exporter" service)
covers frontends, backends and servers; `hpcserve metrics` adds these series, printed in the
Prometheus text format or written as a node_exporter textfile (prometheus_client's
write_to_textfile, an atomic rename), e.g. from cron every minute. Grafana: examples/grafana-dashboard.json.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..config import Deployment
from ..core.pool import Desired, Health, Replica

#: Replica states exported: desired (what the user asked for), and the jobs Slurm has, by health.
STATES = ("desired", "ready", "loading", "starting", "pending", "unreachable", "refused")


class PoolCollector(Collector):
    """The series of one deployment, from values read before (no I/O here).

    Args:
        deployment: the deployment.
        desired: its desired state.
        backends: its jobs as observed (control.observe.observe), or None when Slurm did not answer.
        table: the frontend stick table (runtime.show_table): key name (or source address with
            auth: open) -> {"use", "http_req_cnt", "http_err_cnt", "gpc0_rate(60000)", "gpc1_rate(60000)"}; {} when
            HAProxy does not run.
        dropped_log_lines: access log lines HAProxy's current worker dropped
            (HAProxy.dropped_log_lines); None when unknown (no series then).
        unauthenticated: the stick table "unauthenticated" (runtime.show_table): source address
            -> {"http_req_cnt": requests refused before a key was known, not logged}; an entry
            expires an hour after its last request.
    """

    def __init__(self, deployment: Deployment, desired: Desired, backends: Iterable[Replica] | None,
                 table: Mapping[str, Mapping[str, int]], dropped_log_lines: int | None = None,
                 unauthenticated: Mapping[str, Mapping[str, int]] | None = None):
        self.deployment = deployment
        self.desired = desired
        self.backends = None if backends is None else list(backends)
        self.table = table
        self.dropped_log_lines = dropped_log_lines
        self.unauthenticated = unauthenticated or {}

    def collect(self):
        name = self.deployment.name
        replicas = GaugeMetricFamily("hpcserve_replicas", "Backend jobs of a model, by state (desired: asked for).",
                                     labels=["deployment", "model", "state"])
        for model in self.deployment.models:
            counts = dict.fromkeys(STATES, 0)
            counts["desired"] = self.desired.replicas_of(model.name)
            for backend in self.backends or []:
                if backend.model == model.name and backend.health is not Health.ENDED:
                    counts[backend.health.value] += 1
            for state, value in counts.items():
                if state == "desired" or self.backends is not None:
                    replicas.add_metric([name, model.name, state], value)
        yield replicas
        up = GaugeMetricFamily("hpcserve_scheduler_up", "1 when Slurm answered this scrape's squeue.",
                               labels=["deployment"])
        up.add_metric([name], int(self.backends is not None))
        yield up
        in_flight = GaugeMetricFamily("hpcserve_key_requests_in_flight",
                                      "Requests of an API key in service, queued or uploading now.",
                                      labels=["deployment", "key"])
        requests = CounterMetricFamily("hpcserve_key_requests", "Requests of an API key (HAProxy worker lifetime).",
                                       labels=["deployment", "key"])
        errors = CounterMetricFamily("hpcserve_key_client_errors", "4xx answers to an API key (HAProxy "
                                     "http_err_cnt).", labels=["deployment", "key"])
        admitted = GaugeMetricFamily("hpcserve_key_admitted_per_minute",
                                     "Requests of an API key admitted over the last 60 s (its rate limit counts these).",
                                     labels=["deployment", "key"])
        for key, counters in sorted(self.table.items()):
            in_flight.add_metric([name, key], counters.get("use", 0))
            requests.add_metric([name, key], counters.get("http_req_cnt", 0))
            errors.add_metric([name, key], counters.get("http_err_cnt", 0))
            # gpc1: what the worker before a reload had admitted (HAProxy.reload carries it).
            admitted.add_metric([name, key], counters.get("gpc0_rate(60000)", 0) + counters.get("gpc1_rate(60000)", 0))
        yield from (in_flight, requests, errors, admitted)
        if self.dropped_log_lines is not None:
            dropped = CounterMetricFamily("hpcserve_access_log_dropped_lines",
                                          "Access log lines HAProxy dropped (its current worker's DroppedLogs): "
                                          "requests missing from `hpcserve usage`.", labels=["deployment"])
            dropped.add_metric([name], self.dropped_log_lines)
            yield dropped
        refused = CounterMetricFamily("hpcserve_unauthenticated_requests",
                                      "Requests refused before a key was known (no or a wrong key, headers too "
                                      "large), by source address; not in the access log.",
                                      labels=["deployment", "source"])
        for source, counters in sorted(self.unauthenticated.items()):
            refused.add_metric([name, source], counters.get("http_req_cnt", 0))
        yield refused


def registry(collector: PoolCollector) -> CollectorRegistry:
    """A registry holding only `collector` (no process metrics of the hpcserve command itself)."""
    reg = CollectorRegistry()
    reg.register(collector)
    return reg
