"""The SQLite store's one writer, shared by the gateway and the relay.

One writer task groups whatever is waiting into one transaction (group commit, WAL, synchronous=FULL so a commit
survives power loss, which a Raspberry Pi-class gateway must expect). Each operation runs in its own savepoint, so one
failing operation (a version conflict, say) does not undo the others in its batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import outcome
import trio
from sqlite_utils import Database

from edgetrio.identity import RegistryError

log = logging.getLogger("edgetrio.store")
T = TypeVar("T")
POSTGRES = "postgresql"
PRUNE_CHUNK = 5000  # rows per table per transaction: a first prune of months of rows must not stall ingest


def connect(path: Path) -> Database:
    """Open a SQLite file the way edgetrio keeps its state: WAL, a commit survives power loss, writers wait.

    The file and its directory are its owner's alone (0600, 0700), also when an older version made them readable.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives its -wal and -shm files this mode too
    for part, mode in ((path.parent, 0o700), (path, 0o600), (path.with_name(path.name + "-wal"), 0o600),
                       (path.with_name(path.name + "-shm"), 0o600)):
        with contextlib.suppress(FileNotFoundError, PermissionError):  # PermissionError: not ours to tighten
            os.chmod(part, mode)
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as exc:
        raise RegistryError(f"{path} is not a usable SQLite database: {exc}") from exc
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return Database(conn)


def is_postgres(db: Any) -> bool:
    """The relay's store on PostgreSQL (cloud/database.py) rather than a SQLite file."""
    return getattr(db, "dialect", None) == POSTGRES


@contextlib.contextmanager
def offline_write(db: Database) -> Iterator[Database]:
    """A transaction for a write from outside the running service (the CLI beside a running relay, say).

    BEGIN IMMEDIATE takes the write lock first, waiting out the busy timeout: a deferred transaction that reads and
    then writes fails at once with "database is locked" when the service committed in between (WAL cannot upgrade a
    stale snapshot). On PostgreSQL, a transaction."""
    if is_postgres(db):
        with db.atomic():
            yield db
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


class Write(Generic[T]):
    """One operation for the writer: `apply` runs inside the batch transaction; `done` gets its outcome after commit."""

    __slots__ = ("apply", "done")

    def __init__(self, apply: Callable[[Database], T], done: Callable[[outcome.Outcome[T]], None]) -> None:
        self.apply = apply
        self.done = done


