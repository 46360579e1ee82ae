"""What the relay's and the gateway's web sides share: HTTP/1.1 on h11 (requests in a keep-alive loop, replies with
reason phrases, streamed responses), the dashboard's files, login with session cookies and CSRF tokens, bearer
tokens, roles, the live event streams, and readings as CSV.

Who may do what: the server's own admin secret (the relay's operator token, the gateway's admin credential) and admin
accounts change things, viewer accounts only look. Scripts send a bearer token; the dashboard logs in and gets a
session cookie (HttpOnly, SameSite=Strict), and its writes must carry the session's CSRF token in `x-csrf-token`.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import hmac
import io
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from edgetrio import accounts, wire
from edgetrio.console import parse_since
from edgetrio.identity import RegistryError, token_digest, verify_password
from edgetrio.twin import VersionConflict

log = logging.getLogger("edgetrio.web")
T = TypeVar("T")

MAX_BODY = 1024 * 1024
SESSION_COOKIE = "edgetrio_session"
SESSION_HOURS = 12.0
STREAM_QUEUE = 256  # events waiting for one dashboard stream; a reader further behind loses its stream (it reconnects)
STREAM_BYTES = 1024 * 1024  # ... and bytes: what an unread stream may hold in this process
HEARTBEAT = 15.0  # seconds between keep-alive comments on an idle stream (and how a gone client is noticed)
STREAMS_PER_ACCOUNT = 8  # open event streams of one account (a page has one; a few tabs)
STREAMS_TOTAL = 256  # open event streams of everyone together: each costs a task, a socket and work on every event
STREAM_SEND_TIMEOUT = 30.0  # a client that takes no bytes for this long loses its stream (and its socket)
LOGIN_CHECKS_AT_ONCE = 2  # password checks (scrypt, 32 MiB each) running together; more logins wait their turn
LOGIN_FAILURES = 10  # failed logins a minute per source address, and per account name, before 429
LOGIN_CHECKS_WAITING = 16  # logins waiting for a password check; more get 503 at once
LOGIN_TARPIT = 1.0  # seconds a 429 for a login waits: a flood's clients wait instead of spinning (and the server idles)
LOGIN_TARPIT_HELD = 256  # 429s waiting at once; past that they are answered at once (each holds a socket)
READINGS_LIMIT = 10_000  # readings one request returns at most, the newest (older ones page by `until`)
KDF_NICE = 10  # the password checks' threads run at this niceness: a flood of logins yields the CPU to ingest
WAITING_TOTAL = 128  # connections still sending their first request; beyond, a new one is closed at once
WAITING_PER_ADDRESS = 32  # ... of them from one address
PEER: contextvars.ContextVar[str] = contextvars.ContextVar("peer", default="")  # the connection's source address
WEB = Path(__file__).parent / "webui"  # the dashboard's files, served by the relay and the gateway
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8", "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
          "vendor/uPlot.min.css": "text/css; charset=utf-8", "vendor/uPlot.LICENSE": "text/plain; charset=utf-8"}
RANGES = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}
log = logging.getLogger("edgetrio.api")


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
    release: Callable[[], None] | None = None  # called once the response has ended, however it ended


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


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
    not a wake-up per reading (measured in tools/bench/bench_dashboard.py).

    Streams are bounded per account and in total (429 beyond), and a stream whose reader falls STREAM_QUEUE events
    behind is closed (the page reconnects and reloads): publishing never waits, so no reader can hold up ingest."""

    def __init__(self, per_account: int = STREAMS_PER_ACCOUNT, total: int = STREAMS_TOTAL) -> None:
        self.streams: dict[trio.MemorySendChannel[bytes], Interest] = {}
        self.owners: dict[trio.MemorySendChannel[bytes], str] = {}
        self.held: dict[trio.MemorySendChannel[bytes], int] = {}  # bytes queued for each stream, not sent yet
        self.per_account = per_account
        self.total = total
        self.missed = 0  # events a slow stream did not get (it was closed)
        self.closed_slow = 0
        self.refused = 0

    def publish(self, event: dict[str, Any]) -> None:
        frame = b""  # encoded once, for every stream that wants it
        for stream, interest in list(self.streams.items()):
            if interest.wants(event):
                frame = frame or f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
                try:
                    if self.held[stream] + len(frame) > STREAM_BYTES:
                        raise trio.WouldBlock
                    stream.send_nowait(frame)
                    self.held[stream] += len(frame)
                except trio.WouldBlock:  # a reader this far behind: it loses its stream, not ingest its time
                    self.missed += 1
                    self.closed_slow += 1
                    self.close(stream)

    def open(self, interest: Interest,
             owner: str) -> tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]]:
        """A new stream for `owner` (an account); HTTPError 429 when the account or the server has too many."""
        # owners holds every stream until its response has ended (released), also one closed for falling behind
        # whose socket is still draining: a reader that trickles cannot open more by being closed
        mine = sum(1 for o in self.owners.values() if o == owner)
        if mine >= self.per_account or len(self.owners) >= self.total:
            self.refused += 1
            limit = (f"{self.per_account} per account" if mine >= self.per_account
                     else f"{self.total} on this server")
            raise HTTPError(429, f"too many open event streams ({limit}): close other dashboard tabs",
                            [("retry-after", "10")])
        send, receive = trio.open_memory_channel[bytes](STREAM_QUEUE)
        self.streams[send] = interest
        self.owners[send] = owner
        self.held[send] = 0
        return send, receive

    def taken(self, stream: trio.MemorySendChannel[bytes], size: int) -> None:
        """The stream's reader took a frame off its queue."""
        if stream in self.held:
            self.held[stream] -= size

    def close(self, stream: trio.MemorySendChannel[bytes]) -> None:
        """End a stream: its reader gets what is queued, then the end. Its slot is free once released."""
        self.streams.pop(stream, None)
        self.held.pop(stream, None)
        stream.close()

    def release(self, stream: trio.MemorySendChannel[bytes]) -> None:
        """The stream's response has ended: its slot is free."""
        self.close(stream)
        self.owners.pop(stream, None)


