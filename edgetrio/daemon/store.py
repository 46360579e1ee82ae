"""The SQLite store: owns all durable state of the gateway.

The functions below are plain synchronous SQLite work: the daemon runs them through its one writer (edgetrio.writer:
group commits, one savepoint per operation), the CLI runs them directly when no daemon is running.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from edgetrio import accounts
from edgetrio.daemon.topics import INTEGRATIONS, Reading, advance_watermark
from edgetrio.identity import RegistryError, check_device_id, hash_secret, integration_user, new_secret
from edgetrio.models import Model
from edgetrio.twin import Twin
from edgetrio.writer import PRUNE_CHUNK, connect

log = logging.getLogger("edgetrio.store")
T = TypeVar("T")
DB_FILE = "edgetrio.db"


class UnknownDevice(accounts.NotFound):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"unknown device {device_id!r} (see `edgetrio device list`)")


def backup(data_dir: Path, dest: Path) -> int:
    """Copy the database to `dest` with SQLite's online backup: consistent while the daemon writes, and it holds
    no lock for long (pages go over in steps). Returns the pages copied."""
    source = sqlite3.connect(data_dir / DB_FILE)
    target = sqlite3.connect(dest)
    copied = 0

    def progress(_status: int, remaining: int, total: int) -> None:
        nonlocal copied
        copied = total - remaining

    try:
        source.backup(target, pages=256, progress=progress)
    finally:
        target.close()
        source.close()
    return copied


def open_db(data_dir: Path) -> Database:
    """Open (creating if needed) the gateway database in data_dir."""
    db = connect(data_dir / DB_FILE)
    _create_schema(db)
    return db


def _create_schema(db: Database) -> None:
    with db.atomic():
        db.table("devices").create(
            {"id": str, "model": str, "secret_hash": str, "created": float, "online": int,
             "last_seen": float, "last_connect": float, "meta": str},
            pk="id", not_null={"secret_hash"}, if_not_exists=True,
        )
        db.table("models").create({"name": str, "body": str, "source": str}, pk="name", if_not_exists=True)
        db.table("readings").create(
            {"device": str, "boot": int, "seq": int, "ts": float, "received": float, "data": str},
            pk=("device", "boot", "seq"), if_not_exists=True,
        )
        db.table("watermarks").create({"device": str, "boot": int, "seq": int}, pk=("device", "boot"), if_not_exists=True)
        db.table("rejects").create(
            {"id": int, "received": float, "device": str, "boot": int, "seq": int, "reason": str, "detail": str,
             "payload": str},
            pk="id", if_not_exists=True,
        )
        db.table("twins").create(
            {"device": str, "desired": str, "desired_version": int, "reported": str, "reported_version": int},
            pk="device", if_not_exists=True,
        )
        db.table("commands").create(
            {"id": str, "device": str, "name": str, "args": str, "sent": float, "status": str, "result": str,
             "finished": float},
            pk="id", if_not_exists=True,
        )
        db.table("events").create(
            {"id": int, "ts": float, "device": str, "kind": str, "body": str}, pk="id", if_not_exists=True
        )
        db.table("counters").create({"name": str, "value": int}, pk="name", if_not_exists=True)
        # the cloud link: what goes up waits here until the relay has committed it; applied down-message ids
        # the outbox's identity, sent with every link: a new data dir starts its offsets at 1 again, and the relay
        # must not take them for ones it has (it acknowledged and dropped a reinstalled gateway's first readings)
        db.execute("CREATE TABLE IF NOT EXISTS outbox_identity (id TEXT NOT NULL)")
        if db.execute("SELECT count(*) FROM outbox_identity").fetchone()[0] == 0:
            db.execute("INSERT INTO outbox_identity (id) VALUES (?)", [uuid.uuid4().hex])
        db.execute("CREATE TABLE IF NOT EXISTS outbox (offset INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,"
                   " resource TEXT NOT NULL, body TEXT NOT NULL)")
        db.table("inbox").create({"id": str, "applied": float, "result": str}, pk="id", if_not_exists=True)
        accounts.create_tables(db)  # who may use the dashboard and the API
        db.table("integrations").create({"name": str, "secret_hash": str, "created": float}, pk="name",
                                        if_not_exists=True)
        # automation: rules and schedules (local ones and the set the cloud applied), what they did, alerts, and the
        # notifications waiting to be sent
        db.table("automations").create({"name": str, "kind": str, "source": str, "body": str, "added": float},
                                       pk="name", if_not_exists=True)
        if "asleep_until" not in db.table("devices").columns_dict:  # a battery board's next wake, said as it sleeps
            db.table("devices").add_column("asleep_until", float)
        if "problem" not in db.table("automations").columns_dict:  # why the daemon left it out at its last load
            db.table("automations").add_column("problem", str)
        db.table("rule_sets").create({"source": str, "version": int}, pk="source", if_not_exists=True)
        db.table("rule_history").create(
            {"id": int, "ts": float, "name": str, "device": str, "event": str, "detail": str}, pk="id",
            if_not_exists=True)
        db.table("alerts").create(
            {"id": int, "rule": str, "device": str, "severity": str, "state": str, "values_": str, "started": float,
             "fired": float, "resolved": float, "acked": float, "acked_by": str}, pk="id", if_not_exists=True)
        db.table("notifications").create(
            {"id": int, "alert": int, "url": str, "kind": str, "title": str, "body": str, "created": float,
             "attempts": int, "next_try": float, "sent": float, "error": str}, pk="id", if_not_exists=True)
        db.table("schedule_runs").create({"name": str, "last_run": float}, pk="name", if_not_exists=True)
        # each export sink's place in the readings (their rowid: commit order)
        db.table("export_cursors").create({"name": str, "position": int, "sent": int}, pk="name", if_not_exists=True)
        # readings rules chose for a sink (select = "rules"), in the order they fired
        db.execute("CREATE TABLE IF NOT EXISTS export_queue (id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL,"
                   " ts REAL NOT NULL, body TEXT NOT NULL)")
        db.table("rule_history").create_index(["name", "ts"], if_not_exists=True)
        db.table("alerts").create_index(["state"], if_not_exists=True)
        db.table("notifications").create_index(["sent", "next_try"], if_not_exists=True)
        db.table("readings").create_index(["received"], if_not_exists=True)
        db.table("events").create_index(["device", "ts"], if_not_exists=True)
        db.table("rejects").create_index(["device", "received"], if_not_exists=True)  # refusing(): per device, recent
        # Home Assistant's discovery configs as a broker would retain them; an empty payload is a withdrawal kept
        # until Home Assistant has seen it (a device removed while it was away)
        db.table("ha_configs").create({"topic": str, "device": str, "payload": str, "ts": float}, pk="topic",
                                      if_not_exists=True)
        if "former" not in db.table("ha_configs").columns_dict:  # a withdrawal's last config, to replay before it
            db.table("ha_configs").add_column("former", str)


# -- registry ----------------------------------------------------------------------------------------------------

def add_integration(db: Database, name: str) -> str:
    """A credential for an integration (a new one replaces the old, which stops working); returns it once."""
    if name not in INTEGRATIONS:
        raise RegistryError(f"unknown integration {name!r}; known: {', '.join(sorted(INTEGRATIONS))}")
    secret = new_secret()
    db.table("integrations").upsert({"name": name, "secret_hash": hash_secret(secret), "created": time.time()},
                                    pk="name")
    return secret


def remove_integration(db: Database, name: str) -> None:
    if not list(db.query("SELECT 1 FROM integrations WHERE name = ?", [name])):
        raise RegistryError(f"no integration {name!r} (see `edgetrio integration list`)")
    db.table("integrations").delete(name)


def list_integrations(db: Database) -> list[dict[str, Any]]:
    return [{"name": r["name"], "username": integration_user(r["name"]), "created": r["created"]}
            for r in db.query("SELECT name, created FROM integrations ORDER BY name")]


def integration_secrets(db: Database) -> dict[str, str]:
    """MQTT user name -> secret hash of every integration."""
    return {integration_user(r["name"]): r["secret_hash"]
            for r in db.query("SELECT name, secret_hash FROM integrations")}


def rotate_secret(db: Database, device_id: str) -> str:
    """A new credential for a registered device (the old one stops working); its model, twin and readings stay."""
    if get_device(db, device_id) is None:
        raise UnknownDevice(device_id)
    secret = new_secret()
    db.execute("UPDATE devices SET secret_hash = ? WHERE id = ?", [hash_secret(secret), device_id])
    return secret


def add_device(db: Database, device_id: str, model: str | None = None, secret_hash: str | None = None) -> str:
    """Register a device; return its credential (shown once, stored hashed).

    With `secret_hash` (a registration from the cloud, which made the credential) nothing new is made and "" returned.
    """
    check_device_id(device_id)
    if get_device(db, device_id) is not None:
        raise RegistryError(f"device {device_id!r} is already registered (remove it first to issue a new credential)")
    if model is not None and get_model(db, model) is None:
        raise RegistryError(f"unknown model {model!r} (add it with `edgetrio model add FILE`)")
    secret = "" if secret_hash else new_secret()
    db.table("devices").insert({
        "id": device_id, "model": model, "secret_hash": secret_hash or hash_secret(secret), "created": time.time(),
        "online": 0, "last_seen": None, "last_connect": None, "meta": None,
    })
    return secret


def set_device_model(db: Database, device_id: str, model: str | None) -> None:
    """Give a registered device a model (None: none, its announced one applies)."""
    if get_device(db, device_id) is None:
        raise UnknownDevice(device_id)
    if model is not None and get_model(db, model) is None:
        raise RegistryError(f"unknown model {model!r} (add it with `edgetrio model add FILE`)")
    db.execute("UPDATE devices SET model = ? WHERE id = ?", [model, device_id])


def remove_device(db: Database, device_id: str) -> None:
    """Remove a device and its twin; its stored readings stay (nothing recorded is thrown away)."""
    if get_device(db, device_id) is None:
        raise UnknownDevice(device_id)
    db.table("devices").delete(device_id)
    db.execute("DELETE FROM twins WHERE device = ?", [device_id])


def get_device(db: Database, device_id: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM devices WHERE id = ?", [device_id]))
    return rows[0] if rows else None


def list_devices(db: Database) -> list[dict[str, Any]]:
    out = []
    for row in db.query("SELECT id, model, online, last_seen, last_connect, meta, asleep_until FROM devices "
                        "ORDER BY id"):
        row["online"] = bool(row["online"])
        row["meta"] = json.loads(row["meta"]) if row["meta"] else None
        out.append(row)
    return out


def last_received(db: Database, device_id: str) -> float | None:
    """When the device's newest reading arrived."""
    value = db.execute("SELECT max(received) FROM readings WHERE device = ?", [device_id]).fetchone()[0]
    return float(value) if value is not None else None