class Writer:
    """The single task that writes to the store. Operations wait in a bounded queue (backpressure on ingest).

    Who waits for commits (`next_commit`) is woken only by a batch that changed rows: a component that reads (through
    `read`, or a write that found nothing to do) after being woken does not wake itself again. Reads go through
    `read`, on a connection of their own, and never make a commit.
    """

    def __init__(self, db: Database, max_batch: int = 256, queue_size: int = 128, reader: Database | None = None) -> None:
        self.db = db
        self.reader = reader
        self._reading = trio.Lock()  # the read connection is used by one thread at a time
        self.max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[Write[Any]](queue_size)
        self.batches = 0
        self.ops = 0
        # Why commits fail while the store cannot write (a full disk, an I/O error), and since when; None when it can.
        # Set by the commit thread, read by trio (whole-value swaps).
        self.failure: str | None = None
        self.failing_since: float | None = None
        self._committed = trio.lowlevel.ParkingLot()  # who waits for the next commit (the cloud link's sender)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit operations until `close()` and then everything still queued. A batch in progress always finishes."""
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                changes_before = self.db.conn.total_changes
                results = await trio.to_thread.run_sync(self._commit, batch)
                changed = self.db.conn.total_changes != changes_before
                self.batches += 1
                self.ops += len(batch)
                for op, result in zip(batch, results, strict=True):
                    try:
                        op.done(result)
                    except Exception:
                        log.exception("error after commit")
                if changed:  # a batch that wrote nothing must not wake a reader into reading again (a busy loop)
                    self._committed.unpark_all()

    def _commit(self, batch: list[Write[Any]]) -> list[outcome.Outcome[Any]]:
        results: list[outcome.Outcome[Any]] = []
        try:
            with self.db.atomic():
                for op in batch:
                    try:
                        with self.db.atomic():
                            value = op.apply(self.db)
                        # after the savepoint's release, which can fail too (a database server gone mid-batch)
                        results.append(outcome.Value(value))
                    except Exception as exc:
                        results.append(outcome.Error(exc))
        except Exception as exc:
            if self.failure is None:
                self.failing_since = time.time()
                log.error("the store cannot write (%s): nothing is acknowledged until it can; retrying", exc)
            else:
                log.debug("commit failed, %d operations not stored: %s", len(batch), exc)
            self.failure = str(exc) or type(exc).__name__
            return [outcome.Error(exc)] * len(batch)
        if self.failure is not None:
            log.warning("the store writes again after %.0f s (%s)", time.time() - (self.failing_since or 0), self.failure)
            self.failure = self.failing_since = None
        return results

    async def submit(self, apply: Callable[[Database], T], done: Callable[[outcome.Outcome[T]], None]) -> None:
        """Queue an operation; waits only while the queue is full."""
        await self._send.send(Write(apply, done))

    async def write(self, apply: Callable[[Database], T]) -> T:
        """Run an operation in the next batch and return its result (or raise its error) once committed."""
        finished = trio.Event()
        box: list[outcome.Outcome[T]] = []

        def done(result: outcome.Outcome[T]) -> None:
            box.append(result)
            finished.set()

        await self.submit(apply, done)
        await finished.wait()
        return box[0].unwrap()

    async def read(self, fn: Callable[[Database], T]) -> T:
        """Run a read on the read connection, in a worker thread: not queued behind writes and never a commit.

        Sees everything committed before it starts (WAL). Cancelling it abandons nothing: the read finishes first.
        """
        if self.reader is None:  # an in-memory store has one connection: read in the next batch
            return await self.write(fn)
        reader = self.reader
        async with self._reading:
            return await trio.to_thread.run_sync(fn, reader)

    async def next_commit(self) -> None:
        """Wait until the writer has committed a batch that changed something."""
        await self._committed.park()

    async def close(self) -> None:
        await self._send.aclose()


def open_reader(db: Database) -> Database | None:
    """A second, read-only connection to db's file (None for an in-memory store, and for PostgreSQL: the relay reads
    through its writer)."""
    if is_postgres(db):
        return None
    path = db.conn.execute("PRAGMA database_list").fetchone()[2]
    if not path:
        return None
    conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA query_only=ON")  # a read that tries to write fails instead of racing the writer
    return Database(conn)


@asynccontextmanager
async def open_writer(db: Database, **options: Any) -> AsyncIterator[Writer]:
    """The store's one writer and its read connection, running for the duration of the block.

    On exit it commits what was queued before the block ended, then stops; a batch in progress always finishes.
    """
    reader = open_reader(db)
    writer = Writer(db, reader=reader, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            try:
                yield writer
            finally:
                await writer.close()
    finally:
        if reader is not None:
            reader.conn.close()


async def keep_retention(writer: Writer, prune: Callable[..., int], days: float) -> None:
    """Hourly, delete what is older than `days` (nothing when 0): `prune(db, before)` deletes a chunk and says how many
    rows, each chunk its own commit, so readings and edges keep being served meanwhile."""
    while days > 0:
        before, deleted = time.time() - days * 86400, 0
        try:
            while chunk := await writer.write(partial(prune, before=before)):
                deleted += chunk
        except Exception as exc:  # the store cannot write now; the next round deletes what this one did not
            log.warning("retention: stopped after %d rows: %s", deleted, exc)
        if deleted:
            log.info("retention: deleted %d rows older than %g days", deleted, days)
        await trio.sleep(3600)
