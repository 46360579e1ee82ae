"""The relay's database: one SQLite file (the default) or PostgreSQL (any number of relay replicas on one database).

The store's functions (store.py, rollouts.py, accounts.py) are written once, against the part of sqlite-utils'
`Database` they use (`execute`, `query`, `table(...).insert/upsert/update`, `atomic`); `PgDatabase` answers the same
calls on a psycopg 3 connection, so no feature exists on one back end only. The schema of both is versioned here
(`MIGRATIONS`), applied at start and by `edgetrio cloud migrate`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from edgetrio import accounts
from edgetrio.cloud import rollouts
from edgetrio.writer import POSTGRES, connect, is_postgres

log = logging.getLogger("edgetrio.relay")
DB_FILE = "relay.db"
CONFIG_FILE = "relay.toml"  # `database = "postgresql://..."`: where the relay in this data dir keeps its state
ENV = "EDGETRIO_DATABASE"

Store = Any  # a sqlite_utils.Database or a PgDatabase: the calls the store makes are the same


class DatabaseError(RuntimeError):
    """A database the relay cannot use (a bad URL, a server that does not answer, a corrupt config): said in a line.

    Not a ValueError (as RegistryError is): a batch item that met it was not unusable, the database was away, and it
    must not be skipped as bad input and acknowledged (a crash test lost a reading that way)."""


def database_url(data_dir: Path, given: str | None = None) -> str | None:
    """Where the relay keeps its state: --database, else $EDGETRIO_DATABASE, else `database` in DATA/relay.toml;
    None is the SQLite file in the data dir."""
    url = given or os.environ.get(ENV)
    if not url:
        path = data_dir / CONFIG_FILE
        try:
            config = tomllib.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise DatabaseError(f"{path}: {exc}") from None
        unknown = sorted(set(config) - {"database"})
        if unknown:  # a misspelt `database` would leave this replica on a SQLite file of its own, taking edges
            raise DatabaseError(f"{path}: unknown key {unknown[0]!r} (the relay's config file takes: database)")
        url = config.get("database")
        if url is not None and not isinstance(url, str):
            raise DatabaseError(f"{path}: database must be a string such as \"postgresql://relay@db/edgetrio\"")
    if not url or url == "sqlite":
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise DatabaseError(f"database {redact(url)!r}: give postgresql://USER:PASSWORD@HOST:PORT/NAME (or leave it out "
                            "for the SQLite file in the data dir)")
    return url


def redact(url: str) -> str:
    """A database URL fit for logs and errors: its password left out."""
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    if not at or ":" not in auth:
        return url
    return f"{scheme}{sep}{auth.split(':', 1)[0]}:***@{host}"


def open_database(data_dir: Path, url: str | None = None) -> Store:
    """Connect to the relay's database (not migrated: `migrate` does that)."""
    if url is None:
        return connect(data_dir / DB_FILE)
    return PgDatabase(url)


# -- PostgreSQL ------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """The store's SQL with psycopg's placeholders (the store writes no `?` or `%` inside its string literals)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


PRIMARY_KEYS = {"devices": ("node", "id"), "nodes": ("name",), "alerts": ("node", "id"), "rule_sets": ("node",),
                "rollouts": ("id",), "bundles": ("id",), "users": ("name",)}


