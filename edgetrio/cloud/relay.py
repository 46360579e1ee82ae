"""The cloud relay: edges dial in over WebSocket (`/edge`), operators use the HTTP API (`/api/...`), on one port.

One trio process. Each connection starts as HTTP/1.1 (read with h11); an upgrade request for `/edge` is handed, with
the bytes already read, to trio-websocket. An edge authenticates with its node name and token in the handshake; from
then on everything it sends is attributed to that node, so no node can act for another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import h11
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream

from edgetrio import wire
from edgetrio.cloud import database, rollouts, store
from edgetrio.cloud.api import handle_http
from edgetrio.cloud.downqueue import CHANNEL, notify
from edgetrio.cloud.metrics import REGISTRY, RelayCollector, relay_health
from edgetrio.edgelink import Applied, RelayProtocol, Unknown, Unusable, Up
from edgetrio.identity import new_secret, token_digest
from edgetrio.metrics import serve_metrics
from edgetrio.process import run_file_removed, stop_signals, until_stopped, write_run_file
from edgetrio.web import DIGEST, Arrivals, Events, LoginGuard, Unavailable, peer_address
from edgetrio.wire import MAX_FRAME, clip
from edgetrio.writer import Writer, is_postgres, keep_retention, offline_write, open_writer

log = logging.getLogger("edgetrio.relay")
T = TypeVar("T")
OPERATOR_FILE = "operator.json"
RUN_FILE = "relay.json"
MAX_HTTP_BODY = 1024 * 1024


@dataclass
class RelayConfig:
    data_dir: Path
    host: str = "0.0.0.0"
    port: int = 8765
    cert: str | None = None
    key: str | None = None
    retention_days: float = 90.0  # readings and finished commands older than this are deleted hourly; 0 keeps all
    http_timeout: float = 15.0  # for a request's headers, for its whole body, and for an idle keep-alive connection
    metrics_host: str = "127.0.0.1"  # /metrics and /healthz, on a port of their own
    metrics_port: int = 9884  # 0 picks a free one (in the run file), -1 turns them off
    max_devices_per_node: int = 10_000  # devices the relay keeps for one node; what names more is refused, counted
    edge_keepalive: float = 20.0  # seconds between the relay's pings to each edge; no pong within as long ends it
    database: str | None = None  # postgresql://...: replicas share it; None: DATA/relay.db (cloud/database.py)


def operator_token(data_dir: Path) -> str:
    """The operator API token, created on first start (file mode 0600)."""
    path = data_dir / OPERATOR_FILE
    if path.exists():
        try:
            return str(wire.loads(path.read_text())["token"])
        except (ValueError, KeyError, TypeError) as exc:
            raise store.RegistryError(f"{path} is corrupt; delete it to issue a new operator token") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    token = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"token": token}, f)
    return token


class Replay(trio.abc.Stream):
    """A stream that first returns bytes already read, so a handshake read by h11 can be read again by wsproto."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


def peer(stream: trio.abc.Stream) -> str:
    """host:port of the other end of a TCP or TLS stream, for logs."""
    transport = getattr(stream, "transport_stream", stream)
    try:
        host, port = transport.socket.getpeername()[:2]  # type: ignore[union-attr]
    except (AttributeError, OSError):
        return "unknown"
    return f"{host}:{port}"


STORE_AWAY: tuple[type[Exception], ...] = (Unavailable, *database.UNAVAILABLE)  # the database does not answer
CLOSE_WAIT = 2.0  # seconds a replaced link's close handshake may take (a silent peer never answers it)


class EdgeSession:
    """One edge's link: its WebSocket, the epoch this replica holds it at, what was sent down on it, and the scope
    that ends it."""

    def __init__(self, node: str, ws: WebSocketConnection, epoch: int = 0) -> None:
        self.node = node
        self.ws = ws
        self.epoch = epoch
        self.wakeup = trio.Event()
        self.protocol = RelayProtocol()  # the link's rules (edgelink.py): what its frames mean, what it was sent
        self.scope = trio.CancelScope()  # cancelled to end the link from here (token rotated, node removed)

    async def keep_alive(self, every: float, counters: Counter[str], link: trio.CancelScope) -> None:
        """Ping the edge; one that does not answer in time (its host gone without a FIN, a wedged process) is
        disconnected, so it does not show as linked for ever nor hold its socket."""
        while True:
            await trio.sleep(every)
            with trio.move_on_after(every):
                try:
                    await self.ws.ping()
                except ConnectionClosed:  # the link is ending; receiving says so
                    return
                continue
            counters["edge_timeouts"] += 1
            log.warning("edge silent node=%s: no answer to a ping in %g s; disconnecting", self.node, every)
            link.cancel()
            return


