"""The ingest pipeline: bus events -> classify -> group commit -> ack.

The broker thread hands bus events over in batches; `classify` sorts them into store operations (readings for the group
commit, other changes for the writer), and `commit` writes readings in groups and only then acknowledges devices.
Control requests found on the bus are handed to the control server over a channel.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import outcome
import trio
from sqlite_utils import Database

from edgetrio import wire
from edgetrio.daemon import store
from edgetrio.daemon.broker import BusEvent
from edgetrio.daemon.commands import record_late_result
from edgetrio.daemon.metrics import COMMIT_SECONDS, PUBLISH_TO_COMMIT, STAGE_SECONDS
from edgetrio.daemon.parts import Parts
from edgetrio.daemon.topics import (
    CONTROL_REQUEST,
    Reading,
    Rejected,
    desired_message,
    device_topic,
    parse_batch,
    parse_note,
    parse_object,
    parse_topic,
    time_message,
    topic_matches,
)
from edgetrio.identity import ADMIN_USER, INTEGRATION_PREFIX, RegistryError, is_device_user
from edgetrio.models import Model, check_values_without_model
from edgetrio.twin import Twin

log = logging.getLogger("edgetrio.ingest")
Sorted = tuple[list[Reading], list[tuple[Reading, str]], float]  # readings, refused ones, oldest arrival
MAX_HELD = 20_000  # readings held while the store cannot write; past it ingest waits and the broker refuses
MAX_SLEEP_S = 7 * 86400  # the longest sleep a board may announce
COMMITS_WAITING = 8  # sorted bus batches that may wait for the commit in flight
BUS_STAGE, TO_COMMIT, COMMIT_STAGE = (STAGE_SECONDS.labels(s) for s in ("bus", "to_commit", "commit"))


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class RefusalLog:
    """Logs refusals without flooding: the first of a kind (device, reason) at once, with what to do; then at most one
    line a minute for it, with how many were left out. A board that sends a value its model lacks every 2 s would
    otherwise write 1,800 identical lines an hour."""

    EVERY = 60.0

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}
        self._held: Counter[tuple[str, str]] = Counter()

    def refused(self, device: str, reason: str, message: str, advice: str = "", detail: str = "") -> None:
        # alike: the same device, reason and detail but for its numbers (a value out of range, each reading another)
        key = (device, reason + " " + NUMBER.sub("#", detail)[:200])
        now = time.monotonic()
        if key in self._last and now - self._last[key] < self.EVERY:
            self._held[key] += 1
            return
        first = key not in self._last
        more = self._held.pop(key, 0)
        if len(self._last) > 10_000:  # unbounded ids must not grow this without end
            self._last.clear()
        self._last[key] = now
        log.warning("%s%s%s", message, f" ({more} more like it in the last minute)" if more else "",
                    f"; {advice}" if advice and first else "")


class Watch:
    """What ingest tells the components that follow it (Home Assistant, automation). Called in the pipeline's own
    tasks: a watcher must not block (it queues its own work)."""

    def committed(self, readings: list[Reading]) -> None:
        """Readings just committed (and acknowledged)."""

    def presence(self, device: str, online: bool) -> None:
        """A registered device came online or went offline."""

    def reported(self, device: str, twin: Twin) -> None:
        """A device's reported state was stored."""

    def meta(self, device: str) -> None:
        """A device's meta (and with it perhaps its model) was stored."""

    def integration(self, event: BusEvent) -> None:
        """A message from an integration's credential (Home Assistant); the ACL kept it to that integration's topics."""

    def ota(self, device: str, body: dict[str, Any]) -> None:
        """A board's answer about a firmware update (where it wants the next chunk, installed, confirmed, failed)."""

    def ota_listening(self, device: str) -> None:
        """A board subscribed to its `ota` topic: what is sent there now reaches it (not so at its connect)."""


