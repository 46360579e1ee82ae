"""Metrics and health on an HTTP port of their own (127.0.0.1 by default): Prometheus exposition at /metrics
(prometheus-client) and /healthz (unauthenticated: whether the store and the broker answer).

The HTTP side is prometheus-client's WSGI app behind the standard library's WSGI server, in a thread that
`open_metrics` owns. Values are read in the trio thread (`trio.from_thread`), never from the thread that serves
them, so a scrape sees a consistent snapshot and never races the components that count.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("edgetrio.metrics")
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, open fds, CPU
COMMIT_SECONDS = Histogram("edgetrio_commit_seconds", "Duration of one group commit of readings",
                           registry=REGISTRY, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
HEALTH_TIMEOUT = 5.0

Snapshot = dict[str, Any]


class GatewayCollector:
    """Turns a snapshot of the gateway (taken in the trio thread) into Prometheus families."""

    def __init__(self, snapshot: Callable[[], Snapshot], token: trio.lowlevel.TrioToken) -> None:
        self.snapshot = snapshot
        self.token = token

    def describe(self) -> Iterable[Metric]:
        return []  # values come from the running daemon only; nothing to register at import time

    def collect(self) -> Iterator[Metric]:
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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)


@asynccontextmanager
async def open_metrics(host: str, port: int, snapshot: Callable[[], Snapshot],
                       health: Callable[[], Awaitable[dict[str, str]]]) -> AsyncIterator[int]:
    """Serve /metrics and /healthz on host:port within this block; yields the bound port. Leaving the block stops
    the server and waits for its thread."""
    token = trio.lowlevel.current_trio_token()
    collector = GatewayCollector(snapshot, token)
    REGISTRY.register(collector)
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            try:
                checks = trio.from_thread.run(health, trio_token=token)
            except trio.RunFinishedError:
                checks = {"daemon": "stopping"}
            ok = all(v == "ok" for v in checks.values())
            body = json.dumps({"ok": ok, **checks}).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("PATH_INFO") == "/metrics":
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    server: WSGIServer = make_server(host, port, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="edgetrio-metrics", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        REGISTRY.unregister(collector)
        await trio.to_thread.run_sync(server.shutdown)
        server.server_close()
        thread.join()
