"""Shared test parts: a real daemon process on loopback, real MQTT clients (paho) acting as devices and apps."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from edgetrio.tools.testkit import Daemon, Probe


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
