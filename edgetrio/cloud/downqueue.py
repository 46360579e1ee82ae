"""The relay's durable down queue: what waits for an edge, in order, until the edge confirms it (store.py sends and
drops; rollouts.py queues a rollout's bundle and updates through the same rows), and the hints that tell the relay
replicas on one PostgreSQL database what changed."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from sqlite_utils import Database

from edgetrio.writer import is_postgres

CHANNEL = "edgetrio"  # PostgreSQL LISTEN/NOTIFY channel of the replicas' hints


def queue_down(db: Database, node: str, resource: str, body: dict[str, Any]) -> str:
    message_id = uuid.uuid4().hex
    db.table("downqueue").insert({"id": message_id, "node": node, "created": time.time(), "resource": resource,
                                  "body": json.dumps(body)})
    notify(db, f"down {node}")
    return message_id


def notify(db: Database, payload: str) -> None:
    """A hint to every relay replica on this database, sent when the transaction commits (PostgreSQL's NOTIFY): a
    hint only, each replica also sweeps for what it missed. The SQLite relay is one process and tells itself."""
    if is_postgres(db):
        db.execute("SELECT pg_notify(?, ?)", [CHANNEL, payload[:7900]]).fetchone()


def notify_many(db: Database, payloads: list[str]) -> None:
    """Several hints in one round trip (psycopg sends executemany's statements in a pipeline)."""
    if is_postgres(db) and payloads:
        db.conn.executemany("SELECT pg_notify(?, ?)", [(CHANNEL, p[:7900]) for p in payloads])
