"""The embedded amqtt broker: the gateway's event bus.

amqtt is asyncio-only, so it runs on its own event loop in one dedicated thread (measured in shared/notes to be close to
standalone speed; trio-asyncio was 3-4x costlier). This is the only module that touches asyncio. Messages cross to trio
in batches: the broker thread appends to a deque and wakes trio once when the deque turns non-empty.

amqtt 0.12.1 defects worked around here (see shared/notes/amqtt-under-trio.md):
- retained messages are sent to any subscriber without an ACL check, so this broker keeps none;
- a client publishing to a `$` topic (or a wildcard topic) was left as a zombie, so such a client is disconnected;
- a second connection with the same client id did not close the first, so the first is closed (MQTT-3.1.4-2);
- a broadcast iterating the subscriptions failed with "dictionary changed size during iteration" (and the message was
  lost) when a client subscribed meanwhile, so the subscription table hands out snapshots;
- add_subscription stores the new filter only after an await, so the filter index used for the daemon's own messages
  is rebuilt whenever the table's keys change, not when a subscription starts (a CLI's reply topic went missing);
- a PUBLISH whose topic holds a wildcard was "discarded" with its payload left unread in the stream, so the next
  bytes were parsed as packets (no PUBACK, PINGREQ unanswered): such a packet now ends the connection;
- there was no CONNECT timeout: a socket that never spoke held its fd for ever. CONNECT must arrive within
  `connect_timeout`, and at most `max_unauthenticated` connections may wait for it (a quarter of them from one
  address, so one host cannot take every slot); what is refused there is logged once a minute with counts;
- a connection with a known client id closed the connected session before authentication ran (anyone who knew a
  device id could knock it off), and a will message was not checked against the topic confinement (a device could
  publish on another's topics after leaving). Both are checked when CONNECT arrives, before any session is touched;
- the keep-alive was never enforced (the reader times out, then does nothing): a board that lost power stayed
  connected and online for good. A sweep closes clients silent past 1.5x their keep-alive;
- a topic that is not UTF-8 became str(bytes) and the payload was read by that longer text's length (the stream then
  out of step): the connection is closed;
- a persistent session taken over while connected was marked disconnected by the old connection's teardown, and the
  new connection got nothing: the old one is ended and its teardown awaited first;
- each incoming PUBLISH went through four tasks and two queues (p99 200 ms at 500 devices), and each session kept a
  state machine and four queues of empty deques (48 KB a device): the short path and the light session below.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from amqtt import mqtt as amqtt_packets
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.packet import PUBLISH, MQTTFixedHeader
from amqtt.mqtt.protocol import broker_handler as amqtt_broker_handler
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from edgetrio.daemon.metrics import STAGE_SECONDS
from edgetrio.daemon.topics import DEVICE_CHANNELS, INTEGRATIONS, ROOT, Confinement, in_device_space, parse_topic
from edgetrio.identity import ADMIN_USER, INTEGRATION_PREFIX, is_device_user, verify_secret
from edgetrio.wire import clip

log = logging.getLogger("edgetrio.broker")


class BrokerStartError(Exception):
    """The broker could not listen (port in use, bad address); the message is one line for the user."""


@dataclass(frozen=True)
class BusEvent:
    """Something that happened on the bus, handed to trio. kind: message, connected, disconnected, subscribed."""

    kind: str
    client_id: str
    username: str | None
    topic: str = ""
    payload: bytes = b""
    at: float = field(default_factory=time.monotonic)  # when the broker took it (publish-to-commit latency)


class Credentials:
    """Who may connect. Written by the trio side, read by the broker thread (whole-value swaps only)."""

    def __init__(self, admin_secret: str, devices: dict[str, str], integrations: dict[str, str] | None = None) -> None:
        self.admin_secret = admin_secret
        self.devices = dict(devices)  # device id -> secret hash
        self.integrations = dict(integrations or {})  # integration user -> secret hash

    def check(self, username: str | None, password: str | bytes | None, client_id: str | None) -> str | None:
        """None if allowed, else the reason for refusing."""
        if not username:
            return "no username (anonymous access is off)"
        if username == ADMIN_USER:
            if isinstance(password, str):
                password = password.encode("utf-8", "surrogateescape")
            return None if hmac.compare_digest(password or b"", self.admin_secret.encode()) else "wrong admin password"
        if username.startswith(INTEGRATION_PREFIX):
            stored = self.integrations.get(username)
            if stored is None or not verify_secret(password, stored):
                return f"wrong or unknown credential for {clip(username, 80)!r}"
            return None  # any client id: Home Assistant makes its own
        stored = self.devices.get(username)
        if stored is None:
            return f"unknown device {clip(username, 80)!r}"
        if not verify_secret(password, stored):
            return f"wrong password for device {username!r}"
        if client_id != username:
            # a device's client id is its device id, so no device can take over another's session
            return f"device {username!r} must connect with client id {username!r}"
        return None


def will_refusal(session: Session, max_payload: int) -> str | None:
    """Why a CONNECT's will message may not be accepted, or None. A device's will stays inside its own topics and
    on a channel devices send on (in practice `status`), so it cannot speak for another device once it is gone."""
    if not session.will_flag:
        return None
    topic = session.will_topic or ""
    if not topic or topic.startswith("$") or "#" in topic or "+" in topic:
        return f"invalid will topic {clip(topic, 80)!r}"
    if session.will_qos is not None and not 0 <= session.will_qos <= QOS_2:
        return "invalid will QoS"
    if len(session.will_message or b"") > max_payload:
        return f"will message over {max_payload} bytes"
    if session.username == ADMIN_USER:
        return None
    confinement = integration_confinement(session.username)
    if confinement is not None:
        return None if confinement.may_publish(topic) else f"will topic {clip(topic, 80)!r} is not the integration's"
    parsed = parse_topic(topic)
    if parsed is None or parsed[0] != session.username or parsed[1] not in DEVICE_CHANNELS:
        return f"will topic {clip(topic, 80)!r} is outside the device's own topics"
    return None


def integration_confinement(username: str | None) -> Confinement | None:
    if username is None or not username.startswith(INTEGRATION_PREFIX):
        return None
    return INTEGRATIONS.get(username[len(INTEGRATION_PREFIX):], NOTHING)


NOTHING = Confinement(publish=(), read=())


class ProtocolViolation(Exception):
    """A packet that leaves the stream unframed: the connection is closed (amqtt's reader loop ends on it)."""


class _ClosingPublishPacket(PublishPacket):
    """amqtt discards a PUBLISH with a wildcard topic after reading only its header; this ends the connection
    instead, since the unread payload would be parsed as the next packets."""

    @classmethod
    async def from_stream(cls, reader: ReaderAdapter, fixed_header: MQTTFixedHeader | None = None,
                          variable_header: Any = None) -> _ClosingPublishPacket:
        try:
            packet = await super().from_stream(reader, fixed_header, variable_header)
        except MQTTError as exc:
            protocol_errors["invalid_topic"] += 1
            log.warning("disconnecting a client: %s", clip(str(exc)))
            raise ProtocolViolation(str(exc)) from exc
        topic = packet.topic_name or ""
        if topic[:2] in ("b'", 'b"') and topic[-1:] in ("'", '"'):
            # amqtt turns a topic that is not UTF-8 into str(bytes) and then reads the payload by the longer text's
            # length, leaving bytes in the stream to be parsed as the next packets (MQTT-1.5.3-1: close it)
            protocol_errors["invalid_topic"] += 1
            log.warning("disconnecting a client: a topic that is not UTF-8: %s", clip(topic))
            raise ProtocolViolation("topic not UTF-8")
        return packet


KEEPALIVE_GRACE = 1.5  # a client silent for this many times its keep-alive is disconnected (MQTT-3.1.2-24)
PACE_QUEUED = 32  # messages read from one connection and not yet handled: past this, stop reading from its socket


class _PacedReader(ReaderAdapter):
    """Reads a client's socket only while fewer than PACE_QUEUED of its messages wait in the broker.

    amqtt reads packets as fast as they arrive and queues them per session without bound (a flood of 30 KB logs
    took the daemon from 181 to 360 MB). Not reading leaves the rest in the kernel and TCP slows the sender down.
    """

    def __init__(self, reader: ReaderAdapter, session: Session, handler: BrokerProtocolHandler) -> None:
        self.reader = reader
        self.session = session
        self.handler = handler
        self.heard = time.monotonic()  # when the client last sent anything (its keep-alive is judged on it)

    async def read(self, n: int = -1) -> bytes:
        while (queued := self.session.delivered_message_queue.qsize()) + (
                handing := getattr(self.handler, "handing", 0)) >= PACE_QUEUED:
            if queued >= handing:  # the broker is behind, not the client: it is not silent, its bytes wait for us
                self.heard = time.monotonic()
            # else its PUBACKs wait for it to read its socket: a client stuck so is judged by its keep-alive
            await asyncio.sleep(0.005)
        data = await self.reader.read(n)
        self.heard = time.monotonic()
        return data

    def feed_eof(self) -> None:
        self.reader.feed_eof()


HANDOFF_STAGE, WRITE_STAGE = STAGE_SECONDS.labels("handoff"), STAGE_SECONDS.labels("write")


class _GatewayHandler(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler with a short path for what devices publish.

    amqtt carries each incoming PUBLISH through four tasks and two queues (handle_publish, the session's delivery
    queue, the client loop's next-message task, a plugin task for the ACL check) before the broker sees it; with 500
    devices at 2,000 msg/s each hop waited for a turn of a long event loop and a reading took up to 100 ms to reach
    the broker's hand-off (bench_crowd's per-stage histogram). A device's QoS 0 or 1 PUBLISH is checked and handed to
    trio here, in the reader loop's own step, in arrival order; only its PUBACK is left to a task. Everything else
    (the admin's and integrations' traffic, QoS 2) takes amqtt's path.
    """

    gateway: GatewayBroker | None = None
    handing = 0  # PUBLISHes taken and not yet PUBACKed: the paced reader counts them as queued
    sending = 0  # messages to this client waiting for its socket (in tasks)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_subscriptions = LightQueue()
        self._pending_unsubscriptions = LightQueue()

    async def start(self) -> None:
        await super().start()
        for name in ("_reader_ready", "_reader_stopped"):  # the reader loop looks them up each time it uses them
            light = LightEvent()
            if getattr(self, name).is_set():
                light.set()
            setattr(self, name, light)
        timer: asyncio.TimerHandle | None = getattr(self, "_keepalive_task", None)
        if timer is not None:  # a broker's write timer does nothing, but costs a timer per packet sent
            timer.cancel()
            self._keepalive_task = None

    def handle_publish(self, publish_packet: PublishPacket) -> Coroutine[Any, Any, None]:
        session, broker = self.session, self.gateway
        qos = publish_packet.qos
        if broker is not None and qos not in (QOS_0, QOS_1, QOS_2):  # both QoS bits set: MQTT-3.3.1-4, close it
            broker.counters["invalid_qos"] += 1
            log.warning("disconnecting client=%s: a PUBLISH with QoS %s", clip(session.client_id if session else "?"),
                        qos)
            broker._abort(self)
            return broker._close_connection(self)
        if (broker is None or session is None or qos not in (QOS_0, QOS_1) or publish_packet.topic_name is None
                or publish_packet.data is None or not is_device_user(session.username)):
            return super().handle_publish(publish_packet)
        keep = broker.take_device_publish(session, self, publish_packet.topic_name, publish_packet.data,
                                          publish_packet.retain_flag, qos)
        packet_id = publish_packet.variable_header.packet_id if publish_packet.variable_header else None
        self.handing += 1
        return self._acknowledge(packet_id if keep and qos == QOS_1 else None)

    async def _acknowledge(self, packet_id: int | None) -> None:
        try:
            if packet_id is not None:
                await self._send_packet(PubackPacket.build(packet_id))
        finally:
            self.handing -= 1

    def send_now(self, topic: str, payload: bytes) -> bool:
        """Write a QoS 0 PUBLISH at once, without a task, if nothing else is being written to this client and its
        socket keeps up; False if it must take amqtt's path (which waits for the socket)."""
        writer = self.writer
        stream = getattr(writer, "_writer", None)
        if (writer is None or not isinstance(stream, asyncio.StreamWriter) or self._write_lock.locked()
                or stream.transport.is_closing() or stream.transport.get_write_buffer_size() > WRITE_BUFFER):
            return False
        writer.write(PublishPacket.build(topic, payload, None, False, QOS_0, False).to_bytes())
        return True


MAX_SENDING = 100  # messages to one client that may wait for its socket (mosquitto's max_queued_messages: 1,000)
WRITE_BUFFER = 64 * 1024  # bytes waiting for a client's socket past which its messages wait (amqtt's drain)


class SessionState:
    """What amqtt asks of a session's state machine: new -> connected <-> disconnected, `connect`, `disconnect`,
    `is_connected`, `state`, and an error for a connect while connected (its take-over path catches it).

    amqtt gives every session a `transitions.Machine` of its own: about 6 KB and 60 objects per connected device
    (tracemalloc, 500 devices), for three states.
    """

    __slots__ = ("session", "state")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.state = "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def connect(self) -> None:
        if self.state == "connected":
            raise ValueError("already connected")  # amqtt's take-over path catches MachineError or ValueError
        self.state = "connected"
        self.session.last_connect_time = math.floor(time.time())
        self.session.last_disconnect_time = None

    def disconnect(self) -> None:
        self.state = "disconnected"
        self.session.last_disconnect_time = math.floor(time.time())


class _MadeOnUse:
    """An attribute made on first use (a deque, an event), so that an object which never uses it does not carry it."""

    def __init__(self, make: Callable[[Any], Any]) -> None:
        self.make = make

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.make(obj)
        return value


def _finished_event(queue: asyncio.Queue[Any]) -> asyncio.Event:
    event = asyncio.Event()
    if not queue._unfinished_tasks:  # type: ignore[attr-defined]
        event.set()
    return event


class _Few(list[Any]):
    """The part of a deque asyncio's Queue and Event use, at a list's size: an empty deque takes about 600 bytes, an
    empty list 56, and a client's queues hold a waiter or two."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class LightQueue(asyncio.Queue[Any]):
    """asyncio's Queue on lists, its `join` event made on first use. amqtt keeps four queues per connected client
    (retained messages, deliveries, subscriptions, unsubscriptions), each four deques of about 600 bytes: 13 KB a
    device (tracemalloc, 500 devices), for queues that hold a waiter or two."""

    _finished = _MadeOnUse(_finished_event)

    def __init__(self) -> None:
        super().__init__()
        self._getters: Any = _Few()
        self._putters: Any = _Few()
        self._queue: Any = _Few()
        del self.__dict__["_finished"]  # made again when first used (join)


class LightEvent(asyncio.Event):
    """asyncio's Event with its waiters in a list (amqtt keeps two per connected client)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: Any = _Few()


class _LightSession(Session):
    """amqtt's Session with `SessionState` for a state machine and queues made on first use."""

    def __init__(self) -> None:
        super().__init__()
        self.retained_messages = LightQueue()
        self.delivered_message_queue = LightQueue()

    def _init_states(self) -> None:
        self.transitions = SessionState(self)


amqtt_broker_handler.Session = _LightSession  # the sessions CONNECTs make (one per device)
protocol_errors: Counter[str] = Counter()  # counted while decoding, where no broker is at hand (one per process)
amqtt_packets.packet_dict[PUBLISH] = _ClosingPublishPacket


def _gateway(context: Any) -> GatewayBroker:
    broker = context._broker_instance
    assert isinstance(broker, GatewayBroker)
    return broker


class DeviceAuth(BaseAuthPlugin):
    """Each device authenticates with its own credential; the CLI and local apps with the admin credential."""

    async def authenticate(self, *, session: Session) -> bool | None:
        broker = _gateway(self.context)
        reason = broker.credentials.check(session.username, session.password, session.client_id)
        if reason is None:
            return True
        broker.counters["auth_refused"] += 1
        log.warning("connection refused client=%s reason=%s", clip(session.client_id), clip(reason))
        return False


class DeviceTopics(BaseTopicPlugin):
    """A device may publish, subscribe and receive only under edgetrio/{its id}/."""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        """amqtt's ACL hook: a device publishes and subscribes only in its own topic space, an integration in its
        own."""
        if session is None or topic is None or action is None:
            return False
        return _gateway(self.context).may(session, topic, action)


class BusEvents(BasePlugin[Any]):
    """Forwards connection and subscription events to trio."""

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        _gateway(self.context).hand_off(BusEvent("connected", client_id, client_session.username))

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        _gateway(self.context).hand_off(BusEvent("disconnected", client_id, client_session.username))

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        broker = _gateway(self.context)
        entry = broker._sessions.get(client_id)
        username = entry[0].username if entry else None
        broker.hand_off(BusEvent("subscribed", client_id, username, topic))


PLUGINS: dict[str, dict[str, Any]] = {
    f"{__name__}.DeviceAuth": {},
    f"{__name__}.DeviceTopics": {},
    f"{__name__}.BusEvents": {},
}


class _SnapshotDict(dict[str, Any]):
    """A dict whose items() is a snapshot, safe to iterate across awaits while others add keys.

    `keys_changed` counts added and removed keys, so an index of the keys knows when it is stale whichever amqtt
    path changed them (add_subscription adds its key after an await, so resetting an index on entry is not enough).
    """

    keys_changed = 0

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            self.keys_changed += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.keys_changed += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.keys_changed += 1
        super().clear()

    def pop(self, *args: Any) -> Any:
        self.keys_changed += 1
        return super().pop(*args)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self.keys_changed += 1
        return super().setdefault(key, default)

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return list(super().items())

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))


