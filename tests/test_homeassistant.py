"""Home Assistant: a client that behaves as Home Assistant does, against a virtual board running the real firmware;
the discovery messages checked by Home Assistant's own schemas (tests/ha_reference.py in the `.ha` venv)."""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgetrio.tools.testkit import ROOT, Daemon, Probe, RawMQTT, greenhouse_board, virtual_boards, wait_until

HA_PYTHON = ROOT / ".ha" / "bin" / "python"
HA_USER = "integration:homeassistant"
BOARD = "greenhouse-1"


def ha_reference(configs: dict[str, Any]) -> dict[str, Any]:
    if not HA_PYTHON.exists():
        if os.environ.get("CI"):
            raise AssertionError("Home Assistant's schemas are missing: `make test` installs them into .ha")
        pytest.skip("Home Assistant's schemas are not installed (make .ha/.installed)")
    messages = [{"topic": t, "payload": p} for t, p in configs.items()]
    proc = subprocess.run([str(HA_PYTHON), str(ROOT / "tests" / "ha_reference.py")], input=json.dumps(messages),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    daemon = Daemon(tmp_path_factory.mktemp("ha") / "data", extra=("--ha",)).start()
    secret = json.loads(daemon.cli("integration", "add", "homeassistant", "--json").stdout)["password"]
    try:
        with greenhouse_board(daemon):
            wait_until(lambda: any(d["id"] == BOARD and d["online"] and d["meta"] for d in
                                   json.loads(daemon.cli("device", "list", "--json").stdout)), timeout=90)
            yield daemon, secret
    finally:
        daemon.stop()


def home_assistant(daemon: Daemon, secret: str, client_id: str) -> Probe:
    """Connect as Home Assistant does: subscribe to discovery and the entities' topics, then send the birth message."""
    ha = Probe(daemon, HA_USER, secret, client_id)
    assert ha.accepted()
    assert ha.subscribe("homeassistant/#") and ha.subscribe("edgetrio-ha/#")
    ha.publish("homeassistant/status", "online")
    return ha


def reaches(ha: Probe, topic: str, value: bytes, timeout: float = 20) -> bool:
    """Whether the state on `topic` becomes `value` (reports made before the change may still be on their way)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            if ha.next(topic, timeout=left)[1] == value:
                return True
        except queue.Empty:
            break
    return False


def configs_in(messages: list[tuple[str, bytes]]) -> dict[str, Any]:
    return {t: json.loads(p) for t, p in messages if t.startswith("homeassistant/") and t.endswith("/config") and p}


ENTITIES = {  # what the README's board is in Home Assistant
    ("sensor", "temperature"), ("sensor", "pressure"), ("sensor", "humidity"), ("sensor", "analog"),
    ("sensor", "chip_temperature"), ("switch", "led"), ("number", "period"), ("number", "threshold"),
    ("button", "ping"), ("button", "blink"), ("button", "read_now"), ("button", "reboot"),
}


def every_entity_and_its_state(latest: dict[str, bytes]) -> bool:
    """The board's configs have all come, and the availability and state each points at (buttons have none)."""
    node = "edgetrio_greenhouse-1"
    configs = {t: json.loads(p) for t, p in latest.items() if t.endswith("/config") and f"/{node}/" in t and p}
    return ({(t.split("/")[1], t.split("/")[3]) for t in configs} == ENTITIES
            and all(c["availability_topic"] in latest and c.get("state_topic", c["availability_topic"]) in latest
                    for c in configs.values()))


def test_the_board_appears_in_home_assistant_and_its_switch_and_buttons_work(gateway: tuple[Daemon, str]) -> None:
    daemon, secret = gateway
    ha = home_assistant(daemon, secret, "ha-1")
    received = ha.gather(every_entity_and_its_state)  # configs, and every state they point at
    configs = configs_in(received)
    node = "edgetrio_greenhouse-1"
    by_key = {(t.split("/")[1], t.split("/")[3]): body for t, body in configs.items() if t.split("/")[2] == node}
    assert set(by_key) == ENTITIES
    temperature = by_key[("sensor", "temperature")]
    assert temperature["unit_of_measurement"] == "°C" and temperature["device_class"] == "temperature"
    assert temperature["state_class"] == "measurement"
    assert by_key[("sensor", "pressure")]["unit_of_measurement"] == "hPa"
    assert by_key[("sensor", "humidity")]["device_class"] == "humidity"
    assert by_key[("sensor", "analog")]["device_class"] == "voltage"
    assert temperature["device"]["sw_version"] == "0.1.0" and temperature["device"]["model"] == "esp32-sensor"
    assert by_key[("button", "reboot")]["device_class"] == "restart"
    period = by_key[("number", "period")]
    assert (period["min"], period["max"], period["unit_of_measurement"]) == (0.1, 86400, "s")
    # Home Assistant's own code accepts every config, with no key it would ignore and units that suit the classes
    reference = ha_reference(configs)
    assert reference == {"checked": len(configs), "problems": []}

    # every topic an entity follows is one the gateway publishes: availability and the states came after the configs
    sent = {t: p for t, p in received}
    for body in by_key.values():
        assert sent.get(body["availability_topic"]) == b"online"
    latest = json.loads(daemon.cli("readings", BOARD, "--limit", "50", "--json").stdout)
    for key, (low, high) in (("temperature", (-40, 85)), ("pressure", (300, 1100)), ("humidity", (0, 100))):
        value = float(sent[by_key[("sensor", key)]["state_topic"]])
        assert low <= value <= high and value in [r["values"][key] for r in latest]  # a stored value
    assert sent[by_key[("switch", "led")]["state_topic"]] == b"false"

    # states follow the readings as they are committed
    state_topic = temperature["state_topic"]
    values = [float(ha.next(state_topic, timeout=15)[1]) for _ in range(3)]
    assert all(-40 <= v <= 85 for v in values)

    # the switch sets desired state; the board applies it and reports it; that is the switch's state
    led = by_key[("switch", "led")]
    ha.publish(led["command_topic"], led["payload_on"])
    assert reaches(ha, led["state_topic"], b"true")
    twin = json.loads(daemon.cli("twin", "get", BOARD, "--json").stdout)
    assert twin["desired"]["state"]["led"] is True and twin["reported"]["state"]["led"] is True

    # a number the same way
    ha.publish(by_key[("number", "threshold")]["command_topic"], "2.5")
    assert reaches(ha, by_key[("number", "threshold")]["state_topic"], b"2.5")

    # a button sends the command; its result is stored as any command's
    ha.publish(by_key[("button", "ping")]["command_topic"], "PRESS")

    def ping_answered() -> bool:
        with sqlite3.connect(f"file:{daemon.data_dir / 'edgetrio.db'}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT status, result FROM commands WHERE device = ? AND name = 'ping'",
                              [BOARD]).fetchall()
        return any(status == "ok" and json.loads(result)["value"] == "pong" for status, result in rows)
    wait_until(ping_answered, timeout=20)
    ha.close()


def test_home_assistant_restarting_gets_everything_again(gateway: tuple[Daemon, str]) -> None:
    daemon, secret = gateway
    first = configs_in(home_assistant(daemon, secret, "ha-2").gather(every_entity_and_its_state))
    again = home_assistant(daemon, secret, "ha-3")  # a new session: everything comes again, on subscribe
    assert configs_in(again.gather(every_entity_and_its_state)) == first and len(first) >= len(ENTITIES)


def test_registering_and_removing_a_device_adds_and_withdraws_its_entities(gateway: tuple[Daemon, str],
                                                                          tmp_path: Path) -> None:
    daemon, secret = gateway
    model = tmp_path / "fanbox.toml"
    model.write_text('name = "fanbox"\n[[resources]]\nname = "temperature"\ntype = "float"\nunit = "degC"\n'
                     '[[resources]]\nname = "fan"\ntype = "bool"\naccess = "rw"\n')
    daemon.cli("model", "add", str(model))
    ha = home_assistant(daemon, secret, "ha-4")
    ha.gather(every_entity_and_its_state)  # what it is sent on connecting, before the device exists
    daemon.add_device("fanbox.1", "--model", "fanbox")
    fan_topic = "homeassistant/switch/edgetrio_fanbox_1/fan/config"  # '.' is not allowed there
    got = ha.until(fan_topic, timeout=15)
    fan = json.loads(got[-1][1])
    assert fan["command_topic"] == "edgetrio-ha/fanbox.1/set/fan"
    assert "homeassistant/sensor/edgetrio_fanbox_1/temperature/config" in dict(got)
    assert ha_reference(configs_in(got))["problems"] == []
    daemon.cli("device", "remove", "fanbox.1")
    withdrawn = ha.until(fan_topic, timeout=15)
    assert withdrawn[-1][1] == b""  # an empty config removes the entity


def test_a_board_reflashed_with_a_changed_file_changes_its_entities(gateway: tuple[Daemon, str],
                                                                    tmp_path: Path) -> None:
    daemon, secret = gateway
    node = "edgetrio_rewired-1"
    humidity = f"homeassistant/sensor/{node}/humidity/config"
    light = f"homeassistant/sensor/{node}/illuminance/config"
    ha = home_assistant(daemon, secret, "ha-rewire")
    sht = tmp_path / "sht.toml"
    sht.write_text('[[component]]\ndriver = "sht3x"\n')
    with virtual_boards(daemon, "rewired", 1, period=1, extra=("--board", str(sht))):
        first = configs_in(ha.gather(lambda latest: latest.get(humidity), timeout=90))
        assert first[humidity]["unit_of_measurement"] == "%" and light not in first
    lux = tmp_path / "lux.toml"
    lux.write_text('[[component]]\ndriver = "bh1750"\n')
    with virtual_boards(daemon, "rewired", 1, period=1, extra=("--board", str(lux))):
        # the part the board no longer has is withdrawn (an empty config), the new one appears with its unit
        latest = dict(ha.gather(lambda latest: latest.get(humidity) == b"" and latest.get(light), timeout=90))
        assert json.loads(latest[light])["unit_of_measurement"] == "lx"
        assert json.loads(latest[light])["device_class"] == "illuminance"
    assert ha_reference(configs_in(list(latest.items())))["problems"] == []


def test_the_integration_credential_is_confined_to_its_own_topics(gateway: tuple[Daemon, str]) -> None:
    daemon, secret = gateway
    assert not Probe(daemon, HA_USER, "wrong", "ha-wrong").accepted()
    ha = Probe(daemon, HA_USER, secret, "ha-5")
    assert ha.accepted()
    assert not ha.subscribe("edgetrio/#") and not ha.subscribe("#") and not ha.subscribe(f"edgetrio/{BOARD}/cmd")
    assert ha.subscribe("edgetrio-ha/+/state/temperature")
    # it cannot speak for a board
    refused = daemon.counters().get("acl_refused_publish", 0)
    ha.publish(f"edgetrio/{BOARD}/telemetry", json.dumps({"boot": 999, "seq": 1, "values": {"temperature": 99.0}}))
    ha.publish(f"edgetrio/{BOARD}/cmd", json.dumps({"id": "x", "name": "reboot"}))
    # both refused by the broker (each counted once, so nothing of them went on), and no such reading stored
    wait_until(lambda: daemon.counters().get("acl_refused_publish", 0) == refused + 2, timeout=20)
    assert all(r["boot"] != 999 for r in json.loads(daemon.cli("readings", BOARD, "--json").stdout))
    # nor set what it was not offered, nor press a button it was not given
    ha.publish(f"edgetrio-ha/{BOARD}/set/label", "owned")
    ha.publish(f"edgetrio-ha/{BOARD}/press/factory_reset", "PRESS")
    wait_until(lambda: "refused: not a button it was offered" in daemon.log_text()
               and "refused: not a setting it was offered" in daemon.log_text(), timeout=10)
    assert "label" not in json.loads(daemon.cli("twin", "get", BOARD, "--json").stdout)["desired"]["state"]
    # nor leave a will on a board's topics
    raw = RawMQTT(daemon.host, daemon.port)
    assert raw.connect("ha-will", HA_USER, secret, will=(f"edgetrio/{BOARD}/status", b"offline", 1, False)) != 0
    raw.close()
    # a new credential ends the session of the old one, which is refused from then on
    renewed = json.loads(daemon.cli("integration", "add", "homeassistant", "--json").stdout)["password"]
    wait_until(lambda: ha.closed.is_set(), timeout=10)
    assert not Probe(daemon, HA_USER, secret, "ha-old").accepted()
    assert Probe(daemon, HA_USER, renewed, "ha-new").accepted()


def test_home_assistant_subscribing_late_still_gets_every_entity_and_the_latest_states(
        gateway: tuple[Daemon, str]) -> None:
    """Home Assistant 2024.3 sent its birth 12 s before it subscribed to discovery (still loading its platforms):
    what the gateway announced into that gap must reach it when it subscribes, as a retaining broker's would."""
    daemon, _ = gateway
    secret = json.loads(daemon.cli("integration", "add", "homeassistant", "--json").stdout)["password"]  # its own
    ha = Probe(daemon, HA_USER, secret, "ha-late")
    assert ha.accepted()
    marker = daemon.log_text().count("home assistant: announced")
    ha.publish("homeassistant/status", "online")  # the birth, with nothing subscribed yet
    wait_until(lambda: daemon.log_text().count("home assistant: announced") > marker, timeout=20)
    assert ha.subscribe("homeassistant/+/+/config") and ha.subscribe("homeassistant/+/+/+/config")  # as HA does
    node = "edgetrio_greenhouse-1"
    temperature = f"homeassistant/sensor/{node}/temperature/config"
    configs = configs_in(ha.gather(lambda latest: {f"homeassistant/{k[0]}/{node}/{k[1]}/config" for k in ENTITIES}
                                   <= set(latest), timeout=10))
    assert temperature in configs
    # then, as Home Assistant does, each entity's own topics: their current values come on subscribe
    led = configs[f"homeassistant/switch/{node}/led/config"]
    assert ha.subscribe(led["availability_topic"]) and ha.subscribe(led["state_topic"])
    got = dict(ha.gather(lambda latest: {led["availability_topic"], led["state_topic"]} <= set(latest), timeout=10))
    assert got[led["availability_topic"]] == b"online"
    reported = json.loads(daemon.cli("twin", "get", BOARD, "--json").stdout)["reported"]["state"]["led"]
    assert got[led["state_topic"]] == json.dumps(reported).encode()
    ha.close()


def test_a_device_removed_while_home_assistant_is_away_is_withdrawn_when_it_returns(tmp_path: Path) -> None:
    """The set of what Home Assistant was told outlives both sides: removed while Home Assistant was stopped, and the
    gateway restarted since, the device's entities are still withdrawn when Home Assistant subscribes again."""
    daemon = Daemon(tmp_path / "gw", extra=("--ha",))
    daemon.data_dir.mkdir()
    daemon.start()
    try:
        secret = json.loads(daemon.cli("integration", "add", "homeassistant", "--json").stdout)["password"]
        model = tmp_path / "fanbox.toml"
        model.write_text('name = "fanbox"\n[[resources]]\nname = "fan"\ntype = "bool"\naccess = "rw"\n')
        daemon.cli("model", "add", str(model))
        daemon.add_device("fanbox-9", "--model", "fanbox")
        fan_topic = "homeassistant/switch/edgetrio_fanbox-9/fan/config"
        ha = Probe(daemon, HA_USER, secret, "ha-away")
        assert ha.accepted() and ha.subscribe("homeassistant/+/+/+/config")
        assert json.loads(ha.until(fan_topic, timeout=20)[-1][1])["command_topic"] == "edgetrio-ha/fanbox-9/set/fan"
        ha.close()  # Home Assistant stops
        daemon.cli("device", "remove", "fanbox-9")
        wait_until(lambda: "home assistant: withdrew fanbox-9" in daemon.log_text(), timeout=20)
        daemon.stop()
        daemon.start()
        back = Probe(daemon, HA_USER, secret, "ha-back")
        assert back.accepted() and back.subscribe("homeassistant/+/+/+/config")
        # the config it withdrew, then the empty config: Home Assistant removes only an entity it has discovered since
        # it started (one it restored from its registry would stay); tests/test_homeassistant_core.py shows it does
        assert json.loads(back.until(fan_topic, timeout=20)[-1][1])["unique_id"] == "edgetrio_fanbox-9_fan"
        assert back.next(fan_topic, timeout=10)[1] == b""
        back.close()
        assert "WARNING" not in "\n".join(line for line in daemon.log_text().splitlines() if "topic refused" in line)
    finally:
        daemon.stop()


def test_desired_values_are_checked_against_the_settings_the_board_announced(gateway: tuple[Daemon, str]) -> None:
    """The board announces its controls (type, range) in meta; a desired value it would refuse is refused at once,
    with the reason, from the CLI and from Home Assistant alike, instead of a delta that never clears."""
    daemon, _ = gateway
    before = json.loads(daemon.cli("twin", "get", BOARD, "--json").stdout)["desired"]
    for assignment, reason in (("period=abc", "period: expected float"), ("colour=red", "colour: not a setting"),
                               ("period=-5", "period: -5 below minimum 0.1"), ("led=3", "led: expected bool")):
        refused = daemon.cli("twin", "set", BOARD, assignment, check=False)
        assert refused.returncode == 1 and reason in refused.stderr, (assignment, refused.stderr)
        assert "Traceback" not in refused.stderr
    secret = json.loads(daemon.cli("integration", "add", "homeassistant", "--json").stdout)["password"]
    ha = Probe(daemon, HA_USER, secret, "ha-values")
    assert ha.accepted()
    ha.publish("homeassistant/status", "online")  # announced again: the set topics are offered to this client
    wait_until(lambda: "home assistant: announced" in daemon.log_text())
    for key, value in (("period", "-5"), ("led", "not-a-bool"), ("threshold", "1e999")):
        ha.publish(f"edgetrio-ha/{BOARD}/set/{key}", value)
    wait_until(lambda: daemon.log_text().count(f"home assistant: set {BOARD}.") >= 3, timeout=20)
    assert json.loads(daemon.cli("twin", "get", BOARD, "--json").stdout)["desired"] == before
    assert daemon.cli("twin", "set", BOARD, "period=0.5").returncode == 0  # a value it takes is taken
    ha.close()