def readings_in(item: Any) -> int:
    """How many readings an up item carries (0 for anything else, however malformed: this is only counting)."""
    if not isinstance(item, dict) or item.get("resource") != "readings" or not isinstance(item.get("body"), dict):
        return 0
    readings = item["body"].get("readings")
    return len(readings) if isinstance(readings, list) else 0


async def next_event(conn: h11.Connection, stream: trio.abc.Stream, raw: bytearray | None) -> Any:
    """The next h11 event of the connection, reading as needed; the bytes read are kept in `raw` when given (the
    WebSocket handshake is replayed from them)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = bytes(await stream.receive_some(64 * 1024))
        if raw is not None:
            raw.extend(data)
        conn.receive_data(data)

async def respond(conn: h11.Connection, stream: trio.abc.Stream, status: int, body: Any) -> None:
    """A JSON answer, and the connection closed after it."""
    payload = json.dumps(body).encode()
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
        ("content-type", "application/json"), ("content-length", str(len(payload))), ("connection", "close")])))
    await stream.send_all(conn.send(h11.Data(data=payload)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


def dashboard_events(node: str, items: list[Any]) -> Iterator[dict[str, Any]]:
    """The dashboards' events for a stored batch of an edge (only what is well formed: the batch is stored)."""
    for item in items:
        body = item.get("body") if isinstance(item, dict) else None
        if not isinstance(body, dict):
            continue
        if item.get("resource") == "readings" and isinstance(body.get("readings"), list):
            by_device: dict[Any, list[dict[str, Any]]] = {}  # one event per device and batch
            for r in body["readings"]:
                if isinstance(r, dict) and isinstance(r.get("values"), dict):
                    by_device.setdefault(r.get("device"), []).append({"ts": r.get("ts"), "values": r["values"]})
            for device, readings in by_device.items():
                yield {"type": "readings", "node": node, "device": device, "readings": readings}
        elif item.get("resource") in ("twin", "device", "alert", "ota"):  # ota: a board of a rollout moved on
            yield {"type": item["resource"], "node": node, "device": body.get("device")}
        elif item.get("resource") == "node":  # its report of itself: the fleet page shows the counts
            yield {"type": "node", "node": node}