class Tally:
    """Connections closed before they logged in, logged once a minute with counts by reason and the busiest
    addresses: a line each would let a flood of sockets flood the log too."""

    EVERY = 60.0

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.addresses: Counter[str] = Counter()
        self.logged_at = -self.EVERY
        self.last = ""

    def note(self, reason: str, address: str, detail: str) -> None:
        self.reasons[reason] += 1
        self.addresses[address] += 1
        self.last = f"{address}: {detail}"
        now = time.monotonic()
        if now - self.logged_at >= self.EVERY:
            self.logged_at = now
            log.warning("closed %d connection(s) before they logged in since the last such line (%s; from %s); "
                        "last: %s", sum(self.reasons.values()), ", ".join(f"{k} x{n}" for k, n in self.reasons.items()),
                        ", ".join(f"{k} x{n}" for k, n in self.addresses.most_common(3)), clip(self.last, 200))
            self.reasons.clear()
            self.addresses.clear()


def index_filters(filters: Iterable[str]) -> dict[str, list[str]]:
    """Subscription filters by their first two levels ("" for those with a wildcard there, which every topic tries)."""
    index: dict[str, list[str]] = {}
    for f in filters:
        levels = f.split("/", 2)
        if len(levels) >= 2 and "#" not in levels[0] + levels[1] and "+" not in levels[0] + levels[1]:
            index.setdefault(f"{levels[0]}/{levels[1]}", []).append(f)
        else:
            index.setdefault("", []).append(f)
    return index


