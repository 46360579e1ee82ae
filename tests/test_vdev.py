"""Virtual ESP32s: the real firmware on the MicroPython unix port against the real daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Daemon, wait_until

DEVICE = "vdev-1"


class Bench:
    """A daemon and one virtual device supervised by `edgetrio vdev`."""

    def __init__(self, tmp: Path) -> None:
        self.daemon = Daemon(tmp / "gw").start()
        self.flash = self.daemon.data_dir / "vdevs" / DEVICE
        self.vdev: subprocess.Popen[bytes] | None = None

    def start_vdev(self, period: float = 0.3) -> None:
        log = open(self.daemon.data_dir.parent / "vdev.log", "ab")  # noqa: SIM115
        self.vdev = subprocess.Popen([sys.executable, "-m", "daemon", "vdev", "--count", "1", "--period", str(period),
                                      "--data-dir", str(self.daemon.data_dir)], cwd=ROOT, stdout=log, stderr=log)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.daemon.cli(*args, check=check)

    def fault(self, *args: str) -> None:
        self.cli("fault", DEVICE, *args)

    def readings(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.cli("readings", DEVICE, "--json").stdout)
        return rows

    def online(self) -> bool:
        devices = {d["id"]: d for d in json.loads(self.cli("device", "list", "--json").stdout)}
        return bool(devices.get(DEVICE, {}).get("online"))

    def acked(self) -> dict[int, int]:
        path = self.flash / "buffer.log.ack"
        return {int(k): v for k, v in json.loads(path.read_text())["acked"].items()} if path.exists() else {}

    def buffered(self) -> list[tuple[int, int]]:
        """(boot, seq) of readings on the device's flash not acknowledged yet."""
        path = self.flash / "buffer.log"
        if not path.exists():
            return []
        acked = self.acked()
        lines = [line.split(" ", 2)[:2] for line in path.read_text().splitlines()]
        return [(int(b), int(s)) for b, s in lines if int(s) > acked.get(int(b), 0)]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.flash / "state.json").read_text())
        return state

    def console(self) -> str:
        return (self.flash / "console.log").read_text(errors="replace")

    def close(self) -> None:
        if self.vdev is not None and self.vdev.poll() is None:
            self.vdev.send_signal(signal.SIGTERM)
            try:
                self.vdev.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.vdev.kill()
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.daemon.stop()


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(tmp_path)
    yield b
    b.close()


def contiguous_per_boot(rows: list[dict[str, Any]]) -> dict[int, list[int]]:
    boots: dict[int, list[int]] = {}
    for r in rows:
        boots.setdefault(r["boot"], []).append(r["seq"])
    for seqs in boots.values():
        assert sorted(seqs) == list(range(1, max(seqs) + 1)), "a reading is missing or stored twice"
    return boots


def test_boots_reports_telemetry_and_the_buffer_is_trimmed_by_acks(bench: Bench) -> None:
    bench.start_vdev()
    wait_until(bench.online)
    rows = wait_until(lambda: (r := bench.readings()) and len(r) >= 25 and r)
    assert rows[0]["values"] == {"temperature": 21.5, "pressure": 1013.25, "humidity": 45.0, "analog": 1.65,
                                 "chip_temperature": 42.0}  # the BME280 driver read the simulated registers
    assert contiguous_per_boot(rows) == {1: list(range(1, len(rows) + 1))}
    wait_until(lambda: bench.acked().get(1, 0) >= 25)
    lines = len((bench.flash / "buffer.log").read_text().splitlines())
    assert lines < bench.acked()[1], "acknowledged readings must be dropped from flash"
    device = {d["id"]: d for d in json.loads(bench.cli("device", "list", "--json").stdout)}[DEVICE]
    assert device["meta"]["firmware"] and device["meta"]["boot"] == 1 and not device["meta"]["safe_mode"]
    assert [r["name"] for r in device["meta"]["resources"]] == ["temperature", "pressure", "humidity", "analog",
                                                                 "chip_temperature"]
    assert (bench.flash / "lib" / "node.mpy").exists()  # it runs the .mpy bundle flashing writes


