"""The operator HTTP API and dashboard of the relay: JSON over HTTP/1.1 (h11), OpenAPI document at /openapi.json.

Who may do what: the operator token and admin accounts change things, viewer accounts only look. Scripts send a bearer
token (the operator token, or an account's API token); the dashboard logs in and gets a session cookie (HttpOnly,
SameSite=Strict), and its writes must carry the session's CSRF token in `x-csrf-token`. Live updates are server-sent
events on /api/stream.
"""

from __future__ import annotations

import contextlib
import csv
import hmac
import io
import json
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from edgetrio import wire
from edgetrio.cloud import store
from edgetrio.console import parse_since
from edgetrio.identity import RegistryError, verify_password
from edgetrio.twin import VersionConflict

MAX_BODY = 1024 * 1024
SESSION_COOKIE = "edgetrio_session"
SESSION_HOURS = 12.0
STREAM_QUEUE = 256  # events waiting for one dashboard stream; a slower one misses some (it reloads what it shows)
HEARTBEAT = 15.0  # seconds between keep-alive comments on an idle stream (and how a gone client is noticed)
WEB = Path(__file__).parent / "web"
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8", "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
          "vendor/uPlot.min.css": "text/css; charset=utf-8", "vendor/uPlot.LICENSE": "text/plain; charset=utf-8"}
RANGES = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}
log = logging.getLogger("edgetrio.api")
T = TypeVar("T")


@dataclass(frozen=True)
class Interest:
    """What one dashboard stream wants: a node, a device, kinds of event (empty: any)."""

    node: str | None = None
    device: str | None = None
    kinds: frozenset[str] = frozenset()

    def wants(self, event: dict[str, Any]) -> bool:
        return ((self.node is None or event.get("node") == self.node)
                and (self.device is None or event.get("device") == self.device)
                and (not self.kinds or event["type"] in self.kinds))


class Events:
    """Fans out what the relay stores (readings, twins, devices, nodes) to the open dashboard streams. Each stream
    says what it wants and is handed only that: a thousand open fleet pages cost the ingest path a comparison each,
    not a wake-up per reading (measured in tools/bench/bench_dashboard.py)."""

    def __init__(self) -> None:
        self.streams: dict[trio.MemorySendChannel[bytes], Interest] = {}
        self.missed = 0

    def publish(self, event: dict[str, Any]) -> None:
        frame = b""  # encoded once, for every stream that wants it
        for stream, interest in list(self.streams.items()):
            if interest.wants(event):
                frame = frame or f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
                try:
                    stream.send_nowait(frame)
                except trio.WouldBlock:
                    self.missed += 1

    def open(self, interest: Interest) -> tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]]:
        send, receive = trio.open_memory_channel[bytes](STREAM_QUEUE)
        self.streams[send] = interest
        return send, receive


class Relay(Protocol):
    """What the API needs of the relay (edgetrio.cloud.relay.Relay), so the API does not import the relay."""

    token: str
    sessions: dict[str, Any]  # node -> its live edge session
    command_waiters: dict[str, trio.Event]
    counters: Counter[str]  # what /metrics shows (API requests by status among them)
    events: Events
    secure_cookies: bool  # served over TLS: cookies get the Secure flag

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    def notify(self, node: str) -> None: ...

    async def close_link(self, node: str, reason: str) -> None: ...


@dataclass(frozen=True)
class Principal:
    """Who is asking: an account (or the operator token, as the first admin), and how they proved it."""

    name: str
    role: str
    via: str  # token, cookie
    csrf: str = ""
    key: str = ""  # the session's cookie, to end it