class LoginRefusals:
    """A refused login is logged once a minute for each client id (a board with the wrong password shows); a flood of
    tries is counted into the tally's once-a-minute line instead of a line each."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.logged: dict[str, float] = {}  # client id -> when its refusal was last logged

    def note(self, client_id: str | None, peer: str, address: str, reason: str) -> None:
        now, key = time.monotonic(), clip(client_id, 64)
        if len(self.logged) > 1024:
            self.logged = {k: t for k, t in self.logged.items() if now - t < 60}
        if now - self.logged.get(key, -60.0) >= 60 and len(self.logged) <= 1024:
            self.logged[key] = now
            log.warning("connection refused client=%s remote=%s reason=%s", key, peer, clip(reason))
        else:
            self.tally.note("login refused", address, f"client={key}: {clip(reason)}")


class GatewayBroker(Broker):
    """amqtt's Broker with the gateway's hand-off to trio and the defect workarounds."""

    def __init__(
        self,
        config: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        credentials: Credentials,
        deliver: Callable[[BusEvent], bool | None],
        max_payload: int,
        connect_timeout: float = 10.0,
        max_unauthenticated: int = 256,
    ) -> None:
        self.credentials = credentials
        self.counters: Counter[str] = Counter()
        self.hand_off = deliver
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout
        self.max_unauthenticated = max_unauthenticated
        self._unauthenticated = 0  # connections waiting for their CONNECT
        self._waiting_from: Counter[str] = Counter()  # ... by address
        self._closed_early = Tally()
        self._refusals = LoginRefusals(self._closed_early)
        super().__init__(config, loop=loop)
        self._subscriptions = _SnapshotDict()
        self._index: dict[str, list[str]] = {}  # filters by their first two levels
        self._index_at = -1  # the subscriptions' keys_changed the index was built at
        self._direct_tasks: set[asyncio.Future[Any]] = set()
        self._silent_after: dict[BrokerProtocolHandler, tuple[_PacedReader, float]] = {}  # connections with a keep-alive

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Read CONNECT within the timeout, then authenticate it and check its will before any session is touched:
        only a successful login may replace a connected session with the same client id.

        Raises AMQTTError (amqtt then releases the connection) for anything refused, after closing the socket.
        """
        peer = f"{remote_address}:{remote_port}"
        per_address = max(1, self.max_unauthenticated // 4)
        if (self._unauthenticated >= self.max_unauthenticated
                or self._waiting_from[remote_address] >= per_address):
            self.counters["connect_refused_busy"] += 1
            self._closed_early.note("busy", remote_address, f"{self._unauthenticated} connections waiting to log in, "
                                    f"{self._waiting_from[remote_address]} from this address (at most {per_address})")
            await writer.close()
            raise AMQTTError("too many connections waiting to log in")
        self._unauthenticated += 1
        self._waiting_from[remote_address] += 1
        try:
            handler, session = await asyncio.wait_for(
                _GatewayHandler.init_from_connect(reader, writer, self.plugins_manager), self.connect_timeout)
            if isinstance(handler, _GatewayHandler):
                handler.gateway = self
        except TimeoutError:
            self.counters["connect_timeout"] += 1
            self._closed_early.note("no CONNECT", remote_address, f"no CONNECT within {self.connect_timeout:g} s")
            await writer.close()
            raise AMQTTError("no CONNECT in time") from None
        except Exception as exc:  # anything else a stranger can send before CONNECT ends its connection, only
            self.counters["connect_invalid"] += 1
            self._closed_early.note("invalid", remote_address, str(exc) or type(exc).__name__)
            with suppress(Exception):
                await writer.close()
            raise AMQTTError("invalid CONNECT") from exc
        finally:
            self._unauthenticated -= 1
            self._waiting_from[remote_address] -= 1
            if not self._waiting_from[remote_address]:
                del self._waiting_from[remote_address]
        reason = self.credentials.check(session.username, session.password, session.client_id)
        if reason is None:
            reason = will_refusal(session, self.max_payload)
        if reason is not None:
            self.counters["auth_refused"] += 1
            self._refusals.note(session.client_id, peer, remote_address, reason)
            with suppress(Exception):
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await writer.close()
            raise AMQTTError("connection refused")
        if not session.client_id:
            session.client_id = gen_client_id()
        existing = self._sessions.get(session.client_id)
        if session.clean_session or existing is None:
            await self._delete_session(session.client_id)  # closes a connection it replaces (MQTT-3.1.4-2)
            session.parent = 0
        else:
            # a persistent session resumes with this connection's will and credentials (checked above); a connection
            # still on it is ended first, and its teardown awaited: done later, it marked the resumed session
            # disconnected and the new connection got nothing sent to it
            if existing[0].transitions.is_connected():
                self._abort(existing[1])
                await existing[1].handle_connection_closed()
                with suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        while existing[0].transitions.is_connected():
                            await asyncio.sleep(0.005)
            kept = existing[0]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password"):
                setattr(kept, name, getattr(session, name))
            kept.parent = 1
            session = kept
        return handler, session

    async def _handle_client_session(self, reader: ReaderAdapter, writer: WriterAdapter, client_session: Session,
                                     handler: BrokerProtocolHandler, server: Any, listener_name: str) -> None:
        paced = _PacedReader(reader, client_session, handler)
        # The keep-alive is judged by the sweep below: amqtt reads each packet with a timeout of the keep-alive (a task
        # and a timer per packet) and then does nothing when it passes, so a board that lost power stayed connected
        # (and online) for good. With keep_alive 0 amqtt's reader waits plainly.
        keep_alive, client_session.keep_alive = client_session.keep_alive, 0
        if keep_alive > 0:
            self._silent_after[handler] = (paced, keep_alive * KEEPALIVE_GRACE)
        try:
            await super()._handle_client_session(paced, writer, client_session, handler, server, listener_name)
        finally:
            self._silent_after.pop(handler, None)

    async def start(self) -> None:
        await super().start()
        self._spawn(self._sweep_silent())

    async def _sweep_silent(self) -> None:
        """Close the connections of clients silent for longer than their keep-alive allows (MQTT-3.1.2-24): their will
        is sent and the device goes offline."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for handler, (paced, limit) in list(self._silent_after.items()):
                if now - paced.heard > limit:
                    del self._silent_after[handler]
                    self.counters["keepalive_expired"] += 1
                    session = handler.session
                    log.info("closing client=%s: nothing heard for %.0f s (keep-alive allows %.0f s)",
                             clip(session.client_id if session else "?"), now - paced.heard, limit)
                    self._abort(handler)  # at once: a client that stopped reading would hold a graceful close
                    self._spawn(self._close_connection(handler))

    def _unfit(self, session: Session, topic: str, data: bytes | bytearray | None) -> str | None:
        """What must happen to a client's PUBLISH before any other check, counted and logged: "close" its connection
        (a topic no one may publish to: `$`, wildcards, empty), "drop" it (over max_payload), or None."""
        if not topic or topic.startswith("$") or "#" in topic or "+" in topic:
            self.counters["invalid_topic"] += 1
            log.warning("disconnecting client=%s: invalid publish topic %s", clip(session.client_id), clip(repr(topic)))
            return "close"
        if data is not None and len(data) > self.max_payload:
            self.counters["oversize"] += 1
            log.warning("dropped oversize message client=%s topic=%s bytes=%d limit=%d",
                        clip(session.client_id), clip(topic), len(data), self.max_payload)
            return "drop"
        return None

    async def _handle_message_delivery(self, client_session: Session, handler: Any, wait_deliver: Any) -> bool:
        message = wait_deliver.result()
        if message is not None:
            unfit = self._unfit(client_session, message.topic or "", message.data)
            if unfit == "close":
                await self._close_connection(handler)
            if unfit:
                return True
        return await super()._handle_message_delivery(client_session, handler, wait_deliver)

    def take_device_publish(self, session: Session, handler: BrokerProtocolHandler, topic: str, data: bytes | bytearray,
                            retain: bool, qos: int = QOS_0) -> bool:
        """A device's PUBLISH on the short path: the checks of amqtt's delivery and the ACL, then the hand-off to trio
        (and to any client subscribed to it). False if it is not taken (no PUBACK then): the connection is being closed
        for it, or ingest refused it."""
        unfit = self._unfit(session, topic, data)
        if unfit == "close":
            self._spawn(self._close_connection(handler))
            return False
        if unfit:
            return True
        if not self.may(session, topic, Action.PUBLISH):
            return True
        if retain and data:
            self.counters["retain_ignored"] += 1
        payload = bytes(data)
        if self.hand_off(BusEvent("message", session.client_id or "", session.username, topic, payload)) is False:
            return False  # refused (ingest is behind, or this client floods it): no PUBACK, the client sends it again
        if self._filters_for(topic):  # someone subscribed to it (an admin client; the device itself): bounded delivery
            self.deliver_direct([(topic, payload)], qos)
        return True

    def may(self, session: Session, topic: str, action: Action) -> bool:
        """Whether a client may publish to or read a topic: a device only under its own root, an integration only in
        its own topics, the admin anywhere. A refusal is counted and logged."""
        if session.username == ADMIN_USER:
            return True
        confinement = integration_confinement(session.username)
        if confinement is not None:
            allowed = confinement.may_publish(topic) if action == Action.PUBLISH else confinement.may_read(topic)
        else:
            allowed = session.username is not None and in_device_space(session.username, topic)
        if not allowed:
            self.counters[f"acl_refused_{action.value}"] += 1
            # Home Assistant probes other integrations' topics (tasmota/discovery/#, dsmr/#, ...) each time it
            # connects: refused as ever, but its normal behaviour, not a warning
            probing = confinement is not None and action == Action.SUBSCRIBE
            (log.debug if probing else log.warning)("topic refused device=%s action=%s topic=%s",
                                                    clip(session.username), action, clip(topic))
        return allowed

    @staticmethod
    def _abort(handler: BrokerProtocolHandler) -> None:
        """Drop a connection's socket now, unsent data and all (a graceful close first waits for the client to read)."""
        stream = getattr(handler.writer, "_writer", None)
        if isinstance(stream, asyncio.StreamWriter):
            stream.transport.abort()

    async def _close_connection(self, handler: BrokerProtocolHandler) -> None:
        await handler.handle_connection_closed()
        if handler.writer is not None:  # the waiter alone sometimes left the socket open (seen 1 in 3)
            with contextlib.suppress(Exception):
                await handler.writer.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._direct_tasks.add(task)
        task.add_done_callback(partial(self._direct_done, None, None))

    async def _broadcast_message(
        self, session: Session | None, topic: str | None, data: bytes | bytearray | None, force_qos: int | None = None
    ) -> None:
        # Called for every accepted client publish (after the ACL) and for will messages; session is None for
        # the daemon's own publishes, which need no hand-off.
        if session is not None and topic and data is not None and session.client_id:
            self.hand_off(BusEvent("message", session.client_id, session.username, topic, bytes(data)))
            if not self._filters_for(topic):
                # Usually the daemon is the only consumer of device traffic. amqtt has one broadcast queue for
                # everything, so queueing unread telemetry there would delay the acks and commands behind it.
                return
        await super()._broadcast_message(session, topic, data, force_qos)

    def _filters_for(self, topic: str) -> list[str]:
        """Subscription filters that match a topic, found through an index instead of a scan of all filters."""
        if self._index_at != self._subscriptions.keys_changed:
            self._index_at = self._subscriptions.keys_changed
            self._index = index_filters(self._subscriptions)
        levels = topic.split("/", 2)
        candidates = self._index.get("/".join(levels[:2]), []) + self._index.get("", [])
        return [f for f in candidates if f == topic or self._matches(topic, f)]

    def deliver_direct(self, messages: list[tuple[str, bytes]], qos: int, sent_at: float | None = None) -> None:
        """Send the daemon's own messages straight to the sessions subscribed to them.

        amqtt's single broadcast queue awaits a plugin task per subscriber check, so under 1k msg/s of incoming
        telemetry the daemon's acks waited about a second in it. The daemon's messages need no ACL round trip:
        a device's topics reach only that device (its filters are confined to its root) and admin clients.
        """
        started = time.monotonic()
        if sent_at is not None:
            HANDOFF_STAGE.observe(started - sent_at)
        done = partial(self._direct_done, started)
        for topic, payload in messages:
            targets: dict[str, tuple[Session, int]] = {}
            for f in self._filters_for(topic):
                for session, sub_qos in self._subscriptions.get(f, []):
                    best = targets.get(session.client_id or "")
                    if best is None or sub_qos > best[1]:
                        targets[session.client_id or ""] = (session, sub_qos)
            for session, sub_qos in targets.values():
                handler = self._get_handler(session)
                if handler is None or not session.transitions.is_connected():
                    continue
                if min(qos, sub_qos) == QOS_0 and isinstance(handler, _GatewayHandler) and handler.send_now(topic,
                                                                                                            payload):
                    continue  # written (an ack, most of the time): no task, no wait
                if isinstance(handler, _GatewayHandler):
                    if handler.sending >= MAX_SENDING:
                        # a client that does not read its socket: what it is sent waits in memory, so past a bound
                        # it is dropped and counted (a subscriber that stopped reading grew the daemon to 3 GB)
                        self.counters["dropped_slow_subscriber"] += 1
                        continue
                    handler.sending += 1
                task = asyncio.ensure_future(handler.mqtt_publish(topic, payload, min(qos, sub_qos), retain=False))
                self._direct_tasks.add(task)
                task.add_done_callback(partial(done, handler))
        WRITE_STAGE.observe(time.monotonic() - started)  # those written at once; the others when their task ends

    def _direct_done(self, started: float | None, handler: BrokerProtocolHandler | None,
                     task: asyncio.Future[Any]) -> None:
        if started is not None:
            WRITE_STAGE.observe(time.monotonic() - started)
        if isinstance(handler, _GatewayHandler):
            handler.sending -= 1
        self._direct_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("delivery failed: %s", task.exception())

    async def retain_message(
        self, source_session: Session | None, topic_name: str | None, data: bytes | bytearray | None, qos: int | None = None
    ) -> None:
        # No retained messages at all: amqtt sends them to other clients without an ACL check.
        if data:
            self.counters["retain_ignored"] += 1

    async def _delete_session(self, client_id: str) -> None:
        entry = self._sessions.get(client_id)
        if entry is not None and entry[0].transitions.is_connected():
            log.info("client=%s connected again; closing its previous connection", clip(client_id))
            await entry[1].handle_connection_closed()
            # and its socket, here: left to the old connection's own loop, the client was now and then never told
            # (its connection stayed open beside the new one, against MQTT-3.1.4-2)
            with suppress(Exception):
                if entry[1].writer is not None:
                    await entry[1].writer.close()
        await super()._delete_session(client_id)

    def close_sessions_of(self, username: str) -> None:
        for session, handler in list(self._sessions.values()):
            if session.username == username and session.transitions.is_connected():
                self._spawn(handler.handle_connection_closed())

    def bound_port(self) -> int:
        server = self._servers["default"].instance
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1])


