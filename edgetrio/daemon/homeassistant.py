"""Home Assistant MQTT discovery: each device shows up in Home Assistant with its sensors, switches, numbers and buttons.

Home Assistant connects to the embedded broker with a credential of its own (`edgetrio integration add homeassistant`),
confined to `homeassistant/#` and this gateway's `edgetrio-ha/#` topics (see `ingest.INTEGRATIONS`); it never reads a
device's own topics. The gateway publishes what it has committed, not what devices sent:
- `homeassistant/{component}/edgetrio_{device}/{key}/config`: one entity per resource, control and command;
- `edgetrio-ha/{device}/state/{resource}`: each value as it is committed;
- `edgetrio-ha/{device}/reported/{key}`: the twin's reported state (a switch's or number's state);
- `edgetrio-ha/{device}/availability`: `online`/`offline` from presence.
Home Assistant sends `edgetrio-ha/{device}/set/{key}` (sets desired state) and `edgetrio-ha/{device}/press/{name}`
(sends a command).

Home Assistant expects a broker to retain discovery configs and states, and subscribes whenever it is ready (seconds
after its birth message on a slow machine). The embedded broker retains nothing (amqtt leaks retained messages across
clients, see notes), so the gateway keeps them itself (`Retained`): configs and withdrawals persisted in the store,
states in memory, each the latest; whenever Home Assistant's credential subscribes, what matches is delivered to it.
Whatever starts first, and whatever was removed while the other was away, Home Assistant ends in the current state.
Everything is also announced again on Home Assistant's birth message, as it asks.
"""

from __future__ import annotations

import json
import logging
import re
import time
from functools import partial
from typing import Any

import trio
from sqlite_utils import Database

from edgetrio import wire
from edgetrio.daemon import store
from edgetrio.daemon.broker import BusEvent
from edgetrio.daemon.commands import CommandFailed, set_desired
from edgetrio.daemon.ingest import Watch
from edgetrio.daemon.parts import Parts
from edgetrio.daemon.topics import HA_BIRTH, HA_DISCOVERY, HA_ROOT, Reading, topic_matches
from edgetrio.models import TYPE_ALIASES, Model
from edgetrio.twin import Twin

log = logging.getLogger("edgetrio.homeassistant")
JOBS_WAITING = 256  # announcements, set and press requests waiting; more are dropped (logged)
PRESSES_AT_ONCE = 8  # commands from buttons in flight together
COMMAND_TIMEOUT = 10.0
RECONCILE_EVERY = 2.0  # seconds between looks at the roster for devices added, removed or given another model
# How long a withdrawal is replayed to a Home Assistant that subscribes: one away longer keeps the entity until its
# user deletes the device (docs/homeassistant.md)
WITHDRAWALS_KEPT = 30 * 86400.0

# units as devices spell them -> Home Assistant's spelling, and the device class each implies
UNITS = {"c": "°C", "degc": "°C", "°c": "°C", "celsius": "°C", "f": "°F", "°f": "°F", "k": "K",
         "%": "%", "pa": "Pa", "hpa": "hPa", "kpa": "kPa", "mbar": "mbar", "bar": "bar", "psi": "psi",
         "v": "V", "mv": "mV", "a": "A", "ma": "mA", "w": "W", "kw": "kW", "wh": "Wh", "kwh": "kWh",
         "dbm": "dBm", "db": "dB", "lx": "lx", "ppm": "ppm", "s": "s", "ms": "ms", "min": "min", "h": "h",
         "hz": "Hz", "m": "m", "cm": "cm", "mm": "mm"}
UNIT_CLASSES = {"°C": "temperature", "°F": "temperature", "K": "temperature", "Pa": "pressure", "hPa": "pressure",
                "kPa": "pressure", "mbar": "pressure", "bar": "pressure", "psi": "pressure", "V": "voltage",
                "mV": "voltage", "A": "current", "mA": "current", "W": "power", "kW": "power", "Wh": "energy",
                "kWh": "energy", "dBm": "signal_strength", "lx": "illuminance", "Hz": "frequency",
                "s": "duration", "ms": "duration", "min": "duration", "h": "duration"}