@dataclass
class Reply:
    """A response that is not plain JSON: a page, a file, a cookie, or a stream."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None


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
    ("GET", re.compile(rf"^/api/nodes/{NODE}/devices/{DEVICE}/series$"), "series"),
    ("DELETE", re.compile(rf"^/api/nodes/{NODE}$"), "node_remove"),
    ("POST", re.compile(rf"^/api/nodes/{NODE}/token$"), "node_rotate"),
    ("GET", re.compile(r"^/api/me$"), "me"),
    ("POST", re.compile(r"^/api/logout$"), "logout"),
    ("GET", re.compile(r"^/api/stream$"), "stream"),
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
        reply = payload if isinstance(payload, Reply) else Reply(status, json.dumps(payload).encode())
        headers = [("content-type", reply.content_type), *reply.headers]
        if reply.stream is None:
            headers.append(("content-length", str(len(reply.body))))
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers,
                                                     reason=HTTPStatus(status).phrase.encode())))
        if reply.stream is not None:  # until the client goes away (a send fails) or the relay stops
            async with contextlib.aclosing(reply.stream) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    await stream.send_all(conn.send(h11.Data(data=chunk)))
            return
        await stream.send_all(conn.send(h11.Data(data=reply.body)))
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
    if method == "GET" and (target.path == "/" or target.path.startswith("/static/")):
        return static_file(target.path)
    headers = {k.lower().decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
    if target.path == "/api/login" and method == "POST":
        return await login(relay, parse_body(body))
    principal = await authenticate(relay, headers)
    writes = method not in ("GET", "HEAD") and target.path != "/api/logout"
    if writes and principal.role != "admin":
        raise HTTPError(403, f"{principal.name} is a viewer: viewers cannot change anything")
    if method not in ("GET", "HEAD") and principal.via == "cookie" and not hmac.compare_digest(
            headers.get("x-csrf-token", "").encode(), principal.csrf.encode()):
        raise HTTPError(403, "missing or wrong CSRF token (x-csrf-token)")
    for route_method, pattern, name in ROUTES:
        match = pattern.fullmatch(target.path)
        if match and route_method == method:
            query = {k: v[-1] for k, v in parse_qs(target.query).items()}
            data = parse_body(body)
            try:
                return await HANDLERS[name](relay, principal, match.groupdict(), query, data)
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


def parse_body(body: bytes) -> dict[str, Any]:
    data: Any = {}
    if body:
        try:
            data = wire.loads(body)
        except ValueError as exc:
            raise HTTPError(400, f"request body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return data


def static_file(path: str) -> tuple[int, Reply]:
    name = "index.html" if path == "/" else path.removeprefix("/static/")
    kind = STATIC.get(name)  # only the files listed: no path from the request reaches the file system
    if kind is None:
        raise HTTPError(404, f"no such file {wire.clip(path, 80)}")
    cache = "no-cache" if name == "index.html" else "max-age=3600"
    return 200, Reply(200, (WEB / name).read_bytes(), kind, [("cache-control", cache),
                                                             ("x-content-type-options", "nosniff")])


def cookies(headers: dict[str, str]) -> dict[str, str]:
    out = {}
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


async def authenticate(relay: Relay, headers: dict[str, str]) -> Principal:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        token = auth[7:].strip()
        if hmac.compare_digest(token.encode(), relay.token.encode()):
            return Principal("operator", "admin", "token")  # the relay's operator token: the first admin's
        user = await relay.run(store.token_user, token)
        if user is None:
            raise HTTPError(401, "unknown or revoked token")
        return Principal(user["name"], user["role"], "token")
    key = cookies(headers).get(SESSION_COOKIE)
    if key:
        session = await relay.run(store.session_user, key, time.time())
        if session is None:
            raise HTTPError(401, "session expired: log in again")
        return Principal(session["name"], session["role"], "cookie", session["csrf"], key)
    raise HTTPError(401, "log in, or send a bearer token")


async def login(relay: Relay, data: dict[str, Any]) -> tuple[int, Reply]:
    name, password = data.get("name"), data.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        raise HTTPError(400, "send 'name' and 'password'")
    user = await relay.run(store.get_user, name)
    # the slow KDF runs beside the loop, and as long for an unknown name as for a known one
    ok = await trio.to_thread.run_sync(verify_password, password, user["password_hash"] if user else None)
    if user is None or not ok:
        relay.counters["login_refused"] += 1
        log.warning("login refused user=%s", wire.clip(name, 64))
        raise HTTPError(401, "wrong name or password")
    key, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(18)
    await relay.run(store.start_session, user["name"], key, csrf, time.time() + SESSION_HOURS * 3600)
    cookie = (f"{SESSION_COOKIE}={key}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(SESSION_HOURS * 3600)}"
              + ("; Secure" if relay.secure_cookies else ""))
    body = json.dumps({"name": user["name"], "role": user["role"], "csrf": csrf}).encode()
    return 200, Reply(200, body, headers=[("set-cookie", cookie), ("cache-control", "no-store")])


Params = dict[str, str]
Body = dict[str, Any]
Result = tuple[int, Any]
Handler = Callable[[Relay, Principal, Params, Params, Body], Awaitable[Result]]


async def nodes(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, await relay.run(store.list_nodes)


async def devices(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, await relay.run(store.list_devices, path.get("node") or query.get("node"))


async def device_add(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    device = str(data["id"])
    secret = await relay.run(store.register_device, path["node"], device, data.get("model"))
    relay.notify(path["node"])
    return 201, {"id": device, "username": device, "password": secret}


async def twin_get(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, await relay.run(store.get_twin, path["node"], path["device"])


async def twin_set(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    patch, version = data.get("desired"), data.get("version")
    if not isinstance(patch, dict) or not patch:
        raise HTTPError(400, "'desired' must be a non-empty object")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise HTTPError(400, "'version' must be an integer")
    twin = await relay.run(store.set_twin, path["node"], path["device"], patch, version)
    relay.notify(path["node"])
    return 200, twin


async def fleet_twin(relay: Relay, who: Principal, path: Params, query: Params, data: Body
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


async def command(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
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


async def readings(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    try:  # as the CLI takes them: epoch seconds, an ISO time, or an age such as 10m
        since = parse_since(query["since"]) if "since" in query else None
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    limit = None
    if "limit" in query:
        if not query["limit"].isdigit() or int(query["limit"]) < 1:
            raise HTTPError(400, f"limit {wire.clip(query['limit'], 40)!r}: use a whole number of 1 or more")
        limit = int(query["limit"])
    rows = await relay.run(store.query_readings, path["node"], path["device"], since, limit)
    if query.get("format") == "csv":
        return 200, readings_csv(path["device"], rows)
    return 200, rows


def readings_csv(device: str, rows: list[dict[str, Any]]) -> Reply:
    keys = sorted({k for r in rows for k in r["values"]})
    out = io.StringIO()
    table = csv.writer(out)
    table.writerow(["time_utc", "ts", "boot", "seq", *keys])
    for r in rows:
        when = datetime.fromtimestamp(r["ts"], UTC).isoformat(timespec="milliseconds") if r["ts"] else ""
        table.writerow([when, r["ts"], r["boot"], r["seq"], *(r["values"].get(k, "") for k in keys)])
    return Reply(200, out.getvalue().encode(), "text/csv; charset=utf-8",
                 [("content-disposition", f'attachment; filename="{device}.csv"')])


async def series(relay: Relay, who: Principal, path: Params, query: Params, data: Body
                 ) -> tuple[int, Any]:
    """A device's readings over a range, downsampled on the relay to at most `points` averages per resource."""
    span = RANGES.get(query.get("range", "1h"))
    if span is None:
        raise HTTPError(400, f"range {wire.clip(query.get('range', ''), 20)!r}: use {', '.join(RANGES)}")
    points = query.get("points", "600")
    if not points.isdigit() or not 10 <= int(points) <= 5000:
        raise HTTPError(400, "points: a whole number from 10 to 5000")
    return 200, await relay.run(store.series, path["node"], path["device"], time.time() - span, time.time(),
                                int(points))


