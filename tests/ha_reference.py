"""Check MQTT discovery messages with Home Assistant's own code (run by the Python of the `.ha` venv, not the suite's).

Reads [{"topic": ..., "payload": ...}] on stdin, prints {"checked": N, "problems": [...]}. What Home Assistant does with
a discovery message: the topic must match its pattern and name a supported component, the origin block its schema, the
payload the component's DISCOVERY_SCHEMA (which drops keys it does not know: a dropped key is reported here, since Home
Assistant would ignore it silently), and a sensor's unit and state class must suit its device class.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

from homeassistant.components.mqtt import discovery
from homeassistant.components.sensor import DEVICE_CLASS_STATE_CLASSES, DEVICE_CLASS_UNITS


def check(topic: str, payload: dict[str, Any]) -> list[str]:
    prefix = "homeassistant/"
    if not topic.startswith(prefix) or not (match := discovery.TOPIC_MATCHER.match(topic[len(prefix):])):
        return [f"{topic}: not a discovery topic Home Assistant accepts"]
    component = match.group("component")
    if component not in discovery.SUPPORTED_COMPONENTS:
        return [f"{topic}: component {component} is not supported"]
    problems = []
    if "origin" in payload:
        try:
            discovery.MQTT_ORIGIN_INFO_SCHEMA(payload["origin"])
        except Exception as exc:
            problems.append(f"{topic}: origin refused: {exc}")
    platform = importlib.import_module(f"homeassistant.components.mqtt.{component}")
    body = {k: v for k, v in payload.items() if k != "origin"}
    try:
        valid = platform.DISCOVERY_SCHEMA(dict(body))
    except Exception as exc:
        return [*problems, f"{topic}: refused by Home Assistant's schema: {exc}"]
    dropped = sorted(set(body) - set(valid))
    if dropped:
        problems.append(f"{topic}: keys Home Assistant does not know: {dropped}")
    if component == "sensor" and valid.get("device_class") is not None:
        device_class = valid["device_class"]
        units = DEVICE_CLASS_UNITS.get(device_class, set())
        if valid.get("unit_of_measurement") not in units:
            problems.append(f"{topic}: unit {valid.get('unit_of_measurement')!r} does not suit {device_class}")
        state_class = valid.get("state_class")
        if state_class is not None and state_class not in DEVICE_CLASS_STATE_CLASSES.get(device_class, set()):
            problems.append(f"{topic}: state class {state_class} does not suit {device_class}")
    return problems


def main() -> None:
    messages = json.load(sys.stdin)
    problems = []
    for message in messages:
        problems += check(message["topic"], message["payload"])
    json.dump({"checked": len(messages), "problems": problems}, sys.stdout)


if __name__ == "__main__":
    main()