def refusing(db: Database, device_id: str, since: float) -> dict[str, Any] | None:
    """How many of a device's messages were refused since `since`, the newest reason, and whether its newest reading
    was refused (nothing of it stored since); None when nothing was refused."""
    row = db.execute("SELECT count(*), max(received) FROM rejects WHERE device = ? AND received >= ?",
                     [device_id, since]).fetchone()
    if not row[0]:
        return None
    reason, detail = db.execute("SELECT reason, detail FROM rejects WHERE device = ? ORDER BY id DESC LIMIT 1",
                                [device_id]).fetchone()
    last_stored = last_received(db, device_id)
    return {"count": int(row[0]), "last": float(row[1]), "reason": reason, "detail": detail,
            "readings_refused": reason == "invalid_value" and (last_stored is None or last_stored < float(row[1]))}


def ha_configs(db: Database, withdrawn_before: float) -> list[tuple[str, str, bytes, bytes]]:
    """Every discovery config the gateway holds for Home Assistant: (topic, device, payload, former); an empty payload
    is a withdrawal and `former` the config it withdrew. Withdrawals older than `withdrawn_before` are forgotten."""
    db.execute("DELETE FROM ha_configs WHERE payload = '' AND ts < ?", [withdrawn_before])
    return [(t, d, p.encode(), (f or "").encode())
            for t, d, p, f in db.execute("SELECT topic, device, payload, former FROM ha_configs")]