class Watchers(Watch):
    """Several watchers as one. A watcher that fails costs its own view of that event, never ingest: they are
    called on the commit path, and ingest is vital."""

    def __init__(self, watchers: list[Watch]) -> None:
        self.watchers = watchers

    def _tell(self, what: str, *args: Any) -> None:
        for watcher in self.watchers:
            try:
                getattr(watcher, what)(*args)
            except Exception:
                log.exception("%s failed to take %s", type(watcher).__name__, what)

    def committed(self, readings: list[Reading]) -> None:
        self._tell("committed", readings)

    def presence(self, device: str, online: bool) -> None:
        self._tell("presence", device, online)

    def reported(self, device: str, twin: Twin) -> None:
        self._tell("reported", device, twin)

    def meta(self, device: str) -> None:
        self._tell("meta", device)

    def ota_listening(self, device: str) -> None:
        self._tell("ota_listening", device)

    def integration(self, event: BusEvent) -> None:
        self._tell("integration", event)

    def ota(self, device: str, body: dict[str, Any]) -> None:
        self._tell("ota", device, body)


def missing_from_model(model: Model | None, meta: dict[str, Any]) -> list[str]:
    """The resources a board announces that its registered model lacks (none without a model)."""
    announced = [r.get("name") for r in meta.get("resources") or [] if isinstance(r, dict)]
    return [str(n) for n in announced if isinstance(n, str) and model is not None and n not in model.resources]


class GroupCommit:
    """Commits readings in groups, one transaction in flight, and only then acknowledges them to their devices."""

    def __init__(self, parts: Parts, watch: Watch, counts: Counter[str]) -> None:
        self.writer, self.changes, self.link = parts.writer, parts.changes, parts.link
        self.watch = watch
        self.counts = counts
        self.uncommitted = 0  # readings handed to the commit and not committed yet (held while the store cannot write)
        self.max_held = MAX_HELD

    async def run(self, sorted_: trio.MemoryReceiveChannel[Sorted]) -> None:
        """Group commit: one readings transaction in flight; what arrives meanwhile goes into the next one.

        Keeping a single commit in flight makes one `ack` per device per commit, however fast readings arrive.
        While the store cannot write (a full disk), readings are held here and retried; none is acknowledged, and past
        `max_held` this stops taking more, so classify waits and the broker refuses. Returns once the channel is closed
        and everything sent on it is committed.
        """
        readings: list[Reading] = []
        invalid: list[tuple[Reading, str]] = []
        arrived = 0.0
        retry_in = 0.25
        async with sorted_:
            while True:
                if not (readings or invalid):
                    try:
                        readings, invalid, arrived = await sorted_.receive()
                    except trio.EndOfChannel:
                        return
                while len(readings) + len(invalid) < self.max_held:  # everything that waits joins this commit
                    try:
                        more, more_invalid, more_arrived = sorted_.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    readings, invalid, arrived = readings + more, invalid + more_invalid, min(arrived, more_arrived)
                now = time.time()
                TO_COMMIT.observe(time.monotonic() - arrived)
                try:
                    with COMMIT_SECONDS.time(), COMMIT_STAGE.time():
                        acks = await self.writer.write(
                            partial(self.changes.readings, readings=readings, invalid=invalid, now=now))
                except Exception as exc:
                    if self.writer.failure is None:  # this batch failed, not the store: holding it would block all
                        log.error("%d readings not committed, not acknowledged: %s", len(readings) + len(invalid), exc)
                        self.uncommitted -= len(readings) + len(invalid)
                        readings, invalid = [], []
                        continue
                    log.debug("%d readings held, not committed: %s", len(readings) + len(invalid), exc)
                    if sorted_.statistics().open_send_channels == 0 and retry_in >= 2:
                        log.warning("stopping with %d readings not committed (not acknowledged either)", self.uncommitted)
                        return
                    retry_in = min(retry_in * 2, 10.0)
                    await trio.sleep(retry_in)
                    continue
                retry_in = 0.25
                PUBLISH_TO_COMMIT.observe(time.monotonic() - arrived)
                self.uncommitted -= len(readings) + len(invalid)
                self.counts["readings_received"] += len(readings)
                self.counts["readings_arrival_time"] += sum(r.ts is None for r in readings)
                # QoS 0 is enough: acks are cumulative, a lost one is repaired by the next
                self.link.publish([(device_topic(device, "ack"), json.dumps({"boot": boot, "seq": seq}).encode())
                                   for (device, boot), seq in acks.items()], qos=0)
                self.watch.committed(readings)  # after the acks: those are what devices wait for
                readings, invalid = [], []


