"""The relay's metrics: edges connected, batches and readings taken in, group commits, API requests by status, the
process; served with /healthz on a port of their own (`edgetrio.metrics`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from edgetrio.metrics import store_answers

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)


class RelayCollector:
    """What /metrics shows of the relay: its edges, queues and counters, read on the trio loop when scraped."""

    def __init__(self, relay: Any, token: trio.lowlevel.TrioToken) -> None:
        self.relay = relay
        self.token = token

    def describe(self) -> Iterable[Metric]:
        return []

    def _snapshot(self) -> dict[str, Any]:
        writer = self.relay.writer
        return {"edges": len(self.relay.sessions), "counters": dict(self.relay.counters),
                "commits": writer.batches, "operations": writer.ops, "store_ok": writer.failure is None}

    def collect(self) -> Iterator[Metric]:
        """The relay's gauges and counters, read from the trio side at each scrape."""
        try:
            s = trio.from_thread.run_sync(self._snapshot, trio_token=self.token)
        except trio.RunFinishedError:
            return
        counts: dict[str, int] = s["counters"]
        yield GaugeMetricFamily("edgetrio_relay_edges_connected", "Edges with a live link", s["edges"])
        yield GaugeMetricFamily("edgetrio_relay_store_ok", "1 while the store can write", 1 if s["store_ok"] else 0)
        yield CounterMetricFamily("edgetrio_relay_batches_stored", "Batches from edges committed",
                                  counts.get("batches_stored", 0))
        yield CounterMetricFamily("edgetrio_relay_readings_received", "Readings in committed batches (a resent "
                                  "one counts again; each is stored once)", counts.get("readings_received", 0))
        yield CounterMetricFamily("edgetrio_relay_commits", "Group commits of the store", s["commits"])
        yield CounterMetricFamily("edgetrio_relay_store_operations", "Operations in those commits", s["operations"])
        requests = CounterMetricFamily("edgetrio_relay_api_requests", "API requests answered, by status",
                                       labels=["status"])
        other = CounterMetricFamily("edgetrio_relay_events", "Other things the relay counts", labels=["name"])
        for name, value in sorted(counts.items()):
            if name.startswith("api_"):
                requests.add_metric([name[4:]], value)
            elif name not in ("batches_stored", "readings_received"):
                other.add_metric([name], value)
        yield requests
        yield other


async def relay_health(relay: Any) -> dict[str, str]:
    return {"store": await store_answers(relay.writer)}
