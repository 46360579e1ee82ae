"""Metrics and health over HTTP on a port of their own, for the gateway and the relay alike: Prometheus exposition at
/metrics (prometheus-client's WSGI app) and /healthz (JSON, unauthenticated), behind the standard library's WSGI
server in a thread that `open_metrics_server` owns. Health is asked in the trio thread (`trio.from_thread`), never in
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

log = logging.getLogger("edgetrio.metrics")
HEALTH_TIMEOUT = 5.0  # seconds a health check may take before it says "no answer"

Health = Callable[[], Awaitable[dict[str, str]]]  # component -> "ok" or what is wrong


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)


@asynccontextmanager
async def open_metrics_server(host: str, port: int, registry: CollectorRegistry,
                              health: Health) -> AsyncIterator[int]:
    """Serve /metrics and /healthz on host:port within this block; yields the bound port (OSError if it cannot
    bind). Leaving the block stops the server and waits for its thread."""
    token = trio.lowlevel.current_trio_token()
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
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

    server: WSGIServer = make_server(host, port, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="edgetrio-metrics", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        await trio.to_thread.run_sync(server.shutdown)
        server.server_close()
        thread.join()
