"""Shared test parts: a real daemon process on loopback, real MQTT clients (paho) acting as devices and apps."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from edgetrio.tools.testkit import TEST_POSTGRES, Daemon, Probe, needs


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--relay-database", choices=("sqlite", "postgresql"),
                     default=os.environ.get("EDGETRIO_TEST_RELAY_DATABASE", "sqlite"),
                     help="the back end of every relay the tests start: its SQLite file (default) or a fresh PostgreSQL "
                          "database each test (make test-postgres)")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A PostgreSQL server of this test run's own (per xdist worker), on a free port."""
    from edgetrio.tools.testkit.postgres import Postgres, server_bin
    needs(server_bin() is not None, "PostgreSQL (Debian's postgresql package)")
    server = Postgres().start()
    yield server
    server.close()


@pytest.fixture(scope="session", autouse=True)
def relay_database(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under --relay-database postgresql, every relay the tests start (testkit.Relay) gets a new database."""
    if request.config.getoption("--relay-database") != "postgresql":
        yield
        return
    os.environ[TEST_POSTGRES] = request.getfixturevalue("postgres").url("postgres")
    yield
    del os.environ[TEST_POSTGRES]


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
