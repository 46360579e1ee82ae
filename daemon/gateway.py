"""The gateway daemon: broker -> ingest -> store, with the twin, commands and the local control channel.

One trio process. The broker thread hands bus events over in batches; ingest sorts them into store operations; the
writer commits them in groups and only then are devices acknowledged (`ack`) and callers answered.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import outcome
import trio
from sqlite_utils import Database

from edgetrio import wire
from edgetrio.daemon import store
from edgetrio.daemon.broker import BrokerLink, BusEvent, Credentials, open_broker
from edgetrio.daemon.config import LOCK_FILE, RUN_FILE, ConfigError, DaemonConfig, admin_credential
from edgetrio.daemon.devices import SerialDevice
from edgetrio.daemon.edgehub import EdgeHub
from edgetrio.daemon.ingest import (
    CONTROL_REPLY_ROOT,
    CONTROL_REQUEST,
    DEVICE_CHANNELS,
    Reading,
    Rejected,
    device_topic,
    parse_object,
    parse_telemetry,
    parse_topic,
)
from edgetrio.daemon.registry import Model, check_values_without_model
from edgetrio.identity import ADMIN_USER, RegistryError
from edgetrio.twin import Twin, VersionConflict, set_desired, set_reported
from edgetrio.writer import Writer, open_writer

log = logging.getLogger("edgetrio.gateway")


class DaemonError(Exception):
    """The daemon cannot start; the message is one line for the user."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching for one concrete topic."""
    fparts, tparts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(fparts):
        if part == "#":
            return True
        if i >= len(tparts) or (part != "+" and part != tparts[i]):
            return False
    return len(fparts) == len(tparts)


@dataclass
class DeviceEntry:
    model: Model | None


