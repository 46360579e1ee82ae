"""Hardware-in-the-loop: the same scenarios against a virtual board (default) or a real ESP32 with --port.

    pytest hil-tests                                  # a virtual ESP32: the firmware on the MicroPython unix port
    pytest hil-tests --port /dev/ttyUSB0 --wifi-ssid NET --wifi-password PW --broker-host 192.168.1.20

Either way the board is flashed with `edgetrio flash` through its serial port and joins the gateway started by the
test. Scenarios that need a fault the test cannot cause on real hardware (Wi-Fi loss, a power cut) are skipped there.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.testkit import ROOT, Daemon, wait_until


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgetrio hardware in the loop")
    group.addoption("--port", default=None, help="serial port of a real ESP32 (default: a virtual board)")
    group.addoption("--wifi-ssid", default="", help="Wi-Fi the real board joins")
    group.addoption("--wifi-password", default="")
    group.addoption("--broker-host", default=None, help="this machine's address as the real board sees it")


class Board:
    def __init__(self, daemon: Daemon, port: Path | str, virtual: bool, config: pytest.Config) -> None:
        self.daemon = daemon
        self.port = str(port)
        self.virtual = virtual
        self.config = config
        self.id = "board-1"
        self.flash_dir = daemon.data_dir / "vdevs" / self.id

    # -- actions --
    def flash(self, period: float = 0.3) -> subprocess.CompletedProcess[str]:
        if self.virtual:  # through the virtual board's Wi-Fi (a proxy the test can cut)
            proxy = self.flash_dir / "sim" / "proxy_port"
            broker = f"127.0.0.1:{wait_until(lambda: proxy.exists() and proxy.read_text())}"
        else:
            broker = f"{self.config.getoption('--broker-host')}:{self.daemon.port}"
        return self.daemon.cli("flash", "--port", self.port, "--device-id", self.id, "--broker", broker,
                               "--period", str(period), "--wifi-ssid", self.config.getoption("--wifi-ssid"),
                               "--wifi-password", self.config.getoption("--wifi-password"), "--wait", "90")

    def wifi(self, up: bool) -> None:
        if not self.virtual:
            pytest.skip("needs a Wi-Fi the test controls (virtual board only)")
        self.daemon.cli("fault", self.id, "wifi", "up" if up else "down")

    def power_cycle(self) -> None:
        if not self.virtual:
            pytest.skip("needs a power switch the test controls (virtual board only)")
        self.daemon.cli("fault", self.id, "power")

    def cmd(self, name: str, *args: str, check: bool = True) -> Any:
        out = self.daemon.cli("cmd", self.id, name, *args, "--json", check=check)
        return json.loads(out.stdout) if out.stdout.strip() else {"ok": False, "error": out.stderr}

    # -- observations through the gateway --
    def readings(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.daemon.cli("readings", self.id, "--json").stdout)
        return rows

    def device(self) -> dict[str, Any]:
        devices = {d["id"]: d for d in json.loads(self.daemon.cli("device", "list", "--json").stdout)}
        return devices.get(self.id, {})

    def online(self) -> bool:
        return bool(self.device().get("online"))

    def twin(self) -> dict[str, Any]:
        twin: dict[str, Any] = json.loads(self.daemon.cli("twin", "get", self.id, "--json").stdout)
        return twin

    def boots(self) -> set[int]:
        return {r["boot"] for r in self.readings()}

    # -- observations of the virtual board's flash --
    def buffered(self) -> list[tuple[int, int]]:
        """(boot, seq) of readings on the board's flash not acknowledged yet (virtual board)."""
        path = self.flash_dir / "buffer.log"
        ack = self.flash_dir / "buffer.log.ack"
        acked = {int(k): v for k, v in json.loads(ack.read_text())["acked"].items()} if ack.exists() else {}
        if not path.exists():
            return []
        lines = [line.split(" ", 2)[:2] for line in path.read_text().splitlines()]
        return [(int(b), int(s)) for b, s in lines if int(s) > acked.get(int(b), 0)]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.flash_dir / "state.json").read_text())
        return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def board(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Board]:
    """A gateway and a freshly flashed board (virtual unless --port)."""
    port = request.config.getoption("--port")
    daemon = Daemon(tmp_path / "gw")
    vdev = None
    if port is None:
        daemon.start()
        tty = tmp_path / "ttyUSB0"
        log = open(tmp_path / "vdev.log", "ab")  # noqa: SIM115
        vdev = subprocess.Popen([sys.executable, "-m", "daemon", "vdev", "--blank", "--repl-pty", str(tty),
                                 "--prefix", "board", "--data-dir", str(daemon.data_dir)], cwd=ROOT, stdout=log,
                                stderr=log)
        wait_until(tty.exists)
        b = Board(daemon, tty, True, request.config)
    else:
        if not request.config.getoption("--broker-host"):
            pytest.exit("--port needs --broker-host (this machine's address on the board's Wi-Fi)", 2)
        daemon.host = "0.0.0.0"
        daemon.port = free_port()
        daemon.start()
        b = Board(daemon, port, False, request.config)
    try:
        b.flash()
        wait_until(b.online, timeout=90)
        yield b
    finally:
        if vdev is not None:
            vdev.send_signal(signal.SIGTERM)
            try:
                vdev.wait(timeout=20)
            except subprocess.TimeoutExpired:
                vdev.kill()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


def contiguous_per_boot(rows: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Readings grouped by boot; fails if a seq is missing or stored twice."""
    boots: dict[int, list[int]] = {}
    for r in rows:
        boots.setdefault(r["boot"], []).append(r["seq"])
    for boot, seqs in boots.items():
        assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), f"boot {boot}: a reading is missing"
        assert len(seqs) == len(set(seqs)), f"boot {boot}: a reading is stored twice"
    return boots
