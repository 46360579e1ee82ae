"""The operator HTTP API of the relay: JSON over HTTP/1.1 (h11), bearer token, OpenAPI document at /openapi.json."""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from edgetrio import wire
from edgetrio.cloud import store
from edgetrio.console import parse_since
from edgetrio.identity import RegistryError
from edgetrio.twin import VersionConflict

MAX_BODY = 1024 * 1024
log = logging.getLogger("edgetrio.api")
T = TypeVar("T")


class Relay(Protocol):
    """What the API needs of the relay (edgetrio.cloud.relay.Relay), so the API does not import the relay."""

    token: str
    sessions: dict[str, Any]  # node -> its live edge session
    command_waiters: dict[str, trio.Event]
    counters: Counter[str]  # what /metrics shows (API requests by status among them)

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    def notify(self, node: str) -> None: ...


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


NODE = r"(?P<node>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
DEVICE = r"(?P<device>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/api/nodes$"), "nodes"),
    ("GET", re.compile(r"^/api/devices$"), "devices"),
    ("PATCH", re.compile(r"^/api/fleet/twin$"), "fleet_twin"),
    ("GET", re.compile(rf"^/api/nodes/{NODE}/devices$"), "devices"),
    ("POST", re.compile(rf"^/api/nodes/{NODE}/devices$"), "device_add"),
    ("GET", re.compile(rf"^/api/nodes/{NODE}/devices/{DEVICE}/twin$"), "twin_get"),
    ("PATCH", re.compile(rf"^/api/nodes/{NODE}/devices/{DEVICE}/twin$"), "twin_set"),
    ("POST", re.compile(rf"^/api/nodes/{NODE}/devices/{DEVICE}/commands$"), "command"),
    ("GET", re.compile(rf"^/api/nodes/{NODE}/devices/{DEVICE}/readings$"), "readings"),
]


def openapi() -> dict[str, Any]:
    device_path = "/api/nodes/{node}/devices/{device}"
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in ("node", "device")]
    twin = {"type": "object", "properties": {k: {"type": "object", "properties": {
        "state": {"type": "object"}, "version": {"type": "integer"}}} for k in ("desired", "reported")} | {
        "delta": {"type": "object"}}}
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "edgetrio relay operator API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/api/nodes": {"get": {"summary": "Nodes with online state, last seen, devices and queued messages",
                                   "responses": {"200": ok}}},
            "/api/devices": {"get": {"summary": "Devices of all nodes", "responses": {"200": ok}}},
            "/api/fleet/twin": {"patch": {
                "summary": "One desired change for every device (or those of `node`, or named `device`), one transaction",
                "requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
                    "desired": {"type": "object"}, "node": {"type": "string"}, "device": {"type": "string"}},
                    "required": ["desired"]}}}},
                "responses": {"200": ok, "400": ok, "404": ok}}},
            "/api/nodes/{node}/devices": {
                "parameters": params[:1],
                "get": {"summary": "Devices of a node", "responses": {"200": ok, "404": ok}},
                "post": {"summary": "Register a device on the node; the credential is returned once",
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
                             "id": {"type": "string"}, "model": {"type": "string"}}, "required": ["id"]}}}},
                         "responses": {"201": ok, "400": ok, "404": ok}}},
            f"{device_path}/twin": {
                "parameters": params,
                "get": {"summary": "Twin replica", "responses": {"200": {"description": "twin", "content": {
                    "application/json": {"schema": twin}}}, "404": ok}},
                "patch": {"summary": "Change desired state (null removes a key); a stale version is refused (409)",
                          "requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
                              "desired": {"type": "object"}, "version": {"type": "integer"}},
                              "required": ["desired"]}}}},
                          "responses": {"200": ok, "409": ok, "404": ok}}},
            f"{device_path}/commands": {
                "parameters": params,
                "post": {"summary": "Run a command on the device and wait for its result",
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
                             "name": {"type": "string"}, "args": {"type": "object"}, "timeout": {"type": "number"}},
                             "required": ["name"]}}}},
                         "responses": {"200": ok, "409": ok, "504": ok}}},
            f"{device_path}/readings": {
                "parameters": [*params, {"name": "since", "in": "query", "schema": {"type": "string"},
                                         "description": "epoch seconds, an ISO time, or an age such as 10m, 2h, 1d"},
                               {"name": "limit", "in": "query", "schema": {"type": "integer"}}],
                "get": {"summary": "Readings, oldest first", "responses": {"200": ok}}},
        },
    }


