"""Flashing with mpremote against a virtual board behind a pty, as against a real one on /dev/ttyUSB0."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgetrio.tools.bundle import device_tool
from edgetrio.tools.testkit import Daemon, blank_board


@pytest.fixture
def board(tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    daemon = Daemon(tmp_path / "gw").start()
    try:
        with blank_board(daemon.data_dir, tmp_path / "ttyUSB0") as tty:
            yield daemon, tty
    finally:
        daemon.stop()


def flash(daemon: Daemon, tty: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return daemon.cli("flash", "--port", str(tty), "--device-id", "board-1", "--broker",
                      f"127.0.0.1:{daemon.port}", "--period", "0.3", *extra, check=False)


def test_flash_errors_are_one_line(board: tuple[Daemon, Path], tmp_path: Path) -> None:
    daemon, _tty = board
    missing = flash(daemon, tmp_path / "ttyUSB9")
    assert missing.returncode == 2 and "no such port" in missing.stderr and "Traceback" not in missing.stderr
    # a port where no board answers
    master, slave = os.openpty()
    silent = tmp_path / "silent"
    silent.symlink_to(os.ttyname(slave))
    try:
        dead = flash(daemon, silent)
    finally:
        os.close(master)
        os.close(slave)
    assert dead.returncode == 2 and "mpremote failed" in dead.stderr and len(dead.stderr.strip().splitlines()) == 1
    out = tmp_path / "bundle"
    written = daemon.cli("flash", "--out", str(out), "--device-id", "board-2", "--broker", "10.0.0.2",
                         "--wifi-ssid", "home", "--wifi-password", "pw")
    config = json.loads((out / "config.json").read_text())
    assert config["broker_host"] == "10.0.0.2" and config["broker_port"] == 1883 and config["wifi_ssid"] == "home"
    assert config["watchdog_ms"] == 60000
    short = daemon.cli("flash", "--out", str(out), "--device-id", "board-2", "--broker", "10.0.0.2", "--watchdog", "1",
                       check=False)
    assert short.returncode == 2 and "--watchdog 1: use 2 to 3600 seconds" in short.stderr
    assert (out / "lib" / "node.mpy").exists() and (out / "boot.py").exists()
    assert "bundle written" in written.stdout


def test_the_blank_virtual_board_behaves_like_a_board(board: tuple[Daemon, Path], tmp_path: Path) -> None:
    daemon, tty = board
    flash_dir = daemon.data_dir / "vdevs" / "board-1"

    def mp(*args: str) -> str:
        proc = subprocess.run([device_tool("mpremote"), "connect", str(tty), *args], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert mp("exec", "import machine; print(machine.RTC().datetime()[0])").strip() == "2000"  # unset clock
    marker = tmp_path / "boot.py"
    marker.write_text("f = open('boots.txt', 'a')\nf.write('b')\nf.close()\n")
    host_root_had = Path("/boot.py").exists()
    mp("fs", "cp", str(marker), ":/boot.py")  # `:/` is the board's flash, not the host's root
    assert (flash_dir / "boot.py").read_text() == marker.read_text()
    assert Path("/boot.py").exists() == host_root_had
    before = (flash_dir / "boots.txt").read_text() if (flash_dir / "boots.txt").exists() else ""
    mp("soft-reset")
    assert (flash_dir / "boots.txt").read_text() == before + "b"  # a soft reset runs boot.py, as on an ESP32
    df = mp("df")
    assert str(2 * 1024 * 1024) in df, df  # the 2 MiB partition of a 4 MB ESP32, not the host's disk
    listing = mp("fs", "ls", ":/")
    assert "boot.py" in listing and "etc" not in listing.split()


def test_flash_with_a_credential_made_elsewhere_registers_nothing_and_a_timeout_exits_1(
        board: tuple[Daemon, Path]) -> None:
    daemon, tty = board
    result = flash(daemon, tty, "--password", "made-elsewhere", "--wait", "4")
    assert "not registering" in result.stdout
    copied = [line.split()[-1] for line in result.stdout.splitlines() if "] " in line and "/" in line.split()[-2]]
    assert "lib/node.mpy" in copied and "config.json" in copied, result.stdout  # each file shown as it goes
    assert result.returncode == 1, result.stderr  # flashed, but the gateway does not know this credential
    assert "did not come online within 4 s" in result.stderr
    assert json.loads(daemon.cli("device", "list", "--json").stdout) == []
    config = json.loads((daemon.data_dir / "vdevs" / "board-1" / "config.json").read_text())
    assert config["password"] == "made-elsewhere"