def ha_configs_set(db: Database, device: str, configs: list[tuple[str, bytes, bytes]], now: float) -> None:
    """Hold (topic, payload, former) for a device: `former` is the config a withdrawal (empty payload) withdrew."""
    db.conn.executemany("INSERT OR REPLACE INTO ha_configs (topic, device, payload, former, ts) VALUES (?, ?, ?, ?, ?)",
                        [(t, device, p.decode(), f.decode() or None, now) for t, p, f in configs])


def device_secrets(db: Database) -> dict[str, str]:
    return {row["id"]: row["secret_hash"] for row in db.query("SELECT id, secret_hash FROM devices")}


def add_model(db: Database, model: Model, source: str = "file", device: str | None = None) -> None:
    """Add or replace a model. A board file's (source "board", flashed for `device`) may not replace one added from a
    file, nor one other devices' boards use with other parts: RegistryError says how to name it instead."""
    if source == "board":
        rows = list(db.query("SELECT body, source FROM models WHERE name = ?", [model.name]))
        if rows and json.loads(rows[0]["body"]) != model.as_dict():
            fix = f"give this board file its own name ([board] model = \"{model.name}-2\", say)"
            if rows[0]["source"] != "board":
                raise RegistryError(f"model {model.name!r} was added from a file (`edgetrio model add`): a board file "
                                    f"does not replace it; {fix}")
            others = [r["id"] for r in db.query("SELECT id FROM devices WHERE model = ? AND id != ? ORDER BY id",
                                                 [model.name, device or ""])]
            if others:
                raise RegistryError(f"model {model.name!r} is what {', '.join(others[:3])}"
                                    f"{' and others' if len(others) > 3 else ''} run with other parts; {fix}")
    db.table("models").upsert({"name": model.name, "body": json.dumps(model.as_dict()), "source": source}, pk="name")