class Relay:
    """The cloud relay's state in one process: the edges' links (one session per node, pinged), what comes up (stored
    in group commits, then acknowledged) and what goes down (the durable down queue), the HTTP API and dashboard, and
    the guards that keep one client from starving the others."""

    def __init__(self, writer: Writer, token: str, http_timeout: float = 15.0, secure_cookies: bool = False,
                 max_devices_per_node: int = 10_000, edge_keepalive: float = 20.0, replica: str | None = None,
                 shared: bool = False) -> None:
        # this process among the replicas on one database (one, on SQLite); `shared`: others may be on it too, so
        # what the dashboards are told is told to them as well
        self.replica = replica or f"{socket.gethostname()[:32]}-{uuid.uuid4().hex[:8]}"
        self.shared = shared
        self.max_devices_per_node = max_devices_per_node
        self.edge_keepalive = edge_keepalive
        self.writer = writer  # what thousands of edges send at once shares one group commit
        self.token = token
        self.builtin = ("operator", token)  # the operator token: the first admin's, for scripts (no login page)
        self.builtin_login = False
        self.secure_cookies = secure_cookies
        self.events = Events()  # to the dashboards' live streams
        self.logins = LoginGuard()  # bounds what login floods cost
        self.arrivals = Arrivals()  # bounds connections still sending their first request
        self.http_timeout = http_timeout
        self.sessions: dict[str, EdgeSession] = {}
        self.claiming: set[str] = set()  # nodes whose link is being claimed now
        self.counters: Counter[str] = Counter()
        self.command_waiters: dict[str, trio.Event] = {}
        self.down_waiters: dict[str, trio.Event] = {}  # a down message's id -> set when the edge confirms it

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run store work in the next group commit and return its result once committed (web.Unavailable while the
        database does not answer)."""
        try:
            return await self.writer.write(lambda db: fn(db, *args))
        except database.UNAVAILABLE as exc:
            raise Unavailable(clip(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                                   200)) from exc

    async def drive_rollouts(self, every: float = 2.0) -> None:
        """Move the running firmware rollouts on (rollouts.py): start waves, time boards out, halt at the threshold."""
        rounds = 0
        while True:
            try:
                if rounds % int(3600 / every) == 0:  # hourly: bundles no rollout can send any more
                    pruned = await self.run(rollouts.prune_bundles, time.time())
                    if pruned:
                        log.info("removed %d firmware bundles of rollouts that ended a day ago", pruned)
                rounds += 1
                nodes, changed = await self.run(rollouts.drive, time.time())
                for node in nodes:
                    self.notify(node)
                for rollout in changed:
                    self.events.publish({"type": "ota", "node": None, "rollout": rollout})
            except Unavailable as exc:  # the database is away: the next round goes on
                log.warning("driving the rollouts: %s", exc)
            except Exception:  # a bad row must not stop the relay; it is logged each round until fixed
                log.exception("driving the rollouts failed")
            await trio.sleep(every)

    async def keep_replica(self, address: str, every: float = 5.0) -> None:
        """Heartbeat and sweep: end the links of replicas gone silent, let go of links another replica took (a hint
        that was missed), and send what is queued for the links held here (in case its hint was missed)."""
        while True:
            try:
                # only links claimed before the sweep's query: one claimed in the same batch after it is not in it
                linked = list(self.sessions.items())
                offline, held, queued = await self.run(store.replica_seen, self.replica, address, time.time())
                for node in offline:
                    log.warning("node=%s: its replica went silent; marked offline", node)
                    self.events.publish({"type": "node", "node": node, "online": False})
                # rows that say this replica holds a link it does not have: its release failed (the database was away
                # when the link ended), and no other replica would ever end them: the node showed online for good
                stale = [(n, e) for n, e in held.items() if n not in self.sessions and n not in self.claiming]
                for node, epoch in stale:
                    if await self.run(store.release_session, node, self.replica, epoch, time.time()):
                        log.info("node=%s: its link here ended while the database was away; marked offline", node)
                        self.events.publish({"type": "node", "node": node, "online": False})
                for node, session in linked:
                    if self.sessions.get(node) is session and held.get(node) != session.epoch:
                        log.warning("node=%s: its link is held elsewhere now (epoch %s); closing this one", node,
                                    held.get(node))
                        session.scope.cancel()
                for node in queued:
                    self.notify(node)
            except Exception as exc:  # the database is away: the next round tries again
                log.warning("replica heartbeat failed: %s", clip(str(exc), 200))
            await trio.sleep(every)

    def hint(self, payload: str) -> None:
        """A hint from a replica on this database (this one included): what changed, for whoever waits on it here."""
        kind, _, rest = payload.partition(" ")
        if kind == "down":
            self.notify(rest)
        elif kind == "session":  # another replica took an edge's link: this one lets its own go
            node, _, epoch = rest.rpartition(" ")
            session = self.sessions.get(node)
            if session is not None and epoch.isdigit() and session.epoch < int(epoch):
                log.info("node=%s moved to another replica (epoch %s); closing its link here", node, epoch)
                session.scope.cancel()
        elif kind == "close":
            node, _, reason = rest.partition(" ")
            if node in self.sessions:
                log.info("closing the link of node=%s: %s", node, reason)
                self.sessions[node].scope.cancel()
        elif kind in ("cmd", "applied"):
            waiters = self.command_waiters if kind == "cmd" else self.down_waiters
            if rest in waiters:
                waiters[rest].set()
        elif kind == "events":  # what another replica stored, for the dashboards open here
            origin, _, events = rest.partition(" ")
            if origin != self.replica and self.events.streams:
                with contextlib.suppress(ValueError, TypeError):
                    for event in json.loads(events):
                        self.events.publish(event)

    async def linked(self, node: str) -> bool:
        """Whether the node's edge is linked: here, or to another replica of the same database."""
        return node in self.sessions or (self.shared and await self.run(store.is_online, node))

    def wake_all(self) -> None:
        """Every link here looks at its queue again (after hints may have been missed)."""
        for node in list(self.sessions):
            self.notify(node)

    def notify(self, node: str) -> None:
        """Something was queued for a node: its session sends it now if it is connected."""
        session = self.sessions.get(node)
        if session is not None:
            session.wakeup.set()

    async def close_link(self, node: str, reason: str) -> None:
        """End a node's live link (its token changed or it was removed)."""
        session = self.sessions.get(node)
        if session is not None:  # at once: a close handshake could wait on an edge that does not answer
            log.info("closing the link of node=%s: %s", node, reason)
            session.scope.cancel()

    def tell_dashboards(self, node: str, items: list[Any]) -> None:
        """What a stored batch changed, for the open dashboards."""
        if self.events.streams:
            for event in dashboard_events(node, items):
                self.events.publish(event)

    # -- connections -------------------------------------------------------------------------------------------------

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection. Whatever happens on it ends that connection only, never the relay."""
        try:
            await self._handle(stream)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                 ssl.SSLError, OSError) as group:
            log.debug("connection ended: %r", group.exceptions[0])
        except* STORE_AWAY as group:  # the database is away: nothing was acknowledged, the edge resends
            log.warning("connection ended: the database did not answer (%s)",
                        clip(str(group.exceptions[0]).strip().splitlines()[0], 200))
        except* Exception as group:
            self.counters["connection_errors"] += 1
            log.error("connection failed: %r", group.exceptions[0], exc_info=group.exceptions[0])
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        raw = bytearray()
        with self.arrivals.first_request(peer_address(stream)) as admitted:
            if not admitted:
                return
            with trio.move_on_after(self.http_timeout) as timeout:
                event = await next_event(conn, stream, raw)
        if timeout.cancelled_caught or not isinstance(event, h11.Request):
            return
        headers = {k.lower(): v for k, v in event.headers}
        if headers.get(b"upgrade", b"").lower() == b"websocket":
            if event.target.split(b"?")[0] != b"/edge":
                await respond(conn, stream, 404, {"error": "WebSocket endpoint is /edge"})
                return
            async with trio.open_nursery() as nursery:
                request = await wrap_server_stream(nursery, Replay(stream, bytes(raw)), max_message_size=MAX_FRAME)
                await self._edge(request, peer(stream))
                nursery.cancel_scope.cancel()
            return
        await handle_http(self, conn, stream, event, lambda: next_event(conn, stream, None), self.http_timeout)

    # -- edges -------------------------------------------------------------------------------------------------------

    async def _edge(self, request: WebSocketRequest, remote: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        node = headers.get("x-edgetrio-node", "")
        auth = headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not node or not token or not await self.run(store.check_node, node, token):
            self.counters["edge_refused"] += 1
            log.warning("edge refused node=%s remote=%s", clip(node), remote)
            await request.reject(401, body=b"unknown node or wrong token")
            return
        if await self.run(store.link_outbox, node, headers.get("x-edgetrio-outbox", "")):
            log.warning("edge node=%s sends from a new outbox (its gateway installed anew?): its offsets start again",
                        node)
        ws = await request.accept()
        self.claiming.add(node)  # the sweep must not take the claim's row for a stale one before the session is here
        try:
            session = EdgeSession(node, ws, await self.run(store.claim_session, node, self.replica, remote, time.time()))
        finally:
            self.claiming.discard(node)
        previous = self.sessions.get(node)
        self.sessions[node] = session
        if previous is not None:  # the edge reconnected before its old connection timed out
            previous.scope.cancel()  # its tasks end now; its close handshake gets a moment, not the new link's time
            with trio.move_on_after(CLOSE_WAIT):
                await previous.ws.aclose(1000, "replaced by a new connection")
        self.events.publish({"type": "node", "node": node, "online": True})
        log.info("edge connected node=%s remote=%s", node, remote)
        try:
            with session.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_down, session)
                    nursery.start_soon(session.keep_alive, self.edge_keepalive, self.counters, nursery.cancel_scope)
                    await self._receive_up(session)
                    nursery.cancel_scope.cancel()
        finally:
            if self.sessions.get(node) is session:
                del self.sessions[node]
                released = False
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):  # the database may be away
                    released = await self.run(store.release_session, node, self.replica, session.epoch, time.time())
                if released:
                    self.events.publish({"type": "node", "node": node, "online": False})
                log.info("edge disconnected node=%s", node)

    async def _refuse(self, session: EdgeSession, unusable: Unusable) -> None:
        """Answer a frame that may have carried readings this relay could not take, and end the link (edgelink.py:
        the edge resends from the last offset acknowledged)."""
        self.counters["malformed_frames"] += 1
        log.warning("unusable frame from node=%s: %s", session.node, clip(unusable.reason))
        await session.ws.send_message(session.protocol.refusal(unusable))
        await session.ws.aclose(1007, "unusable frame")

    async def held(self, session: EdgeSession, fn: Callable[..., T], *args: Any) -> T:
        """Store work for an edge, in one transaction with the check that this replica still holds its link."""
        def work(db: Any) -> T:
            store.hold_session(db, session.node, self.replica, session.epoch)
            return fn(db, *args)
        return await self.writer.write(work)

    async def _receive_up(self, session: EdgeSession) -> None:
        try:
            await self._receive(session)
        except store.Fenced as exc:  # the edge is linked elsewhere now: what it sends here is not this one's to store
            self.counters["links_fenced"] += 1
            log.warning("fenced: %s; closing this link", exc)
            with trio.move_on_after(CLOSE_WAIT):
                await session.ws.aclose(1012, "linked to another relay replica")

    async def _receive(self, session: EdgeSession) -> None:
        while True:
            event = session.protocol.receive(await session.ws.get_message())
            if isinstance(event, Unusable):
                await self._refuse(session, event)
                return
            if isinstance(event, Up):
                items = event.items
                offset, finished, skipped, over_cap = await self.held(session, self._store_up, session.node, items,
                                                                      time.time())
                if over_cap:  # counted and logged; the edge is acknowledged (resending would not make room)
                    self.counters["devices_refused"] += len(over_cap)
                    log.warning("node=%s: %d devices refused, over its cap of %d devices (%s ...)", session.node,
                                len(over_cap), self.max_devices_per_node, wire.clip(", ".join(sorted(over_cap)[:5]), 120))
                self.counters["batches_stored"] += 1
                self.tell_dashboards(session.node, items)
                self.counters["readings_received"] += sum(readings_in(item) for item in items)
                if skipped:
                    self.counters["items_skipped"] += skipped
                    log.warning("node=%s sent %d items this relay cannot use", session.node, skipped)
                await session.ws.send_message(session.protocol.ack(offset, event))
                for cmd_id in finished:
                    waiter = self.command_waiters.get(cmd_id)
                    if waiter is not None:
                        waiter.set()
            elif isinstance(event, Applied):
                refused = await self.held(session, store.down_applied, session.node, event.parent, event.result)
                if event.parent in self.down_waiters:
                    self.down_waiters[event.parent].set()
                if refused and refused in self.command_waiters:
                    self.command_waiters[refused].set()
            elif isinstance(event, Unknown):
                self.counters["malformed_frames"] += 1
                await session.ws.send_message(session.protocol.unknown(event))

    def _store_up(self, db: Any, node: str, items: list[Any], now: float) -> tuple[int, list[str], int, set[str]]:
        """Store a batch; on a shared database, tell the other replicas' dashboards what it changed (at commit)."""
        done = store.apply_up(db, node, items, now, self.max_devices_per_node)
        if self.shared:  # one hint per batch, all its events; past NOTIFY's size, the dashboards refresh the node
            text = json.dumps(list(dashboard_events(node, items)))
            notify(db, f"events {self.replica} {text if len(text) < 7000 else json.dumps([{'type': 'node', 'node': node}])}")
        return done

    async def _send_down(self, session: EdgeSession) -> None:
        """Send what is queued for the node, in order, until the edge confirms each one (resent on reconnect)."""
        while True:
            session.wakeup = trio.Event()
            for frame in session.protocol.to_send(await self.run(store.pending_down, session.node)):
                await session.ws.send_message(frame)
            await session.wakeup.wait()


