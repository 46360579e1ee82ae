"""Virtual boards as a fleet: each its own weather, and the BMP280 many boards sold as BME280 carry."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from edgetrio.tools.testkit import ROOT, Daemon, wait_until


def test_boards_differ_and_a_bmp280_in_forced_mode_reports_no_humidity(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "gw").start()
    log = open(tmp_path / "vdev.log", "ab")  # noqa: SIM115
    fleet = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--count", "3", "--prefix", "room",
                              "--period", "0.5", "--data-dir", str(daemon.data_dir)], cwd=ROOT, stdout=log,
                             stderr=log)
    bmp = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--prefix", "battery", "--sensor", "bmp280",
                            "--forced", "--period", "0.5", "--data-dir", str(daemon.data_dir)], cwd=ROOT, stdout=log,
                           stderr=log)
    try:
        rooms = [wait_until(lambda d=d: (r := daemon.readings(d, missing_ok=True)) and len(r) >= 5 and r, timeout=60)
                 for d in ("room-1", "room-2", "room-3")]
        temperatures = [r[-1]["values"]["temperature"] for r in rooms]
        assert len(set(temperatures)) == 3, temperatures  # not one value for the whole fleet
        noisy = {row["values"]["pressure"] for row in rooms[0]}
        assert len(noisy) > 1  # a real sensor's last digits move
        battery = wait_until(lambda: (r := daemon.readings("battery-1", missing_ok=True)) and len(r) >= 3 and r, timeout=60)
        assert "humidity" not in battery[-1]["values"] and 950 < battery[-1]["values"]["pressure"] < 1050
        devices = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
        names = [r["name"] for r in devices["battery-1"]["meta"]["resources"]]
        assert "humidity" not in names and "temperature" in names
    finally:
        for proc in (fleet, bmp):
            proc.send_signal(signal.SIGTERM)
        for proc in (fleet, bmp):
            proc.wait(timeout=30)
        daemon.stop()
