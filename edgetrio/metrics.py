"""Metrics and health over HTTP on a port of their own, for the gateway and the relay alike: Prometheus exposition at
/metrics (prometheus-client's WSGI app) and /healthz (JSON, unauthenticated), behind the standard library's WSGI
server in a thread that `serve_metrics` owns. Health is asked in the trio thread (`trio.from_thread`), never in
the serving thread, so it sees the components as they are and never races them; collectors do the same."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.registry import Collector

from edgetrio.writer import Writer

log = logging.getLogger("edgetrio.metrics")
HEALTH_TIMEOUT = 5.0  # seconds a health check may take before it says "no answer"

Health = Callable[[], Awaitable[dict[str, str]]]  # component -> "ok" or what is wrong


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)


async def store_answers(writer: Writer) -> str:
    """"ok" when the store answers a query within HEALTH_TIMEOUT and can write, else what is wrong."""
    with trio.move_on_after(HEALTH_TIMEOUT):
        try:
            await writer.write(lambda db: db.execute("SELECT 1").fetchone())
        except Exception as exc:
            return f"cannot write: {exc}"
        return "ok" if writer.failure is None else f"cannot write: {writer.failure}"
    return "no answer"


@asynccontextmanager
async def serve_metrics(host: str, port: int, registry: CollectorRegistry, collector: Collector,
                        health: Health) -> AsyncIterator[str | None]:
    """Serve /metrics (the registry, with `collector` in it) and /healthz on host:port within this block; yields
    "host:port", or None when turned off (a negative port) or when the port cannot be bound: metrics are optional,
    so that is logged and the service goes on. Leaving the block stops the server and waits for its thread."""
    server: WSGIServer | None = None
    if port >= 0:
        token = trio.lowlevel.current_trio_token()
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            """/metrics from the registry, /healthz from the health checks run on the trio side."""
            if environ.get("PATH_INFO") == "/healthz":
                try:
                    checks = trio.from_thread.run(health, trio_token=token)
                except trio.RunFinishedError:
                    checks = {"service": "stopping"}
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

        try:
            server = make_server(host, port, app, handler_class=_QuietHandler)
        except OSError as exc:
            log.warning("metrics and health not served on %s:%d: %s", host, port, exc)
    if server is None:
        yield None
        return
    registry.register(collector)
    thread = threading.Thread(target=server.serve_forever, name="edgetrio-metrics", daemon=True)
    thread.start()
    try:
        yield f"{host}:{server.server_address[1]}"
    finally:
        registry.unregister(collector)
        await trio.to_thread.run_sync(server.shutdown)
        server.server_close()
        thread.join()
