"""Real processes for tests and the hardware-in-the-loop suite: the daemon, the relay, the CLI, polling."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon.config import admin_credential
from tools.demo import wait_for_daemon

ROOT = Path(__file__).resolve().parent.parent


def cli(data_dir: Path, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `edgetrio` command line."""
    proc = subprocess.run([sys.executable, "-m", "daemon", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgetrio {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


class Daemon:
    def __init__(self, data_dir: Path, extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def start(self) -> Daemon:
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}-daemon.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "daemon", "--data-dir", str(self.data_dir), "--mqtt-host", self.host,
             "--mqtt-port", str(self.port), *self.extra],
            cwd=ROOT, stdout=self.log, stderr=self.log,
        )
        info = wait_for_daemon(self.data_dir, self.proc)
        self.port = int(str(info["mqtt_port"]))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(self.data_dir, *args, check=check)

    def add_device(self, device_id: str, *extra: str) -> str:
        out = self.cli("device", "add", device_id, "--json", *extra)
        password: str = json.loads(out.stdout)["password"]
        return password

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cli("status", "--json").stdout)
        return result

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.status()["daemon"]["counters"]
        return counters

    def admin(self) -> tuple[str, str]:
        return admin_credential(self.data_dir)

    def log_text(self) -> str:
        return (self.data_dir.parent / f"{self.data_dir.name}-daemon.log").read_text(errors="replace")


class Relay:
    """A real relay process on loopback."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.extra: tuple[str, ...] = ()

    def start(self) -> Relay:
        log = open(self.data_dir.parent / f"{self.data_dir.name}-relay.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "cloud", "serve", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
             "--port", str(self.port), *self.extra], cwd=ROOT, stdout=log, stderr=log)
        run_file = self.data_dir / "relay.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}")
            if run_file.exists():
                info = json.loads(run_file.read_text())
                if info["pid"] == self.proc.pid:
                    self.port = info["port"]
                    self.url = info["edge_url"]
                    return self
            time.sleep(0.05)
        raise TimeoutError("relay did not start")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "daemon", "cloud", *args, "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, timeout=90, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"edgetrio cloud {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def add_node(self, name: str) -> str:
        token: str = self.json("node", "add", name)["token"]
        return token



def wait_until(predicate: Any, timeout: float = 30, interval: float = 0.2) -> Any:
    """Poll until predicate() is truthy; return its value (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