async def listen_hints(url: str, on_hint: Callable[[str], None], on_connect: Callable[[], None]) -> None:
    """The replicas' hints (PostgreSQL LISTEN), on a connection of its own in a worker thread (psycopg's async mode is
    asyncio's). A lost connection is opened again; on each (re)connect `on_connect` runs: hints sent meanwhile are lost,
    so what they would have said is looked up."""
    import psycopg
    stop = threading.Event()

    def listen() -> None:
        conn, failing = None, False
        while not stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(url, autocommit=True, connect_timeout=5, application_name="edgetrio-hints")
                    conn.execute(f"LISTEN {CHANNEL}")
                    if failing:
                        log.info("hints from the other replicas: listening again")
                    failing = False
                    trio.from_thread.run_sync(on_connect)
                for hint in conn.notifies(timeout=1.0):
                    trio.from_thread.run_sync(on_hint, hint.payload)
            except psycopg.Error as exc:
                reason = clip(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, 200)
                (log.debug if failing else log.warning)("hints from the other replicas: %s; listening again each second "
                                                        "(the sweep covers what they would say)", reason)
                failing = True
                with contextlib.suppress(Exception):
                    conn.close()  # type: ignore[union-attr]
                conn = None
                stop.wait(1.0)
            except (trio.RunFinishedError, trio.Cancelled):
                break
        if conn is not None:
            conn.close()

    try:
        await trio.to_thread.run_sync(listen, abandon_on_cancel=True)
    finally:
        stop.set()


