"""Nothing acknowledged is lost: kill -9 of the daemon mid-stream, and a clean SIGTERM stop, with virtual boards
running the real firmware (what the gateway has not acknowledged stays on their flash and is sent again)."""

from __future__ import annotations

import signal
from pathlib import Path

from edgetrio.tools.testkit import Daemon, stored, virtual_boards, wait_until, whole
from edgetrio.tools.vdev import flash_dir


def grown(daemon: Daemon, boards: list[str], by: int) -> None:
    """Wait until each board has `by` more readings stored."""
    marks = {b: len(stored(daemon.data_dir / "edgetrio.db", b)) for b in boards}
    wait_until(lambda: all(len(stored(daemon.data_dir / "edgetrio.db", b)) >= marks[b] + by for b in boards),
               timeout=90)


def test_kill_9_mid_stream_loses_no_acknowledged_reading(tmp_path: Path) -> None:
    """Six boards at ten readings a second; the gateway killed twice mid-stream. A reading the gateway acknowledged
    and then lost would be a hole: the board deleted it from its flash when the ack came."""
    daemon = Daemon(tmp_path / "data").start()
    try:
        with virtual_boards(daemon, "streamer", count=6, period=0.1) as boards:
            for _ in range(2):
                grown(daemon, boards, 20)
                daemon.stop(signal.SIGKILL)
                daemon.start()  # same port: the boards reconnect and send what was not acknowledged
            grown(daemon, boards, 20)
        for board in boards:
            whole(stored(daemon.data_dir / "edgetrio.db", board))
    finally:
        daemon.stop()


def test_sigterm_stops_promptly_and_commits_what_was_received(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "data").start()
    try:
        with virtual_boards(daemon, "quitter", count=2, period=0.1) as boards:
            grown(daemon, boards, 10)
            assert daemon.stop(signal.SIGTERM) == 0
            assert "daemon stopped" in daemon.log_text()
            assert not (daemon.data_dir / "daemon.json").exists()
            daemon.start()
            grown(daemon, boards, 10)
        for board in boards:
            whole(stored(daemon.data_dir / "edgetrio.db", board))
    finally:
        daemon.stop()


def test_a_board_back_from_an_outage_catches_up_in_batches(tmp_path: Path) -> None:
    """Readings buffered on flash while the Wi-Fi was down go out several to a message (a batch, acknowledged by the
    same watermark), every one stored once."""
    daemon = Daemon(tmp_path / "data").start()
    db = daemon.data_dir / "edgetrio.db"
    try:
        with virtual_boards(daemon, "catcher", count=1, period=0.1) as (board,):
            grown(daemon, [board], 5)
            daemon.cli("fault", board, "wifi", "down")
            before = len(stored(db, board))
            log = flash_dir(daemon.data_dir, board) / "buffer.log"
            wait_until(lambda: len(log.read_bytes().splitlines()) >= 80, timeout=60)  # ~60 taken offline
            batches = daemon.counters().get("telemetry_batches", 0)
            daemon.cli("fault", board, "wifi", "up")
            wait_until(lambda: len(stored(db, board)) >= before + 60, timeout=60)
            assert daemon.counters().get("telemetry_batches", 0) >= batches + 5, "the catch-up went one per message"
        whole(stored(db, board))
    finally:
        daemon.stop()