class PgTable:
    """The writes of sqlite-utils' Table the store uses, in PostgreSQL's SQL."""

    def __init__(self, db: PgDatabase, name: str) -> None:
        self.db, self.name = db, name

    def insert(self, row: dict[str, Any]) -> None:
        self.insert_all([row])

    def insert_all(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rows with the same columns in one executemany (one pipeline, not a round trip per row)."""
        by_columns: dict[tuple[str, ...], list[list[Any]]] = {}
        for row in rows:
            by_columns.setdefault(tuple(row), []).append(list(row.values()))
        for columns, values in by_columns.items():
            self.db.conn.executemany(f"INSERT INTO {_quote(self.name)} ({', '.join(_quote(c) for c in columns)}) "
                                     f"VALUES ({', '.join('?' for _ in columns)})", values)

    def upsert(self, row: dict[str, Any], pk: str | Sequence[str]) -> None:
        keys = (pk,) if isinstance(pk, str) else tuple(pk)
        columns = ", ".join(_quote(c) for c in row)
        changes = ", ".join(f"{_quote(c)} = EXCLUDED.{_quote(c)}" for c in row if c not in keys)
        self.db.execute(f"INSERT INTO {_quote(self.name)} ({columns}) VALUES ({', '.join('?' for _ in row)}) "
                        f"ON CONFLICT ({', '.join(_quote(k) for k in keys)}) "
                        + (f"DO UPDATE SET {changes}" if changes else "DO NOTHING"), list(row.values()))

    def update(self, key: Any, fields: dict[str, Any]) -> None:
        keys = PRIMARY_KEYS[self.name]
        values = list(key) if isinstance(key, tuple | list) else [key]
        self.db.execute(f"UPDATE {_quote(self.name)} SET {', '.join(f'{_quote(c)} = ?' for c in fields)} WHERE "
                        + " AND ".join(f"{_quote(k)} = ?" for k in keys), [*fields.values(), *values])


class PgConnection:
    """What the writer and the store use of sqlite3's connection: a count of changed rows, executemany, close."""

    def __init__(self, db: PgDatabase) -> None:
        self.db = db
        self.total_changes = 0

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self.db.raw().cursor() as cursor:
                cursor.executemany(pg_sql(sql), rows)
                self.total_changes += max(cursor.rowcount, 0)

    def close(self) -> None:
        self.db.close()


class PgDatabase:
    """A psycopg 3 connection that answers the calls the store makes of a sqlite-utils Database.

    Synchronous on purpose: psycopg's async mode is asyncio's, and the relay is trio; the store runs in the writer's
    worker thread (trio.to_thread) like the SQLite one. A connection the server dropped (a restart, a failover) is
    opened again at the next transaction; the one that failed is not acknowledged to anyone (the writer says so).
    """

    dialect = POSTGRES

    def __init__(self, url: str, connect_timeout: float = 5.0) -> None:
        try:
            import psycopg  # noqa: F401 - optional: only a relay on PostgreSQL needs it
        except ImportError:
            raise DatabaseError("a PostgreSQL database needs psycopg: pip install 'edgetrio[postgresql]'") from None
        self.url = url
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        self._depth = 0  # transactions open: inside one, a lost connection fails it, never opens a new one
        self.conn = PgConnection(self)
        self.raw()  # a database that cannot be reached is said at start, not at the first write

    def raw(self) -> Any:
        """The live psycopg connection (autocommit; `atomic` makes the transactions), reconnecting when it broke and
        no transaction is open (statements on a new connection would run outside the one that failed)."""
        import psycopg
        if self._depth:
            if self._conn is None or self._conn.broken or self._conn.closed:
                raise DatabaseError(f"the connection to {redact(self.url)} was lost in a transaction")
            return self._conn
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
            try:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                                             application_name="edgetrio-relay")
            except psycopg.Error as exc:
                raise DatabaseError(f"cannot connect to {redact(self.url)}: {str(exc).strip().splitlines()[0]}") from None
        return self._conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self.raw().execute(pg_sql(sql), list(params))
        if cursor.description is None:
            self.conn.total_changes += max(cursor.rowcount, 0)
        return cursor

    def query(self, sql: str, params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        from psycopg.rows import dict_row
        with self.raw().cursor(row_factory=dict_row) as cursor:
            cursor.execute(pg_sql(sql), list(params))
            rows = cursor.fetchall()
        yield from rows

    def table(self, name: str) -> PgTable:
        return PgTable(self, name)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[PgDatabase]:
        """A transaction; nested, a savepoint (as sqlite-utils' atomic). Raises when it did not commit: psycopg's
        transaction ends silently on a connection that broke inside it if no exception left the block (the writer
        catches each operation's), and a batch the server never committed was taken as committed and acknowledged."""
        with self.raw().transaction() as transaction:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
        if transaction.status != transaction.Status.COMMITTED:
            raise DatabaseError(f"the connection to {redact(self.url)} was lost: the transaction was not committed")

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def _unavailable() -> tuple[type[Exception], ...]:
    found: list[type[Exception]] = [DatabaseError, sqlite3.OperationalError]
    with contextlib.suppress(ImportError):
        import psycopg
        found.append(psycopg.OperationalError)
    return tuple(found)


def bind_errors() -> tuple[type[Exception], ...]:
    """What a value the database cannot hold raises (a number too large, a NUL in a string), on either back end."""
    found: list[type[Exception]] = [sqlite3.InterfaceError, sqlite3.ProgrammingError, OverflowError]
    with contextlib.suppress(ImportError):
        import psycopg
        found.append(psycopg.DataError)
    return tuple(found)


UNAVAILABLE = _unavailable()  # what a database that does not answer (a restart, a failover, a full disk) raises


# -- migrations ------------------------------------------------------------------------------------------------------

def _sqlite_v1(db: Store) -> None:
    """The schema as relays before versioned migrations made it, step by step (each step idempotent, so a relay.db of
    any earlier version comes out the same)."""
    db.table("nodes").create(
        {"name": str, "token_hash": str, "created": float, "online": int, "last_seen": float, "connects": int,
         "last_offset": int}, pk="name", if_not_exists=True)
    if "outbox" not in db.table("nodes").columns_dict:  # the edge's outbox its offsets count in
        db.table("nodes").add_column("outbox", str)
    db.table("devices").create(
        {"node": str, "id": str, "registered": int, "model": str, "online": int, "last_seen": float,
         "meta": str, "twin": str}, pk=("node", "id"), if_not_exists=True)
    db.table("readings").create(
        {"node": str, "device": str, "boot": int, "seq": int, "ts": float, "received": float, "data": str},
        pk=("node", "device", "boot", "seq"), if_not_exists=True)
    db.table("downqueue").create(
        {"id": str, "node": str, "created": float, "resource": str, "body": str}, pk="id", if_not_exists=True)
    db.table("commands").create(
        {"id": str, "node": str, "device": str, "name": str, "args": str, "created": float, "status": str,
         "result": str}, pk="id", if_not_exists=True)
    accounts.create_tables(db)
    if "asleep_until" not in db.table("devices").columns_dict:  # a battery board's next wake
        db.table("devices").add_column("asleep_until", float)
    if "counters" not in db.table("nodes").columns_dict:  # what each gateway last reported of itself
        db.table("nodes").add_column("counters", str)
    db.table("device_events").create(  # log and status lines, and what the gateway refused, per device
        {"id": int, "node": str, "device": str, "ts": float, "received": float, "kind": str, "body": str},
        pk="id", if_not_exists=True)
    db.table("device_events").create_index(["node", "device", "kind", "id"], if_not_exists=True)
    db.table("device_events").create_index(["received"], if_not_exists=True)
    # each node's rule set (versioned like a twin: the edge applies only a newer one) and the alerts edges send up
    db.table("rule_sets").create({"node": str, "version": int, "doc": str, "updated": float, "applied": int,
                                  "result": str}, pk="node", if_not_exists=True)
    db.table("alerts").create(
        {"node": str, "id": int, "rule": str, "device": str, "severity": str, "state": str, "values_": str,
         "started": float, "fired": float, "resolved": float, "acked": float, "acked_by": str, "received": float},
        pk=("node", "id"), if_not_exists=True)
    db.table("downqueue").create_index(["node", "created"], if_not_exists=True)
    db.table("readings").create_index(["received"], if_not_exists=True)  # retention deletes by age
    rollouts.create_tables(db)


# PostgreSQL's version 1 is the same tables as SQLite's (tests/test_postgres.py compares their columns). Integers are
# BIGINT (SQLite's are 64-bit); readings are partitioned by day of their time, so retention drops whole days; the
# down queue's order is a sequence (clocks of several replicas do not order their writes).
_PG_V1 = """
CREATE TABLE nodes (name TEXT PRIMARY KEY, token_hash TEXT, created DOUBLE PRECISION, online BIGINT,
    last_seen DOUBLE PRECISION, connects BIGINT, last_offset BIGINT, outbox TEXT, counters TEXT);
CREATE TABLE devices (node TEXT, id TEXT, registered BIGINT, model TEXT, online BIGINT, last_seen DOUBLE PRECISION,
    meta TEXT, twin TEXT, asleep_until DOUBLE PRECISION, PRIMARY KEY (node, id));
CREATE TABLE readings (node TEXT, device TEXT, boot BIGINT, seq BIGINT, ts DOUBLE PRECISION, received DOUBLE PRECISION,
    data TEXT, PRIMARY KEY (node, device, boot, seq, ts)) PARTITION BY RANGE (ts);
CREATE TABLE readings_default PARTITION OF readings DEFAULT;
CREATE INDEX readings_series ON readings (node, device, ts);
CREATE TABLE downqueue (id TEXT PRIMARY KEY, node TEXT, created DOUBLE PRECISION, resource TEXT, body TEXT,
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY);
CREATE INDEX downqueue_node ON downqueue (node, seq);
CREATE TABLE commands (id TEXT PRIMARY KEY, node TEXT, device TEXT, name TEXT, args TEXT, created DOUBLE PRECISION,
    status TEXT, result TEXT);
CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT, password_hash TEXT, created DOUBLE PRECISION);
CREATE TABLE api_tokens (id TEXT PRIMARY KEY, "user" TEXT, token_hash TEXT, created DOUBLE PRECISION);
CREATE UNIQUE INDEX api_tokens_hash ON api_tokens (token_hash);
CREATE TABLE web_sessions (key_hash TEXT PRIMARY KEY, "user" TEXT, role TEXT, csrf TEXT, expires DOUBLE PRECISION);
CREATE TABLE device_events (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, node TEXT, device TEXT,
    ts DOUBLE PRECISION, received DOUBLE PRECISION, kind TEXT, body TEXT);
CREATE INDEX device_events_kind ON device_events (node, device, kind, id);
CREATE INDEX device_events_received ON device_events (received);
CREATE TABLE rule_sets (node TEXT PRIMARY KEY, version BIGINT, doc TEXT, updated DOUBLE PRECISION, applied BIGINT,
    result TEXT);
CREATE TABLE alerts (node TEXT, id BIGINT, rule TEXT, device TEXT, severity TEXT, state TEXT, values_ TEXT,
    started DOUBLE PRECISION, fired DOUBLE PRECISION, resolved DOUBLE PRECISION, acked DOUBLE PRECISION,
    acked_by TEXT, received DOUBLE PRECISION, PRIMARY KEY (node, id));
CREATE TABLE bundles (id TEXT PRIMARY KEY, created DOUBLE PRECISION, files TEXT);
CREATE TABLE rollouts (id TEXT PRIMARY KEY, bundle TEXT, created DOUBLE PRECISION, by TEXT, state TEXT, reason TEXT,
    selector TEXT, waves TEXT, wave BIGINT, success DOUBLE PRECISION, max_failures BIGINT, timeout DOUBLE PRECISION,
    confirm_s BIGINT, updated DOUBLE PRECISION, accepted BIGINT NOT NULL DEFAULT -1);
CREATE TABLE rollout_boards (rollout TEXT, node TEXT, device TEXT, wave BIGINT, state TEXT, message TEXT,
    started DOUBLE PRECISION, finished DOUBLE PRECISION, detail TEXT, PRIMARY KEY (rollout, node, device));
CREATE INDEX rollout_boards_state ON rollout_boards (node, device, state);
-- SQLite's json_extract, as the store uses it (a field of a JSON text), and a numbers-only form for averages
CREATE FUNCTION json_extract(doc TEXT, path TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT jsonb_path_query_first(doc::jsonb, path::jsonpath) #>> '{}' $$;
CREATE FUNCTION json_number(doc TEXT, path TEXT) RETURNS DOUBLE PRECISION LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT CASE WHEN jsonb_typeof(v) = 'number' THEN (v #>> '{}')::double precision END
       FROM jsonb_path_query_first(doc::jsonb, path::jsonpath) AS v $$;
"""

# Version 2 (both): which replica holds each edge's link, fenced by an epoch, the replicas' heartbeats, and what all
# replicas share (the operator token).
_V2 = """
CREATE TABLE IF NOT EXISTS edge_sessions (node TEXT PRIMARY KEY, replica TEXT NOT NULL, epoch BIGINT NOT NULL,
    since DOUBLE PRECISION, remote TEXT);
CREATE TABLE IF NOT EXISTS replicas (id TEXT PRIMARY KEY, started DOUBLE PRECISION, seen DOUBLE PRECISION, address TEXT);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT);
"""


def _script(sql: str) -> Callable[[Store], None]:
    def run(db: Store) -> None:
        for statement in _statements(sql):
            db.execute(statement)
    return run


def _statements(sql: str) -> list[str]:
    """A script's statements (split at `;` ending a line, so function bodies keep theirs)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";\n") if s.strip().rstrip(";")]


# version -> (what it is, SQLite step, PostgreSQL step)
MIGRATIONS: dict[int, tuple[str, Callable[[Store], None], Callable[[Store], None]]] = {
    1: ("nodes, devices, readings, the down queue, accounts, alerts, rules, rollouts", _sqlite_v1, _script(_PG_V1)),
    2: ("edge sessions held by replicas, fenced by an epoch", _script(_V2), _script(_V2)),
}
LATEST = max(MIGRATIONS)


def schema_version(db: Store) -> int:
    """The schema version the database is at (0: empty, or a relay.db from before versions)."""
    with db.atomic():
        if is_postgres(db):
            found = db.execute("SELECT to_regclass('schema_migrations')").fetchone()[0]
        else:
            found = db.execute("SELECT name FROM sqlite_master WHERE name = 'schema_migrations'").fetchone()
        if not found:
            return 0
        return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])


def migrate(db: Store, upto: int | None = None) -> list[int]:
    """Bring the schema up to `upto` (the latest by default), each version in its own transaction; returns those
    applied. Replicas starting together take turns (an advisory lock); a database newer than this relay is refused."""
    target = LATEST if upto is None else upto
    applied: list[int] = []
    for version in range(1, target + 1):
        with db.atomic():
            if is_postgres(db):
                db.execute("SELECT pg_advisory_xact_lock(72390145)").fetchone()
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, "
                       "applied DOUBLE PRECISION, what TEXT)")
            newest = int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])
            if newest > LATEST:
                raise DatabaseError(f"the database is at schema version {newest}, newer than this relay's {LATEST}: "
                                    "upgrade edgetrio on this machine")
            if newest >= version:
                continue
            what, sqlite_step, pg_step = MIGRATIONS[version]
            (pg_step if is_postgres(db) else sqlite_step)(db)
            db.execute("INSERT INTO schema_migrations (version, applied, what) VALUES (?, ?, ?)",
                       [version, time.time(), what])
            applied.append(version)
            log.info("database schema: version %d applied (%s)", version, what)
    if is_postgres(db) and target >= 1:
        ensure_partitions(db, time.time())
    return applied


# -- readings' partitions (PostgreSQL) -------------------------------------------------------------------------------

PARTITION_DAYS_AHEAD = 3


def _day(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def ensure_partitions(db: Store, now: float) -> int:
    """Daily partitions of readings from yesterday to a few days ahead (readings of other times go to the default
    partition); returns how many were made. Two replicas making the same one is harmless."""
    made = 0
    for offset in range(-1, PARTITION_DAYS_AHEAD + 1):
        day = _day(now) + timedelta(days=offset)
        name = f"readings_{day:%Y%m%d}"
        try:
            with db.atomic():
                if db.execute("SELECT to_regclass(?)", [name]).fetchone()[0]:
                    continue
                db.execute(f"CREATE TABLE {name} PARTITION OF readings FOR VALUES FROM ({day.timestamp()}) "
                           f"TO ({(day + timedelta(days=1)).timestamp()})")
                made += 1
        except Exception as exc:  # made by another replica meanwhile, or the default partition holds rows of that day
            log.debug("partition %s not made: %s", name, exc)
    return made


def drop_partitions(db: Store, before: float) -> int:
    """Drop the daily partitions wholly older than `before`; returns the readings they held."""
    dropped = 0
    rows = db.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                      "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'readings' "
                      "AND c.relname ~ '^readings_[0-9]{8}$'").fetchall()
    for (name,) in sorted(rows):
        end = datetime.strptime(name[-8:], "%Y%m%d").replace(tzinfo=UTC) + timedelta(days=1)
        if end.timestamp() <= before:
            dropped += int(db.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
            db.execute(f"DROP TABLE {name}")
    return dropped