TOTAL_CLASSES = {"energy"}  # meters count up: state class total_increasing, not measurement
RESTART_COMMANDS = {"reboot", "restart", "reset"}
NOT_BUTTONS = {"rollback"}  # going back to older firmware is an admin's act (edgetrio cmd), not a button on a page


def object_id(text: str) -> str:
    """A discovery topic level: Home Assistant takes [A-Za-z0-9_-] there, a device id may also hold '.'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def ha_unit(unit: str) -> str:
    return UNITS.get(unit.strip().lower(), unit.strip())


def payload(value: Any) -> bytes:
    """A state as Home Assistant reads it: numbers and booleans as JSON, text as it is."""
    return value.encode() if isinstance(value, str) else json.dumps(value).encode()


def topic(device: str, *levels: str) -> str:
    return "/".join((HA_ROOT, device, *levels))


def listed(meta: dict[str, Any], key: str) -> list[Any]:
    """A list a device announced in its meta, or none: what it sends is not checked in shape."""
    value = meta.get(key)
    return value if isinstance(value, list) else []


def controls_of(model: Model | None, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """What can be set on a device: its model's rw resources, and the twin keys its meta describes."""
    out: dict[str, dict[str, Any]] = {}
    if model is not None:
        for r in model.resources.values():
            if r.access == "rw":
                out[r.name] = {"name": r.name, "type": r.type, "unit": r.unit, "min": r.minimum, "max": r.maximum}
    for item in listed(meta, "controls"):
        if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"] not in out:
            kind = TYPE_ALIASES.get(str(item.get("type", "")).lower())
            if kind is not None:
                out[item["name"]] = {"name": item["name"], "type": kind, "unit": str(item.get("unit") or ""),
                                     "min": item.get("min"), "max": item.get("max")}
    return list(out.values())