class Arrivals:
    """Bounds connections that have not sent a whole first request yet, in all and per address: a client that sends
    headers a byte at a time (slowloris) and reconnects held 1,100 sockets, and at a 1,024 descriptor limit the store
    could no longer open its files. Refusals are closed at once, counted, and logged once a minute."""

    def __init__(self, total: int = WAITING_TOTAL, per_address: int = WAITING_PER_ADDRESS) -> None:
        self.total, self.per_address = total, per_address
        self.waiting: Counter[str] = Counter()
        self.refused = 0
        self.logged_at = 0.0

    @contextlib.contextmanager
    def first_request(self, address: str) -> Iterator[bool]:
        """Whether this connection may wait for its first request; it counts as waiting for the block."""
        if sum(self.waiting.values()) >= self.total or self.waiting[address] >= self.per_address:
            self.refused += 1
            now = time.monotonic()
            if now - self.logged_at >= 60:
                self.logged_at = now
                log.warning("connections refused: %d still sending a first request (%d from %s); %d refused so far",
                            sum(self.waiting.values()), self.waiting[address], address or "?", self.refused)
            yield False
            return
        self.waiting[address] += 1
        try:
            yield True
        finally:
            self.waiting[address] -= 1
            if not self.waiting[address]:
                del self.waiting[address]


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), KDF_NICE)