class BrokerLink:
    """The trio side of the embedded broker: receive bus events in batches, publish to devices."""

    def __init__(self, max_pending: int, max_pending_bytes: int = 32 << 20, max_device_bytes: int = 4 << 20) -> None:
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes  # payload bytes waiting for ingest, all clients together
        self.max_device_bytes = max_device_bytes  # ... and from one client: a flooding device cannot take them all
        self.dropped = 0
        self.flood_dropped = 0
        self._pending_bytes = 0
        self._client_bytes: Counter[str] = Counter()
        self._flood_logged: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pending: deque[BusEvent] = deque()
        self._wake_scheduled = False
        self._wakeup = trio.Event()
        self._closed = False
        self._stopping = False
        self._token = trio.lowlevel.current_trio_token()
        self._broker: GatewayBroker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        # devices on other transports: device id -> callable(channel, payload), called in trio
        self.sinks: dict[str, Callable[[str, bytes], None]] = {}
        self.counters_extra: Counter[str] = Counter()  # counted by those transports

    # -- broker thread side --
    def deliver(self, event: BusEvent) -> bool:
        """Queue a bus event for trio (the broker thread's side); past the bounds it is refused (False) and counted."""
        size = len(event.payload)
        with self._lock:
            if len(self._pending) >= self.max_pending or self._pending_bytes + size > self.max_pending_bytes:
                # overload: refuse rather than queue without bound; the device resends what was never acked
                self.dropped += 1
                return False
            if size and self._client_bytes[event.client_id] + size > self.max_device_bytes:
                self.flood_dropped += 1
                self._log_flood(event.client_id)
                return False
            self._pending_bytes += size
            if size:
                self._client_bytes[event.client_id] += size
            self._pending.append(event)
            if self._wake_scheduled:
                return True
            self._wake_scheduled = True
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._wake)
        return True

    def _log_flood(self, client_id: str) -> None:
        now = time.monotonic()
        if now - self._flood_logged.get(client_id, -60.0) >= 60:  # once a minute per client, or the log floods too
            if len(self._flood_logged) > 10_000:
                self._flood_logged.clear()
            self._flood_logged[client_id] = now
            log.warning("client=%s sends faster than ingest takes it: messages beyond %d bytes waiting are refused",
                        clip(client_id), self.max_device_bytes)

    # -- trio side --
    def _wake(self) -> None:
        self._wakeup.set()

    async def receive_batch(self) -> list[BusEvent]:
        """Wait for bus events and return all that are pending; [] once the broker has stopped and all are taken."""
        while True:
            with self._lock:
                if self._pending:
                    batch = list(self._pending)
                    self._pending.clear()
                    self._pending_bytes = 0
                    self._client_bytes.clear()
                    self._wake_scheduled = False
                    return batch
                self._wake_scheduled = False
                if self._closed:
                    return []
            await self._wakeup.wait()
            self._wakeup = trio.Event()

    def publish(self, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
        """Queue messages for devices. Never blocks; a no-op once the broker is stopping.

        Messages for a device attached by another transport (a serial line) go to its sink instead of the broker.
        """
        if self.sinks:
            rest = []
            for topic, payload in messages:
                parts = topic.split("/", 2)
                sink = self.sinks.get(parts[1]) if len(parts) == 3 and parts[0] == ROOT else None
                if sink is not None:
                    sink(parts[2], payload)
                else:
                    rest.append((topic, payload))
            messages = rest
        broker, loop = self._broker, self._loop
        if not messages or broker is None or loop is None or self._stopping:
            return
        with suppress(RuntimeError):  # the loop closed during shutdown
            loop.call_soon_threadsafe(broker.deliver_direct, messages, qos, time.monotonic())

    def disconnect(self, client_id: str) -> None:
        """Close a client's connection if it has one (a removed device must not stay connected)."""
        broker, loop = self._broker, self._loop
        if broker is None or loop is None or self._stopping:
            return
        entry = broker._sessions.get(client_id)
        if entry is not None:
            asyncio.run_coroutine_threadsafe(entry[1].handle_connection_closed(), loop)

    def disconnect_user(self, username: str) -> None:
        """Close every connection logged in as `username` (an integration whose credential changed)."""
        broker, loop = self._broker, self._loop
        if broker is None or loop is None or self._stopping:
            return
        with suppress(RuntimeError):  # the loop closed during shutdown
            loop.call_soon_threadsafe(broker.close_sessions_of, username)

    def waiting(self) -> int:
        """Bus events handed over and not taken by ingest yet."""
        return len(self._pending)

    def counters(self) -> Counter[str]:
        out: Counter[str] = Counter(self._broker.counters if self._broker else {})
        out.update(protocol_errors)
        out.update(self.counters_extra)
        if self.dropped:
            out["dropped_overload"] = self.dropped
        if self.flood_dropped:
            out["dropped_flood"] = self.flood_dropped
        return out

    def connected_clients(self) -> int:
        broker = self._broker
        if broker is None:
            return 0
        return sum(1 for session, _ in list(broker._sessions.values()) if session.transitions.is_connected())

    def _close(self) -> None:
        with self._lock:
            self._closed = True
        self._wakeup.set()


def _broker_config(host: str, port: int, tls: tuple[str, str] | None) -> dict[str, Any]:
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}"}
    if tls:
        listener.update({"ssl": True, "certfile": tls[0], "keyfile": tls[1]})
    return {"listeners": {"default": listener}, "plugins": PLUGINS}