class Ingest:
    """The path of everything devices send: sorts bus events by channel (telemetry into the next group commit, the rest
    into store operations), commits readings and only then acks them, and tells the watchers (rules, Home Assistant,
    the dashboard) what was committed."""

    def __init__(self, parts: Parts, control_requests: trio.MemorySendChannel[bytes],
                 watchers: list[Watch] | None = None) -> None:
        self.watch = Watchers(watchers or [])
        self.link, self.writer, self.roster = parts.link, parts.writer, parts.roster
        self.changes, self.commands = parts.changes, parts.commands
        self.control_requests = control_requests
        self.counts: Counter[str] = Counter()
        self.refusals = RefusalLog()
        self.group = GroupCommit(parts, self.watch, self.counts)
        # store writes decided while sorting one batch, queued after it
        self._writes: list[tuple[Callable[[Database], Any], Callable[[outcome.Outcome[Any]], None]]] = []
        # readings sorted from the bus batch being classified, handed to the group commit as one item
        self._readings: list[Reading] = []
        self._invalid: list[tuple[Reading, str]] = []
        self._by_kind: dict[str, Callable[[BusEvent, float], None]] = {
            "connected": self._connected, "disconnected": self._disconnected, "subscribed": self._subscribed,
            "message": self._message}
        self._by_channel: dict[str, Callable[[str, BusEvent, float], None]] = {
            "telemetry": self._telemetry, "twin/reported": self._reported, "meta": self._meta,
            "cmd/result": self._cmd_result, "log": self._note, "status": self._note, "ota/status": self._ota}

    async def run(self) -> None:
        """Classify and commit until the broker has stopped and everything it handed over is committed (or, with a
        store that cannot write, given up after a few tries: the devices still hold what was not acknowledged)."""
        to_commit, sorted_ = trio.open_memory_channel[Sorted](COMMITS_WAITING)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.classify, to_commit)
            nursery.start_soon(self.group.run, sorted_)

    async def classify(self, to_commit: trio.MemorySendChannel[Sorted]) -> None:
        """Take bus events in batches until the broker has stopped; closes the channel to the commit then."""
        async with to_commit, self.control_requests:
            while batch := await self.link.receive_batch():
                BUS_STAGE.observe(time.monotonic() - batch[0].at)
                for event in batch:
                    try:
                        self._classify(event)
                    except Rejected as exc:
                        self._reject(event, exc.reason, str(exc))
                    except Exception as exc:  # a message nobody foresaw costs that message, never the daemon
                        log.exception("message not handled client=%s topic=%s", wire.clip(event.client_id),
                                      wire.clip(event.topic))
                        self._reject(event, "internal", f"{type(exc).__name__}: {wire.clip(str(exc))}")
                writes, self._writes = self._writes, []
                for apply, done in writes:
                    await self.writer.submit(apply, done)
                if self._readings or self._invalid:
                    batch_sorted = (self._readings, self._invalid, batch[0].at)  # the bus hands events over in order
                    self._readings, self._invalid = [], []
                    self.group.uncommitted += len(batch_sorted[0]) + len(batch_sorted[1])
                    await to_commit.send(batch_sorted)

    def _reject(self, event: BusEvent, reason: str, detail: str) -> None:
        self.counts[f"rejected_{reason}"] += 1
        parsed = parse_topic(event.topic)
        device = parsed[0] if parsed else event.username
        self.refusals.refused(str(device), reason, f"rejected reason={reason} device={device} "
                              f"topic={wire.clip(event.topic)} detail={wire.clip(detail, 400)}", detail=detail)
        self._write(partial(self.changes.reject, device=device, reason=reason, detail=detail, payload=event.payload,
                            now=time.time(), registered=device in self.roster))

    def _write(self, apply: Callable[[Database], Any],
               then: Callable[[Any], None] | None = None) -> None:
        """Queue a store write after this batch; `then` gets its result. A failure is counted and logged."""
        def done(result: outcome.Outcome[Any]) -> None:
            if isinstance(result, outcome.Error):
                self.counts["store_write_failed"] += 1
                # while the store cannot write, the writer has said so once; one line per message would flood the log
                (log.debug if self.writer.failure else log.error)("store write failed: %s", result.error)
            elif then is not None and isinstance(result, outcome.Value):
                then(result.value)
        self._writes.append((apply, done))

    def _model_known(self, device: str, model: Model | None) -> None:
        self.roster.set_model(device, model)
        self.watch.meta(device)

    def _classify(self, event: BusEvent) -> None:
        handler = self._by_kind.get(event.kind)
        if handler is not None:
            handler(event, time.time())

    # -- by the bus event's kind ------------------------------------------------------------------------------------

    def _connected(self, event: BusEvent, now: float) -> None:
        if is_device_user(event.username) and self.roster.connection_opened(event.client_id):
            log.info("device online device=%s", event.client_id)
            self._write(partial(self.changes.presence, device=event.client_id, online=True, now=now))
            self.watch.presence(event.client_id, True)

    def _disconnected(self, event: BusEvent, now: float) -> None:
        if is_device_user(event.username) and self.roster.connection_closed(event.client_id):
            log.info("device offline device=%s", event.client_id)
            self._write(partial(self.changes.presence, device=event.client_id, online=False, now=now))
            self.watch.presence(event.client_id, False)

    def _subscribed(self, event: BusEvent, now: float) -> None:
        if is_device_user(event.username):
            if topic_matches(event.topic, device_topic(event.client_id, "time")):
                self.link.publish([time_message(event.client_id, now)])  # a board's clock starts unset
            if topic_matches(event.topic, device_topic(event.client_id, "ota")):
                self.watch.ota_listening(event.client_id)
            if topic_matches(event.topic, device_topic(event.client_id, "cmd")):  # listening: what was held for it
                device = event.client_id
                self._write(partial(store.take_held, device_id=device, now=now),
                            lambda held: self.commands.release(device, held))
            if topic_matches(event.topic, device_topic(event.client_id, "twin/desired")):
                self._write(partial(store.get_twin, device_id=event.client_id),
                            lambda twin: self.link.publish([desired_message(event.client_id, twin)]))
        elif event.username is not None and event.username.startswith(INTEGRATION_PREFIX):
            self.watch.integration(event)  # Home Assistant subscribed: it gets what a retaining broker would send

    def _message(self, event: BusEvent, now: float) -> None:
        if event.topic == CONTROL_REQUEST and event.username == ADMIN_USER:
            try:
                self.control_requests.send_nowait(event.payload)
            except trio.WouldBlock:
                log.warning("control request dropped: too many in progress")
            return
        if event.username is not None and event.username.startswith(INTEGRATION_PREFIX):
            self.watch.integration(event)  # its credential confines it to its own topics, never a device's
            return
        parsed = parse_topic(event.topic)
        if parsed is None:
            return  # admin traffic outside the device space is not ours to judge
        device, channel = parsed
        handler = self._by_channel.get(channel)
        if handler is None:
            if is_device_user(event.username):
                raise Rejected("unknown_channel", f"devices do not publish on {wire.clip(channel, 80)!r}")
            return  # edge -> device traffic (ack, twin/desired, cmd) sent by an admin app
        if device not in self.roster:
            raise Rejected("unknown_device", f"device {device!r} is not registered")
        handler(device, event, now)

    # -- a registered device's message, by its channel ---------------------------------------------------------------

    def _telemetry(self, device: str, event: BusEvent, now: float) -> None:
        parsed = parse_batch(device, event.payload, now)
        if len(parsed) > 1:  # how much boards catch up in batches (readings_received counts the readings)
            self.counts["telemetry_batches"] += 1
        refused = [r for r in parsed if isinstance(r, Rejected)]
        if refused:  # one refusal per message, not per reading: a batch of 100 bad ones must not store 100 copies
            detail = "; ".join(str(r) for r in refused[:3])
            self._reject(event, refused[0].reason,
                         f"{len(refused)} of {len(parsed)} readings: {detail}" if len(parsed) > 1 else detail)
        for reading in parsed:
            if not isinstance(reading, Rejected):
                self._take(device, event, reading, now)

    def _take(self, device: str, event: BusEvent, reading: Reading, now: float) -> None:
        model = self.roster.models[device]
        reason = model.check_values(reading.values) if model else check_values_without_model(reading.values)
        if reason and model is not None and model.on_invalid == "drop_value":
            kept, reasons = model.split_values(reading.values)
            if kept:  # the model keeps what fits: the reading is stored without the bad values
                self.counts["rejected_invalid_value"] += len(reasons)
                self.refusals.refused(device, "drop_value", f"dropped values device={device} boot={reading.boot} "
                                      f"seq={reading.seq} detail={'; '.join(reasons)}", detail="; ".join(reasons))
                self._write(partial(self.changes.reject, device=device, reason="invalid_value",
                                    detail=f"boot {reading.boot} seq {reading.seq}: " + "; ".join(reasons),
                                    payload=event.payload, now=now, registered=True))
                reading = replace(reading, values=kept)
                reason = None
        if reason:
            self.counts["rejected_invalid_value"] += 1
            self.refusals.refused(
                device, "invalid_value", f"rejected reason=invalid_value device={device} boot={reading.boot} "
                f"seq={reading.seq} detail={reason}",
                f"its readings are not stored until the model allows them: add what it sends to its model and "
                f"load it again (`edgetrio model add FILE`); `edgetrio rejects --device {device}` lists them",
                detail=reason)
            self._invalid.append((reading, reason))
        else:
            self._readings.append(reading)

    def _reported(self, device: str, event: BusEvent, now: float) -> None:
        state = parse_object(event.payload).get("state")
        if not isinstance(state, dict):
            raise Rejected("bad_envelope", "twin/reported needs {\"state\": {...}}")
        self._write(partial(self.changes.reported, device=device, state=state), partial(self.watch.reported, device))

    def _meta(self, device: str, event: BusEvent, now: float) -> None:
        meta = parse_object(event.payload)
        if meta.get("resources"):
            try:
                Model.from_dict({"resources": meta["resources"]}, name=f"device:{device}")
            except RegistryError as exc:
                raise Rejected("bad_meta", str(exc)) from exc
        self._write(partial(self.changes.meta, device=device, meta=meta, now=now))
        self._write(partial(store.device_model, device_id=device), partial(self._model_known, device))
        model = self.roster.models.get(device)
        missing = missing_from_model(model, meta)
        if model is not None and missing:  # its readings will be refused: say so now, not only once per reading
            self.refusals.refused(
                device, "model_lacks", f"device {device} announces {', '.join(missing)}, which its model "
                f"{model.name!r} lacks: readings with them will be refused", "add them to the model and load it "
                "again (`edgetrio model add FILE`)")

    def _cmd_result(self, device: str, event: BusEvent, now: float) -> None:
        body = parse_object(event.payload)
        cmd_id = body.get("id")
        if not isinstance(cmd_id, str):
            raise Rejected("bad_envelope", "cmd/result needs a string 'id'")
        if not self.commands.deliver(device, cmd_id, body):
            self._write(partial(record_late_result, cmd_id=cmd_id, body=body, now=now))

    def _ota(self, device: str, event: BusEvent, now: float) -> None:
        body = parse_object(event.payload)
        if body.get("state") != "receiving":  # the steps of an update, not each chunk, go on the device's log
            self._write(partial(self.changes.event, device=device, kind="ota", body=body, now=now))
        self.watch.ota(device, body)

    def _note(self, device: str, event: BusEvent, now: float) -> None:  # log and status lines, kept as events
        channel = event.topic.rsplit("/", 1)[1]
        body = parse_note(event.payload)
        self._write(partial(self.changes.event, device=device, kind=channel, body=body, now=now))
        wake_in = body.get("wake_in") if isinstance(body, dict) and body.get("state") == "asleep" else None
        if channel == "status" and isinstance(wake_in, int | float) and not isinstance(wake_in, bool) \
                and 0 < wake_in <= MAX_SLEEP_S:  # a battery board going to sleep: when it wakes next
            self.roster.asleep[device] = now + wake_in
            self._write(partial(self.changes.asleep, device=device, until=now + wake_in))
