"""A gateway whose disk fills: it keeps running, acknowledges nothing it could not commit, says so, and resumes.

The data dir lives on a small tmpfs (tests and CI run as root); a filler file takes the last free byte.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgetrio.tools.testkit import Daemon, Probe, fill, needs, small_disk, telemetry, wait_until


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_disk(tmp_path / "disk", 4) as mounted:
        needs(mounted, "root, to mount a small tmpfs")
        yield tmp_path / "disk"


def acked_seq(probe: Probe, topic: str, wait: float) -> int:
    """The highest ack that arrives within `wait` seconds (0 if none)."""
    return max((json.loads(p)["seq"] for t, p in probe.drain(wait) if t == topic), default=0)


def test_a_full_disk_holds_readings_unacknowledged_and_resumes_when_space_frees(disk: Path) -> None:
    daemon = Daemon(disk / "data").start()
    try:
        password = daemon.add_device("d1")
        probe = Probe(daemon, "d1", password, "d1")
        assert probe.accepted() and probe.subscribe("edgetrio/d1/#")
        ack = "edgetrio/d1/ack"
        probe.publish("edgetrio/d1/telemetry", telemetry(1, t=20.0 + 1 / 100, note="x" * 1500))
        assert probe.next_json(ack)["seq"] == 1

        filler = disk / "filler"
        fill(filler)
        for seq in range(2, 302):  # about 450 KB: more than the WAL can take without growing
            probe.publish("edgetrio/d1/telemetry", telemetry(seq, t=20.0 + seq / 100, note="x" * 1500))
        status = wait_until(lambda: (s := daemon.status()["daemon"])["store"]["ok"] is False and s, timeout=30)
        assert "full" in status["store"]["error"]
        assert "store:     cannot write" in daemon.cli("status").stdout
        acked_while_full = acked_seq(probe, ack, 12)  # past the 5 s counter flush that used to kill the daemon
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon exited on a full disk"
        assert acked_while_full < 301, "the test proves nothing: every reading was committed before the disk filled"
        assert "cannot write" in daemon.log_text()

        filler.unlink()
        wait_until(lambda: acked_seq(probe, ack, 1) == 301, timeout=60)
        status = daemon.status()["daemon"]
        assert status["store"]["ok"] is True and status["store"]["readings_held"] == 0
        rows = json.loads(daemon.cli("readings", "d1", "--json").stdout)
        assert [r["seq"] for r in rows] == list(range(1, 302))  # each once, none lost
        assert "writes again" in daemon.log_text()
        probe.close()
    finally:
        assert daemon.stop() == 0


def data_files_are_private(data_dir: Path) -> list[str]:
    loose = [p.name for p in data_dir.iterdir() if p.is_file() and os.stat(p).st_mode & 0o077]
    if os.stat(data_dir).st_mode & 0o077:
        loose.append(str(data_dir))
    return loose


def test_data_dir_and_its_files_are_private(tmp_path: Path) -> Any:
    daemon = Daemon(tmp_path / "data").start()
    try:
        daemon.add_device("d1")
        assert data_files_are_private(daemon.data_dir) == []
    finally:
        daemon.stop()
