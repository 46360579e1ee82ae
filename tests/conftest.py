"""Shared test parts: a real daemon process on loopback, real MQTT clients (paho) acting as devices and apps."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tools.testkit import ROOT, Daemon, Relay, cli, wait_until

__all__ = ["ROOT", "Daemon", "Probe", "Relay", "cli", "wait_until"]


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
