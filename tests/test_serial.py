"""The serial transport: a virtual board speaking JSON lines over a socat pty pair to the daemon's serial service."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgetrio.tools.testkit import ROOT, Daemon, contiguous_per_boot, needs, wait_until


@pytest.fixture(autouse=True)
def _socat() -> None:
    needs(shutil.which("socat") is not None, "socat (Debian package)")


DEVICE = "serial-1"


def socat(a: Path, b: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["socat", f"PTY,link={a},raw,echo=0", f"PTY,link={b},raw,echo=0"])
    wait_until(lambda: a.exists() and b.exists())
    return proc


@pytest.fixture
def line(tmp_path: Path) -> Iterator[tuple[Daemon, Path, Path, list[subprocess.Popen[bytes]]]]:
    board_end, gateway_end = tmp_path / "ttyBoard", tmp_path / "ttyGateway"
    procs = [socat(board_end, gateway_end)]
    daemon = Daemon(tmp_path / "gw", extra=("--serial", str(gateway_end)))
    daemon.start()
    log = open(tmp_path / "vdev.log", "ab")  # noqa: SIM115
    vdev = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--count", "1", "--prefix", "serial",
                             "--period", "0.3", "--uart", str(board_end), "--data-dir", str(daemon.data_dir)],
                            cwd=ROOT, stdout=log, stderr=log)
    procs.append(vdev)
    yield daemon, board_end, gateway_end, procs
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    daemon.stop()


def test_telemetry_twin_and_commands_over_serial(line: tuple[Daemon, Path, Path, list[subprocess.Popen[bytes]]]) -> None:
    daemon, _board, _gateway, _procs = line
    rows = wait_until(lambda: (r := daemon.readings(DEVICE, missing_ok=True)) and len(r) >= 10 and r, timeout=60)
    contiguous_per_boot(rows)
    device = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}[DEVICE]
    assert device["online"] and device["meta"]["transport"] == "serial"
    flash = daemon.data_dir / "vdevs" / DEVICE
    ack = flash / "buffer.log.ack"  # written when acks trim the buffer (or every 30 s)
    wait_until(lambda: ack.exists() and json.loads(ack.read_text())["acked"]["1"] >= 10)  # acks arrive
    daemon.cli("twin", "set", DEVICE, "led=true", "period=0.2")
    twin = wait_until(lambda: (t := json.loads(daemon.cli("twin", "get", DEVICE, "--json").stdout))
                      ["reported"]["state"].get("led") and t)
    assert twin["delta"] == {}
    assert json.loads(daemon.cli("cmd", DEVICE, "ping", "--json").stdout)["value"] == "pong"
    daemon.cli("fault", DEVICE, "env", "temperature=21.5")
    assert json.loads(daemon.cli("cmd", DEVICE, "read_now", "--json").stdout)["value"]["temperature"] == 21.5


def test_unplugged_and_plugged_back_loses_nothing(line: tuple[Daemon, Path, Path, list[subprocess.Popen[bytes]]]) -> None:
    daemon, board, gateway, procs = line
    wait_until(lambda: len(daemon.readings(DEVICE, missing_ok=True)) >= 5, timeout=60)
    procs[0].send_signal(signal.SIGTERM)  # the cable is pulled: both ends of the line vanish
    procs[0].wait(timeout=10)
    wait_until(lambda: not {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
               [DEVICE]["online"])
    time.sleep(3)
    procs[0] = socat(board, gateway)  # plugged back
    seen = len(daemon.readings(DEVICE, missing_ok=True))
    wait_until(lambda: len(daemon.readings(DEVICE, missing_ok=True)) > seen + 10, timeout=60)
    contiguous_per_boot(daemon.readings(DEVICE, missing_ok=True))
    status = daemon.status()
    assert status["running"] is True and DEVICE in status["daemon"]["devices_connected"]  # online again


def test_deeply_nested_lines_are_dropped_and_the_line_keeps_serving(tmp_path: Path) -> None:
    board, gateway = tmp_path / "ttyRawBoard", tmp_path / "ttyRawGateway"
    link = socat(board, gateway)
    daemon = Daemon(tmp_path / "gw", extra=("--serial", str(gateway))).start()
    nested = "[" * 1100 + "]" * 1100
    try:
        password = daemon.add_device("raw-1")
        fd = os.open(board, os.O_RDWR | os.O_NOCTTY)
        received = b""

        def until(text: bytes) -> None:
            nonlocal received
            deadline = time.monotonic() + 20
            while text not in received:
                assert time.monotonic() < deadline, f"no {text!r} from the gateway; got {received[-300:]!r}"
                if select.select([fd], [], [], 0.5)[0]:
                    received += os.read(fd, 65536)

        os.write(fd, f'{{"ch": "hello", "msg": {nested}}}\n'.encode())
        os.write(fd, json.dumps({"ch": "hello", "msg": {"id": "raw-1", "password": password}}).encode() + b"\n")
        until(b'"welcome"')
        os.write(fd, f'{{"ch": "telemetry", "msg": {{"boot": 1, "seq": 1, "values": {{"x": {nested}}}}}}}\n'.encode())
        os.write(fd, json.dumps({"ch": "telemetry", "msg": {"boot": 1, "seq": 1, "values": {"t": 1}}}).encode() + b"\n")
        until(b'"ack"')
        os.close(fd)
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert daemon.counters().get("serial_malformed", 0) >= 2
    finally:
        daemon.stop()
        link.terminate()
        link.wait(timeout=10)