@asynccontextmanager
async def open_broker(
    host: str,
    port: int,
    credentials: Credentials,
    *,
    max_pending: int = 50_000,
    max_pending_bytes: int = 32 << 20,
    max_device_bytes: int = 4 << 20,
    max_payload: int = 64 * 1024,
    tls: tuple[str, str] | None = None,
    connect_timeout: float = 10.0,
    max_unauthenticated: int = 256,
    shutdown_timeout: float = 5.0,
) -> AsyncIterator[BrokerLink]:
    """Run the broker in its own thread for the duration of the block; yields once it listens.

    Raises BrokerStartError if it cannot listen. On exit (also on cancellation) the broker is shut down within
    `shutdown_timeout` seconds and its thread joined; no bus event is delivered after that.
    """
    link = BrokerLink(max_pending, max_pending_bytes, max_device_bytes)
    started: trio.Event = trio.Event()
    failure: list[BaseException] = []
    loop_box: list[asyncio.AbstractEventLoop] = []

    def run_thread() -> None:
        """The broker's own asyncio loop, in its own thread, until trio asks it to stop."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop_box.append(loop)
        try:
            broker = GatewayBroker(_broker_config(host, port, tls), loop, credentials, link.deliver, max_payload,
                                   connect_timeout, max_unauthenticated)
            loop.run_until_complete(broker.start())
            link._broker, link._loop = broker, loop
            link.port = broker.bound_port()
        except BaseException as exc:  # reported to trio below
            failure.append(exc)
            loop.close()
            trio.from_thread.run_sync(started.set, trio_token=link._token)
            return
        trio.from_thread.run_sync(started.set, trio_token=link._token)
        loop.run_forever()
        try:
            loop.run_until_complete(asyncio.wait_for(broker.shutdown(), shutdown_timeout))
        except Exception as exc:
            log.warning("broker shutdown incomplete: %s", exc)
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    thread = threading.Thread(target=run_thread, name="amqtt-broker", daemon=True)
    thread.start()
    with trio.CancelScope(shield=True):
        await started.wait()
    if failure:
        await trio.to_thread.run_sync(thread.join)
        exc = failure[0]
        cause = exc.__cause__ or exc
        if isinstance(exc, BrokerError | OSError):
            reason = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(cause)
            raise BrokerStartError(f"cannot listen for MQTT on {host}:{port}: {reason}") from exc
        raise exc
    try:
        yield link
    finally:
        with trio.CancelScope(shield=True):
            loop = loop_box[0]
            link._stopping = True
            loop.call_soon_threadsafe(loop.stop)
            with trio.move_on_after(shutdown_timeout + 2):
                await trio.to_thread.run_sync(thread.join)
            link._close()
