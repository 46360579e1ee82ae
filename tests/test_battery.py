"""Battery mode on a virtual board running the real firmware: it deep-sleeps between readings and connects every
third one, sends what it buffered in one batch, and loses nothing across the sleeps; the gateway shows it asleep with
its next wake, holds a command for it and applies a desired change at its wake."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from edgetrio.tools.testkit import Daemon, cli, stored, virtual_boards, wait_until


def listed(daemon: Daemon, device: str) -> dict[str, Any]:
    found: dict[str, Any] = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}[device]
    return found


def command_row(db: Path, cmd_id: str) -> tuple[str, Any] | None:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        row = conn.execute("SELECT status, result FROM commands WHERE id = ?", [cmd_id]).fetchone()
    return (row[0], json.loads(row[1]) if row[1] else None) if row else None


def test_a_battery_board_sleeps_batches_and_gets_what_was_held_for_it(daemon: Daemon) -> None:
    db = daemon.data_dir / "edgetrio.db"
    with virtual_boards(daemon, "bat", 1, period=1.0, extra=("--battery", "3")) as (board,):
        wait_until(lambda: len(stored(db, board)) >= 6, timeout=90)
        # asleep between its wakes, and the gateway says until when
        seen = wait_until(lambda: (d := listed(daemon, board)) and not d["online"] and d.get("asleep_until") and d,
                          timeout=30)
        assert seen["asleep_until"] > seen["last_seen"]
        assert f"~ {board}: asleep, next wake ~" in daemon.cli("device", "list").stdout
        # a command while it sleeps is held, and goes out when it wakes; so does a desired change. The board may wake
        # between seeing it asleep and the command arriving (a loaded machine: the CLI takes a while): then it answers
        # at once, and the command is given again at its next sleep
        def held_while_asleep() -> dict[str, Any] | None:
            wait_until(lambda: (d := listed(daemon, board)) and not d["online"] and d.get("asleep_until"), timeout=30)
            given = cli(daemon.data_dir, "cmd", board, "ping", "--timeout", "0.5", "--json")
            answer: dict[str, Any] = json.loads(given.stdout) if given.stdout.strip().startswith("{") else {}
            return answer if given.returncode == 0 and answer.get("held") else None
        answer = wait_until(held_while_asleep, timeout=120, interval=0)
        assert "held for its next wake" in answer["message"]
        cmd_id = answer["message"].rsplit("command id ", 1)[1].rstrip(")")
        daemon.cli("twin", "set", board, "led=true")
        done = wait_until(lambda: (r := command_row(db, cmd_id)) and r[0] != "held" and r[1] and r, timeout=60)
        assert done[0] == "ok" and done[1]["value"] == "pong"
        wait_until(lambda: '"led": true' in daemon.cli("twin", "get", board).stdout.split("reported", 1)[1],
                   timeout=60)
        # a command given long enough waits for the wake and returns the board's answer
        blink = cli(daemon.data_dir, "cmd", board, "blink", "times=1", "--timeout", "30")
        assert blink.returncode == 0 and blink.stdout.strip() == '"blinked"', blink.stdout + blink.stderr
        wait_until(lambda: len(stored(db, board)) >= 12, timeout=90)
    rows = stored(db, board)
    # a wake goes on with the boot it slept in: one boot, every reading of every wake there, once
    assert {b for b, _ in rows} == {rows[0][0]} and [s for _, s in rows] == list(range(1, len(rows) + 1))
    # readings went several to a message (a wake that connects sends the ones of the wakes that did not)
    assert daemon.counters().get("telemetry_batches", 0) >= 2
    console = (daemon.data_dir / "vdevs" / board / "console.log").read_text()
    wakes = [line for line in console.splitlines() if line.startswith("[battery] awake")]
    assert sum(", sent" in w for w in wakes) >= 3 and sum(", sent" not in w for w in wakes) >= 6