async def me(relay: Relay, who: Principal, path: Params, query: Params, data: Body
             ) -> tuple[int, Any]:
    return 200, {"name": who.name, "role": who.role, "via": who.via, "csrf": who.csrf or None}


async def logout(relay: Relay, who: Principal, path: Params, query: Params, data: Body
                 ) -> tuple[int, Any]:
    if who.via == "cookie":
        await relay.run(store.end_session, who.key)
    return 200, Reply(200, b'{"ok": true}', headers=[
        ("set-cookie", f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")])


async def node_remove(relay: Relay, who: Principal, path: Params, query: Params, data: Body
                      ) -> tuple[int, Any]:
    await relay.run(store.remove_node, path["node"])
    await relay.close_link(path["node"], "node removed")
    log.info("node removed node=%s by=%s", path["node"], who.name)
    return 200, {"node": path["node"], "removed": True}


async def node_rotate(relay: Relay, who: Principal, path: Params, query: Params, data: Body
                      ) -> tuple[int, Any]:
    token = await relay.run(store.rotate_node, path["node"])
    await relay.close_link(path["node"], "token rotated")  # the old token is refused from now on, its link too
    log.info("node token rotated node=%s by=%s", path["node"], who.name)
    return 200, {"node": path["node"], "token": token}


async def stream(relay: Relay, who: Principal, path: Params, query: Params, data: Body
                 ) -> tuple[int, Any]:
    """Server-sent events: what the relay stores as it stores it (`node`, `device`, `kinds` narrow it down)."""
    kinds = frozenset(k for k in query.get("kinds", "").split(",") if k)
    interest = Interest(query.get("node") or None, query.get("device") or None, kinds)

    async def events() -> AsyncIterator[bytes]:
        send, receive = relay.events.open(interest)
        try:
            yield b"retry: 2000\n\n"
            while True:
                with trio.move_on_after(HEARTBEAT) as idle:
                    frame = await receive.receive()
                yield b": idle\n\n" if idle.cancelled_caught else frame
        finally:
            relay.events.streams.pop(send, None)
    return 200, Reply(200, content_type="text/event-stream", headers=[("cache-control", "no-store")],
                      stream=events())


HANDLERS: dict[str, Handler] = {"nodes": nodes, "devices": devices, "device_add": device_add, "twin_get": twin_get,
                                "twin_set": twin_set, "fleet_twin": fleet_twin, "command": command,
                                "readings": readings, "series": series, "me": me, "logout": logout,
                                "node_remove": node_remove, "node_rotate": node_rotate, "stream": stream}
