"""The edge's link to the cloud relay (KubeEdge's EdgeHub): a WebSocket the edge dials out on.

Up: every change of the gateway's state is mirrored into the durable outbox in its own transaction (`outbox_mirror`);
rows go up in offset order, in batches, and a row is deleted only after the relay acknowledges its offset; a new
connection resumes from the first unacknowledged row. Down: each message is applied once, in one transaction (down.py),
then acknowledged by id. The edge keeps working while the link is down; the outbox is bounded by rows and age, and what
the bound drops is counted, never silent.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import trio
from sqlite_utils import Database
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from edgetrio.daemon import store
from edgetrio.edgelink import Acked, Apply, EdgeProtocol, Refused
from edgetrio.wire import MAX_FRAME
from edgetrio.writer import Writer

# (message id, resource, body) -> result: applies one message from the cloud once, in one transaction
ApplyDown = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]
log = logging.getLogger("edgetrio.edgehub")
CONNECT_TIMEOUT = 15.0  # seconds for the whole opening of the link: TCP, TLS and the relay's answer to the upgrade


def outbox_mirror(db: Database, resource: str, body: Any) -> None:
    """Mirror one change to the cloud: an outbox row in the transaction that makes the change."""
    store.outbox_add(db, resource, body, time.time())


def handshake_reason(exc: HandshakeError) -> str:
    """Why the relay did not take the link, in words (trio-websocket's own text is a tuple of headers, or empty)."""
    if isinstance(exc, ConnectionRejected):
        body = (exc.body or b"").decode("utf-8", "replace").strip()[:200]
        if exc.status_code in (401, 403):
            return f"the relay refused this node ({exc.status_code}: {body or 'wrong token'}); check --node-id and the token"
        return f"the relay answered {exc.status_code}" + (f": {body}" if body else "")
    cause = exc.__cause__ or exc.__context__
    return str(exc) or (f"{type(cause).__name__}: {cause}" if cause else type(exc).__name__)


class RelayRefused(Exception):
    """The relay could not use a frame this edge sent; the link starts again from the last acknowledged offset."""


def backoff_delays(base: float = 0.5, cap: float = 30.0) -> Iterator[float]:
    """Exponential backoff with full jitter: 0..base, 0..2*base, ... capped, so a fleet does not reconnect in step."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap, base * 2**attempt))
        attempt += 1


async def ping_every(ws: WebSocketConnection, seconds: float) -> None:
    """Ping the relay; no answer within `seconds` ends the link (TooSlowError), and the hub reconnects."""
    while True:
        await trio.sleep(seconds)
        with trio.fail_after(seconds):
            await ws.ping()


def prune_outbox(db: Database, acked: int, max_rows: int, max_age: float) -> int:
    """Delete what the relay acknowledged, then hold the outbox to its bounds; how many unsent rows that dropped."""
    store.outbox_acknowledged(db, acked)
    return store.outbox_bound(db, max_rows=max_rows, max_age=max_age, now=time.time())


class EdgeHub:
    """The gateway's link to its relay: dials out, sends the outbox (readings and changes, in order, each kept until
    the relay acknowledges it), applies what comes down once, and reconnects with jittered backoff; the gateway works
    the same while it is down."""

    def __init__(self, url: str, node: str, token: str, writer: Writer, apply_down: ApplyDown, *,
                 max_rows: int, max_age: float, keepalive: float = 15.0, cafile: str | None = None) -> None:
        self.url, self.node, self.token = url.rstrip("/") + "/edge", node, token
        self.writer, self.apply_down = writer, apply_down
        self.max_rows, self.max_age, self.keepalive = max_rows, max_age, keepalive
        self.ssl_context = ssl.create_default_context(cafile=cafile) if url.startswith("wss:") else None
        self.connected = False
        self.connects = 0
        self.last_change: float | None = None
        self.last_error: str | None = None
        self.protocol = EdgeProtocol()  # the link's rules (edgelink.py): offsets sent and acknowledged, the window
        self.dropped = 0  # outbox rows its bounds dropped
        self._wakeup = trio.Event()
        self._prune_wakeup = trio.Event()
        self._window_full = False  # the sender waits for an ack before it may send more

    def wake(self) -> None:
        """Something was committed or acknowledged; the sender looks at the outbox again."""
        self._wakeup.set()

    async def _wake_on_commits(self) -> None:
        while True:
            await self.writer.next_commit()
            self.wake()
            self._prune_wakeup.set()  # new rows: the outbox may be over its bounds

    def state(self) -> dict[str, Any]:
        return {"url": self.url, "node": self.node, "connected": self.connected, "connects": self.connects,
                "since": self.last_change, "last_error": self.last_error, "acked_offset": self.protocol.acked,
                "dropped": self.dropped}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up until cancelled, reconnecting with jittered exponential backoff."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._bound_outbox)
            nursery.start_soon(self._wake_on_commits)
            delays = backoff_delays()
            while True:
                try:
                    await self._session()
                    delays = backoff_delays()
                except HandshakeError as exc:
                    await self._down(f"cannot connect to {self.url}: {handshake_reason(exc)}")
                except RelayRefused as exc:
                    await self._down(f"the relay refused a frame ({exc}); resending from offset {self.protocol.acked}")
                except (ConnectionClosed, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                    await self._down(f"link lost: {type(exc).__name__}" + (f" {exc}" if str(exc) else ""))
                except Exception as exc:  # whatever the relay sends must cost the link, never the daemon
                    if self.writer.failure is None:  # a full disk has been reported already, a traceback adds nothing
                        log.exception("cloud link failed")
                    await self._down(f"link error: {type(exc).__name__} {exc}")
                await trio.sleep(next(delays))

    async def _down(self, reason: str) -> None:
        if self.connected or reason != self.last_error:
            log.warning("cloud link down node=%s reason=%s", self.node, reason)
        if self.connected:
            await self._record_link_event(False, reason)
        self.connected = False
        self.last_change = time.time()
        self.last_error = reason

    async def _record_link_event(self, up: bool, reason: str = "") -> None:
        try:
            await self.writer.write(partial(store.record_event, device_id="", kind="cloud_link",
                                            body={"connected": up, "reason": reason}, now=time.time()))
        except Exception as exc:  # a note for the history; a store that cannot write has said so already
            log.debug("link event not recorded: %s", exc)

    async def _session(self) -> None:
        outbox = await self.writer.read(store.outbox_identity)
        headers = [(b"authorization", f"Bearer {self.token}".encode()), (b"x-edgetrio-node", self.node.encode()),
                   (b"x-edgetrio-outbox", outbox.encode())]
        try:
            async with trio.open_nursery() as connection:  # the connection's own reader task lives here
                # the whole opening (TCP, TLS, the upgrade's answer) within one bound: trio-websocket's connect_timeout
                # covers the TCP connect only, and a relay that accepted but never answered the upgrade held the link
                # for good (the outbox grew to 18,746 rows while the relay showed the node online)
                with trio.fail_after(CONNECT_TIMEOUT):
                    ws = await connect_websocket_url(connection, self.url, self.ssl_context, extra_headers=headers,
                                                     max_message_size=MAX_FRAME)
                try:
                    await self._serve_link(ws)
                finally:
                    stopping = trio.current_effective_deadline() == float("-inf")  # cancelled: the gateway stops
                    # a close handshake, bounded, also when cancelled; when the gateway stops, the connection's reader
                    # is cancelled too and cannot take the relay's answer: the close frame goes, nobody waits 5 s for
                    # a reply that cannot be read (a linked gateway took 7 s to stop, an unlinked one 1.6 s)
                    with trio.move_on_after(0.2 if stopping else 5) as closing:
                        closing.shield = True
                        await ws.aclose()
                    connection.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # the link's tasks end together; report the first transport error as the reason
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    async def _serve_link(self, ws: WebSocketConnection) -> None:
        self.connected = True
        self.connects += 1
        self.last_change = time.time()
        self.last_error = None
        log.info("cloud link up node=%s url=%s", self.node, self.url)
        await self._record_link_event(True)
        self.protocol.connected()  # resume from the first row the relay has not confirmed
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_up, ws)
            nursery.start_soon(self._receive, ws)
            nursery.start_soon(ping_every, ws, self.keepalive)

    async def _send_up(self, ws: WebSocketConnection) -> None:
        while True:
            self._wakeup = trio.Event()  # before looking: whatever is committed or acknowledged from now on wakes us
            rows: list[dict[str, Any]] = []
            self._window_full = not self.protocol.window_open()
            if not self._window_full:
                # a read, not a write: the sender is woken by commits and must not wake itself
                rows = await self.writer.read(partial(store.outbox_after, offset=self.protocol.sent,
                                                      limit=self.protocol.batch_rows))
            if not rows:
                await self._wakeup.wait()
                continue
            await ws.send_message(self.protocol.batch(rows))

    async def _receive(self, ws: WebSocketConnection) -> None:
        while True:
            event = self.protocol.receive(await ws.get_message())
            if isinstance(event, Acked):
                if event.advanced:  # deleted from the outbox within a second, in one commit (_bound_outbox)
                    self._prune_wakeup.set()
                    if self._window_full:  # otherwise the sender has nothing new to look at: a wake is a wasted read
                        self.wake()
            elif isinstance(event, Apply):
                try:
                    result = await self.apply_down(event.message_id, event.resource, event.body)
                except Exception as exc:  # what the relay sends must not stop the edge
                    log.exception("could not apply message %s from the relay", event.message_id)
                    result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                await ws.send_message(self.protocol.applied(event, result))
            elif isinstance(event, Refused):
                # Something sent was not taken; batches are pipelined, so the relay may acknowledge later offsets:
                # end the link and resume from the last acknowledged offset rather than risk passing a gap.
                raise RelayRefused(event.reason)
            else:
                log.warning("ignored %s", event.reason)

    async def _bound_outbox(self) -> None:
        """At most once a second, delete what the relay acknowledged and hold the outbox to its bounds.

        Acknowledged rows go in this one commit rather than one commit (an fsync) per ack: a gateway sending 10
        readings a second would otherwise pay two commits per reading. Rows acknowledged but not yet deleted are never
        sent again while the daemon runs (the sender starts after the acknowledged offset); after a crash they go again, and the
        relay keeps each once."""
        deleted_upto = 0
        while True:
            if self.protocol.acked <= deleted_upto:
                await self._prune_wakeup.wait()
            self._prune_wakeup = trio.Event()
            acked = self.protocol.acked

            try:
                dropped = await self.writer.write(partial(prune_outbox, acked=acked, max_rows=self.max_rows,
                                                          max_age=self.max_age))
            except Exception as exc:  # the store cannot write now (a full disk): look again in a second
                log.debug("outbox bounds not applied: %s", exc)
                await trio.sleep(1)
                continue
            deleted_upto = acked
            if dropped:
                self.dropped += dropped
                log.error("outbox over its bounds: dropped %d oldest rows (not sent to the cloud)", dropped)
            await trio.sleep(1)
