"""Hardware-in-the-loop: the same scenarios against a virtual board (default) or a real ESP32 with --port.

    pytest hil-tests                                  # a virtual ESP32: the firmware on the MicroPython unix port
    pytest hil-tests --port /dev/ttyUSB0 --wifi-ssid NET --wifi-password PW --broker-host 192.168.1.20

Either way the board is flashed with `edgetrio flash` through its serial port and joins the gateway started by the
test. Scenarios that need a fault the test cannot cause on real hardware (Wi-Fi loss, a power cut) are skipped there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgetrio.tools.testkit import ROOT, Board, Daemon, blank_board, free_port, wait_until


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgetrio hardware in the loop")
    group.addoption("--port", default=None, help="serial port of a real ESP32 (default: a virtual board)")
    group.addoption("--wifi-ssid", default="", help="Wi-Fi the real board joins")
    group.addoption("--wifi-password", default="")
    group.addoption("--broker-host", default=None, help="this machine's address as the real board sees it")
    group.addoption("--board-file", default=None, type=Path,
                    help="how the real board is wired (a board file, docs/firmware.md); default for a virtual board: "
                         "examples/boards/greenhouse.toml")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "board_file: the scenario flashes the board with a board file")


def wiring(request: pytest.FixtureRequest, virtual: bool) -> tuple[str, ...]:
    """The `--board FILE` a scenario marked board_file flashes with (none for the others)."""
    if request.node.get_closest_marker("board_file") is None:
        return ()
    given = request.config.getoption("--board-file")
    if given is None and not virtual:
        pytest.skip("needs --board-file: how the real board is wired")
    return ("--board", str((given or ROOT / "examples" / "boards" / "greenhouse.toml").resolve()))


@pytest.fixture
def board(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Board]:
    """A gateway and a freshly flashed board (virtual unless --port)."""
    port = request.config.getoption("--port")
    daemon = Daemon(tmp_path / "gw")
    blank = contextlib.ExitStack()
    wired = wiring(request, port is None)
    if port is None:
        daemon.start()  # the virtual board's simulated parts follow the board file, as a real board's are soldered
        tty = blank.enter_context(blank_board(daemon.data_dir, tmp_path / "ttyUSB0", extra=wired))
        b = Board(daemon, tty, True, request.config)
    else:
        if not request.config.getoption("--broker-host"):
            pytest.exit("--port needs --broker-host (this machine's address on the board's Wi-Fi)", 2)
        daemon.host = "0.0.0.0"
        daemon.port = free_port("0.0.0.0")  # a real board reaches it over Wi-Fi
        daemon.start()
        b = Board(daemon, port, False, request.config)
    try:
        b.wired = wired
        b.flash(erase=True)  # a real board keeps its flash between runs: each scenario starts from a clean one
        wait_until(b.online, timeout=90)
        yield b
    finally:
        blank.close()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
