"""Twin and commands end to end: CLI -> daemon -> device and back, with real MQTT devices."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from edgetrio.daemon.control import ControlClient
from edgetrio.tools.testkit import Daemon, stored, virtual_boards, wait_until


def test_desired_is_delivered_on_connect_and_on_change(daemon: Daemon, device: Any, connect: Any) -> None:
    device_id, password, probe = device(subscribe=False)
    probe.close()
    # set while the device is away
    daemon.cli("twin", "set", device_id, "period=30", "led=true", "label=kitchen")
    probe = connect(device_id, password)
    assert probe.accepted() and probe.subscribe(f"edgetrio/{device_id}/twin/desired")
    assert probe.next_json(f"edgetrio/{device_id}/twin/desired") == {
        "state": {"period": 30, "led": True, "label": "kitchen"}, "version": 1}
    # changed while connected
    daemon.cli("twin", "set", device_id, "led=false", "label=null")
    assert probe.next_json(f"edgetrio/{device_id}/twin/desired") == {"state": {"period": 30, "led": False},
                                                                       "version": 2}


def test_reported_state_updates_the_delta(daemon: Daemon, device: Any) -> None:
    device_id, _, probe = device()
    daemon.cli("twin", "set", device_id, "period=10", "threshold=0.5")
    twin = json.loads(daemon.cli("twin", "get", device_id, "--json").stdout)
    assert twin["delta"] == {"period": 10, "threshold": 0.5}
    probe.publish(f"edgetrio/{device_id}/twin/reported", json.dumps({"state": {"period": 10, "threshold": 1}}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        twin = json.loads(daemon.cli("twin", "get", device_id, "--json").stdout)
        if twin["reported"]["version"] == 1:
            break
    assert twin == {
        "desired": {"state": {"period": 10, "threshold": 0.5}, "version": 1},
        "reported": {"state": {"period": 10, "threshold": 1}, "version": 1},
        "delta": {"threshold": 0.5},
    }


def test_a_stale_version_is_refused(daemon: Daemon, device: Any) -> None:
    device_id, _, _probe = device()
    daemon.cli("twin", "set", device_id, "period=5", "--version", "0")
    stale = daemon.cli("twin", "set", device_id, "period=7", "--version", "0", check=False)
    assert stale.returncode == 1
    assert "conflict" in stale.stderr and "current desired version is 1" in stale.stderr
    twin = json.loads(daemon.cli("twin", "get", device_id, "--json").stdout)
    assert twin["desired"] == {"state": {"period": 5}, "version": 1}
    daemon.cli("twin", "set", device_id, "period=7", "--version", "1")


def answer_commands(probe: Any, device_id: str) -> None:
    """Play the device: answer the next command on its cmd topic."""
    command = probe.next_json(f"edgetrio/{device_id}/cmd")
    result = {"id": command["id"], "ok": True, "value": {"echo": command["args"], "name": command["name"]}}
    for _ in range(3):  # a device that repeats itself: the first result counts, the daemon carries on
        probe.publish(f"edgetrio/{device_id}/cmd/result", json.dumps(result))


def test_command_round_trip(daemon: Daemon, device: Any) -> None:

    device_id, _, probe = device()
    responder = threading.Thread(target=answer_commands, args=(probe, device_id))
    responder.start()
    out = daemon.cli("cmd", device_id, "blink", "times=3", "color=red", "--json")
    responder.join()
    result = json.loads(out.stdout)
    assert result["ok"] is True
    assert result["value"] == {"echo": {"times": 3, "color": "red"}, "name": "blink"}
    assert daemon.status()["running"] and daemon.proc is not None and daemon.proc.poll() is None


def test_command_timeout_and_offline_device(daemon: Daemon, device: Any) -> None:
    device_id, _, probe = device()
    slow = daemon.cli("cmd", device_id, "reboot", "--timeout", "1", check=False)
    assert slow.returncode == 1
    assert f"device '{device_id}' did not answer command 'reboot' within 1 s" in slow.stderr
    assert probe.next_json(f"edgetrio/{device_id}/cmd")["name"] == "reboot"  # it was sent
    probe.close()
    wait_until(lambda: device_id not in daemon.status()["daemon"]["devices_connected"])
    offline = daemon.cli("cmd", device_id, "ping", check=False)
    assert offline.returncode == 1 and "not connected" in offline.stderr
    unknown = daemon.cli("cmd", "nobody-here", "ping", check=False)
    assert unknown.returncode == 1 and "unknown device" in unknown.stderr


def test_control_replies_arrive_while_devices_stream(daemon: Daemon) -> None:
    # Each CLI call subscribes to its own reply topic while the daemon keeps acking busy devices: a subscription
    # added during that traffic once went missing from the broker's topic index, and the reply with it.
    with virtual_boards(daemon, "streamer", count=6, period=0.1) as boards:

        def connected() -> set[str]:
            with ControlClient(daemon.data_dir) as client:
                return set(client.request("status", {}, timeout=5)["devices_connected"])
        wait_until(lambda: set(boards) <= connected(), timeout=90)
        counts = {b: len(stored(daemon.data_dir / "edgetrio.db", b)) for b in boards}
        for _ in range(60):
            assert set(boards) <= connected()
        # and the boards' readings kept being committed and acknowledged meanwhile
        wait_until(lambda: all(len(stored(daemon.data_dir / "edgetrio.db", b)) > counts[b] + 5 for b in boards))