def test_twin_and_commands(bench: Bench) -> None:
    bench.start_vdev()
    wait_until(bench.online)
    bench.cli("twin", "set", DEVICE, "period=0.2", "led=true", "colour=red")
    twin = wait_until(lambda: (t := json.loads(bench.cli("twin", "get", DEVICE, "--json").stdout))
                      ["reported"]["state"].get("led") and t)
    assert twin["reported"]["state"]["period"] == 0.2
    assert twin["reported"]["state"]["rejected"] == {"colour": "unknown key"}
    assert twin["delta"] == {"colour": "red"}
    ping = json.loads(bench.cli("cmd", DEVICE, "ping", "--json").stdout)
    assert ping["ok"] and ping["value"] == "pong"
    assert json.loads(bench.cli("cmd", DEVICE, "blink", "times=2", "--json").stdout)["value"] == "blinked"
    bench.fault("env", "temperature=30.25")
    now = json.loads(bench.cli("cmd", DEVICE, "read_now", "--json").stdout)
    assert now["ok"] and now["value"]["temperature"] == 30.25
    bad = bench.cli("cmd", DEVICE, "selfdestruct", check=False)
    assert bad.returncode == 1 and "unknown command" in bad.stdout
    reboot = json.loads(bench.cli("cmd", DEVICE, "reboot", "--json").stdout)
    assert reboot["ok"]
    wait_until(lambda: bench.state()["boot"] == 2)
    wait_until(lambda: 2 in {r["boot"] for r in bench.readings()})
    # the desired state survived the reboot
    assert wait_until(lambda: json.loads(bench.cli("twin", "get", DEVICE, "--json").stdout)
                      ["reported"]["version"] >= 2)


def test_wifi_down_then_up_and_daemon_restart_lose_nothing(bench: Bench) -> None:
    bench.start_vdev()
    wait_until(bench.online)
    wait_until(lambda: len(bench.readings()) >= 5)
    bench.fault("wifi", "down")
    wait_until(lambda: not bench.online())
    time.sleep(5)
    held = bench.buffered()
    assert len(held) >= 5, "readings taken while offline wait on flash"
    bench.fault("wifi", "up")
    wait_until(lambda: set(held) <= {(r["boot"], r["seq"]) for r in bench.readings()}, timeout=60)
    bench.daemon.stop()
    time.sleep(3)
    bench.daemon.start()  # same port
    wait_until(bench.online, timeout=60)
    seen = len(bench.readings())
    wait_until(lambda: len(bench.readings()) > seen + 5, timeout=60)
    contiguous_per_boot(bench.readings())


def test_power_cycle_with_readings_buffered_delivers_all_once(bench: Bench) -> None:
    bench.start_vdev()
    wait_until(bench.online)
    bench.fault("wifi", "down")
    wait_until(lambda: len(bench.buffered()) >= 5)
    bench.fault("power")
    wait_until(lambda: bench.state()["boot"] == 2)
    bench.fault("wifi", "up")
    held = bench.buffered()
    wait_until(lambda: 2 in {r["boot"] for r in bench.readings()}, timeout=60)
    wait_until(lambda: {b for b, _ in held} <= {r["boot"] for r in bench.readings()}, timeout=60)
    boots = contiguous_per_boot(bench.readings())
    assert 1 in boots and 2 in boots


def test_a_boot_loop_ends_in_safe_mode(bench: Bench) -> None:
    bench.start_vdev()
    wait_until(bench.online)
    bench.fault("wifi", "down")  # no ack, so no boot counts as good
    for boot in range(2, 9):
        bench.fault("power")
        wait_until(lambda boot=boot: bench.state()["boot"] == boot)
    assert bench.state()["failed_boots"] > 5
    bench.fault("wifi", "up")
    wait_until(bench.online, timeout=60)
    meta = wait_until(lambda: (d := {x["id"]: x for x in json.loads(bench.cli("device", "list", "--json").stdout)})
                      [DEVICE]["meta"]["safe_mode"] and d[DEVICE]["meta"])
    assert meta["resources"] == []
    assert json.loads(bench.cli("cmd", DEVICE, "ping", "--json").stdout)["value"] == "pong"  # commands still work
    refused = bench.cli("cmd", DEVICE, "read_now", check=False)
    assert refused.returncode == 1 and "safe mode" in refused.stdout
    assert bench.state()["failed_boots"] > 5  # still in safe mode after a good connection...
    bench.cli("cmd", DEVICE, "reboot", "normal=true")  # ...until the operator says otherwise
    wait_until(lambda: bench.state()["boot"] == 9)
    wait_until(lambda: 9 in {r["boot"] for r in bench.readings()})