class Gateway:
    """Sorts bus events into store operations and answers the local control channel."""

    def __init__(self, link: BrokerLink, writer: Writer, credentials: Credentials, db: Database,
                 cloud: bool = False) -> None:
        self.link = link
        self.cloud = cloud  # with a cloud link, state changes also go into the outbox, in the same transaction
        self.writer = writer
        self.credentials = credentials
        self.counts: Counter[str] = Counter()
        self._flushed: Counter[str] = Counter()
        self.connections: Counter[str] = Counter()
        self.devices: dict[str, DeviceEntry] = {}
        self.pending_commands: dict[str, tuple[str, trio.MemorySendChannel[dict[str, Any]]]] = {}
        self.requests: trio.Nursery | None = None
        self.hub: EdgeHub | None = None
        # store writes decided while sorting one batch, queued after it
        self._pending_writes: list[tuple[Callable[[Database], Any], Callable[[outcome.Outcome[Any]], None]]] = []
        # readings sorted by ingest, waiting for the next group commit
        # readings sorted from the bus batch being classified, then handed to the group commit as one item
        self._readings: list[Reading] = []
        self._invalid: list[tuple[Reading, str]] = []
        # A few bus batches may wait for the commit in flight; past that, ingest waits and the broker refuses.
        self._to_commit, self._sorted = trio.open_memory_channel[tuple[list[Reading], list[tuple[Reading, str]]]](8)
        self.uncommitted = 0  # readings handed to the commit and not committed yet (held while the store cannot write)
        self.max_held = 20_000
        self.started = time.time()
        for row in store.list_devices(db):
            self.devices[row["id"]] = DeviceEntry(store.device_model(db, row["id"]))
        # presence left over from a previous run that ended abruptly
        db.execute("UPDATE devices SET online = 0 WHERE online = 1")
        db.conn.commit()

    # -- ingest ------------------------------------------------------------------------------------------------------

    async def ingest(self) -> None:
        """Take bus events in batches until the broker has stopped and every event is handed to the writer or the
        group commit (whose channel it closes then)."""
        async with self._to_commit:
            while batch := await self.link.receive_batch():
                for event in batch:
                    try:
                        self._classify(event)
                    except Rejected as exc:
                        self._reject(event, exc.reason, str(exc))
                    except Exception as exc:  # a message nobody foresaw costs that message, never the daemon
                        log.exception("message not handled client=%s topic=%s", wire.clip(event.client_id),
                                      wire.clip(event.topic))
                        self._reject(event, "internal", f"{type(exc).__name__}: {wire.clip(str(exc))}")
                writes, self._pending_writes = self._pending_writes, []
                for apply, done in writes:
                    await self.writer.submit(apply, done)
                if self._readings or self._invalid:
                    sorted_, self._readings, self._invalid = (self._readings, self._invalid), [], []
                    self.uncommitted += len(sorted_[0]) + len(sorted_[1])
                    await self._to_commit.send(sorted_)

    async def commit_readings(self) -> None:
        """Group commit: one readings transaction in flight; what arrives meanwhile goes into the next one.

        Keeping a single commit in flight makes one `ack` per device per commit, however fast readings arrive.
        While the store cannot write (a full disk), readings are held here and retried; none is acknowledged, and past
        `max_held` this stops taking more, so ingest waits and the broker refuses. Returns once ingest has closed the
        channel and everything it sent is committed (when stopping with a store that cannot write, after a few more
        tries: the devices still hold what was not acknowledged).
        """
        readings: list[Reading] = []
        invalid: list[tuple[Reading, str]] = []
        retry_in = 0.25
        async with self._sorted:
            while True:
                if not (readings or invalid):
                    try:
                        readings, invalid = await self._sorted.receive()
                    except trio.EndOfChannel:
                        return
                while len(readings) + len(invalid) < self.max_held:  # everything that waits joins this commit
                    try:
                        more, more_invalid = self._sorted.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    readings, invalid = readings + more, invalid + more_invalid
                try:
                    acks = await self.writer.write(
                        partial(self._commit_readings, readings=readings, invalid=invalid, now=time.time()))
                except Exception as exc:
                    if self.writer.failure is None:  # this batch failed, not the store: holding it would block all
                        log.error("%d readings not committed, not acknowledged: %s", len(readings) + len(invalid), exc)
                        self.uncommitted -= len(readings) + len(invalid)
                        readings, invalid = [], []
                        continue
                    log.debug("%d readings held, not committed: %s", len(readings) + len(invalid), exc)
                    if self._sorted.statistics().open_send_channels == 0 and retry_in >= 2:
                        # stopping: the devices still hold what was not acknowledged
                        log.warning("stopping with %d readings not committed (not acknowledged either)", self.uncommitted)
                        return
                    retry_in = min(retry_in * 2, 10.0)
                    await trio.sleep(retry_in)
                    continue
                retry_in = 0.25
                self.uncommitted -= len(readings) + len(invalid)
                self.counts["readings_received"] += len(readings)
                readings, invalid = [], []
                # QoS 0 is enough: acks are cumulative, a lost one is repaired by the next
                self.link.publish([(device_topic(device, "ack"), json.dumps({"boot": boot, "seq": seq}).encode())
                                   for (device, boot), seq in acks.items()], qos=0)

    def _reject(self, event: BusEvent, reason: str, detail: str) -> None:
        self.counts[f"rejected_{reason}"] += 1
        parsed = parse_topic(event.topic)
        device = parsed[0] if parsed else event.username
        log.warning("rejected reason=%s device=%s topic=%s detail=%s", reason, device, event.topic[:200], detail)
        self._spawn_write(partial(store.record_reject, device_id=device, reason=reason, detail=detail,
                                  payload=event.payload, now=time.time()))

    def _spawn_write(self, apply: Callable[[Database], Any]) -> None:
        """Queue a store write whose result nobody waits for; a failure is logged."""
        def done(result: outcome.Outcome[Any]) -> None:
            if isinstance(result, outcome.Error):
                self.counts["store_write_failed"] += 1
                # while the store cannot write, the writer has said so once; one line per message would flood the log
                (log.debug if self.writer.failure else log.error)("store write failed: %s", result.error)
        self._pending_writes.append((apply, done))

    def _classify(self, event: BusEvent) -> None:
        device_client = event.username is not None and event.username != ADMIN_USER
        now = time.time()
        if event.kind == "connected" and device_client:
            self.connections[event.client_id] += 1
            if self.connections[event.client_id] == 1 and event.client_id in self.devices:
                log.info("device online device=%s", event.client_id)
                self._spawn_write(partial(self._presence, device=event.client_id, online=True, now=now))
            return
        if event.kind == "disconnected" and device_client:
            # presence counts connections: the will of a replaced connection arrives after the new one's birth
            self.connections[event.client_id] -= 1
            if self.connections[event.client_id] <= 0:
                del self.connections[event.client_id]
                if event.client_id in self.devices:
                    log.info("device offline device=%s", event.client_id)
                    self._spawn_write(partial(self._presence, device=event.client_id, online=False, now=now))
            return
        if event.kind == "subscribed" and device_client:
            desired_topic = device_topic(event.client_id, "twin/desired")
            if topic_matches(event.topic, desired_topic):
                self._send_desired(event.client_id)
            return
        if event.kind != "message":
            return
        if event.topic == CONTROL_REQUEST and event.username == ADMIN_USER:
            self._start_request(event.payload)
            return
        parsed = parse_topic(event.topic)
        if parsed is None:
            return  # admin traffic outside the device space is not ours to judge
        device, channel = parsed
        if channel not in DEVICE_CHANNELS:
            if device_client:
                raise Rejected("unknown_channel", f"devices do not publish on {channel!r}")
            return  # edge -> device traffic (ack, twin/desired, cmd) sent by an admin app
        entry = self.devices.get(device)
        if entry is None:
            raise Rejected("unknown_device", f"device {device!r} is not registered")
        if channel == "telemetry":
            reading = parse_telemetry(device, event.payload)
            model = entry.model
            reason = model.check_values(reading.values) if model else check_values_without_model(reading.values)
            if reason:
                self.counts["rejected_invalid_value"] += 1
                log.warning("rejected reason=invalid_value device=%s boot=%d seq=%d detail=%s",
                            device, reading.boot, reading.seq, reason)
                self._invalid.append((reading, reason))
            else:
                self._readings.append(reading)
        elif channel == "twin/reported":
            body = parse_object(event.payload)
            state = body.get("state")
            if not isinstance(state, dict):
                raise Rejected("bad_envelope", "twin/reported needs {\"state\": {...}}")
            self._spawn_write(partial(self._apply_reported, device=device, state=state))
        elif channel == "meta":
            meta = parse_object(event.payload)
            if meta.get("resources"):
                try:
                    Model.from_dict({"resources": meta["resources"]}, name=f"device:{device}")
                except RegistryError as exc:
                    raise Rejected("bad_meta", str(exc)) from exc
            self._spawn_write(partial(self._record_meta, device=device, meta=meta, now=now))
            self._refresh_model(device)
        elif channel == "cmd/result":
            body = parse_object(event.payload)
            cmd_id = body.get("id")
            if not isinstance(cmd_id, str):
                raise Rejected("bad_envelope", "cmd/result needs a string 'id'")
            waiter = self.pending_commands.get(cmd_id)
            if waiter is not None and waiter[0] == device:
                with contextlib.suppress(trio.WouldBlock):  # a repeated result: the first one counts
                    waiter[1].send_nowait(body)
            else:
                self._spawn_write(partial(self._late_result, cmd_id=cmd_id, body=body, now=now))
        elif channel in ("log", "status"):
            note: Any
            try:
                note = wire.loads(event.payload)
            except ValueError:
                note = event.payload[:4096].decode("utf-8", "replace")
            self._spawn_write(partial(store.record_event, device_id=device, kind=channel, body=note, now=now))

    def _refresh_model(self, device: str) -> None:
        def done(result: outcome.Outcome[Model | None]) -> None:
            if isinstance(result, outcome.Value) and device in self.devices:
                self.devices[device] = DeviceEntry(result.value)
        self._pending_writes.append((partial(store.device_model, device_id=device), done))

    def _up(self, db: Database, resource: str, body: Any) -> None:
        if self.cloud:
            store.outbox_add(db, resource, body, time.time())

    def snapshot_up(self, db: Database) -> None:
        """Queue the registry and twins for the cloud, so it knows devices registered before the link existed."""
        for row in store.list_devices(db):
            self._up(db, "device", {"device": row["id"], "registered": True, "model": row["model"],
                                    "online": row["online"], "last_seen": row["last_seen"], "meta": row["meta"]})
            self._up(db, "twin", {"device": row["id"], "twin": store.get_twin(db, row["id"]).as_json()})

    def _presence(self, db: Database, device: str, online: bool, now: float) -> None:
        store.set_presence(db, device, online, now)
        self._up(db, "device", {"device": device, "online": online, "last_seen": now})

    def _record_meta(self, db: Database, device: str, meta: dict[str, Any], now: float) -> None:
        store.record_meta(db, device, meta, now)
        self._up(db, "device", {"device": device, "meta": meta, "last_seen": now})

    def _apply_reported(self, db: Database, device: str, state: dict[str, Any]) -> Twin:
        twin = set_reported(store.get_twin(db, device), state)
        store.save_twin(db, device, twin)
        self._up(db, "twin", {"device": device, "twin": twin.as_json()})
        return twin

    def _commit_readings(self, db: Database, readings: list[Reading], invalid: list[tuple[Reading, str]],
                         now: float) -> dict[tuple[str, int], int]:
        acks = store.commit_readings(db, readings, invalid, now)
        for start in range(0, len(readings), 1000):  # rows of bounded size: each must fit a WebSocket frame
            self._up(db, "readings", {"readings": [
                {"device": r.device, "boot": r.boot, "seq": r.seq, "ts": r.ts if r.ts is not None else now,
                 "values": r.values} for r in readings[start:start + 1000]]})
        return acks

    @staticmethod
    def _late_result(db: Database, cmd_id: str, body: dict[str, Any], now: float) -> None:
        status = "ok" if body.get("ok") else "error"
        if store.finish_command(db, cmd_id, status, body, now):
            log.info("late command result stored id=%s", cmd_id)

    def _send_desired(self, device: str) -> None:
        def done(result: outcome.Outcome[Twin]) -> None:
            if isinstance(result, outcome.Value):
                self.publish_desired(device, result.value)
        self._pending_writes.append((partial(store.get_twin, device_id=device), done))

    def publish_desired(self, device: str, twin: Twin) -> None:
        self.link.publish([(device_topic(device, "twin/desired"), json.dumps(twin.desired_message()).encode())])

    # -- local control channel -------------------------------------------------------------------------------------

    def _start_request(self, payload: bytes) -> None:
        try:
            request = parse_object(payload)
        except Rejected as exc:
            log.warning("control request is not a JSON object: %s", exc)
            return
        reply_to = request.get("reply_to")
        if not isinstance(reply_to, str) or not reply_to.startswith(CONTROL_REPLY_ROOT):
            log.warning("control request without a usable reply_to")
            return
        assert self.requests is not None
        self.requests.start_soon(self._answer, request, reply_to)

    async def _answer(self, request: dict[str, Any], reply_to: str) -> None:
        reply: dict[str, Any] = {"id": request.get("id")}
        try:
            reply["result"] = await self.handle(str(request.get("op")), request.get("args") or {})
        except VersionConflict as exc:
            reply["error"], reply["code"] = str(exc), "conflict"
        except (RegistryError, ValueError, KeyError, TypeError) as exc:
            reply["error"], reply["code"] = str(exc), "invalid"
        except CommandFailed as exc:
            reply["error"], reply["code"] = str(exc), exc.code
        except Exception as exc:  # a request the daemon did not foresee must not stop it
            log.exception("control request %r failed", request.get("op"))
            reply["error"], reply["code"] = f"internal error: {type(exc).__name__}: {exc}", "internal"
        self.link.publish([(reply_to, json.dumps(reply).encode())])

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        """Carry out one control operation; raises RegistryError/ValueError/VersionConflict/CommandFailed."""
        if op == "device.add":
            device_id, model = args["id"], args.get("model")
            secret = await self.writer.write(partial(self._register, device=device_id, model=model))
            await self._after_registry_change(device_id)
            return {"id": device_id, "username": device_id, "password": secret}
        if op == "device.remove":
            device_id = args["id"]
            await self.writer.write(partial(self._unregister, device=device_id))
            await self._after_registry_change(device_id)
            return {"id": device_id, "removed": True}
        if op == "model.add":
            model = Model.from_dict(args.get("model"))
            await self.writer.write(partial(store.add_model, model=model))
            await self._refresh_models()
            return model.as_dict()
        if op == "twin.set":
            device_id, patch, version = args["id"], args["patch"], args.get("version")
            if not isinstance(patch, dict) or not patch:
                raise ValueError("twin set needs at least one key=value")
            twin = await self.writer.write(partial(self._apply_desired, device=device_id, patch=patch, version=version))
            self.publish_desired(device_id, twin)
            return twin.as_json()
        if op == "cmd":
            return await self.command(args["id"], str(args["name"]), args.get("args") or {},
                                      float(args.get("timeout", 10)))
        if op == "status":
            return self.status()
        raise ValueError(f"unknown operation {op!r}")

    def _apply_desired(self, db: Database, device: str, patch: dict[str, Any], version: int | None) -> Twin:
        twin = set_desired(store.get_twin(db, device), patch, version)
        store.save_twin(db, device, twin)
        self._up(db, "twin", {"device": device, "twin": twin.as_json()})
        return twin

    def _register(self, db: Database, device: str, model: str | None, secret_hash: str | None = None) -> str:
        secret = store.add_device(db, device, model, secret_hash)
        self._up(db, "device", {"device": device, "registered": True, "model": model})
        return secret

    def _unregister(self, db: Database, device: str) -> None:
        store.remove_device(db, device)
        self._up(db, "device", {"device": device, "registered": False})

    async def _after_registry_change(self, device_id: str) -> None:
        self.credentials.devices = await self.writer.write(store.device_secrets)
        if device_id in self.credentials.devices:
            self.devices[device_id] = DeviceEntry(await self.writer.write(partial(store.device_model, device_id=device_id)))
        else:
            self.devices.pop(device_id, None)
            self.link.disconnect(device_id)

    async def _refresh_models(self) -> None:
        for device_id in list(self.devices):
            self.devices[device_id] = DeviceEntry(await self.writer.write(partial(store.device_model, device_id=device_id)))

    # -- messages from the cloud ---------------------------------------------------------------------------------------

    async def apply_down(self, message_id: str, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        """Apply one message from the cloud in one transaction, once: a repeated id returns the first result."""
        now = time.time()

        def apply(db: Database) -> tuple[bool, dict[str, Any]]:
            prior = store.inbox_result(db, message_id)
            if prior is not None:
                return False, prior
            try:
                with db.atomic():
                    result = self._apply_down(db, resource, body)
            except (RegistryError, VersionConflict, KeyError, TypeError, ValueError) as exc:
                result = {"ok": False, "error": str(exc) or type(exc).__name__}
            store.inbox_record(db, message_id, result, now)
            return True, result

        new, result = await self.writer.write(apply)
        if not new or not result.get("ok"):
            return result
        device = body.get("device")
        if resource == "twin" and isinstance(device, str):
            self.publish_desired(device, Twin(result["twin"]["desired"]["state"], result["twin"]["desired"]["version"]))
        elif resource == "device" and isinstance(device, str):
            await self._after_registry_change(device)
        elif resource == "model":
            await self._refresh_models()
        elif resource == "cmd":
            assert self.requests is not None
            self.requests.start_soon(self._cloud_command, body)
        return result

    def _apply_down(self, db: Database, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        if resource == "twin":
            twin = self._apply_desired(db, str(body["device"]), dict(body["patch"]), None)
            return {"ok": True, "twin": twin.as_json()}
        if resource == "device":
            if body.get("remove"):
                self._unregister(db, str(body["device"]))
            else:
                self._register(db, str(body["device"]), body.get("model"), str(body["secret_hash"]))
            return {"ok": True}
        if resource == "model":
            store.add_model(db, Model.from_dict(body["model"]))
            return {"ok": True}
        if resource == "cmd":
            if body.get("device") not in self.devices:
                raise store.UnknownDevice(str(body.get("device")))
            return {"ok": True, "dispatched": True}
        raise ValueError(f"unknown resource {resource!r}")

    async def _cloud_command(self, body: dict[str, Any]) -> None:
        """Run a command that came from the cloud; its result goes up through the outbox."""
        outcome_: dict[str, Any]
        try:
            result = await self.command(str(body["device"]), str(body["name"]), body.get("args") or {},
                                        float(body.get("timeout", 10)))
            outcome_ = {"result": result}
        except (CommandFailed, RegistryError) as exc:
            outcome_ = {"error": str(exc), "code": getattr(exc, "code", "invalid")}
        except Exception as exc:  # a store that cannot write, say: the command fails, the daemon goes on
            outcome_ = {"error": f"{type(exc).__name__}: {exc}", "code": "failed"}
        up = {"cmd": body.get("cmd"), "device": body.get("device"), **outcome_}
        try:
            await self.writer.write(partial(self._up, resource="cmd_result", body=up))
        except Exception as exc:  # the relay times the command out; the daemon goes on
            log.error("result of cloud command %s not queued for the cloud: %s", wire.clip(body.get("cmd")), exc)

    async def command(self, device: str, name: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a command and wait for its result; records it and its outcome in the store."""
        if device not in self.devices:
            raise store.UnknownDevice(device)
        if device not in self.connections:
            raise CommandFailed("offline", f"device {device!r} is not connected")
        cmd_id = uuid.uuid4().hex[:16]
        await self.writer.write(partial(store.record_command, cmd_id=cmd_id, device_id=device, name=name, args=args,
                                        now=time.time()))
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self.pending_commands[cmd_id] = (device, send)
        try:
            self.link.publish([(device_topic(device, "cmd"),
                                json.dumps({"id": cmd_id, "name": name, "args": args}).encode())])
            with trio.move_on_after(timeout):
                result = await receive.receive()
                status = "ok" if result.get("ok") else "error"
                await self.writer.write(partial(store.finish_command, cmd_id=cmd_id, status=status, result=result,
                                                now=time.time()))
                return result
        finally:
            del self.pending_commands[cmd_id]
        await self.writer.write(partial(store.finish_command, cmd_id=cmd_id, status="timeout", result=None,
                                        now=time.time()))
        raise CommandFailed("timeout", f"device {device!r} did not answer command {name!r} within {timeout:g} s")

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "devices_connected": sorted(d for d in self.connections if d in self.devices),
            "counters": dict(self.live_counters()),
            "writer": {"batches": self.writer.batches, "operations": self.writer.ops},
            "store": {"ok": self.writer.failure is None, "error": self.writer.failure,
                      "failing_since": self.writer.failing_since,
                      "readings_held": self.uncommitted},
            "cloud": self.hub.state() if self.hub else None,
        }

    def live_counters(self) -> Counter[str]:
        out = Counter(self.counts)
        out.update(self.link.counters())
        if self.hub is not None and self.hub.dropped:
            out["outbox_dropped"] = self.hub.dropped
        return out

    async def flush_counters(self) -> None:
        """Add what was counted since the last flush to the persistent counters."""
        current = self.live_counters()
        delta = current - self._flushed
        if delta:
            try:
                await self.writer.write(partial(store.add_counters, counts=delta))
            except Exception as exc:  # the store cannot write: the delta waits for the next flush
                log.debug("counters not flushed: %s", exc)
                return
            self._flushed = current

    async def keep_retention(self, days: float) -> None:
        """Hourly, delete what is older than the retention period (a gateway's disk is small)."""
        while days > 0:
            before, deleted = time.time() - days * 86400, 0
            try:
                while chunk := await self.writer.write(partial(store.prune, before=before)):
                    deleted += chunk  # in chunks, each its own commit, so readings keep flowing meanwhile
            except Exception as exc:  # the store cannot write now; the next round deletes what this one did not
                log.warning("retention: stopped after %d rows: %s", deleted, exc)
            if deleted:
                log.info("retention: deleted %d rows older than %g days", deleted, days)
            await trio.sleep(3600)

    async def flush_counters_every(self, seconds: float) -> None:
        while True:
            await trio.sleep(seconds)
            await self.flush_counters()


class CommandFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def lock_data_dir(cfg: DaemonConfig) -> int:
    """Hold an exclusive lock on the data dir for the life of the process, so two daemons never share it."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonError(f"another daemon is already running on {cfg.data_dir}") from None
    return fd


def daemon_running(data_dir: Any) -> bool:
    path = data_dir / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def run(cfg: DaemonConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the gateway until SIGINT or SIGTERM; then stop the broker, commit what was received, and return.

    Reports the bound MQTT port through task_status once devices can connect. Raises DaemonError or ConfigError
    (one-line messages) when it cannot start.
    """
    lock_fd = lock_data_dir(cfg)
    try:
        try:
            db = store.open_db(cfg.data_dir)
        except RegistryError as exc:
            raise DaemonError(str(exc)) from exc
        _, admin_secret = admin_credential(cfg.data_dir)
        credentials = Credentials(admin_secret, store.device_secrets(db))
        tls = (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert and cfg.tls_key else None
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_writer(db) as writer, trio.open_nursery() as nursery:
                ingest_done = trio.Event()
                periodic = trio.CancelScope()
                async with open_broker(cfg.mqtt_host, cfg.mqtt_port, credentials, max_pending=cfg.max_pending,
                                       max_payload=cfg.max_payload, tls=tls, connect_timeout=cfg.connect_timeout,
                                       max_unauthenticated=cfg.max_unauthenticated,
                                       max_pending_bytes=cfg.max_pending_bytes,
                                       max_device_bytes=cfg.max_device_pending_bytes) as link:
                    gateway = Gateway(link, writer, credentials, db, cloud=bool(cfg.cloud_url))

                    async def ingest() -> None:
                        async with trio.open_nursery() as pipeline:
                            pipeline.start_soon(gateway.ingest)
                            pipeline.start_soon(gateway.commit_readings)
                        ingest_done.set()

                    async def chores_until_stopped() -> None:
                        with periodic:
                            async with trio.open_nursery() as chores:
                                chores.start_soon(gateway.keep_retention, cfg.retention_days)
                                chores.start_soon(gateway.flush_counters_every, 5)

                    nursery.start_soon(ingest)
                    nursery.start_soon(chores_until_stopped)
                    async with trio.open_nursery() as requests:
                        gateway.requests = requests
                        for port in cfg.serial:
                            requests.start_soon(SerialDevice(port, link, credentials).run)
                        if cfg.cloud_url:
                            hub = EdgeHub(cfg.cloud_url, str(cfg.node_id), str(cfg.cloud_token), writer, gateway.apply_down,
                                          max_rows=cfg.outbox_max_rows, max_age=cfg.outbox_max_age,
                                          cafile=cfg.cloud_cafile)
                            gateway.hub = hub
                            await writer.write(gateway.snapshot_up)
                            await requests.start(hub.run)
                        _write_run_file(cfg, link.port)
                        log.info("daemon ready data_dir=%s mqtt=%s:%d devices=%d", cfg.data_dir, cfg.mqtt_host,
                                 link.port, len(gateway.devices))
                        task_status.started(link.port)
                        async for signum in signals:
                            log.info("stopping on %s", signal.Signals(signum).name)
                            break
                        requests.cancel_scope.cancel()
                # the broker has stopped: commit what it handed over; leaving open_writer lets the writer finish
                await ingest_done.wait()
                periodic.cancel()
                await gateway.flush_counters()
            log.info("daemon stopped; %d operations committed in %d batches", writer.ops, writer.batches)
    finally:
        (cfg.data_dir / RUN_FILE).unlink(missing_ok=True)
        os.close(lock_fd)


def _write_run_file(cfg: DaemonConfig, port: int) -> None:
    host = cfg.mqtt_host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    tmp = cfg.data_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "mqtt_host": host, "mqtt_port": port}))
    tmp.replace(cfg.data_dir / RUN_FILE)


def read_run_file(data_dir: Any) -> dict[str, Any]:
    path = data_dir / RUN_FILE
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        return info
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no running daemon found in {data_dir} (start one with `edgetrio daemon`)") from exc
