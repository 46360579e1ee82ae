"""A write from the CLI beside a running service waits for the service's write instead of failing.

`edgetrio cloud user add` once ended in `database is locked` while the relay committed twin changes: a deferred
transaction that reads (does the user exist?) and then writes cannot upgrade a snapshot the relay's commit made stale,
and SQLite refuses at once, without waiting. Planted defect this catches: `offline_write` beginning a deferred
transaction (sqlite-utils' `atomic`) instead of BEGIN IMMEDIATE.
"""

from __future__ import annotations

import threading
from pathlib import Path

from edgetrio.writer import connect, offline_write


def test_a_read_then_write_waits_out_the_service_commit(tmp_path: Path) -> None:
    service = connect(tmp_path / "store.db")
    service.execute("CREATE TABLE users (name TEXT PRIMARY KEY)")
    service.conn.commit()
    cli = connect(tmp_path / "store.db")
    service.conn.execute("BEGIN IMMEDIATE")  # the service is in the middle of a group commit
    service.execute("INSERT INTO users VALUES ('from-service')")
    read_done = threading.Event()
    outcome: list[object] = []

    def cli_add() -> None:
        try:
            with offline_write(cli):
                taken = cli.execute("SELECT count(*) FROM users WHERE name = 'alice'").fetchone()[0]
                read_done.set()
                if not taken:
                    cli.execute("INSERT INTO users VALUES ('alice')")
            outcome.append("ok")
        except Exception as exc:
            outcome.append(exc)
        finally:
            read_done.set()

    worker = threading.Thread(target=cli_add)
    worker.start()
    read_done.wait(timeout=1)  # a deferred transaction has read by now; an immediate one still waits for the lock
    service.conn.commit()  # the service commits between the CLI's read and its write
    worker.join(timeout=60)
    assert outcome == ["ok"], outcome
    names = {row[0] for row in service.execute("SELECT name FROM users")}
    assert names == {"from-service", "alice"}
