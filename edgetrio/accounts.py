"""Operator accounts, API tokens and browser sessions, and the downsampled series the dashboards plot: SQL shared by
the relay's store and the gateway's (each keeps these tables in its own database).

Passwords are hashed by the caller (`identity.hash_password`, a slow KDF that does not belong in a store's writer);
tokens and session keys are random and stored as their SHA-256.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from sqlite_utils import Database

from edgetrio.identity import RegistryError, check_device_id, new_secret, token_digest


class NotFound(RegistryError):
    pass


def create_tables(db: Database) -> None:
    db.table("users").create({"name": str, "role": str, "password_hash": str, "created": float}, pk="name",
                             if_not_exists=True)
    db.table("api_tokens").create({"id": str, "user": str, "token_hash": str, "created": float}, pk="id",
                                  if_not_exists=True)
    db.table("web_sessions").create({"key_hash": str, "user": str, "role": str, "csrf": str, "expires": float},
                                    pk="key_hash", if_not_exists=True)
    db.table("api_tokens").create_index(["token_hash"], unique=True, if_not_exists=True)


ROLES = ("admin", "viewer")  # an admin changes things, a viewer only looks


def add_user(db: Database, name: str, role: str, password_hash: str) -> None:
    """Add an operator account (the password hashed by the caller: a slow KDF does not belong in the writer)."""
    check_device_id(name)
    if role not in ROLES:
        raise RegistryError(f"role {role!r}: use admin or viewer")
    if get_user(db, name) is not None:
        raise RegistryError(f"user {name!r} already exists")
    db.table("users").insert({"name": name, "role": role, "password_hash": password_hash, "created": time.time()})


def get_user(db: Database, name: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM users WHERE name = ?", [name]))
    return rows[0] if rows else None


def list_users(db: Database) -> list[dict[str, Any]]:
    return list(db.query('SELECT u.name, u.role, u.created, (SELECT count(*) FROM api_tokens t WHERE t."user" = u.name)'
                         " AS tokens FROM users u ORDER BY u.name"))


def remove_user(db: Database, name: str) -> None:
    """Remove an account with its tokens and sessions: all of them stop working at once."""
    if get_user(db, name) is None:
        raise NotFound(f"unknown user {name!r}")
    for table in ("api_tokens", "web_sessions"):
        db.execute(f'DELETE FROM {table} WHERE "user" = ?', [name])
    db.execute("DELETE FROM users WHERE name = ?", [name])


def add_token(db: Database, user: str) -> tuple[str, str]:
    """A new API token for a user's scripts: (its id, the token, shown once)."""
    if get_user(db, user) is None:
        raise NotFound(f"unknown user {user!r}")
    token = new_secret()
    token_id = uuid.uuid4().hex[:8]
    db.table("api_tokens").insert({"id": token_id, "user": user, "token_hash": token_digest(token),
                                   "created": time.time()})
    return token_id, token


def revoke_token(db: Database, token_id: str) -> None:
    if db.execute("DELETE FROM api_tokens WHERE id = ?", [token_id]).rowcount == 0:
        raise NotFound(f"no token {token_id!r}")


def token_user(db: Database, token: str) -> dict[str, Any] | None:
    rows = list(db.query('SELECT u.name, u.role FROM api_tokens t JOIN users u ON u.name = t."user"'
                         " WHERE t.token_hash = ?", [token_digest(token)]))
    return rows[0] if rows else None


def start_session(db: Database, user: str, role: str, key: str, csrf: str, expires: float) -> None:
    db.execute("DELETE FROM web_sessions WHERE expires < ?", [time.time()])
    db.table("web_sessions").insert({"key_hash": token_digest(key), "user": user, "role": role, "csrf": csrf,
                                     "expires": expires})


def session_user(db: Database, key: str, now: float) -> dict[str, Any] | None:
    """The session's user (a removed account's sessions are deleted with it), or None once expired."""
    rows = list(db.query('SELECT "user" AS name, role, csrf FROM web_sessions WHERE key_hash = ? AND expires > ?',
                         [token_digest(key), now]))
    return rows[0] if rows else None


def end_session(db: Database, key: str) -> None:
    db.execute("DELETE FROM web_sessions WHERE key_hash = ?", [token_digest(key)])



def series(db: Database, where: str, params: list[Any], ts: str, since: float, until: float, points: int
           ) -> dict[str, Any]:
    """Readings (`where` picks the device's rows, `ts` is their time expression) from `since` averaged into at most
    `points` equal buckets per numeric resource, in SQL: a week of 10 s readings is 60,480 rows, and only the averages
    leave the store. `ts` in the answer holds each bucket's middle."""
    recent = db.execute(f"SELECT data FROM readings WHERE {where} AND data IS NOT NULL ORDER BY {ts} DESC LIMIT 20",
                        params).fetchall()
    keys = sorted({k for (data,) in recent for k, v in json.loads(data).items()
                   if isinstance(v, int | float) and not isinstance(v, bool)})
    width = max((until - since) / points, 0.001)
    # PostgreSQL (the relay on it, cloud/database.py): its own number-only json_number, and FLOOR (its CAST rounds)
    postgres = getattr(db, "dialect", None) == "postgresql"
    columns = "".join(f", AVG({'json_number' if postgres else 'json_extract'}(data, ?))" for _ in keys)
    bucket = "FLOOR(({ts} - ?) / ?)::bigint" if postgres else "CAST(({ts} - ?) / ? AS INTEGER)"
    rows = db.execute(f"SELECT {bucket.format(ts=ts)} AS bucket, count(*){columns} FROM readings"
                      f" WHERE {where} AND data IS NOT NULL AND {ts} >= ? AND {ts} <= ? GROUP BY bucket ORDER BY bucket",
                      [since, width, *(f'$."{k}"' for k in keys), *params, since, until]).fetchall()
    return {"since": since, "until": until, "bucket": width, "ts": [since + (r[0] + 0.5) * width for r in rows],
            "count": [r[1] for r in rows], "values": {k: [r[2 + i] for r in rows] for i, k in enumerate(keys)}}
