"""The relay's SQLite store: nodes, their devices and twin replicas, readings, and the queue of what must go down.

Plain synchronous functions over one sqlite-utils Database; the relay runs them one at a time in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from edgetrio import accounts, wire
from edgetrio.cloud import database, rollouts
from edgetrio.cloud.downqueue import notify, notify_many, queue_down
from edgetrio.identity import RegistryError, check_device_id, hash_secret, new_secret, token_digest, verify_secret
from edgetrio.models import Model, check_desired, settings_of
from edgetrio.twin import Twin, set_desired
from edgetrio.wire import MAX_INTEGER
from edgetrio.writer import PRUNE_CHUNK, is_postgres

log = logging.getLogger("edgetrio.relay")
DB_FILE = database.DB_FILE
# what makes one item of an edge's batch unusable (a number the store cannot hold, a value it cannot bind, ...)
ITEM_ERRORS: tuple[type[Exception], ...] = (KeyError, TypeError, ValueError, AttributeError, *database.bind_errors())


NotFound = accounts.NotFound  # an unknown node, device, user or token: 404


def open_db(data_dir: Path, url: str | None = None) -> Database:
    """Open the relay's database (the SQLite file in data_dir, or PostgreSQL at `url`) at the latest schema."""
    db = database.open_database(data_dir, url)
    database.migrate(db)
    return db


# -- nodes -----------------------------------------------------------------------------------------------------------

def add_node(db: Database, name: str) -> str:
    """Register a node; return its token (shown once, stored hashed)."""
    check_device_id(name)
    if get_node(db, name) is not None:
        raise RegistryError(f"node {name!r} already exists")
    token = new_secret()
    db.table("nodes").insert({"name": name, "token_hash": hash_secret(token), "created": time.time(), "online": 0,
                              "last_seen": None, "connects": 0, "last_offset": 0})
    return token


def rotate_node(db: Database, name: str) -> str:
    """A new token for a node; the old one is refused from now on."""
    require_node(db, name)
    token = new_secret()
    db.execute("UPDATE nodes SET token_hash = ? WHERE name = ?", [hash_secret(token), name])
    notify(db, f"close {name} its token was rotated")  # whichever replica holds its link ends it
    return token


def remove_node(db: Database, name: str) -> None:
    """Forget a node: its token, devices, queue and readings."""
    require_node(db, name)
    for table in ("devices", "downqueue", "commands", "readings", "device_events", "alerts", "rule_sets",
                  "edge_sessions"):
        db.execute(f"DELETE FROM {table} WHERE node = ?", [name])
    db.execute("DELETE FROM nodes WHERE name = ?", [name])
    notify(db, f"close {name} it was removed")


