"""Shared test parts: a real daemon process on loopback, real MQTT clients (paho) acting as devices and apps."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

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
            [sys.executable, "-m", "daemon", "daemon", "--data-dir", str(self.data_dir), "--mqtt-host", "127.0.0.1",
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


class Probe:
    """A raw MQTT client for tests: connect with any credential, subscribe, publish, collect what arrives."""

    def __init__(self, daemon: Daemon, username: str | None, password: str | None, client_id: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.closed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if username is not None:
            client.username_pw_set(username, password)
        client.on_connect = lambda _c, _u, _f, reason, _p: self.connack.put(reason)
        client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.put(list(codes))
        client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        client.on_disconnect = lambda *_a: self.closed.set()
        self.client = client
        client.connect(daemon.host, daemon.port, keepalive=15)
        client.loop_start()

    def accepted(self, timeout: float = 10) -> bool:
        reason = self.connack.get(timeout=timeout)
        return not reason.is_failure

    def subscribe(self, topic: str, timeout: float = 10) -> bool:
        self.client.subscribe(topic, qos=1)
        codes = self.subacks.get(timeout=timeout)
        return not codes[0].is_failure

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def next(self, topic: str | None = None, timeout: float = 10) -> tuple[str, bytes]:
        """The next message (on `topic`, skipping others)."""
        while True:
            got = self.messages.get(timeout=timeout)
            if topic is None or got[0] == topic:
                return got

    def next_json(self, topic: str, timeout: float = 10) -> Any:
        return json.loads(self.next(topic, timeout)[1])

    def nothing(self, wait: float = 1.0, topic: str | None = None) -> bool:
        """True if no message (on `topic`, if given) arrives within `wait` seconds."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self.messages.get(timeout=left)
            except queue.Empty:
                return True
            if topic is None or got[0] == topic:
                return False
        return True

    def drain(self, wait: float = 1.0) -> list[tuple[str, bytes]]:
        """Everything that arrives within `wait` seconds."""
        deadline = time.monotonic() + wait
        got = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon shared by a test module (tests use their own device ids)."""
    d = Daemon(tmp_path_factory.mktemp("gw") / "data").start()
    yield d
    d.stop()


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    made: list[Probe] = []
    yield made
    for p in made:
        p.close()


@pytest.fixture
def connect(daemon: Daemon, probes: list[Probe]) -> Any:
    def make(username: str | None, password: str | None, client_id: str | None = None) -> Probe:
        probe = Probe(daemon, username, password, client_id or username or f"anon-{os.getpid()}")
        probes.append(probe)
        return probe
    return make


@pytest.fixture
def device(daemon: Daemon, connect: Any, request: pytest.FixtureRequest) -> Any:
    """Register a device named after the test and connect it, subscribed to its ack, twin and cmd topics."""
    counter = {"n": 0}

    def make(suffix: str = "", model: str | None = None, subscribe: bool = True) -> tuple[str, str, Probe]:
        counter["n"] += 1
        device_id = f"{request.node.name.replace('_', '-')[:40]}-{counter['n']}{suffix}"
        password = daemon.add_device(device_id, *(["--model", model] if model else []))
        probe = connect(device_id, password)
        assert probe.accepted()
        if subscribe:
            assert probe.subscribe(f"edgetrio/{device_id}/#")
        return device_id, password, probe
    return make


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