def discovery(device: str, model: Model | None, meta: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The discovery configs of one device: (config topic, payload) for each entity."""
    node = f"edgetrio_{object_id(device)}"
    block: dict[str, Any] = {"identifiers": [node], "name": device, "manufacturer": "edgetrio"}
    announced = meta.get("model")
    if isinstance(announced, str) and announced:
        block["model"] = announced
    elif model is not None:
        block["model"] = model.name
    if isinstance(meta.get("firmware"), str):
        block["sw_version"] = meta["firmware"]
    common = {"availability_topic": topic(device, "availability"), "device": block,
              "origin": {"name": "edgetrio"}}

    def entity(component: str, key: str, name: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        uid = f"{node}_{object_id(key)}"
        return (f"{HA_DISCOVERY}/{component}/{node}/{object_id(key)}/config",
                {"name": name, "unique_id": uid, "object_id": uid, **body, **common})

    configs = []
    controls = controls_of(model, meta)
    control_names = {c["name"] for c in controls}
    # what a board file said a contact is (door, window, motion...): its meta carries the class with the resource
    announced = [r for r in listed(meta, "resources") if isinstance(r, dict) and isinstance(r.get("name"), str)]
    classes = {r["name"]: r["device_class"] for r in announced if isinstance(r.get("device_class"), str)}
    totals = {r["name"] for r in announced if r.get("state_class") == "total_increasing"}  # a meter's count
    for r in (model.resources.values() if model is not None else []):
        if r.name in control_names:
            continue
        name = r.name.replace("_", " ")
        if r.type == "bool":
            configs.append(entity("binary_sensor", r.name, name, {
                "state_topic": topic(device, "state", r.name), "payload_on": "true", "payload_off": "false",
                **({"device_class": classes[r.name]} if r.name in classes else {})}))
            continue
        body: dict[str, Any] = {"state_topic": topic(device, "state", r.name)}
        if r.type in ("int", "float"):
            unit = ha_unit(r.unit)
            if unit:
                body["unit_of_measurement"] = unit
            device_class = UNIT_CLASSES.get(unit)
            if unit == "%" and "humid" in r.name:
                device_class = "humidity"
            if device_class:
                body["device_class"] = device_class
            counts_up = device_class in TOTAL_CLASSES or r.name in totals
            body["state_class"] = "total_increasing" if counts_up else "measurement"
        configs.append(entity("sensor", r.name, name, body))
    for c in controls:
        name = c["name"].replace("_", " ")
        body = {"command_topic": topic(device, "set", c["name"]), "state_topic": topic(device, "reported", c["name"])}
        if c["type"] == "bool":
            configs.append(entity("switch", c["name"], name, {
                **body, "payload_on": "true", "payload_off": "false", "state_on": "true", "state_off": "false"}))
        elif c["type"] in ("int", "float"):
            # a dimmer's 0-100 %: a slider; a period of 0.1 s to a day: a box to type in
            bounded = c["min"] is not None and c["max"] is not None and c["max"] - c["min"] <= 1000
            body.update({"min": c["min"] if c["min"] is not None else -1e9,
                         "max": c["max"] if c["max"] is not None else 1e9,
                         "step": 1 if c["type"] == "int" else 0.1, "mode": "slider" if bounded else "box"})
            if c["unit"]:
                body["unit_of_measurement"] = ha_unit(c["unit"])
            configs.append(entity("number", c["name"], name, body))
        else:
            configs.append(entity("text", c["name"], name, body))
    for command in listed(meta, "commands"):
        if isinstance(command, str) and command and command not in NOT_BUTTONS:
            body = {"command_topic": topic(device, "press", command), "payload_press": "PRESS"}
            if command in RESTART_COMMANDS:
                body["device_class"] = "restart"
            configs.append(entity("button", command, command.replace("_", " "), body))
    return configs


def _device_view(db: Database, device: str) -> dict[str, Any] | None:
    """What an announcement needs from the store: meta, model, twin and the latest values."""
    row = store.get_device(db, device)
    if row is None:
        return None
    meta = wire.loads(row["meta"]) if row["meta"] else {}
    latest = store.query_readings(db, device, limit=1)
    return {"meta": meta if isinstance(meta, dict) else {}, "model": store.device_model(db, device),
            "reported": store.get_twin(db, device).reported, "values": latest[0]["values"] if latest else {},
            "online": bool(row["online"])}


class Retained:
    """The latest message of each topic Home Assistant reads, as a retaining broker would hold it.

    Configs (and withdrawals: an empty config) are also persisted by the component; states, availability and reported
    values are rebuilt from the store at start. A withdrawal is sent to a subscriber as the config it withdrew and then
    the empty config: Home Assistant ignores an empty config for an entity it has not discovered since it started, so
    an entity it restored from its own registry would otherwise stay for good (checked against Home Assistant 2024.3)."""

    def __init__(self) -> None:
        self.messages: dict[str, bytes] = {}
        self.device_of: dict[str, str] = {}
        self.former: dict[str, bytes] = {}  # withdrawn config topic -> the config it withdrew

    def former_of(self, t: str, p: bytes) -> bytes:
        """What `p` withdraws on topic `t` (b"" when `p` is not a withdrawal)."""
        return b"" if p else (self.messages.get(t) or self.former.get(t) or b"")

    def put(self, device: str, messages: list[tuple[str, bytes]]) -> None:
        for t, p in messages:
            if t.endswith("/config"):
                if former := self.former_of(t, p):
                    self.former[t] = former
                else:
                    self.former.pop(t, None)
            self.messages[t] = p
            self.device_of[t] = device

    def matching(self, topic_filter: str) -> list[tuple[str, bytes]]:
        if "+" not in topic_filter and "#" not in topic_filter:  # Home Assistant subscribes per entity topic: a lookup
            found = [(topic_filter, self.messages[topic_filter])] if topic_filter in self.messages else []
        else:
            found = [(t, p) for t, p in self.messages.items() if topic_matches(topic_filter, t)]
        return [m for t, p in found for m in ([(t, self.former[t]), (t, p)] if not p and t in self.former else [(t, p)])]

    def configs_of(self, device: str) -> set[str]:
        """The config topics announced (not withdrawn) for a device."""
        return {t for t, d in self.device_of.items() if d == device and t.endswith("/config") and self.messages[t]}

    def devices(self) -> set[str]:
        return {self.device_of[t] for t in self.messages if t.endswith("/config") and self.messages[t]}

    def forget_states(self, device: str) -> None:
        for t in [t for t, d in self.device_of.items() if d == device and not t.endswith("/config")]:
            del self.messages[t], self.device_of[t]


class HomeAssistant(Watch):
    """Announces devices to Home Assistant and carries its switches and buttons to the twin and to commands."""

    def __init__(self, parts: Parts) -> None:
        self.link, self.writer, self.roster = parts.link, parts.writer, parts.roster
        self.changes, self.commands = parts.changes, parts.commands
        self.jobs_in, self.jobs = trio.open_memory_channel[tuple[str, ...]](JOBS_WAITING)
        self.retained = Retained()
        self.offered: dict[str, set[str]] = {}  # device -> command topics of what was announced: all it may use
        self.seen_models: dict[str, Model | None] = {}
        self.presses = trio.CapacityLimiter(PRESSES_AT_ONCE)

    def _send(self, device: str, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
        """Publish, and hold each as the latest of its topic for a subscriber that comes later."""
        self.retained.put(device, messages)
        self.link.publish(messages, qos=qos)

    # -- what ingest tells (never blocks) --
    def committed(self, readings: list[Reading]) -> None:
        latest: dict[str, dict[str, Any]] = {}
        for r in sorted(readings, key=lambda r: (r.boot, r.seq)):  # resent old readings must not win
            latest.setdefault(r.device, {}).update(r.values)
        for device, values in latest.items():
            self._send(device, [(topic(device, "state", key), payload(value)) for key, value in values.items()], qos=0)

    def presence(self, device: str, online: bool) -> None:
        self._send(device, [(topic(device, "availability"), b"online" if online else b"offline")])

    def reported(self, device: str, twin: Twin) -> None:
        self._send(device, [(topic(device, "reported", key), payload(value))
                            for key, value in twin.reported.items() if value is not None])

    def meta(self, device: str) -> None:
        self._job("announce", device)

    def integration(self, event: BusEvent) -> None:
        if event.kind == "subscribed":  # what a retaining broker would send now; the ACL confined the filter
            self.link.publish(self.retained.matching(event.topic))
            return
        if event.topic == HA_BIRTH:
            if event.payload.strip() == b"online":
                self._job("announce_all")
            return
        levels = event.topic.split("/")
        if len(levels) == 4 and levels[0] == HA_ROOT and levels[2] in ("set", "press"):
            self._job(levels[2], levels[1], levels[3], event.payload[:1024].decode("utf-8", "replace"))

    def _job(self, *job: str) -> None:
        try:
            self.jobs_in.send_nowait(job)
        except trio.WouldBlock:
            log.warning("home assistant request dropped (%d waiting): %s", JOBS_WAITING, " ".join(job[:3]))

    # -- the component --
    async def run(self) -> None:
        """Restore what Home Assistant was told before, then announce devices and carry its presses and switches."""
        held = await self.writer.write(partial(store.ha_configs, withdrawn_before=time.time() - WITHDRAWALS_KEPT))
        for t, device, p, former in held:  # what Home Assistant was told before
            self.retained.put(device, [(t, former)] if former and not p else [])
            self.retained.put(device, [(t, p)])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reconcile)
            async for job in self.jobs:
                if job[0] == "announce_all":
                    await self.announce(list(self.roster.models))
                elif job[0] == "announce":
                    await self.announce([job[1]])
                elif job[0] == "set":
                    nursery.start_soon(self._set, job[1], job[2], job[3])
                elif job[0] == "press":
                    nursery.start_soon(self._press, job[1], job[2])

    async def _reconcile(self) -> None:
        """Announce devices registered or given another model, and withdraw removed ones (the registry changes through
        the CLI, the cloud and meta; looking at the roster catches all of them)."""
        while True:
            models = dict(self.roster.models)
            changed = [d for d, m in models.items() if d not in self.seen_models or self.seen_models[d] != m]
            if changed:
                await self.announce(changed)
            for device in sorted(self.retained.devices() - set(models)):
                # an empty config removes the entity; it is kept (persisted) for a Home Assistant that is away now
                withdrawals = [(t, b"") for t in sorted(self.retained.configs_of(device))]
                await self.writer.write(partial(store.ha_configs_set, device=device, now=time.time(), configs=[
                    (t, p, self.retained.former_of(t, p)) for t, p in withdrawals]))
                self.retained.forget_states(device)
                self._send(device, withdrawals)
                self.offered.pop(device, None)
                self.seen_models.pop(device, None)
                log.info("home assistant: withdrew %s", device)
            await trio.sleep(RECONCILE_EVERY)

    async def announce(self, devices: list[str]) -> None:
        """Send the devices' configs and their current states (a subscriber that comes later gets both then)."""
        announced = 0
        for device in devices:
            self.seen_models[device] = self.roster.models.get(device)
            view = await self.writer.read(partial(_device_view, device=device))
            if view is None:
                continue
            configs = discovery(device, view["model"], view["meta"])
            messages = [(t, b"") for t in sorted(self.retained.configs_of(device) - {t for t, _ in configs})]
            messages += [(t, json.dumps(body).encode()) for t, body in configs]
            if [(t, self.retained.messages.get(t)) for t, _ in messages] != messages:  # persisted only when changed
                await self.writer.write(partial(store.ha_configs_set, device=device, now=time.time(), configs=[
                    (t, p, self.retained.former_of(t, p)) for t, p in messages]))
            self.offered[device] = {body["command_topic"] for _, body in configs if "command_topic" in body}
            # states: what is held already is newer than the store's view (ingest updates it as it commits);
            # availability is read now, never from before a wait, so the latest presence always wins
            states = [(t, p) for t, p in
                      [(topic(device, "state", k), payload(v)) for k, v in view["values"].items()] +
                      [(topic(device, "reported", k), payload(v)) for k, v in view["reported"].items() if v is not None]
                      if t not in self.retained.messages]
            self.retained.put(device, states)
            self._send(device, messages)
            self._send(device, [(topic(device, "availability"), b"online" if self.roster.online(device) else b"offline"),
                                *[(t, self.retained.messages[t]) for t in self.retained.messages
                                  if self.retained.device_of[t] == device and not t.endswith(("/config", "/availability"))]])
            announced += 1
        if announced:
            log.info("home assistant: announced %d device(s)", announced)

    async def _set(self, device: str, key: str, text: str) -> None:
        """A switch or number changed in Home Assistant: the desired state follows (the board then reports it)."""
        if topic(device, "set", key) not in self.offered.get(device, set()):
            log.warning("home assistant: set %s on %s refused: not a setting it was offered", key, device)
            return
        try:
            value = wire.loads(text)
        except ValueError:
            value = text  # a text entity's value
        if isinstance(value, dict | list):
            log.warning("home assistant: set %s.%s refused: not a single value", device, key)
            return
        try:
            twin = await set_desired(self.writer, self.changes, self.link, device, {key: value}, None)
        except Exception as exc:
            log.warning("home assistant: set %s.%s failed: %s", device, key, exc)
            return
        log.info("home assistant: set %s.%s = %s (desired version %d)", device, key, wire.clip(text, 40),
                 twin.desired_version)

    async def _press(self, device: str, name: str) -> None:
        if topic(device, "press", name) not in self.offered.get(device, set()):
            log.warning("home assistant: command %s on %s refused: not a button it was offered", name, device)
            return
        async with self.presses:
            started = time.monotonic()
            try:
                result = await self.commands.send(device, name, {}, COMMAND_TIMEOUT)
            except (CommandFailed, store.UnknownDevice) as exc:
                log.warning("home assistant: command %s on %s failed: %s", name, device, exc)
                return
            log.info("home assistant: command %s on %s -> %s in %.1f s", name, device,
                     wire.clip(json.dumps(result), 120), time.monotonic() - started)