def get_model(db: Database, name: str) -> Model | None:
    rows = list(db.query("SELECT body FROM models WHERE name = ?", [name]))
    return Model.from_dict(json.loads(rows[0]["body"])) if rows else None


def list_models(db: Database) -> list[dict[str, Any]]:
    return [json.loads(row["body"]) | {"source": row["source"]}
            for row in db.query("SELECT body, source FROM models ORDER BY name")]


def device_models(db: Database) -> dict[str, Model | None]:
    """Every registered device's model (None: it has none)."""
    return {row["id"]: device_model(db, row["id"]) for row in list_devices(db)}


def device_model(db: Database, device_id: str) -> Model | None:
    """The model telemetry is checked against: the registered one, else the one the device announced."""
    device = get_device(db, device_id)
    if device is None:
        return None
    if device["model"]:
        return get_model(db, device["model"])
    return get_model(db, f"device:{device_id}")


def set_presence(db: Database, device_id: str, online: bool, now: float) -> None:
    fields: dict[str, Any] = {"online": int(online), "last_seen": now}
    if online:
        fields["last_connect"] = now
        fields["asleep_until"] = None  # awake
    db.table("devices").update(device_id, fields)


def set_asleep(db: Database, device_id: str, until: float) -> None:
    db.table("devices").update(device_id, {"asleep_until": until})


def record_meta(db: Database, device_id: str, meta: dict[str, Any], now: float) -> None:
    """Store what the device says about itself; announced resources become its model unless one is registered."""
    db.table("devices").update(device_id, {"meta": json.dumps(meta), "last_seen": now})
    resources = meta.get("resources")
    if resources:
        model = Model.from_dict({"resources": resources}, name=f"device:{device_id}")
        add_model(db, model, source="meta")


def record_event(db: Database, device_id: str, kind: str, body: Any, now: float) -> None:
    db.table("events").insert({"ts": now, "device": device_id, "kind": kind, "body": json.dumps(body)})


