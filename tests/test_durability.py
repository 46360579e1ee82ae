"""Nothing acknowledged is lost: kill -9 of the daemon mid-stream, and a clean SIGTERM stop."""

from __future__ import annotations

import signal
from pathlib import Path

from edgetrio.daemon import store
from edgetrio.tools.testkit import Daemon, wait_until
from edgetrio.tools.testkit.simdevice import SimDevice


def stored_seqs(data_dir: Path, device_id: str, boot: int) -> list[int]:
    db = store.open_db(data_dir)
    try:
        return [row["seq"] for row in db.query(
            "SELECT seq FROM readings WHERE device = ? AND boot = ? ORDER BY seq", [device_id, boot])]
    finally:
        db.close()


def test_kill_9_mid_stream_loses_no_acknowledged_reading(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "data").start()
    password = daemon.add_device("streamer")
    sensor = SimDevice("streamer", password, daemon.host, daemon.port, boot=3).start()
    total = 3000
    try:
        for i in range(total):
            sensor.read({"n": i})
            if i == 1000:
                assert sensor.wait_acked(50, timeout=30)
        wait_until(lambda: sensor.acked >= 400, timeout=60, interval=0.01)
        daemon.stop(signal.SIGKILL)
        acked_at_kill = sensor.acked
        stored = stored_seqs(daemon.data_dir, "streamer", 3)
        assert set(range(1, acked_at_kill + 1)) <= set(stored), "an acknowledged reading was lost"
        assert acked_at_kill < total, "the stream finished before the kill; the test proves nothing"

        # back on the same port: the device resends its buffer and everything ends up stored exactly once
        daemon.start()
        assert sensor.wait_acked(total, timeout=60), f"only {sensor.acked} of {total} acknowledged after restart"
        assert stored_seqs(daemon.data_dir, "streamer", 3) == list(range(1, total + 1))
    finally:
        sensor.stop()
        daemon.stop()


def test_sigterm_stops_promptly_and_commits_what_was_received(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "data").start()
    password = daemon.add_device("quitter")
    sensor = SimDevice("quitter", password, daemon.host, daemon.port, boot=1).start()
    try:
        for i in range(500):
            sensor.read({"n": i})
        assert sensor.wait_acked(1, timeout=30)
        assert daemon.stop(signal.SIGTERM) == 0
        assert set(range(1, sensor.acked + 1)) <= set(stored_seqs(daemon.data_dir, "quitter", 1))
        assert "daemon stopped" in daemon.log_text()
        assert not (daemon.data_dir / "daemon.json").exists()
    finally:
        sensor.stop()
