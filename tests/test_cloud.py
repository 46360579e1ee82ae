"""The relay and the edge's cloud link, with real processes on loopback."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from edgetrio.tools.testkit import Daemon, Relay, wait_until
from edgetrio.tools.testkit.simdevice import SimDevice


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    """A relay with node gw1 and a gateway daemon linked to it; sensors registered on the gateway."""
    relay = Relay(tmp_path / "relay").start()
    token = relay.add_node("gw1")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    daemon = Daemon(tmp_path / "gw", extra=("--cloud", relay.url, "--node-id", "gw1", "--token-file", str(token_file)))
    parts: dict[str, Any] = {"relay": relay, "daemon": daemon, "token": token, "sensors": []}
    yield parts
    for sensor in parts["sensors"]:
        sensor.stop()
    for proc in (daemon, relay):
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


def sensor(fleet: dict[str, Any], device_id: str, boot: int = 1) -> SimDevice:
    daemon: Daemon = fleet["daemon"]
    password = daemon.add_device(device_id)
    s = SimDevice(device_id, password, daemon.host, daemon.port, boot=boot).start()
    fleet["sensors"].append(s)
    return s


def cloud_seqs(relay: Relay, device: str) -> list[int]:
    return [r["seq"] for r in relay.json("readings", "gw1", device)]


def test_readings_reach_the_relay_and_twin_flows_both_ways(fleet: dict[str, Any]) -> None:
    relay, daemon = fleet["relay"], fleet["daemon"].start()
    # the token came from a file: it is not in the daemon's command line for `ps` to show
    assert fleet["token"] not in Path(f"/proc/{daemon.proc.pid}/cmdline").read_text()
    s = sensor(fleet, "s1")
    for i in range(20):
        s.read({"t": 20 + i})
    assert s.wait_acked(20)
    wait_until(lambda: cloud_seqs(relay, "s1") == list(range(1, 21)))
    readings = relay.json("readings", "gw1", "s1", "--limit", "2")
    assert [r["values"]["t"] for r in readings] == [38, 39]
    nodes = relay.json("nodes")
    assert nodes[0]["name"] == "gw1" and nodes[0]["online"] is True
    devices = relay.json("devices", "gw1")
    assert [(d["id"], d["online"]) for d in devices] == [("s1", True)]
    # desired from the cloud reaches the device; its reported state comes back up
    relay.json("twin", "set", "gw1", "s1", "period=15")
    wait_until(lambda: s.desired == {"period": 15})
    twin = wait_until(lambda: (t := relay.json("twin", "get", "gw1", "s1"))["reported"]["state"] and t)
    assert twin["reported"]["state"] == {"period": 15} and twin["delta"] == {}
    edge = json.loads(daemon.cli("twin", "get", "s1", "--json").stdout)
    assert edge["desired"]["state"] == {"period": 15}
    # a stale version is a conflict at the cloud too
    stale = relay.cli("twin", "set", "gw1", "s1", "period=1", "--version", "0", check=False)
    assert stale.returncode == 1 and "conflict" in stale.stderr and "409" in stale.stderr


def test_relay_down_then_back_ends_with_every_reading_exactly_once(fleet: dict[str, Any]) -> None:
    relay, daemon = fleet["relay"], fleet["daemon"].start()
    s = sensor(fleet, "s2")
    for i in range(10):
        s.read({"t": i})
    wait_until(lambda: len(cloud_seqs(relay, "s2")) == 10)
    relay.stop()
    for i in range(10, 200):  # the edge keeps working: stored and acked while the cloud is away
        s.read({"t": i})
    assert s.wait_acked(200)
    status = daemon.status()
    assert status["daemon"]["cloud"]["connected"] is False and status["outbox"]["rows"] > 0
    relay.start()  # same port and data
    wait_until(lambda: cloud_seqs(relay, "s2") == list(range(1, 201)), timeout=60)
    wait_until(lambda: daemon.status()["outbox"]["rows"] == 0)


def test_kill_9_of_the_relay_and_of_the_daemon_mid_stream_loses_nothing(fleet: dict[str, Any]) -> None:
    relay, daemon = fleet["relay"], fleet["daemon"].start()
    s = sensor(fleet, "s3")
    total = 0
    for round_ in range(2):
        for i in range(300):
            s.read({"t": i})
        total += 300
        time.sleep(0.2)
        if round_ == 0:
            relay.stop(signal.SIGKILL)
            relay.start()
        else:
            daemon.stop(signal.SIGKILL)
            daemon.start()  # same port; the sensor reconnects and resends what was not acked
    assert s.wait_acked(total, timeout=60)
    wait_until(lambda: cloud_seqs(relay, "s3") == list(range(1, total + 1)), timeout=90)


def test_desired_set_while_the_edge_is_offline_is_applied_on_reconnect(fleet: dict[str, Any]) -> None:
    relay, daemon = fleet["relay"], fleet["daemon"].start()
    s = sensor(fleet, "s4")
    wait_until(lambda: relay.json("devices", "gw1"))
    daemon.stop()
    s.stop()
    fleet["sensors"].remove(s)
    twin = relay.json("twin", "set", "gw1", "s4", "led=true", "label=hall")
    assert twin["desired"]["state"] == {"led": True, "label": "hall"}
    assert relay.json("nodes")[0]["queued"] == 1
    daemon.start()
    wait_until(lambda: relay.json("nodes")[0]["queued"] == 0)
    edge = json.loads(daemon.cli("twin", "get", "s4", "--json").stdout)
    assert edge["desired"]["state"] == {"led": True, "label": "hall"}
    # the device gets it when it comes back, and its report reaches the cloud
    password = s.client._password  # the same credential the sensor had
    again = SimDevice("s4", password.decode() if isinstance(password, bytes) else str(password), daemon.host,
                      daemon.port, boot=2).start()
    fleet["sensors"].append(again)
    wait_until(lambda: again.desired == {"led": True, "label": "hall"})
    wait_until(lambda: relay.json("twin", "get", "gw1", "s4")["reported"]["state"] == {"led": True, "label": "hall"})


def test_command_from_the_cloud_and_device_added_from_the_cloud(fleet: dict[str, Any]) -> None:
    relay, daemon = fleet["relay"], fleet["daemon"].start()
    s = sensor(fleet, "s5")
    wait_until(lambda: relay.json("devices", "gw1"))
    result = relay.json("cmd", "gw1", "s5", "ping")
    assert result == {"id": result["id"], "ok": True, "value": "pong"}
    failed = relay.cli("cmd", "gw1", "s5", "selfdestruct", check=False)
    assert failed.returncode == 1 and "unknown command" in failed.stdout
    s.answer_commands = False
    slow = relay.cli("cmd", "gw1", "s5", "ping", "--timeout", "1", check=False)
    assert slow.returncode == 1 and "did not answer" in slow.stderr

    added = relay.json("device", "add", "gw1", "s6")
    assert set(added) == {"id", "username", "password"}
    wait_until(lambda: "s6" in [d["id"] for d in json.loads(daemon.cli("device", "list", "--json").stdout)])
    new = SimDevice("s6", added["password"], daemon.host, daemon.port).start()  # the credential works at the edge
    fleet["sensors"].append(new)
    new.read({"t": 1})
    assert new.wait_acked(1)
    daemon.stop()
    offline = relay.cli("cmd", "gw1", "s5", "ping", check=False)
    assert offline.returncode == 1 and "offline" in offline.stderr


def test_the_relay_deletes_readings_older_than_its_retention(fleet: dict[str, Any]) -> None:
    relay = fleet["relay"]
    fleet["daemon"].start()
    s = sensor(fleet, "s7")
    for i in range(10):
        s.read({"t": i})
    wait_until(lambda: cloud_seqs(relay, "s7") == list(range(1, 11)))
    relay.stop()
    db = sqlite3.connect(relay.data_dir / "relay.db")
    with db:  # the first four arrived 40 days ago
        db.execute("UPDATE readings SET received = received - 40 * 86400, ts = ts - 40 * 86400 WHERE seq <= 4")
    db.close()
    relay.extra = ("--retention-days", "30")
    relay.start()
    wait_until(lambda: cloud_seqs(relay, "s7") == list(range(5, 11)))
    assert "retention: deleted 4 rows older than 30 days" in (relay.data_dir.parent / "relay-relay.log").read_text()
    s.read({"t": 10})  # the link goes on as before
    wait_until(lambda: cloud_seqs(relay, "s7") == list(range(5, 12)))