def events(db: Database, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
    rows = db.query(
        "SELECT ts, kind, body FROM events WHERE device = ? ORDER BY id DESC LIMIT ?", [device_id, limit]
    )
    return [{"ts": r["ts"], "kind": r["kind"], "body": json.loads(r["body"])} for r in rows]


def device_logs(db: Database, device_id: str, after_id: int = 0, since: float | None = None,
                limit: int = 1000) -> list[dict[str, Any]]:
    """A device's log and status lines and the steps of its firmware updates, in order, after event `after_id` (for
    following) and from `since`."""
    sql = "SELECT id, ts, kind, body FROM events WHERE device = ? AND kind IN ('log', 'status', 'ota') AND id > ?"
    params: list[Any] = [device_id, after_id]
    if since is not None:
        sql += " AND ts >= ?"
        params.append(since)
    rows = list(db.query(sql + " ORDER BY id DESC LIMIT ?", [*params, limit]))
    rows.reverse()
    return [{"id": r["id"], "ts": r["ts"], "kind": r["kind"], "body": json.loads(r["body"])} for r in rows]


def rejects(db: Database, device_id: str | None = None, since: float | None = None,
            limit: int = 100) -> list[dict[str, Any]]:
    """What was refused (newest `limit`, in order), with the reason and what the device sent."""
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if device_id is not None:
        where.append("device = ?")
        params.append(device_id)
    if since is not None:
        where.append("received >= ?")
        params.append(since)
    rows = list(db.query(f"SELECT received, device, boot, seq, reason, detail, payload FROM rejects "
                         f"WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?", [*params, limit]))
    rows.reverse()
    return rows


# -- readings ------------------------------------------------------------------------------------------------------

def commit_readings(
    db: Database, readings: list[Reading], rejects: list[tuple[Reading, str]], now: float
) -> dict[tuple[str, int], int]:
    """Store readings once per (device, boot, seq) and rejected ones for inspection; advance the watermarks.

    Returns the new watermark of every (device, boot) touched, including those touched only by duplicates, so a
    device that missed an ack gets it again. A rejected reading counts as done: it would never become valid.
    """
    # plain executemany on the hot path: sqlite-utils' insert_all re-reads the schema on every call.
    # A reading without a trusted time is stored with ts NULL: its time is then its arrival, and marked so.
    db.conn.executemany(
        "INSERT OR IGNORE INTO readings (device, boot, seq, ts, received, data) VALUES (?, ?, ?, ?, ?, ?)",
        [(r.device, r.boot, r.seq, r.ts, now, json.dumps(r.values)) for r in readings],
    )
    # a reading is a sign of life: last seen follows it (presence alone stamps only connects and disconnects)
    db.conn.executemany("UPDATE devices SET last_seen = ? WHERE id = ? AND (last_seen IS NULL OR last_seen < ?)",
                        [(now, device, now) for device in {r.device for r in readings}])
    for reading, reason in rejects:
        db.table("rejects").insert({"received": now, "device": reading.device, "boot": reading.boot, "seq": reading.seq,
                              "reason": "invalid_value", "detail": reason, "payload": json.dumps(reading.values)})
        # keep the slot so the watermark can pass it; the values live in `rejects`
        db.execute(
            "INSERT OR IGNORE INTO readings (device, boot, seq, ts, received, data) VALUES (?, ?, ?, ?, ?, NULL)",
            [reading.device, reading.boot, reading.seq, reading.ts, now],
        )
    floors: dict[tuple[str, int], int] = {}
    for r in [*readings, *(r for r, _ in rejects)]:
        key = (r.device, r.boot)
        floors[key] = max(floors.get(key, 0), r.first - 1)
    acks = {}
    for (device, boot), floor in floors.items():
        rows = list(db.query("SELECT seq FROM watermarks WHERE device = ? AND boot = ?", [device, boot]))
        mark = max(rows[0]["seq"] if rows else 0, floor)
        while True:
            seqs = [row["seq"] for row in db.query(
                "SELECT seq FROM readings WHERE device = ? AND boot = ? AND seq > ? ORDER BY seq LIMIT 1000",
                [device, boot, mark])]
            mark = advance_watermark(mark, seqs)
            if len(seqs) < 1000 or mark != seqs[-1]:
                break
        db.execute("INSERT OR REPLACE INTO watermarks (device, boot, seq) VALUES (?, ?, ?)", [device, boot, mark])
        acks[(device, boot)] = mark
    return acks


def record_reject(db: Database, device_id: str | None, reason: str, detail: str, payload: bytes, now: float) -> None:
    """Keep what could not be parsed (truncated) so an operator can see what the device sent."""
    db.table("rejects").insert({"received": now, "device": device_id, "boot": None, "seq": None, "reason": reason,
                          "detail": detail, "payload": payload[:2048].decode("utf-8", "replace")})


def query_readings(
    db: Database, device_id: str, since: float | None = None, limit: int | None = None, until: float | None = None
) -> list[dict[str, Any]]:
    """Readings of a device in time order (the newest `limit` of those from `since` and before `until`), skipping
    rejected slots."""
    where = ["device = ?", "data IS NOT NULL"]
    params: list[Any] = [device_id]
    if since is not None:
        where.append("COALESCE(ts, received) >= ?")
        params.append(since)
    if until is not None:
        where.append("COALESCE(ts, received) < ?")
        params.append(until)
    sql = (f"SELECT boot, seq, ts, received, data FROM readings WHERE {' AND '.join(where)}"
           " ORDER BY received DESC, boot DESC, seq DESC")
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    rows = list(db.query(sql, params))
    rows.reverse()
    return [{"boot": r["boot"], "seq": r["seq"], "ts": r["ts"], "values": json.loads(r["data"])} if r["ts"] is not None
            else {"boot": r["boot"], "seq": r["seq"], "ts": r["received"], "ts_arrival": True,
                  "values": json.loads(r["data"])} for r in rows]




def prune(db: Database, before: float, limit: int = PRUNE_CHUNK) -> int:
    """Delete up to `limit` readings, events and rejects each received before `before`; returns how many rows went
    (call again until it returns 0).

    Watermarks stay, so a device resending an old reading is still acknowledged rather than stored again.
    """
    deleted = 0
    for table, column in (("readings", "received"), ("events", "ts"), ("rejects", "received"), ("rule_history", "ts")):
        deleted += int(db.execute(f"DELETE FROM {table} WHERE rowid IN "
                                  f"(SELECT rowid FROM {table} WHERE {column} < ? LIMIT ?)", [before, limit]).rowcount)
    # alerts resolved and acknowledged, and notifications sent, once they are as old (open ones stay)
    deleted += int(db.execute("DELETE FROM alerts WHERE rowid IN (SELECT rowid FROM alerts WHERE state = 'resolved' "
                              "AND acked IS NOT NULL AND resolved < ? LIMIT ?)", [before, limit]).rowcount)
    deleted += int(db.execute("DELETE FROM notifications WHERE rowid IN (SELECT rowid FROM notifications WHERE "
                              "sent IS NOT NULL AND sent < ? LIMIT ?)", [before, limit]).rowcount)
    deleted += int(db.execute("DELETE FROM export_queue WHERE id IN (SELECT id FROM export_queue WHERE ts < ? LIMIT ?)",
                              [before, limit]).rowcount)
    return deleted


def reading_count(db: Database, device_id: str | None = None) -> int:
    if device_id is None:
        return int(db.execute("SELECT count(*) FROM readings WHERE data IS NOT NULL").fetchone()[0])
    return int(db.execute(
        "SELECT count(*) FROM readings WHERE device = ? AND data IS NOT NULL", [device_id]).fetchone()[0])


# -- twin ------------------------------------------------------------------------------------------------------------

def get_twin(db: Database, device_id: str) -> Twin:
    if get_device(db, device_id) is None:
        raise UnknownDevice(device_id)
    rows = list(db.query("SELECT * FROM twins WHERE device = ?", [device_id]))
    if not rows:
        return Twin()
    row = rows[0]
    return Twin(json.loads(row["desired"]), row["desired_version"], json.loads(row["reported"]), row["reported_version"])


def save_twin(db: Database, device_id: str, twin: Twin) -> None:
    db.table("twins").upsert({
        "device": device_id, "desired": json.dumps(twin.desired), "desired_version": twin.desired_version,
        "reported": json.dumps(twin.reported), "reported_version": twin.reported_version,
    }, pk="device")


# -- commands and counters -------------------------------------------------------------------------------------------

def record_command(db: Database, cmd_id: str, device_id: str, name: str, args: dict[str, Any], now: float,
                   status: str = "sent") -> None:
    db.table("commands").insert({"id": cmd_id, "device": device_id, "name": name, "args": json.dumps(args), "sent": now,
                           "status": status, "result": None, "finished": None})


HELD_PER_WAKE = 4  # held commands sent at one wake: a board's heap takes a few at once (15 at once ran it out)


def take_held(db: Database, device_id: str, now: float) -> list[dict[str, Any]]:
    """The oldest commands held for a sleeping device (a few: the rest wait for its next wake), marked sent (it is
    awake and listening now)."""
    rows = [{"id": r["id"], "name": r["name"], "args": json.loads(r["args"])} for r in db.query(
        "SELECT id, name, args FROM commands WHERE device = ? AND status = 'held' ORDER BY sent, rowid LIMIT ?",
        [device_id, HELD_PER_WAKE])]
    db.conn.executemany("UPDATE commands SET status = 'sent', sent = ? WHERE id = ?", [(now, r["id"]) for r in rows])
    return rows


def finish_command(db: Database, cmd_id: str, status: str, result: Any, now: float) -> bool:
    """Record a command's outcome; False if the id is unknown or already finished (a late or repeated result)."""
    cursor = db.execute(
        "UPDATE commands SET status = ?, result = ?, finished = ? WHERE id = ? AND status = 'sent'",
        [status, json.dumps(result), now, cmd_id],
    )
    return cursor.rowcount > 0


def add_counters(db: Database, counts: Counter[str]) -> None:
    for name, value in counts.items():
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            [name, value, value],
        )