async def handle_http(relay: Relay, conn: h11.Connection, stream: trio.abc.Stream, first: Any,
                      next_event: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> None:
    """Serve requests on one connection (keep-alive) until the client closes it, or takes longer than `timeout`
    to send a whole body or, idle, its next request."""
    event = first
    while isinstance(event, h11.Request):
        body = bytearray()
        too_large = False
        with trio.move_on_after(timeout):  # for the whole body: a byte now and then must not hold the connection
            while True:
                part = await next_event()
                if isinstance(part, h11.Data):
                    if len(body) + len(part.data) > MAX_BODY:
                        too_large = True
                    else:
                        body.extend(part.data)
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:
                    return
        if not isinstance(part, h11.EndOfMessage):
            return
        try:
            if too_large:
                raise HTTPError(413, f"request body over {MAX_BODY} bytes")
            status, payload = await route(relay, event, bytes(body))
        except HTTPError as exc:
            status, payload = exc.status, {"error": str(exc)}
        relay.counters[f"api_{status}"] += 1
        data = json.dumps(payload).encode()
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
            ("content-type", "application/json"), ("content-length", str(len(data)))])))
        await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()
        event = None
        with trio.move_on_after(timeout):
            event = await next_event()


async def route(relay: Relay, request: h11.Request, body: bytes) -> tuple[int, Any]:
    target = urlsplit(request.target.decode("latin-1"))
    method = request.method.decode()
    if method == "GET" and target.path == "/openapi.json":
        return 200, openapi()
    if method == "GET" and target.path == "/healthz":  # for load balancers and probes: no token, nothing revealed
        with trio.move_on_after(5):
            await relay.run(lambda db: db.execute("SELECT 1").fetchone())
            return 200, {"ok": True, "store": "ok"}
        raise HTTPError(503, "the store did not answer within 5 s")
    auth = dict((k.lower(), v) for k, v in request.headers).get(b"authorization", b"").decode("latin-1")
    if not (auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].encode(), relay.token.encode())):
        raise HTTPError(401, "missing or wrong operator token")
    for route_method, pattern, name in ROUTES:
        match = pattern.fullmatch(target.path)
        if match and route_method == method:
            query = {k: v[-1] for k, v in parse_qs(target.query).items()}
            data: Any = {}
            if body:
                try:
                    data = wire.loads(body)
                except ValueError as exc:
                    raise HTTPError(400, f"request body is not JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise HTTPError(400, "request body must be a JSON object")
            try:
                return await HANDLERS[name](relay, match.groupdict(), query, data)
            except store.NotFound as exc:
                raise HTTPError(404, str(exc)) from exc
            except VersionConflict as exc:
                raise HTTPError(409, str(exc)) from exc
            except (RegistryError, KeyError, TypeError, ValueError) as exc:
                raise HTTPError(400, str(exc) or f"bad request: {type(exc).__name__}") from exc
            except (HTTPError, trio.Cancelled):
                raise
            except Exception as exc:
                log.exception("request %s %s failed", method, target.path)
                raise HTTPError(500, f"internal error: {type(exc).__name__}") from exc
    if any(pattern.fullmatch(target.path) for _, pattern, _ in ROUTES):
        raise HTTPError(405, f"{method} is not allowed on {target.path}")
    raise HTTPError(404, f"no such endpoint {target.path}")


Handler = Callable[[Relay, dict[str, str], dict[str, str], dict[str, Any]], Awaitable[tuple[int, Any]]]


async def nodes(relay: Relay, path: dict[str, str], query: dict[str, str], data: dict[str, Any]) -> tuple[int, Any]:
    return 200, await relay.run(store.list_nodes)


async def devices(relay: Relay, path: dict[str, str], query: dict[str, str], data: dict[str, Any]) -> tuple[int, Any]:
    return 200, await relay.run(store.list_devices, path.get("node") or query.get("node"))


async def device_add(relay: Relay, path: dict[str, str], query: dict[str, str], data: dict[str, Any]) -> tuple[int, Any]:
    device = str(data["id"])
    secret = await relay.run(store.register_device, path["node"], device, data.get("model"))
    relay.notify(path["node"])
    return 201, {"id": device, "username": device, "password": secret}


async def twin_get(relay: Relay, path: dict[str, str], query: dict[str, str], data: dict[str, Any]) -> tuple[int, Any]:
    return 200, await relay.run(store.get_twin, path["node"], path["device"])


async def twin_set(relay: Relay, path: dict[str, str], query: dict[str, str], data: dict[str, Any]) -> tuple[int, Any]:
    patch, version = data.get("desired"), data.get("version")
    if not isinstance(patch, dict) or not patch:
        raise HTTPError(400, "'desired' must be a non-empty object")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise HTTPError(400, "'version' must be an integer")
    twin = await relay.run(store.set_twin, path["node"], path["device"], patch, version)
    relay.notify(path["node"])
    return 200, twin


async def fleet_twin(relay: Relay, path: dict[str, str], query: dict[str, str], data: dict[str, Any]
                     ) -> tuple[int, Any]:
    patch = data.get("desired")
    if not isinstance(patch, dict) or not patch:
        raise HTTPError(400, "'desired' must be a non-empty object")
    node, device = data.get("node"), data.get("device")
    if not isinstance(node, str | None) or not isinstance(device, str | None):
        raise HTTPError(400, "'node' and 'device' must be strings when given")
    done = await relay.run(store.set_twin_fleet, patch, node, device)
    for name in list(relay.sessions):
        relay.notify(name)  # each session sends only what is queued for it
    return 200, done


async def command(relay: Relay, path: dict[str, str], query: dict[str, str], data: dict[str, Any]) -> tuple[int, Any]:
    name, args = data.get("name"), data.get("args") or {}
    timeout = float(data.get("timeout", 10))
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        raise HTTPError(400, "a command needs a 'name' and an object 'args'")
    node = path["node"]
    if node not in relay.sessions:
        # commands are bound in time, unlike desired state: refuse rather than run it whenever the edge returns
        await relay.run(store.require_node, node)
        raise HTTPError(409, f"node {node!r} is offline")
    cmd_id = await relay.run(store.start_command, node, path["device"], name, args, timeout)
    waiter = relay.command_waiters[cmd_id] = trio.Event()
    relay.notify(node)
    try:
        with trio.move_on_after(timeout + 5):  # the edge gives the device `timeout`; allow for the round trips
            while (result := await relay.run(store.command_outcome, cmd_id)) is None:
                await waiter.wait()
                relay.command_waiters[cmd_id] = waiter = trio.Event()
            if "result" in result:
                return 200, result["result"]
            code = 504 if result.get("code") == "timeout" else 409
            raise HTTPError(code, str(result.get("error")))
    finally:
        relay.command_waiters.pop(cmd_id, None)
    raise HTTPError(504, f"no result from node {node!r} within {timeout + 5:g} s")


async def readings(relay: Relay, path: dict[str, str], query: dict[str, str], data: dict[str, Any]) -> tuple[int, Any]:
    try:  # as the CLI takes them: epoch seconds, an ISO time, or an age such as 10m
        since = parse_since(query["since"]) if "since" in query else None
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    limit = None
    if "limit" in query:
        if not query["limit"].isdigit() or int(query["limit"]) < 1:
            raise HTTPError(400, f"limit {wire.clip(query['limit'], 40)!r}: use a whole number of 1 or more")
        limit = int(query["limit"])
    return 200, await relay.run(store.query_readings, path["node"], path["device"], since, limit)


HANDLERS: dict[str, Handler] = {"nodes": nodes, "devices": devices, "device_add": device_add, "twin_get": twin_get,
                                "twin_set": twin_set, "fleet_twin": fleet_twin, "command": command,
                                "readings": readings}
