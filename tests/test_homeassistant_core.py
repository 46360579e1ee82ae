"""A real Home Assistant core (2024.3.3, from the `.ha` venv) against the gateway and a virtual board running the real
firmware: started, onboarded, MQTT added through its own config flow, and what it shows read back through its REST API.
Both orders of start-up, restarts of either side, control from Home Assistant, and removals while it is stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgetrio.tools.testkit import ROOT, Daemon, free_port, greenhouse_board, needs, virtual_boards, wait_until

HASS = ROOT / ".ha" / "bin" / "hass"
NODE = "edgetrio_greenhouse_1"  # Home Assistant's entity ids: <component>.<object_id> from the discovery config
SENSORS = {  # what the README's board sends, as Home Assistant should show it: unit, device class
    "temperature": ("°C", "temperature"), "pressure": ("hPa", "pressure"), "humidity": ("%", "humidity"),
    "analog": ("V", "voltage"), "chip_temperature": ("°C", "temperature"),
}


class HomeAssistant:
    """One Home Assistant core in a config folder of its own, on a loopback port; its state lives in the folder, so
    a restart is the same instance."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None
        config_dir.mkdir(parents=True)
        # metric, UTC and a location so it asks nothing and looks nothing up; --skip-pip: it installs nothing at start
        (config_dir / "configuration.yaml").write_text(
            "homeassistant:\n  name: edgetrio test\n  latitude: 52.5\n  longitude: 13.4\n  elevation: 30\n"
            "  unit_system: metric\n  time_zone: UTC\n  country: DE\n  currency: EUR\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {self.port}\n")

    def start(self) -> HomeAssistant:
        self.log = open(self.config_dir / "hass-output.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([str(HASS), "-c", str(self.config_dir), "--skip-pip", "--log-no-color"],
                                     stdout=self.log, stderr=self.log)
        wait_until(self._answers, timeout=180)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"Home Assistant exited: {self.log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/api/onboarding", timeout=5):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def log_text(self) -> str:
        return (self.config_dir / "hass-output.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=90)
            self.log.close()

    def call(self, method: str, path: str, body: Any = None, form: dict[str, str] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def onboard(self) -> None:
        """The first user, as its onboarding page creates it, and a token for the REST API."""
        client = self.url + "/"
        code = self.call("POST", "/api/onboarding/users", {"client_id": client, "name": "Owner", "username": "owner",
                                                           "password": "owner-password", "language": "en"})["auth_code"]
        self.token = self.call("POST", "/auth/token", form={"grant_type": "authorization_code", "code": code,
                                                            "client_id": client})["access_token"]

    def add_mqtt(self, port: int, username: str, password: str) -> dict[str, Any]:
        """Settings > Devices & services > Add integration > MQTT: the broker form, as a user fills it in."""
        flow = self.call("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        assert flow["step_id"] == "broker", flow
        result: dict[str, Any] = self.call("POST", f"/api/config/config_entries/flow/{flow['flow_id']}", {
            "broker": "127.0.0.1", "port": port, "username": username, "password": password})
        return result

    def turn_birth_off(self, port: int, username: str, password: str) -> None:
        """MQTT > Configure: the same broker, and "Enable birth message" off (a choice its users make)."""
        entry = next(e for e in self.call("GET", "/api/config/config_entries/entry") if e["domain"] == "mqtt")
        flow = self.call("POST", "/api/config/config_entries/options/flow", {"handler": entry["entry_id"]})
        flow = self.call("POST", f"/api/config/config_entries/options/flow/{flow['flow_id']}", {
            "broker": "127.0.0.1", "port": port, "username": username, "password": password})
        assert flow["step_id"] == "options", flow
        done = self.call("POST", f"/api/config/config_entries/options/flow/{flow['flow_id']}", {
            "discovery": True, "discovery_prefix": "homeassistant", "birth_enable": False, "will_enable": True})
        assert done["type"] == "create_entry", done

    def states(self) -> dict[str, dict[str, Any]]:
        return {s["entity_id"]: s for s in self.call("GET", "/api/states")}

    def state(self, entity: str) -> str | None:
        found = self.states().get(entity)
        return None if found is None else str(found["state"])

    def service(self, domain: str, name: str, **data: Any) -> None:
        self.call("POST", f"/api/services/{domain}/{name}", data)


@pytest.fixture
def home_assistant(tmp_path: Path) -> Iterator[HomeAssistant]:
    needs(HASS.exists(), "Home Assistant core (make .ha/.installed)")
    ha = HomeAssistant(tmp_path / "ha")
    try:
        yield ha
    finally:
        ha.stop()


def gateway(tmp_path: Path) -> tuple[Daemon, str]:
    daemon = Daemon(tmp_path / "gw", extra=("--ha",))
    daemon.data_dir.mkdir()
    daemon.start()
    secret = json.loads(daemon.cli("integration", "add", "homeassistant", "--json").stdout)["password"]
    return daemon, secret


def board_online(daemon: Daemon) -> bool:
    return any(d["id"] == "greenhouse-1" and d["online"] and d["meta"]
               for d in json.loads(daemon.cli("device", "list", "--json").stdout))


def live(ha: HomeAssistant, entity: str) -> bool:
    return ha.state(entity) not in (None, "unavailable", "unknown")


def twin_reported(daemon: Daemon, key: str) -> Any:
    return json.loads(daemon.cli("twin", "get", "greenhouse-1", "--json").stdout)["reported"]["state"].get(key)


def test_home_assistant_started_after_the_gateway_shows_the_board_and_controls_it(
        tmp_path: Path, home_assistant: HomeAssistant) -> None:
    """The order that lost every device before: the gateway and its board run first, Home Assistant starts later
    (its discovery subscription seconds after its birth). Every entity appears, with units, classes and live values,
    controls included, with no reload; its switch and number drive the board; a board that stops goes unavailable."""
    daemon, secret = gateway(tmp_path)
    try:
        with greenhouse_board(daemon):
            wait_until(lambda: board_online(daemon), timeout=90)
            ha = home_assistant.start()
            ha.onboard()
            entry = ha.add_mqtt(daemon.port, "integration:homeassistant", secret)
            assert entry["type"] == "create_entry" and entry["result"]["state"] == "loaded", entry

            wanted = [f"sensor.{NODE}_{name}" for name in SENSORS] + [
                f"switch.{NODE}_led", f"number.{NODE}_period", f"number.{NODE}_threshold"]
            wait_until(lambda: all(live(ha, e) for e in wanted), timeout=60)
            states = ha.states()
            for name, (unit, device_class) in SENSORS.items():
                shown = states[f"sensor.{NODE}_{name}"]
                assert shown["attributes"]["unit_of_measurement"] == unit, shown
                assert shown["attributes"]["device_class"] == device_class, shown
                assert shown["attributes"]["state_class"] == "measurement"
                float(shown["state"])  # a number, not a string Home Assistant could not read
            assert -40 <= float(states[f"sensor.{NODE}_temperature"]["state"]) <= 85
            assert 300 <= float(states[f"sensor.{NODE}_pressure"]["state"]) <= 1100
            assert states[f"switch.{NODE}_led"]["state"] == "off"  # the board's reported state, not "unknown"
            assert float(states[f"number.{NODE}_period"]["state"]) == 0.5  # the period the board runs at
            assert f"button.{NODE}_reboot" in states and states[f"button.{NODE}_reboot"]["attributes"][
                "device_class"] == "restart"
            # the values move as the board reports
            first = states[f"sensor.{NODE}_pressure"]["last_updated"]
            wait_until(lambda: ha.states()[f"sensor.{NODE}_pressure"]["last_updated"] != first, timeout=30)

            # control from Home Assistant reaches the board, and its report is the entity's state
            ha.service("switch", "turn_on", entity_id=f"switch.{NODE}_led")
            wait_until(lambda: twin_reported(daemon, "led") is True, timeout=30)
            wait_until(lambda: ha.state(f"switch.{NODE}_led") == "on", timeout=30)
            ha.service("number", "set_value", entity_id=f"number.{NODE}_threshold", value=2.5)
            wait_until(lambda: twin_reported(daemon, "threshold") == 2.5, timeout=30)
            wait_until(lambda: ha.state(f"number.{NODE}_threshold") == "2.5", timeout=30)

            # with its birth message turned off nothing asks the gateway to announce: Home Assistant restarted still
            # gets every entity, live, from what the gateway holds for its subscriptions (restored from its own
            # registry they would stay "unavailable")
            ha.turn_birth_off(daemon.port, "integration:homeassistant", secret)
            ha.stop()
            ha.start()
            wait_until(lambda: all(live(ha, e) for e in wanted), timeout=90)
            assert ha.state(f"switch.{NODE}_led") == "on" and ha.state(f"number.{NODE}_threshold") == "2.5"

        # the board is gone (its process stopped): Home Assistant shows it unavailable once the gateway says offline
        wait_until(lambda: ha.state(f"sensor.{NODE}_temperature") == "unavailable", timeout=120)
        assert ha.state(f"switch.{NODE}_led") == "unavailable"
    finally:
        daemon.stop()


def test_home_assistant_started_first_and_restarts_on_either_side_keep_it_right(
        tmp_path: Path, home_assistant: HomeAssistant) -> None:
    """Home Assistant first, the gateway after; the gateway restarting under it; a device added while both run; a
    device removed while Home Assistant is stopped. Each time Home Assistant ends up showing exactly what the gateway
    has, with no reload of the integration."""
    daemon, secret = gateway(tmp_path)
    model = tmp_path / "fanbox.toml"
    model.write_text('name = "fanbox"\n[[resources]]\nname = "fan"\ntype = "bool"\naccess = "rw"\n')
    daemon.cli("model", "add", str(model))
    ha = home_assistant.start()
    ha.onboard()
    assert ha.add_mqtt(daemon.port, "integration:homeassistant", secret)["type"] == "create_entry"
    daemon.stop()  # the gateway goes away; Home Assistant keeps its MQTT entry and waits for the broker
    try:
        # Home Assistant restarts with nothing to connect to, then the gateway and the board come up
        ha.stop()
        ha.start()
        daemon.start()
        with greenhouse_board(daemon):
            wait_until(lambda: live(ha, f"sensor.{NODE}_temperature") and live(ha, f"switch.{NODE}_led"), timeout=90)

            # a device registered while both run appears; its switch is there even before the device ever connected
            daemon.add_device("fanbox-9", "--model", "fanbox")
            wait_until(lambda: "switch.edgetrio_fanbox_9_fan" in ha.states(), timeout=30)

            # the gateway restarts under Home Assistant: its entities come back live, with no reload
            daemon.stop()
            wait_until(lambda: ha.state(f"sensor.{NODE}_temperature") == "unavailable", timeout=60)
            daemon.start()
            wait_until(lambda: live(ha, f"sensor.{NODE}_temperature"), timeout=90)

            # removed while Home Assistant is stopped: gone from Home Assistant when it returns, the rest still there
            ha.stop()
            daemon.cli("device", "remove", "fanbox-9")
            ha.start()
            wait_until(lambda: live(ha, f"sensor.{NODE}_temperature"), timeout=90)
            wait_until(lambda: "switch.edgetrio_fanbox_9_fan" not in ha.states(), timeout=60)
    finally:
        daemon.stop()


def test_a_board_described_in_a_file_appears_with_each_part_as_the_entity_it_is(
        tmp_path: Path, home_assistant: HomeAssistant) -> None:
    """A board file's parts, as Home Assistant itself shows them: a contact as a door, a relay as a switch, a PWM
    output as a slider, light and soil sensors with their units; its controls drive the board's outputs."""
    daemon, secret = gateway(tmp_path)
    board_file = ROOT / "examples" / "boards" / "greenhouse.toml"
    node = "edgetrio_gh_1"
    try:
        with virtual_boards(daemon, "gh", 1, period=1, extra=("--board", str(board_file))):
            wait_until(lambda: any(d["id"] == "gh-1" and d["online"] and d["meta"]
                                   for d in json.loads(daemon.cli("device", "list", "--json").stdout)), timeout=90)
            ha = home_assistant.start()
            ha.onboard()
            assert ha.add_mqtt(daemon.port, "integration:homeassistant", secret)["type"] == "create_entry"
            wanted = [f"binary_sensor.{node}_door", f"switch.{node}_pump", f"number.{node}_lamp",
                      f"sensor.{node}_air_temperature", f"sensor.{node}_light", f"sensor.{node}_soil_1"]
            wait_until(lambda: all(live(ha, e) for e in wanted), timeout=90)
            states = ha.states()
            assert states[f"binary_sensor.{node}_door"]["attributes"]["device_class"] == "door"
            assert states[f"binary_sensor.{node}_door"]["state"] == "on"  # the contact open (its pin pulled up)
            assert states[f"number.{node}_lamp"]["attributes"]["mode"] == "slider"
            assert states[f"number.{node}_lamp"]["attributes"]["max"] == 100
            assert states[f"sensor.{node}_light"]["attributes"]["unit_of_measurement"] == "lx"
            assert states[f"sensor.{node}_light"]["attributes"]["device_class"] == "illuminance"
            assert states[f"sensor.{node}_soil_1"]["attributes"]["unit_of_measurement"] == "°C"
            # its controls drive the board's outputs, and the board's report is what Home Assistant shows
            ha.service("switch", "turn_on", entity_id=f"switch.{node}_pump")
            ha.service("number", "set_value", entity_id=f"number.{node}_lamp", value=40)
            wait_until(lambda: (s := json.loads(daemon.cli("twin", "get", "gh-1", "--json").stdout)["reported"][
                "state"]).get("pump") is True and s.get("lamp") == 40, timeout=30)
            wait_until(lambda: ha.state(f"switch.{node}_pump") == "on", timeout=30)
            # the door closes: Home Assistant sees it within moments
            daemon.cli("fault", "gh-1", "env", "gpio13=0")
            wait_until(lambda: ha.state(f"binary_sensor.{node}_door") == "off", timeout=30)
    finally:
        daemon.stop()