def counters(db: Database) -> dict[str, int]:
    return {row["name"]: row["value"] for row in db.query("SELECT name, value FROM counters ORDER BY name")}


# -- the cloud link's outbox and inbox ---------------------------------------------------------------------------------

def outbox_identity(db: Database) -> str:
    return str(db.execute("SELECT id FROM outbox_identity").fetchone()[0])


def outbox_add(db: Database, resource: str, body: Any, now: float) -> None:
    db.execute("INSERT INTO outbox (ts, resource, body) VALUES (?, ?, ?)", [now, resource, json.dumps(body)])


def outbox_after(db: Database, offset: int, limit: int) -> list[dict[str, Any]]:
    """The next rows to send, oldest first."""
    rows = db.execute(
        "SELECT offset, ts, resource, body FROM outbox WHERE offset > ? ORDER BY offset LIMIT ?", [offset, limit]
    ).fetchall()
    return [{"offset": o, "ts": ts, "resource": r, "body": json.loads(b)} for o, ts, r, b in rows]


def outbox_acknowledged(db: Database, offset: int) -> int:
    """The relay committed everything up to `offset`: those rows may go."""
    return int(db.execute("DELETE FROM outbox WHERE offset <= ?", [offset]).rowcount)


def outbox_bound(db: Database, max_rows: int, max_age: float, now: float) -> int:
    """Drop what exceeds the outbox bounds (oldest first); returns how many rows were dropped."""
    dropped = int(db.execute("DELETE FROM outbox WHERE ts < ?", [now - max_age]).rowcount)
    count = int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
    if count > max_rows:
        dropped += int(db.execute(
            "DELETE FROM outbox WHERE offset IN (SELECT offset FROM outbox ORDER BY offset LIMIT ?)",
            [count - max_rows]).rowcount)
    return dropped


def outbox_state(db: Database) -> dict[str, Any]:
    """Rows waiting and the oldest one's time, from the ends of the offset key (no count over a big outbox: rows
    leave only from the oldest end, so the offsets between the ends are the rows)."""
    first, last = db.execute("SELECT min(offset), max(offset) FROM outbox").fetchone()
    if first is None:
        return {"rows": 0, "oldest": None}
    oldest = db.execute("SELECT ts FROM outbox WHERE offset = ?", [first]).fetchone()[0]
    return {"rows": int(last) - int(first) + 1, "oldest": oldest}


def inbox_result(db: Database, message_id: str) -> Any | None:
    """The stored result of a down message already applied, or None if it is new."""
    row = db.execute("SELECT result FROM inbox WHERE id = ?", [message_id]).fetchone()
    return json.loads(row[0]) if row else None


def inbox_record(db: Database, message_id: str, result: Any, now: float) -> None:
    db.execute("INSERT OR REPLACE INTO inbox (id, applied, result) VALUES (?, ?, ?)",
               [message_id, now, json.dumps(result)])