def get_node(db: Database, name: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM nodes WHERE name = ?", [name]))
    return rows[0] if rows else None


def check_node(db: Database, name: str, token: str) -> bool:
    node = get_node(db, name)
    return node is not None and verify_secret(token, node["token_hash"])


def node_presence(db: Database, name: str, online: bool, now: float) -> None:
    db.execute("UPDATE nodes SET online = ?, last_seen = ?, connects = connects + ? WHERE name = ?",
               [int(online), now, int(online), name])


def list_nodes(db: Database) -> list[dict[str, Any]]:
    rows = db.query(
        "SELECT n.name, n.online, n.last_seen, n.connects, n.counters, (SELECT count(*) FROM devices d WHERE d.node = n.name"
        " AND d.registered = 1) AS devices, (SELECT count(*) FROM downqueue q WHERE q.node = n.name) AS queued,"
        " (SELECT r.address FROM edge_sessions s JOIN replicas r ON r.id = s.replica WHERE s.node = n.name) AS replica"
        " FROM nodes n ORDER BY n.name")
    return [{**r, "online": bool(r["online"]), "counters": json.loads(r["counters"]) if r["counters"] else None}
            for r in rows]


def link_outbox(db: Database, node: str, outbox: str) -> bool:
    """Note the outbox a node's edge sends from; True when it is another than before (a gateway installed anew):
    its offsets start again at 1, so the relay's count of what it has is set back (readings it has twice are one)."""
    row = db.execute("SELECT outbox, last_offset FROM nodes WHERE name = ?", [node]).fetchone()
    if row is None or not outbox or row[0] == outbox:
        return False
    db.execute("UPDATE nodes SET outbox = ?, last_offset = 0 WHERE name = ?", [outbox[:64], node])
    return row[0] is not None  # the first outbox a relay hears of is no news


def require_node(db: Database, name: str) -> None:
    if get_node(db, name) is None:
        raise NotFound(f"unknown node {name!r}")


def is_online(db: Database, name: str) -> bool:
    """Whether the node's edge is linked to this relay or to another replica on the same database."""
    row = db.execute("SELECT online FROM nodes WHERE name = ?", [name]).fetchone()
    return bool(row and row[0])


# -- edge sessions: which replica holds each edge's link -------------------------------------------------------------
# An edge may dial any replica. The one it reaches claims its session (the epoch goes up); every write that replica
# makes for the edge first checks it still holds that epoch (`hold_session`, a row lock on PostgreSQL), so a replica
# that lost the link (the edge moved, or the replica was cut off and swept) is fenced instead of writing for it.

REPLICA_STALE = 30.0  # seconds without a heartbeat after which a replica's links count as gone


class Fenced(RuntimeError):
    """This replica no longer holds the edge's link: another took it, or it was swept as gone."""


def start_replica(db: Database, replica: str, address: str, now: float) -> None:
    """A replica's first heartbeat. A SQLite relay is the only one: the links of its earlier runs are gone."""
    if not is_postgres(db):
        db.execute("UPDATE edge_sessions SET replica = '' WHERE replica != ''")
        db.execute("DELETE FROM replicas")
        db.execute("UPDATE nodes SET online = 0 WHERE online = 1")
    db.table("replicas").upsert({"id": replica, "started": now, "seen": now, "address": address}, pk="id")


def shared_operator_digest(db: Database, mine: str) -> str:
    """The digest of the operator token every replica on this database answers to: the first replica's. Only the
    digest is kept (the database is not to hand out the operator's access); the token is in that replica's
    DATA/operator.json, to be copied to the others'."""
    db.execute("INSERT INTO settings (key, value) VALUES ('operator_token_digest', ?) ON CONFLICT (key) DO NOTHING",
               [token_digest(mine)])
    return str(db.execute("SELECT value FROM settings WHERE key = 'operator_token_digest'").fetchone()[0])


def claim_session(db: Database, node: str, replica: str, remote: str, now: float) -> int:
    """The edge's link is now on this replica: its session's next epoch (a replica holding an older one is fenced)."""
    epoch = int(db.execute(
        "INSERT INTO edge_sessions (node, replica, epoch, since, remote) VALUES (?, ?, 1, ?, ?) ON CONFLICT (node) DO "
        "UPDATE SET replica = excluded.replica, epoch = edge_sessions.epoch + 1, since = excluded.since, "
        "remote = excluded.remote RETURNING epoch", [node, replica, now, remote[:64]]).fetchall()[0][0])
    node_presence(db, node, True, now)
    notify(db, f"session {node} {epoch}")  # the replica that held it before lets its link go
    return epoch


def hold_session(db: Database, node: str, replica: str, epoch: int) -> None:
    """Fenced unless this replica still holds the node's link at this epoch; on PostgreSQL the row stays locked to the
    end of the transaction, so a takeover waits for the write in progress instead of interleaving with it."""
    lock = " FOR UPDATE" if is_postgres(db) else ""
    row = db.execute(f"SELECT replica, epoch FROM edge_sessions WHERE node = ?{lock}", [node]).fetchone()
    if row is None or row[0] != replica or int(row[1]) != epoch:
        holder = f"replica {row[0]} (epoch {row[1]})" if row and row[0] else "no replica"
        raise Fenced(f"node {node}: its link is held by {holder}, not by this one (epoch {epoch})")


def release_session(db: Database, node: str, replica: str, epoch: int, now: float) -> bool:
    """The link ended; the node is offline unless another replica holds it by now. True when it went offline."""
    if db.execute("UPDATE edge_sessions SET replica = '' WHERE node = ? AND replica = ? AND epoch = ?",
                  [node, replica, epoch]).rowcount:
        node_presence(db, node, False, now)
        return True
    return False


def replica_seen(db: Database, replica: str, address: str, now: float,
                 stale: float = REPLICA_STALE) -> tuple[list[str], dict[str, int], set[str]]:
    """A replica's heartbeat and sweep. Ends the links of replicas silent for `stale` seconds (killed, or cut off from
    the database): their nodes go offline, and a cut-off one is fenced when it comes back. Returns the nodes that went
    offline, the links this replica holds (node -> epoch), and the nodes it holds with messages queued."""
    if not db.execute("UPDATE replicas SET seen = ? WHERE id = ?", [now, replica]).rowcount:
        db.table("replicas").upsert({"id": replica, "started": now, "seen": now, "address": address}, pk="id")
    gone = db.execute("SELECT s.node, s.epoch FROM edge_sessions s LEFT JOIN replicas r ON r.id = s.replica "
                      "WHERE s.replica != '' AND (r.seen IS NULL OR r.seen < ?)", [now - stale]).fetchall()
    offline = []
    for node, epoch in gone:
        if db.execute("UPDATE edge_sessions SET replica = '' WHERE node = ? AND epoch = ?", [node, epoch]).rowcount:
            node_presence(db, node, False, now)
            offline.append(str(node))
    db.execute("DELETE FROM replicas WHERE seen < ?", [now - 86400])
    held = {str(n): int(e) for n, e in db.execute("SELECT node, epoch FROM edge_sessions WHERE replica = ?",
                                                   [replica]).fetchall()}
    queued = {str(n) for (n,) in db.execute("SELECT DISTINCT q.node FROM downqueue q JOIN edge_sessions s ON "
                                            "s.node = q.node WHERE s.replica = ?", [replica]).fetchall()}
    return offline, held, queued


# -- what comes up ---------------------------------------------------------------------------------------------------

MAX_DEVICES_PER_NODE = 10_000  # one edge, even with a valid token, must not fill every operator's fleet page


class TooManyDevices(ValueError):
    """A node already has as many devices as the relay keeps for one node: what names a new one is refused."""


def _device(db: Database, node: str, device: str, limit: int | None = None,
            counts: dict[str, int] | None = None) -> dict[str, Any]:
    """A node's device row, made when new unless the node has `limit` devices (TooManyDevices). `counts` carries each
    node's device count across a batch, so refusing many ids costs a lookup each, not a count each."""
    rows = list(db.query("SELECT * FROM devices WHERE node = ? AND id = ?", [node, device]))
    if rows:
        return rows[0]
    limit = MAX_DEVICES_PER_NODE if limit is None else limit
    counts = {} if counts is None else counts
    if node not in counts:
        counts[node] = int(db.execute("SELECT count(*) FROM devices WHERE node = ?", [node]).fetchone()[0])
    if counts[node] >= limit:
        raise TooManyDevices(f"node {node} has {limit} devices, as many as the relay keeps for one node; "
                             f"{wire.clip(device, 64)!r} refused")
    row = {"node": node, "id": device, "registered": 1, "model": None, "online": 0, "last_seen": None,
           "meta": None, "twin": None}
    db.table("devices").insert(row)
    counts[node] += 1
    return row


def apply_up(db: Database, node: str, items: list[dict[str, Any]], now: float,
             max_devices: int = MAX_DEVICES_PER_NODE) -> tuple[int, list[str], int, set[str]]:
    """Store a batch from an edge once: items at or below the node's last offset were stored before.

    Returns (highest offset now stored, ids of commands whose result arrived, number of items skipped as unusable,
    the devices refused as over the node's cap: their readings and changes are not kept).
    """
    over_cap: set[str] = set()
    counts: dict[str, int] = {}
    last = int(db.execute("SELECT last_offset FROM nodes WHERE name = ?", [node]).fetchone()[0])
    finished: list[str] = []
    skipped = 0
    for item in items:
        try:
            offset = int(item["offset"])
            resource, body = item["resource"], item["body"]
            if not 0 < offset <= MAX_INTEGER:
                raise ValueError("offset out of range")
        except (KeyError, TypeError, ValueError, OverflowError):
            skipped += 1
            continue
        if offset <= last:
            continue
        try:
            with db.atomic():  # a savepoint: an item that fails halfway leaves none of its rows
                done = _apply_item(db, node, resource, body, now, over_cap, max_devices, counts)
        except TooManyDevices:
            over_cap.add(str(body.get("device")) if isinstance(body, dict) else "?")
            done = None
        except ITEM_ERRORS:
            skipped += 1  # an item this relay cannot use must not block the ones behind it
            done = None
        if done:
            finished.append(done)
        last = offset
    db.execute("UPDATE nodes SET last_offset = ?, last_seen = ? WHERE name = ?", [last, now, node])
    return last, finished, skipped, over_cap


def _apply_item(db: Database, node: str, resource: str, body: dict[str, Any], now: float,
                over_cap: set[str], max_devices: int = MAX_DEVICES_PER_NODE,
                counts: dict[str, int] | None = None) -> str | None:
    if resource == "readings":
        rows = [(node, str(r["device"]), int(r["boot"]), int(r["seq"]), float(r["ts"]), now, json.dumps(r["values"]))
                for r in body["readings"]]
        refused: set[str] = set()
        for device in sorted({r[1] for r in rows}):
            try:
                _device(db, node, device, max_devices, counts)
            except TooManyDevices:  # the readings of devices past the cap go, those of the others are kept
                refused.add(device)
                continue
            db.execute("UPDATE devices SET last_seen = ? WHERE node = ? AND id = ?", [now, node, device])
        db.conn.executemany(
            "INSERT INTO readings (node, device, boot, seq, ts, received, data) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [r for r in rows if r[1] not in refused])
        over_cap.update(refused)
    elif resource == "twin":
        _device(db, node, str(body["device"]), max_devices, counts)
        db.execute("UPDATE devices SET twin = ? WHERE node = ? AND id = ?",
                   [json.dumps(body["twin"]), node, body["device"]])
    elif resource == "device":
        device = str(body["device"])
        _device(db, node, device, max_devices, counts)
        fields: dict[str, Any] = {k: body[k] for k in ("online", "last_seen", "model", "asleep_until") if k in body}
        if fields.get("asleep_until") is not None:
            fields["asleep_until"] = float(fields["asleep_until"])
        if "meta" in body:
            fields["meta"] = json.dumps(body["meta"])
        if "registered" in body:
            fields["registered"] = int(bool(body["registered"]))
        if "online" in fields:
            fields["online"] = int(bool(fields["online"]))
        if fields:
            db.table("devices").update((node, device), fields)
    elif resource == "event":
        kind = str(body["kind"])
        if kind not in ("log", "status", "reject", "ota"):
            raise ValueError(f"unknown event kind {kind!r}")
        _device(db, node, str(body["device"]), max_devices, counts)
        db.table("device_events").insert({"node": node, "device": str(body["device"]), "ts": float(body["ts"]),
                                          "received": now, "kind": kind, "body": json.dumps(body.get("body"))})
    elif resource == "node":  # the gateway's report of itself: what it refused, rejected, dropped, outbox depth
        counters = {str(k): int(v) for k, v in dict(body["counters"]).items()}
        db.execute("UPDATE nodes SET counters = ? WHERE name = ?", [json.dumps(counters), node])
    elif resource == "alert" and body.get("state") == "cancelled":  # pending, and it did not hold
        db.execute("DELETE FROM alerts WHERE node = ? AND id = ?", [node, int(body["id"])])
    elif resource == "alert":  # an alert's state as the edge has it now (raised, fired, resolved, acknowledged)
        _device(db, node, str(body["device"]), max_devices, counts)  # an alert is of a device the node may have
        fields = {k: body.get(k) for k in ("rule", "device", "severity", "state", "started", "fired", "resolved",
                                          "acked", "acked_by")}
        db.table("alerts").upsert({"node": node, "id": int(body["id"]), **fields,
                                   "values_": json.dumps(body.get("values") or {}), "received": now},
                                  pk=("node", "id"))
    elif resource == "ota":  # a board's firmware update, as its gateway has it now
        rollouts.progress(db, node, body, now)
    elif resource == "cmd_result":
        cmd_id = str(body["cmd"])
        status = "ok" if body.get("result", {}).get("ok") else "error"
        db.execute("UPDATE commands SET status = ?, result = ? WHERE id = ? AND node = ?",
                   [status, json.dumps(body), cmd_id, node])
        notify(db, f"cmd {cmd_id}")  # the replica whose operator waits for it may be another
        return cmd_id
    else:
        raise ValueError(f"unknown resource {resource!r}")
    return None


# -- what goes down --------------------------------------------------------------------------------------------------

def pending_down(db: Database, node: str) -> list[dict[str, Any]]:
    order = "seq" if is_postgres(db) else "created, rowid"  # the order they were queued in
    return [{**r, "body": json.loads(r["body"])} for r in db.query(
        f"SELECT id, resource, body FROM downqueue WHERE node = ? ORDER BY {order}", [node])]


def down_confirmed(db: Database, node: str, message_id: str) -> bool:
    """Whether the edge confirmed a down message (it left the queue)."""
    return db.execute("SELECT 1 FROM downqueue WHERE id = ? AND node = ?", [message_id, node]).fetchone() is None


def down_applied(db: Database, node: str, message_id: str, result: Any) -> str | None:
    """The edge applied a message: it leaves the queue; a twin result refreshes the replica.

    Returns the command id when the edge refused a command (its result is then final)."""
    rows = db.execute("DELETE FROM downqueue WHERE id = ? AND node = ? RETURNING resource, body",
                      [message_id, node]).fetchall()  # one statement (on PostgreSQL each is a round trip); all read
    if not rows:
        return None  # a repeated confirmation
    resource, body = rows[0][0], json.loads(rows[0][1])
    if resource == "device":  # an operator's `device add` may wait for it on another replica
        notify(db, f"applied {message_id}")
    if not isinstance(result, dict):
        return None
    if resource == "twin" and result.get("ok") and isinstance(result.get("twin"), dict):
        db.execute("UPDATE devices SET twin = ? WHERE node = ? AND id = ?",
                   [json.dumps(result["twin"]), node, body["device"]])
    if resource == "rules":
        db.execute("UPDATE rule_sets SET applied = ?, result = ? WHERE node = ?",
                   [int(result.get("version") or 0) if result.get("ok") else None, json.dumps(result), node])
    if resource == "device" and not result.get("ok") and not body.get("remove"):
        # the node could not register it (a model it does not have): the relay's fleet must not show it as there
        log.warning("node=%s refused the registration of %s: %s", node, wire.clip(body["device"], 64),
                    wire.clip(result.get("error"), 200))
        db.execute("UPDATE devices SET registered = 0 WHERE node = ? AND id = ?", [node, body["device"]])
        db.table("device_events").insert({"node": node, "device": str(body["device"]), "ts": time.time(),
                                          "received": time.time(), "kind": "log", "body": json.dumps({
                                              "level": "error", "message": "the node refused this registration: "
                                              f"{clip_text(result.get('error'))}"})})
    if resource == "ota":
        rollouts.taken(db, node, message_id, body, result, time.time())
    if resource == "cmd" and not result.get("ok"):
        db.execute("UPDATE commands SET status = 'error', result = ? WHERE id = ?",
                   [json.dumps({"cmd": body["cmd"], "error": result.get("error"), "code": "refused"}), body["cmd"]])
        notify(db, f"cmd {body['cmd']}")
        return str(body["cmd"])
    return None


# -- operator views and actions ---------------------------------------------------------------------------------------

def count_devices(db: Database, node: str | None = None) -> int:
    if node is None:
        return int(db.execute("SELECT count(*) FROM devices WHERE registered = 1").fetchone()[0])
    return int(db.execute("SELECT count(*) FROM devices WHERE registered = 1 AND node = ?", [node]).fetchone()[0])


def list_devices(db: Database, node: str | None = None, limit: int = -1, offset: int = 0) -> list[dict[str, Any]]:
    """Registered devices by node and id; a page of them with `limit` (-1: all) and `offset`."""
    sql = "SELECT node, id, model, online, last_seen, meta, asleep_until FROM devices WHERE registered = 1"
    params: list[Any] = []
    if node is not None:
        require_node(db, node)
        sql += " AND node = ?"
        params.append(node)
    sql += " ORDER BY node, id"
    if limit >= 0 or offset:
        sql += " LIMIT ? OFFSET ?"
        params += [limit if limit >= 0 else MAX_INTEGER, offset]
    return [{**r, "online": bool(r["online"]), "meta": json.loads(r["meta"]) if r["meta"] else None}
            for r in db.query(sql, params)]


def _replica(db: Database, node: str, device: str) -> Twin:
    require_node(db, node)
    rows = list(db.query("SELECT twin FROM devices WHERE node = ? AND id = ? AND registered = 1", [node, device]))
    if not rows:
        raise NotFound(f"unknown device {device!r} on node {node!r}")
    return _twin_of(rows[0]["twin"])


def _twin_of(text: str | None) -> Twin:
    if not text:
        return Twin()
    t = json.loads(text)
    return Twin(t["desired"]["state"], t["desired"]["version"], t["reported"]["state"], t["reported"]["version"])


def get_twin(db: Database, node: str, device: str) -> dict[str, Any]:
    return _replica(db, node, device).as_json()


def set_twin(db: Database, node: str, device: str, patch: dict[str, Any], version: int | None) -> dict[str, Any]:
    """Check the change against the replica (a stale version is a VersionConflict), queue it, update the replica.

    The edge applies the patch when it gets it and sends its twin back, which then replaces the replica.
    """
    replica = _replica(db, node, device)
    row = next(iter(db.query("SELECT meta FROM devices WHERE node = ? AND id = ?", [node, device])))
    problem = desired_problem(json.loads(row["meta"]) if row["meta"] else {}, patch)
    if problem:  # refused here, as the gateway would: the two must not disagree for good
        raise RegistryError(f"{device}: {problem}")
    twin = set_desired(replica, patch, version)
    queue_down(db, node, "twin", {"device": device, "patch": patch})
    db.execute("UPDATE devices SET twin = ? WHERE node = ? AND id = ?", [json.dumps(twin.as_json()), node, device])
    return twin.as_json()


def desired_problem(meta: dict[str, Any], patch: dict[str, Any]) -> str | None:
    """Why a desired change does not fit what the device's board announced it can be set to (its outputs and its
    firmware's settings), as the gateway checks it; None if it fits or nothing is known of the device yet."""
    if not isinstance(meta, dict):  # what an edge mirrored as meta is not checked there: a list must not crash here
        meta = {}
    announced = meta.get("resources")
    outputs = [r for r in (announced if isinstance(announced, list) else [])
               if isinstance(r, dict) and r.get("access") == "rw"]
    model = None
    if outputs:
        with contextlib.suppress(RegistryError):  # a board that describes itself badly judges its own desired state
            model = Model.from_dict({"resources": outputs}, name="announced")
    return check_desired(settings_of(model, meta), patch)


def set_twin_fleet(db: Database, patch: dict[str, Any], node: str | None, device: str | None) -> dict[str, Any]:
    """Queue one desired change for every registered device (of a node, or with an id) that has those settings; says
    how many, and which were skipped and why. In a few statements whatever the fleet's size (on PostgreSQL each one
    is a round trip: a statement per device took 3 s for 2,000 devices)."""
    sql, params = "SELECT node, id, meta, twin FROM devices WHERE registered = 1", []
    if node is not None:
        require_node(db, node)
        sql, params = sql + " AND node = ?", [node]
    if device is not None:
        sql, params = sql + " AND id = ?", [*params, device]
    queued, twins, skipped, nodes = [], [], {}, set()
    now = time.time()
    for d in db.query(sql + " ORDER BY node, id", params):
        problem = desired_problem(json.loads(d["meta"]) if d["meta"] else {}, patch)
        if problem:  # a device without that setting (a pump on some boards only) is left as it is, and counted
            skipped[f"{d['node']}/{d['id']}"] = problem
            continue
        twin = set_desired(_twin_of(d["twin"]), patch, None)
        queued.append((uuid.uuid4().hex, d["node"], now, "twin", json.dumps({"device": d["id"], "patch": patch})))
        twins.append((json.dumps(twin.as_json()), d["node"], d["id"]))
        nodes.add(d["node"])
    db.conn.executemany("INSERT INTO downqueue (id, node, created, resource, body) VALUES (?, ?, ?, ?, ?)", queued)
    db.conn.executemany("UPDATE devices SET twin = ? WHERE node = ? AND id = ?", twins)
    notify_many(db, [f"down {n}" for n in sorted(nodes)])
    return {"nodes": len(nodes), "devices": len(queued), "skipped": skipped}


def set_rules(db: Database, node: str, doc: dict[str, Any]) -> dict[str, Any]:
    """A node's new rule set (checked by the caller): the next version, sent down in place of any older one still
    queued; an edge that is offline gets the latest when it reconnects."""
    require_node(db, node)
    row = next(iter(db.query("SELECT version FROM rule_sets WHERE node = ?", [node])), None)
    # the clock's milliseconds, so a relay set up anew still sends what the edge takes as newer than the old one's
    version = max((row["version"] if row else 0) + 1, int(time.time() * 1000))
    db.table("rule_sets").upsert({"node": node, "version": version, "doc": json.dumps(doc), "updated": time.time(),
                                  "applied": None, "result": None}, pk="node")
    db.execute("DELETE FROM downqueue WHERE node = ? AND resource = 'rules'", [node])
    queue_down(db, node, "rules", {"version": version, "doc": doc})
    return {"node": node, "version": version, "rules": len(doc.get("rule", [])),
            "schedules": len(doc.get("schedule", []))}


def get_rules(db: Database, node: str) -> dict[str, Any]:
    require_node(db, node)
    row = next(iter(db.query("SELECT * FROM rule_sets WHERE node = ?", [node])), None)
    if row is None:
        return {"node": node, "version": 0, "doc": {"rule": [], "schedule": []}, "applied": None, "result": None}
    return {**row, "doc": json.loads(row["doc"]), "result": json.loads(row["result"]) if row["result"] else None}


def ack_alert(db: Database, node: str, alert_id: int, who: str) -> dict[str, Any]:
    """Acknowledge an alert: shown at once, and sent down to the edge, whose store holds the alert (it sends the
    acknowledged alert back up)."""
    row = next(iter(db.query("SELECT acked FROM alerts WHERE node = ? AND id = ?", [node, alert_id])), None)
    if row is None:
        raise NotFound(f"no alert {alert_id} on node {node!r}")
    if row["acked"] is None:
        db.execute("UPDATE alerts SET acked = ?, acked_by = ? WHERE node = ? AND id = ?",
                   [time.time(), who, node, alert_id])
        queue_down(db, node, "alert_ack", {"id": alert_id, "by": who})
    return {"node": node, "id": alert_id, "acked_by": who}


def list_alerts(db: Database, everything: bool = False, node: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Alerts of the fleet, newest first: open ones (and resolved ones not yet acknowledged), or all."""
    where, params = ["1 = 1"], []
    if not everything:
        where.append("(state != 'resolved' OR acked IS NULL)")
    if node is not None:
        where.append("node = ?")
        params.append(node)
    rows = db.query(f"SELECT * FROM alerts WHERE {' AND '.join(where)} ORDER BY COALESCE(fired, started) DESC NULLS LAST "
                    "LIMIT ?",
                    [*params, limit])
    return [{**{k: v for k, v in r.items() if k != "values_"}, "values": json.loads(r["values_"] or "{}")} for r in rows]


def clip_text(value: Any) -> str:
    return wire.clip(str(value), 300)


def registration_refused(db: Database, node: str, device: str) -> str | None:
    """Why the node refused a device registered from here (None: it took it, or has not answered yet)."""
    row = db.execute("SELECT registered FROM devices WHERE node = ? AND id = ?", [node, device]).fetchone()
    if row is None or row[0]:
        return None
    event = db.execute("SELECT body FROM device_events WHERE node = ? AND device = ? AND kind = 'log' ORDER BY id DESC "
                       "LIMIT 1", [node, device]).fetchone()
    return str(json.loads(event[0]).get("message")) if event else "the node refused it"


def register_device(db: Database, node: str, device: str, model: str | None) -> tuple[str, str]:
    """Register a device on an edge from the cloud; the credential is made here, returned once, sent down hashed.
    Returns it and the id of the message that carries it down."""
    require_node(db, node)
    check_device_id(device)
    rows = list(db.query("SELECT registered FROM devices WHERE node = ? AND id = ?", [node, device]))
    if rows and rows[0]["registered"]:
        raise RegistryError(f"device {device!r} is already registered on node {node!r}")
    secret = new_secret()
    message = queue_down(db, node, "device", {"device": device, "model": model, "secret_hash": hash_secret(secret)})
    _device(db, node, device)
    db.execute("UPDATE devices SET registered = 1, model = ? WHERE node = ? AND id = ?", [model, node, device])
    return secret, message


def start_command(db: Database, node: str, device: str, name: str, args: dict[str, Any], timeout: float) -> str:
    _replica(db, node, device)  # node and device must exist
    cmd_id = uuid.uuid4().hex[:16]
    db.table("commands").insert({"id": cmd_id, "node": node, "device": device, "name": name, "args": json.dumps(args),
                                 "created": time.time(), "status": "queued", "result": None})
    queue_down(db, node, "cmd", {"cmd": cmd_id, "device": device, "name": name, "args": args, "timeout": timeout})
    return cmd_id


def command_outcome(db: Database, cmd_id: str) -> dict[str, Any] | None:
    row = db.execute("SELECT status, result FROM commands WHERE id = ?", [cmd_id]).fetchone()
    if row is None or row[0] == "queued":
        return None
    return dict(json.loads(row[1])) if row[1] else {"error": row[0]}


def prune(db: Database, before: float, limit: int = PRUNE_CHUNK) -> int:
    """Delete up to `limit` readings received and commands finished before `before`; returns how many rows went
    (call again until it returns 0). On PostgreSQL readings go a day at a time: their daily partitions are dropped
    (by the readings' own time), and what the default partition holds is deleted as rows."""
    row, deleted = "rowid", 0
    if is_postgres(db):
        row = "ctid"
        database.ensure_partitions(db, time.time())
        deleted += database.drop_partitions(db, before)
        deleted += int(db.execute("DELETE FROM readings_default WHERE ctid IN (SELECT ctid FROM readings_default "
                                  "WHERE ts < ? LIMIT ?)", [before, limit]).rowcount)
    else:
        deleted += int(db.execute("DELETE FROM readings WHERE rowid IN (SELECT rowid FROM readings WHERE received < ? "
                                  "LIMIT ?)", [before, limit]).rowcount)
    deleted += int(db.execute(f"DELETE FROM device_events WHERE {row} IN (SELECT {row} FROM device_events WHERE "
                              "received < ? LIMIT ?)", [before, limit]).rowcount)
    deleted += int(db.execute(f"DELETE FROM commands WHERE {row} IN (SELECT {row} FROM commands WHERE created < ? "
                              "AND status != 'queued' LIMIT ?)", [before, limit]).rowcount)
    deleted += int(db.execute(f"DELETE FROM alerts WHERE {row} IN (SELECT {row} FROM alerts WHERE state = 'resolved' "
                              "AND received < ? LIMIT ?)", [before, limit]).rowcount)
    return deleted


def query_readings(db: Database, node: str, device: str, since: float | None, limit: int | None,
                   until: float | None = None) -> list[dict[str, Any]]:
    """A device's readings in time order: the newest `limit` of those from `since` and before `until`."""
    _replica(db, node, device)
    sql = "SELECT boot, seq, ts, data FROM readings WHERE node = ? AND device = ?"
    params: list[Any] = [node, device]
    if since is not None:
        sql += " AND ts >= ?"
        params.append(since)
    if until is not None:
        sql += " AND ts < ?"
        params.append(until)
    sql += " ORDER BY ts DESC, boot DESC, seq DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    rows = list(db.query(sql, params))
    rows.reverse()
    return [{"boot": r["boot"], "seq": r["seq"], "ts": r["ts"], "values": json.loads(r["data"])} for r in rows]




def series(db: Database, node: str, device: str, since: float, until: float, points: int) -> dict[str, Any]:
    _replica(db, node, device)
    return accounts.series(db, "node = ? AND device = ?", [node, device], "ts", since, until, points)


def device_events(db: Database, node: str, device: str, kinds: tuple[str, ...], limit: int) -> list[dict[str, Any]]:
    """A device's newest events of these kinds, in order."""
    _replica(db, node, device)
    rows = list(db.query(f"SELECT id, ts, kind, body FROM device_events WHERE node = ? AND device = ? AND kind IN "
                         f"({', '.join('?' for _ in kinds)}) ORDER BY id DESC LIMIT ?", [node, device, *kinds, limit]))
    rows.reverse()
    return [{"id": r["id"], "ts": r["ts"], "kind": r["kind"], "body": json.loads(r["body"])} for r in rows]
