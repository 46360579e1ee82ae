"""Durable changes of the gateway's state, each written with what mirrors it to the cloud in the same transaction.

The functions run inside the writer's transaction (they take the `Database`); `Mirror` is given by the cloud link
when there is one (it adds an outbox row) and does nothing otherwise, so a change and its mirror commit together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlite_utils import Database

from edgetrio import wire
from edgetrio.daemon import store
from edgetrio.daemon.topics import Reading
from edgetrio.identity import RegistryError
from edgetrio.models import check_desired, settings_of
from edgetrio.twin import Twin, set_desired, set_reported

# (db, resource, body): record a change for the cloud, inside the transaction that makes it
Mirror = Callable[[Database, str, Any], None]
READINGS_PER_ROW = 1000  # rows of bounded size: each must fit one WebSocket frame


def _up_reading(r: Reading, now: float) -> dict[str, Any]:
    if r.ts is None:  # the board's clock could not be trusted: its arrival, marked
        return {"device": r.device, "boot": r.boot, "seq": r.seq, "ts": now, "ts_arrival": True, "values": r.values}
    return {"device": r.device, "boot": r.boot, "seq": r.seq, "ts": r.ts, "values": r.values}


def no_mirror(_db: Database, _resource: str, _body: Any) -> None:
    """A gateway without a cloud link keeps its changes to itself."""


class StateChanges:
    """State changes of the registry, twins, alerts and rules, written in the caller's transaction together with their
    mirror to the cloud (the outbox), so the relay learns each change once and in order."""

    def __init__(self, mirror: Mirror = no_mirror) -> None:
        self.mirror = mirror

    def snapshot(self, db: Database) -> None:
        """Mirror the registry and twins, so the cloud knows devices registered before the link existed."""
        for row in store.list_devices(db):
            self.mirror(db, "device", {"device": row["id"], "registered": True, "model": row["model"],
                                       "online": row["online"], "last_seen": row["last_seen"], "meta": row["meta"]})
            self.mirror(db, "twin", {"device": row["id"], "twin": store.get_twin(db, row["id"]).as_json()})

    def presence(self, db: Database, device: str, online: bool, now: float) -> None:
        store.set_presence(db, device, online, now)
        self.mirror(db, "device", {"device": device, "online": online, "last_seen": now,
                                   **({"asleep_until": None} if online else {})})

    def asleep(self, db: Database, device: str, until: float) -> None:
        """A battery board went to sleep until about `until` (it says so before it disconnects)."""
        store.set_asleep(db, device, until)
        self.mirror(db, "device", {"device": device, "asleep_until": until})

    def meta(self, db: Database, device: str, meta: dict[str, Any], now: float) -> None:
        store.record_meta(db, device, meta, now)
        self.mirror(db, "device", {"device": device, "meta": meta, "last_seen": now})

    def reported(self, db: Database, device: str, state: dict[str, Any]) -> Twin:
        twin = set_reported(store.get_twin(db, device), state)
        store.save_twin(db, device, twin)
        self.mirror(db, "twin", {"device": device, "twin": twin.as_json()})
        return twin

    def desired(self, db: Database, device: str, patch: dict[str, Any], version: int | None) -> Twin:
        """Change the desired state; a value the device cannot take (a setting it lacks, a wrong type, out of its
        range: from its model and the controls it announced) is refused with the reason (RegistryError)."""
        row = store.get_device(db, device)
        meta = wire.loads(row["meta"]) if row is not None and row["meta"] else {}
        reason = check_desired(settings_of(store.device_model(db, device), meta if isinstance(meta, dict) else {}),
                               patch)
        if reason:
            raise RegistryError(f"{device}: desired {reason}")
        twin = set_desired(store.get_twin(db, device), patch, version)
        store.save_twin(db, device, twin)
        self.mirror(db, "twin", {"device": device, "twin": twin.as_json()})
        return twin

    def register(self, db: Database, device: str, model: str | None, secret_hash: str | None = None) -> str:
        secret = store.add_device(db, device, model, secret_hash)
        self.mirror(db, "device", {"device": device, "registered": True, "model": model})
        return secret

    def set_model(self, db: Database, device: str, model: str | None) -> None:
        store.set_device_model(db, device, model)
        self.mirror(db, "device", {"device": device, "registered": True, "model": model})

    def unregister(self, db: Database, device: str) -> None:
        store.remove_device(db, device)
        self.mirror(db, "device", {"device": device, "registered": False})

    def readings(self, db: Database, readings: list[Reading], invalid: list[tuple[Reading, str]],
                 now: float) -> dict[tuple[str, int], int]:
        """Commit readings; returns the new ack watermark per (device, boot)."""
        acks = store.commit_readings(db, readings, invalid, now)
        for reading, reason in invalid:
            self.mirror(db, "event", {"device": reading.device, "kind": "reject", "ts": now, "body": {
                "reason": "invalid_value", "detail": f"boot {reading.boot} seq {reading.seq}: {reason}"}})
        for start in range(0, len(readings), READINGS_PER_ROW):
            self.mirror(db, "readings", {"readings": [
                _up_reading(r, now) for r in readings[start:start + READINGS_PER_ROW]]})
        return acks

    def event(self, db: Database, device: str, kind: str, body: Any, now: float) -> None:
        """A device's log or status line; the cloud gets it for the device page."""
        store.record_event(db, device, kind, body, now)
        self.mirror(db, "event", {"device": device, "kind": kind, "body": body, "ts": now})

    def reject(self, db: Database, device: str | None, reason: str, detail: str, payload: bytes, now: float,
               registered: bool) -> None:
        """Something refused, kept for inspection; a registered device's go to the cloud too (not a stranger's: the
        outbox is no place for what anyone can make up)."""
        store.record_reject(db, device, reason, detail, payload, now)
        if registered and device is not None:
            self.mirror(db, "event", {"device": device, "kind": "reject", "body": {"reason": reason, "detail": detail},
                                      "ts": now})

    def command_result(self, db: Database, result: dict[str, Any]) -> None:
        self.mirror(db, "cmd_result", result)