class LoginGuard:
    """What login tries may cost: at most LOGIN_CHECKS_AT_ONCE password checks at a time (each scrypt takes 32 MiB),
    and per source address and per account name at most LOGIN_FAILURES failures a minute, then 429 with Retry-After
    (the built-in admin name too, which needs no KDF). Refusals are logged once a minute with counts, not per try."""

    WINDOW = 60.0

    def __init__(self) -> None:
        self.checks = trio.CapacityLimiter(LOGIN_CHECKS_AT_ONCE)
        self.held = 0  # 429s waiting out LOGIN_TARPIT
        # threads of their own, niced (on Linux a thread's niceness is its own): trio's worker threads, which the
        # store's reads also use, keep theirs
        self.kdf = ThreadPoolExecutor(LOGIN_CHECKS_AT_ONCE, "kdf", initializer=_lower_priority)
        self.failures: dict[str, list[float]] = {}
        self.refused: Counter[str] = Counter()  # since the last log line: names and addresses refused
        self.logged_at = 0.0

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self.failures.get(key, []) if now - t < self.WINDOW]
        if times:
            self.failures[key] = times
        else:
            self.failures.pop(key, None)
        return times

    def admit(self, name: str, peer: str) -> float:
        """Raise 429 while this address or this name has failed too often lately; else count this try as a failure
        now, before the password is checked (`succeeded` takes it back): tries sent at once cannot all pass."""
        now = time.monotonic()
        for key in (f"address {peer}", f"name {name[:64]}"):
            recent = self._recent(key, now)
            if len(recent) >= LOGIN_FAILURES:
                self.note(key, now)
                wait = max(1, int(self.WINDOW - (now - recent[0])) + 1)
                raise HTTPError(429, f"too many failed logins from this {key.split()[0]}: try again in {wait} s",
                                [("retry-after", str(wait))])
        if len(self.failures) > 10_000:  # unbounded names and addresses must not grow this without end
            for key in list(self.failures):
                self._recent(key, now)
        for key in (f"address {peer}", f"name {name[:64]}"):
            self.failures.setdefault(key, []).append(now)
        return now

    async def slow_down(self) -> None:
        """Hold a refused login's answer a moment, unless too many are held already."""
        if self.held >= LOGIN_TARPIT_HELD:
            return
        self.held += 1
        try:
            await trio.sleep(LOGIN_TARPIT)
        finally:
            self.held -= 1

    async def check(self, password: str, stored: str | None) -> bool:
        """The password against its stored hash (as long for no hash), a few at a time, on the niced threads; with
        LOGIN_CHECKS_WAITING waiting already, 503 at once (tries from many addresses queued without end, and a right
        password waited 27 s behind them)."""
        if self.checks.statistics().tasks_waiting >= LOGIN_CHECKS_WAITING:
            raise HTTPError(503, "too many logins are being checked: try again in a few seconds",
                            [("retry-after", "5")])
        async with self.checks:
            job = self.kdf.submit(verify_password, password, stored)
            return await trio.to_thread.run_sync(job.result)

    def succeeded(self, name: str, peer: str, at: float) -> None:
        for key in (f"address {peer}", f"name {name[:64]}"):
            with contextlib.suppress(KeyError, ValueError):
                self.failures[key].remove(at)

    def failed(self, name: str) -> None:
        self.note(f"name {name[:64]}", time.monotonic())

    def note(self, key: str, now: float) -> None:
        self.refused[key] += 1
        if now - self.logged_at >= self.WINDOW:
            self.logged_at = now
            total = sum(self.refused.values())
            top = ", ".join(f"{k} x{n}" for k, n in self.refused.most_common(3))
            log.warning("logins refused: %d in the last minute (%s)", total, wire.clip(top, 200))
            self.refused.clear()


DIGEST = "digest:"  # a built-in secret given as "digest:" + identity.token_digest(secret)


class Unavailable(Exception):
    """The store does not answer now (its database restarting, say): 503, try again."""


class Site(Protocol):
    """What the shared web side needs of a server (the relay, the gateway daemon)."""

    counters: Counter[str]  # requests by status among them
    events: Events
    secure_cookies: bool  # served over TLS: cookies get the Secure flag
    builtin: tuple[str, str]  # the built-in admin: (name, secret); the secret works as a bearer token
    builtin_login: bool  # ... and as that name's password on the login page
    logins: LoginGuard

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...


Params = dict[str, str]
Body = dict[str, Any]
Result = tuple[int, Any]
NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # a node or device id in a path (identity.DEVICE_ID's characters)


@dataclass(frozen=True)
class Route:
    """An endpoint: GET /api/nodes/{node}/devices/{device}/twin -> handler(site, who, path, query, body)."""

    method: str
    template: str
    handler: Callable[..., Awaitable[Result]]
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        names = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m.group(1)}>{NAME})", self.template)
        object.__setattr__(self, "pattern", re.compile(names))


Routes = list[Route]