async def serve(cfg: RelayConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve edges and operators until SIGINT/SIGTERM. Reports the bound port once listening."""
    url = database.database_url(cfg.data_dir, cfg.database)
    db = store.open_db(cfg.data_dir, url)
    shared = is_postgres(db)
    token = operator_token(cfg.data_dir)
    if shared:  # every replica answers to the same operator token: the first one's
        with offline_write(db):
            digest = store.shared_operator_digest(db, token)
        if digest != token_digest(token):
            log.warning("%s is not the operator token of the relays on this database: this relay accepts theirs "
                        "(the first replica's); copy that replica's %s here for the CLI on this machine",
                        cfg.data_dir / OPERATOR_FILE, OPERATOR_FILE)
        token = DIGEST + digest
    listeners: list[Any] = list(await trio.open_tcp_listeners(cfg.port, host=cfg.host))
    if cfg.cert and cfg.key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.cert, cfg.key)
        listeners = [trio.SSLListener(listener, context, https_compatible=True) for listener in listeners]
    port = listeners[0].socket.getsockname()[1] if not cfg.cert else listeners[0].transport_listener.socket.getsockname()[1]
    scheme = "wss" if cfg.cert else "ws"
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    run_file = cfg.data_dir / RUN_FILE
    with stop_signals() as signals, run_file_removed(run_file):
        # leaving open_writer commits what was received, then stops the writer
        async with open_writer(db, max_batch=1024, queue_size=4096) as writer:
            relay = Relay(writer, token, cfg.http_timeout, secure_cookies=bool(cfg.cert),
                          max_devices_per_node=cfg.max_devices_per_node, edge_keepalive=cfg.edge_keepalive,
                          shared=shared)
            address = f"{socket.gethostname()}:{port}"
            # links of a run that ended (even by kill -9) are gone: on SQLite at once, on PostgreSQL when the sweep
            # finds that run's replica silent
            await relay.run(store.start_replica, relay.replica, address, time.time())
            gauges = RelayCollector(relay, trio.lowlevel.current_trio_token())
            async with trio.open_nursery() as connections, serve_metrics(
                    cfg.metrics_host, cfg.metrics_port, REGISTRY, gauges, partial(relay_health, relay)) as metrics:
                write_run_file(run_file, {"port": port, "edge_url": f"{scheme}://{host}:{port}",
                                          "api_url": f"{'https' if cfg.cert else 'http'}://{host}:{port}",
                                          "metrics": metrics})
                log.info("relay ready data_dir=%s port=%d metrics=%s database=%s replica=%s", cfg.data_dir, port,
                         metrics or "off", database.redact(url) if url else cfg.data_dir / database.DB_FILE,
                         relay.replica)
                connections.start_soon(trio.serve_listeners, relay.handle_connection, listeners)
                connections.start_soon(keep_retention, writer, store.prune, cfg.retention_days)
                connections.start_soon(relay.drive_rollouts)
                # replicas beat every 5 s; a lone SQLite relay only sweeps, each minute (no needless fsyncs)
                connections.start_soon(relay.keep_replica, address, 5.0 if shared else 60.0)
                if shared and url:
                    connections.start_soon(listen_hints, url, relay.hint, relay.wake_all)
                task_status.started(port)
                await until_stopped(signals)
                connections.cancel_scope.cancel()
