"""The gateway's metrics: what /metrics shows (prometheus-client families from a snapshot of the components, taken
in the trio thread) and the group-commit histogram. The HTTP side is shared with the relay (`edgetrio.metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, open fds, CPU
COMMIT_SECONDS = Histogram("edgetrio_commit_seconds", "Duration of one group commit of readings",
                           registry=REGISTRY, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

PUBLISH_TO_COMMIT = Histogram(
    "edgetrio_publish_to_commit_seconds", "From the broker taking a reading to its commit (the oldest of each commit)",
    registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

# Where a reading's time goes between the broker taking it and its ack leaving (one observation per bus batch, commit
# or ack, so measuring costs little): bus = broker thread -> trio, to_commit = arrival -> its commit starting (the
# oldest of the group), commit, handoff = trio -> the broker thread's loop sending the ack, write = the ack written
STAGE_SECONDS = Histogram(
    "edgetrio_stage_seconds", "Time spent in each stage of a reading's path, seconds", ["stage"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))

Snapshot = dict[str, Any]


class GatewayCollector:
    """Turns a snapshot of the gateway (taken in the trio thread) into Prometheus families."""

    def __init__(self, snapshot: Callable[[], Snapshot], token: trio.lowlevel.TrioToken) -> None:
        self.snapshot = snapshot
        self.token = token

    def describe(self) -> Iterable[Metric]:
        return []  # values come from the running daemon only; nothing to register at import time

    def collect(self) -> Iterator[Metric]:
        """The gateway's gauges, read from the trio side at each scrape."""
        try:
            s = trio.from_thread.run_sync(self.snapshot, trio_token=self.token)
        except trio.RunFinishedError:
            return
        yield GaugeMetricFamily("edgetrio_devices_registered", "Devices in the registry", s["registered"])
        yield GaugeMetricFamily("edgetrio_devices_online", "Devices connected now", s["online"])
        yield GaugeMetricFamily("edgetrio_readings_held", "Readings taken in and not committed yet", s["held"])
        yield GaugeMetricFamily("edgetrio_store_ok", "1 while the store can write", 1 if s["store_ok"] else 0)
        yield GaugeMetricFamily("edgetrio_bus_pending", "Bus events waiting for ingest", s["bus_pending"])
        counts: dict[str, int] = s["counters"]
        yield CounterMetricFamily("edgetrio_readings_ingested", "Readings committed to the store",
                                  counts.get("readings_received", 0))
        families = {"rejected": CounterMetricFamily("edgetrio_rejected", "Messages refused, by reason", labels=["reason"]),
                    "dropped": CounterMetricFamily("edgetrio_dropped", "Messages dropped, by reason", labels=["reason"])}
        other = CounterMetricFamily("edgetrio_events", "Other things the daemon counts", labels=["name"])
        for name, value in sorted(counts.items()):
            kind, _, reason = name.partition("_")
            if kind in families and reason:
                families[kind].add_metric([reason], value)
            elif name != "readings_received":
                other.add_metric([name], value)
        yield from families.values()
        yield other
        cloud = s.get("cloud")
        if cloud is not None:
            yield GaugeMetricFamily("edgetrio_cloud_link_up", "1 while the link to the relay is up",
                                    1 if cloud["connected"] else 0)
            yield GaugeMetricFamily("edgetrio_outbox_rows", "Rows waiting in the outbox for the relay",
                                    cloud.get("outbox_rows", 0))
            yield GaugeMetricFamily("edgetrio_outbox_age_seconds", "Age of the oldest row waiting in the outbox",
                                    cloud.get("outbox_age", 0.0))