async def dispatch(site: Site, routes: Routes, request: h11.Request, body: bytes) -> Result:
    """Serve the dashboard's files and login to anyone; everything else to who may: a viewer only reads, and a write
    with a session cookie must carry the session's CSRF token. Errors become one-line JSON answers."""
    target = urlsplit(request.target.decode("latin-1"))
    method = request.method.decode()
    if method == "GET" and (target.path == "/" or target.path.startswith("/static/")):
        return static_file(target.path)
    headers = {k.lower().decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
    if target.path == "/api/login" and method != "POST":
        raise HTTPError(405, f"{method} is not allowed on /api/login", [("allow", "POST")])
    if target.path == "/api/login" and method == "POST":
        # JSON only: a foreign page can post a form or text/plain without asking, never application/json
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise HTTPError(415, "log in with a JSON body (content-type: application/json)")
        return await login(site, parse_body(body))
    principal = await authenticate(site, headers)
    writes = method not in ("GET", "HEAD") and target.path != "/api/logout"
    if writes and principal.role != "admin":
        raise HTTPError(403, f"{principal.name} is a viewer: viewers cannot change anything")
    if method not in ("GET", "HEAD") and principal.via == "cookie" and not hmac.compare_digest(
            headers.get("x-csrf-token", "").encode(), principal.csrf.encode()):
        raise HTTPError(403, "missing or wrong CSRF token (x-csrf-token)")
    for route in routes:
        match = route.pattern.fullmatch(target.path)
        if match and route.method == method:
            query = {k: v[-1] for k, v in parse_qs(target.query).items()}
            data = parse_body(body)
            try:
                return await route.handler(site, principal, match.groupdict(), query, data)
            except accounts.NotFound as exc:
                raise HTTPError(404, str(exc)) from exc
            except VersionConflict as exc:
                raise HTTPError(409, str(exc)) from exc
            except Unavailable as exc:
                raise HTTPError(503, f"the store does not answer now: {exc}; try again") from exc
            except (RegistryError, KeyError, TypeError, ValueError) as exc:
                raise HTTPError(400, str(exc) or f"bad request: {type(exc).__name__}") from exc
            except (HTTPError, trio.Cancelled):
                raise
            except Exception as exc:
                log.exception("request %s %s failed", method, target.path)
                raise HTTPError(500, f"internal error: {type(exc).__name__}") from exc
    allowed = sorted({route.method for route in routes if route.pattern.fullmatch(target.path)})
    if allowed:  # RFC 9110: a 405 says which methods the resource has
        raise HTTPError(405, f"{method} is not allowed on {target.path}", [("allow", ", ".join(allowed))])
    raise HTTPError(404, f"no such endpoint {target.path}")


def readings_query(query: Params) -> tuple[float | None, float | None, int]:
    """`since` and `until` (as the CLI takes them: epoch seconds, an ISO time, or an age such as 10m) and `limit`."""
    try:
        since = parse_since(query["since"]) if "since" in query else None
        until = parse_since(query["until"]) if "until" in query else None
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    limit = READINGS_LIMIT  # one answer is built in memory: without a bound a year of readings would be
    if "limit" in query:
        # ASCII digits only, and few: "٣".isdigit() is true, and int() of 5,000 digits raises
        if not re.fullmatch(r"[0-9]{1,6}", query["limit"]) or not 1 <= int(query["limit"]) <= READINGS_LIMIT:
            raise HTTPError(400, f"limit {wire.clip(query['limit'], 40)!r}: use a whole number from 1 to "
                                 f"{READINGS_LIMIT} (older ones: until= the oldest time you got)")
        limit = int(query["limit"])
    return since, until, limit


def series_query(query: Params) -> tuple[float, int]:
    """The span in seconds (`range` 1h, 24h or 7d) and the most `points` a series may have."""
    span = RANGES.get(query.get("range", "1h"))
    if span is None:
        raise HTTPError(400, f"range {wire.clip(query.get('range', ''), 20)!r}: use {', '.join(RANGES)}")
    points = query.get("points", "600")
    if not points.isdigit() or not 10 <= int(points) <= 5000:
        raise HTTPError(400, "points: a whole number from 10 to 5000")
    return span, int(points)


def event_stream(site: Site, query: Params, owner: str) -> Reply:
    """Server-sent events: what the server stores as it stores it (`node`, `device`, `kinds` narrow it down).
    429 when the account or the server has too many streams open; the stream ends when its reader falls behind."""
    kinds = frozenset(k for k in query.get("kinds", "").split(",") if k)
    interest = Interest(query.get("node") or None, query.get("device") or None, kinds)
    send, receive = site.events.open(interest, owner)

    async def events() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        while True:
            frame = b": idle\n\n"
            with trio.move_on_after(HEARTBEAT):
                try:
                    frame = await receive.receive()
                    site.events.taken(send, len(frame))
                except trio.EndOfChannel:  # closed for falling behind: the page reconnects and reloads
                    return
            yield frame
    return Reply(200, content_type="text/event-stream", headers=[("cache-control", "no-store")], stream=events(),
                 release=partial(site.events.release, send))


async def me(site: Site, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, {"name": who.name, "role": who.role, "via": who.via, "csrf": who.csrf or None}


async def logout(site: Site, who: Principal, path: Params, query: Params, data: Body) -> Result:
    if who.via == "cookie":
        await site.run(accounts.end_session, who.key)
    return 200, Reply(200, b'{"ok": true}', headers=[
        ("set-cookie", f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")])


async def stream(site: Site, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, event_stream(site, query, who.name)


ACCOUNT_ROUTES: Routes = [
    Route("GET", "/api/me", me),
    Route("POST", "/api/logout", logout),
    Route("GET", "/api/stream", stream),
]


class BodyBytes:
    """Bytes of request bodies received and not yet handled, in this process: bodies arriving a byte at a time on
    many connections held 150 MB (the connection bound covers only a request's head)."""

    held = 0


BODIES = BodyBytes()
BODIES_HELD = 32 << 20  # past this, a body that arrives is answered 503 and its connection closed


async def serve_requests(site: Site, route: Callable[[h11.Request, bytes], Awaitable[tuple[int, Any]]],
                         conn: h11.Connection, stream: trio.abc.Stream, first: Any,
                         next_event: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> None:
    """Serve requests on one connection (keep-alive) until the client closes it, or takes longer than `timeout`
    to send a whole body or, idle, its next request."""
    PEER.set(peer_address(stream))
    event = first
    while isinstance(event, h11.Request):
        body = bytearray()
        too_large = busy = False
        part: Any = None  # nothing at all within the timeout: the connection ends
        try:
            with trio.move_on_after(timeout):  # for the whole body: a byte now and then must not hold the connection
                while True:
                    part = await next_event()
                    if isinstance(part, h11.Data):
                        if len(body) + len(part.data) > MAX_BODY:
                            too_large = True
                        elif busy or BODIES.held + len(part.data) > BODIES_HELD:
                            busy = True  # read to its end and dropped (an answer before it would be reset), then 503
                        else:
                            body.extend(part.data)
                            BODIES.held += len(part.data)
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
            if not isinstance(part, h11.EndOfMessage):
                return
            extra: list[tuple[str, str]] = []
            try:
                if busy:
                    raise HTTPError(503, "the server is receiving too many request bodies at once: try again",
                                    [("retry-after", "5")])
                if too_large:
                    raise HTTPError(413, f"request body over {MAX_BODY} bytes")
                status, payload = await route(event, bytes(body))
            except HTTPError as exc:
                status, payload, extra = exc.status, {"error": str(exc)}, exc.headers
        finally:
            BODIES.held -= len(body)
        site.counters[f"api_{status}"] += 1
        reply = payload if isinstance(payload, Reply) else Reply(status, json.dumps(payload).encode())
        headers = [("content-type", reply.content_type), *SECURITY_HEADERS, *reply.headers, *extra]
        if reply.stream is None:
            headers.append(("content-length", str(len(reply.body))))
        try:
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers,
                                                         reason=HTTPStatus(status).phrase.encode())))
            if reply.stream is not None:  # until the client goes away, takes nothing for a while, or the server stops
                async with contextlib.aclosing(reply.stream) as chunks:  # type: ignore[type-var]
                    async for chunk in chunks:
                        with trio.move_on_after(STREAM_SEND_TIMEOUT) as stuck:
                            await stream.send_all(conn.send(h11.Data(data=chunk)))
                        if stuck.cancelled_caught:  # a reader that reads nothing holds a socket and memory
                            return
                return
        finally:
            if reply.release is not None:
                reply.release()
        await stream.send_all(conn.send(h11.Data(data=reply.body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()
        event = None
        with trio.move_on_after(timeout):
            event = await next_event()


# Every answer: the pages load their scripts and styles from this server only, and may not be framed by another site
SECURITY_HEADERS = [
    ("content-security-policy", "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    ("x-frame-options", "DENY"), ("x-content-type-options", "nosniff"), ("referrer-policy", "same-origin")]


def peer_address(stream: trio.abc.Stream) -> str:
    """The client's address (through TLS too); "" when the stream is not a socket."""
    inner: Any = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else ""
    except OSError:
        return ""


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


async def authenticate(site: Site, headers: dict[str, str]) -> Principal:
    """Who sends this request: a bearer token (the admin credential or an API token), or a session cookie."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        token = auth[7:].strip()
        name, secret = site.builtin
        if secret.startswith(DIGEST):  # known by its digest only (relay replicas keep no token in their database)
            given, secret = token_digest(token), secret[len(DIGEST):]
        else:
            given = token
        if hmac.compare_digest(given.encode(), secret.encode()):
            return Principal(name, "admin", "token")  # the server's own admin secret: the first admin's
        user = await site.run(accounts.token_user, token)
        if user is None:
            raise HTTPError(401, "unknown or revoked token")
        return Principal(user["name"], user["role"], "token")
    key = cookies(headers).get(SESSION_COOKIE)
    if key:
        session = await site.run(accounts.session_user, key, time.time())
        if session is None:
            raise HTTPError(401, "session expired: log in again")
        return Principal(session["name"], session["role"], "cookie", session["csrf"], key)
    raise HTTPError(401, "log in, or send a bearer token")


async def login(site: Site, data: dict[str, Any]) -> tuple[int, Reply]:
    """Check a name and password (through the login guard's tarpit and KDF limit) and open a session."""
    name, password = data.get("name"), data.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        raise HTTPError(400, "send 'name' and 'password'")
    if len(password) > 1024 or len(name) > 256:  # a megabyte password costs the KDF a megabyte to hash
        raise HTTPError(400, "name or password too long")
    peer = PEER.get()
    try:
        tried = site.logins.admit(name, peer)
    except HTTPError:
        await site.logins.slow_down()
        raise
    builtin, secret = site.builtin
    if name == builtin and site.builtin_login:  # the gateway's admin credential logs in as its local user
        user: dict[str, Any] | None = {"name": builtin, "role": "admin"}
        ok = hmac.compare_digest(password.encode(), secret.encode())
    else:
        user = await site.run(accounts.get_user, name)
        # the slow KDF runs beside the loop, a few at a time, and as long for an unknown name as for a known one
        ok = await site.logins.check(password, user["password_hash"] if user else None)
    if user is None or not ok:
        site.counters["login_refused"] += 1
        site.logins.failed(name)
        raise HTTPError(401, "wrong name or password")
    site.logins.succeeded(name, peer, tried)
    key, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(18)
    await site.run(accounts.start_session, user["name"], user["role"], key, csrf, time.time() + SESSION_HOURS * 3600)
    cookie = (f"{SESSION_COOKIE}={key}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(SESSION_HOURS * 3600)}"
              + ("; Secure" if site.secure_cookies else ""))
    body = json.dumps({"name": user["name"], "role": user["role"], "csrf": csrf}).encode()
    return 200, Reply(200, body, headers=[("set-cookie", cookie), ("cache-control", "no-store")])


def readings_csv_text(rows: list[dict[str, Any]]) -> str:
    """Readings as CSV: a column per resource; a time marked as its arrival (the board's clock was not set) says so."""
    keys = sorted({k for r in rows for k in r["values"]})
    out = io.StringIO()
    table = csv.writer(out)
    table.writerow(["time_utc", "ts", "ts_arrival", "boot", "seq", *keys])
    for r in rows:
        when = datetime.fromtimestamp(r["ts"], UTC).isoformat(timespec="milliseconds") if r["ts"] else ""
        table.writerow([when, r["ts"], "true" if r.get("ts_arrival") else "", r["boot"], r["seq"],
                        *(json.dumps(v) if isinstance(v := r["values"].get(k, ""), bool) else v for k in keys)])
    return out.getvalue()


def readings_csv(device: str, rows: list[dict[str, Any]]) -> Reply:
    return Reply(200, readings_csv_text(rows).encode(), "text/csv; charset=utf-8",
                 [("content-disposition", f'attachment; filename="{device}.csv"')])
