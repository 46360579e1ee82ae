"""The relay's durable down queue: what waits for an edge, in order, until the edge confirms it (store.py sends and
drops; rollouts.py queues a rollout's bundle and updates through the same rows)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from sqlite_utils import Database


def queue_down(db: Database, node: str, resource: str, body: dict[str, Any]) -> str:
    message_id = uuid.uuid4().hex
    db.table("downqueue").insert({"id": message_id, "node": node, "created": time.time(), "resource": resource,
                                  "body": json.dumps(body)})
    return message_id
