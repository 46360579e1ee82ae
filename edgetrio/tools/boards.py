"""Boards described in a file: what is wired to an ESP32 (components, each with a driver, its pins or bus, its
interval, filters and units), checked before anything is written, turned into the board's config.json and into the
device model that follows from it.

    [board]
    model = "greenhouse"          # the device model flashing registers (default: board-<file name>)
    period = 10                   # seconds between readings (the twin can change it)
    battery = 6                   # optional: deep sleep between readings, online every 6th (docs/firmware.md)

    [[component]]
    driver = "sht3x"              # see DRIVERS
    name = "air"                  # resources air_temperature, air_humidity (a driver's own names without one)
    sda = 21
    scl = 22
    address = 0x44
    filters = { offset = -0.3, median = 3 }
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetrio import wire

# What each driver reports (name suffix, type, unit, min, max; "rw" for outputs), where it is wired, and which of its
# settings it takes besides the common ones. A component's resources are NAME_SUFFIX (or the suffix alone, without a
# name); a one-value driver's resource is the component's name.
I2C, ONEWIRE, PIN_IN, PIN_OUT, ADC, NONE = "i2c", "onewire", "input", "output", "adc", "none"


@dataclass(frozen=True)
class Driver:
    wiring: str
    resources: tuple[tuple[str, str, str, float | None, float | None], ...]
    settings: frozenset[str] = frozenset()
    addresses: tuple[int, ...] = ()  # I2C addresses the chip can have; the first is the default
    writable: bool = False
    default_name: str = ""  # a one-value driver's resource without a name


NUMBER = "float"
DRIVERS: dict[str, Driver] = {
    "bme280": Driver(I2C, (("temperature", NUMBER, "C", -40, 85), ("pressure", NUMBER, "hPa", 300, 1100),
                           ("humidity", NUMBER, "%", 0, 100)), frozenset({"mode"}), (0x76, 0x77)),
    "bmp280": Driver(I2C, (("temperature", NUMBER, "C", -40, 85), ("pressure", NUMBER, "hPa", 300, 1100)),
                     frozenset({"mode"}), (0x76, 0x77)),
    "sht3x": Driver(I2C, (("temperature", NUMBER, "C", -40, 125), ("humidity", NUMBER, "%", 0, 100)),
                    addresses=(0x44, 0x45)),
    "bh1750": Driver(I2C, (("", NUMBER, "lx", 0, 65535),), addresses=(0x23, 0x5C),
                     default_name="illuminance"),
    "ds18b20": Driver(ONEWIRE, (("", NUMBER, "C", -55, 125),), frozenset({"count", "roms"}),
                      default_name="temperature"),
    "dht22": Driver(PIN_IN, (("temperature", NUMBER, "C", -40, 80), ("humidity", NUMBER, "%", 0, 100))),
    "dht11": Driver(PIN_IN, (("temperature", NUMBER, "C", 0, 50), ("humidity", NUMBER, "%", 20, 90))),
    "adc": Driver(ADC, (("", NUMBER, "V", 0, None),), frozenset({"attenuation", "divider"}), default_name="voltage"),
    "binary_input": Driver(PIN_IN, (("", "bool", "", None, None),),
                           frozenset({"pull", "inverted", "debounce_ms", "device_class"}), default_name="input"),
    # the total (pulses times per_pulse, in `unit`) and its rate per minute
    "pulse_counter": Driver(PIN_IN, (("", NUMBER, "", 0, None), ("rate", NUMBER, "/min", 0, None)),
                            frozenset({"pull", "per_pulse"}), default_name="pulses"),
    "switch": Driver(PIN_OUT, (("", "bool", "", None, None),), frozenset({"inverted", "restore"}), writable=True,
                     default_name="switch"),
    "pwm": Driver(PIN_OUT, (("", NUMBER, "%", 0, 100),), frozenset({"frequency", "restore"}), writable=True,
                  default_name="level"),
    "chip": Driver(NONE, (("", NUMBER, "C", -40, 125),), default_name="chip_temperature"),
}
COMMON = frozenset({"driver", "name", "interval", "filters", "unit", "pin", "sda", "scl", "address"})
FILTERS = frozenset({"offset", "multiply", "calibrate", "median", "average", "delta", "throttle"})
ATTENUATIONS = ("0dB", "2.5dB", "6dB", "11dB")
# ESP32 (WROOM/WROVER) pins: 6-11 are wired to the flash chip, 34-39 are inputs only, ADC2 cannot be read while
# Wi-Fi is on, and only these pins exist at all
FLASH_PINS = frozenset(range(6, 12))
INPUT_ONLY = frozenset(range(34, 40))
ADC1 = frozenset(range(32, 40))
ADC2 = frozenset({0, 2, 4, 12, 13, 14, 15, 25, 26, 27})
GPIOS = frozenset({*range(0, 20), 21, 22, 23, 25, 26, 27, *range(32, 40)})
RESERVED = {2: "the board's LED"}  # the firmware drives it for the `led` setting
MAX_COMPONENTS = 24  # each driver's code and state live in the board's heap
NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
FIRMWARE_KEYS = ("led", "period", "threshold")  # the firmware's own settings: no resource may take these names


class BoardError(Exception):
    """A one-line reason a board file cannot be used (the file, the component and what to change)."""


@dataclass
class Board:
    """A board file, checked: the components as the firmware takes them, and the model that follows."""

    path: Path
    model: str
    period: float
    battery: int | None = None  # battery mode: online every `battery` readings, deep sleep between
    components: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    # (sda, scl) -> {address: the component expected there}
    i2c_buses: dict[tuple[int, int], dict[int, str]] = field(default_factory=dict)

    def model_document(self) -> dict[str, Any]:
        """The device model flashing registers: every resource the components report or take."""
        return {"name": self.model, "resources": [
            {k: v for k, v in r.items() if k not in ("key", "device_class", "state_class")} for r in self.resources]}

    def config(self) -> dict[str, Any]:
        """What goes into the board's config.json besides its identity and gateway."""
        return {"model": self.model, "period": self.period, "components": self.components,
                **({"battery": {"send_every": self.battery}} if self.battery else {})}


def load_board(path: Path, wifi: bool = True) -> Board:
    """Read and check a board file; `wifi` is whether the board talks over Wi-Fi (ADC2 pins cannot be read then)."""
    try:
        doc = wire.loads_toml(path.read_text())
    except OSError as exc:
        raise BoardError(f"{path}: cannot read the board file: {exc.strerror}") from None
    except ValueError as exc:
        raise BoardError(f"{path}: not valid TOML: {exc}") from None
    return check_board(path, doc, wifi)


def check_board(path: Path, doc: dict[str, Any], wifi: bool = True) -> Board:
    unknown = set(doc) - {"board", "component"}
    if unknown:
        raise BoardError(f"{path}: unknown table {sorted(unknown)[0]!r} (use [board] and [[component]])")
    head = doc.get("board") or {}
    if not isinstance(head, dict) or set(head) - {"model", "period", "battery"}:
        raise BoardError(f"{path}: [board] takes model, period and battery")
    battery = head.get("battery")
    if battery is not None and (not isinstance(battery, int) or isinstance(battery, bool) or not 1 <= battery <= 1000):
        raise BoardError(f"{path}: [board] battery {battery!r}: online every 1 to 1000 readings (deep sleep between)")
    model = head.get("model") or f"board-{re.sub(r'[^a-z0-9]+', '-', path.stem.lower()).strip('-') or 'custom'}"
    period = head.get("period", 10)
    if not isinstance(model, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", model):
        raise BoardError(f"{path}: [board] model {model!r}: 1-64 letters, digits, '_', '.' or '-'")
    if not isinstance(period, int | float) or isinstance(period, bool) or not 0.1 <= period <= 86400:
        raise BoardError(f"{path}: [board] period {period!r}: 0.1 to 86400 seconds")
    items = doc.get("component")
    if not isinstance(items, list) or not items:
        raise BoardError(f"{path}: no [[component]]: describe at least one thing wired to the board")
    if len(items) > MAX_COMPONENTS:
        raise BoardError(f"{path}: {len(items)} components: a board takes up to {MAX_COMPONENTS} (each driver and "
                         "its readings take heap on the board)")
    board = Board(path, model, float(period), battery)
    pins_used: dict[int, str] = {}
    names: dict[str, str] = {}
    for index, item in enumerate(items, 1):
        component = check_component(f"{path}: component {index}", item, wifi, pins_used, board.i2c_buses)
        for resource in component["resources"]:
            owner = names.get(resource["name"])
            if owner is not None:
                raise BoardError(f"{path}: component {index} reports {resource['name']!r}, as {owner} does: give it "
                                 "another name")
            names[resource["name"]] = f"component {index}"
            board.resources.append(resource)
        board.components.append(component)
    return board


def check_component(where: str, item: Any, wifi: bool, pins_used: dict[int, str],
                    buses: dict[tuple[int, int], dict[int, str]]) -> dict[str, Any]:
    """One [[component]], checked and normalised, with the resources it reports (or takes) under "resources"."""
    if not isinstance(item, dict) or not isinstance(item.get("driver"), str):
        raise BoardError(f"{where}: needs driver = one of {', '.join(sorted(DRIVERS))}")
    kind = item["driver"].lower()
    driver = DRIVERS.get(kind)
    if driver is None:
        raise BoardError(f"{where}: unknown driver {item['driver']!r} (known: {', '.join(sorted(DRIVERS))})")
    where = f"{where} ({kind})"
    unknown = set(item) - COMMON - driver.settings
    if unknown:
        raise BoardError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
    name = item.get("name")
    if name is not None and (not isinstance(name, str) or not NAME.match(name)):
        raise BoardError(f"{where}: name {str(name)[:40]!r}: up to 32 lower-case letters, digits and _, starting "
                         "with a letter")
    out: dict[str, Any] = {"driver": kind}
    if name:
        out["name"] = name
    interval = item.get("interval")
    if interval is not None:
        if not isinstance(interval, int | float) or not 0.1 <= interval <= 86400:
            raise BoardError(f"{where}: interval is 0.1 to 86400 seconds")
        out["interval"] = float(interval)
    out.update(check_wiring(where, driver, item, wifi, pins_used, buses))
    out.update(check_settings(where, kind, item))
    resources = resources_of(kind, driver, name, out)
    for resource in resources:
        if resource["name"] in FIRMWARE_KEYS:
            raise BoardError(f"{where}: {resource['name']!r} is one of the firmware's own settings "
                             f"({', '.join(FIRMWARE_KEYS)}): give the component another name")
    if "filters" in item:
        if driver.writable:
            raise BoardError(f"{where}: filters apply to what a board reads, not to outputs")
        if all(r["type"] == "bool" for r in resources):
            raise BoardError(f"{where}: filters shape numbers; a contact reports true or false (use debounce_ms)")
        out["filters"] = check_filters(where, item["filters"], {r["key"] for r in resources})
        for resource in resources:  # a value scaled or calibrated leaves the chip's range: the model keeps none
            scaling = {**out["filters"], **out["filters"].get(resource["key"], {})}
            if {"offset", "multiply", "calibrate"} & set(scaling):
                resource.pop("min", None)
                resource.pop("max", None)
    if "unit" in item:
        if not isinstance(item["unit"], str) or not 0 < len(item["unit"]) <= 16 or (len(driver.resources) > 1 and (
                kind != "pulse_counter")):
            raise BoardError(f"{where}: unit is a short text such as \"L\" or \"kWh\", for a one-value driver or a "
                             "pulse counter")
        out["unit"] = item["unit"]
        resources[0]["unit"] = item["unit"]
        if kind == "pulse_counter":
            resources[1]["unit"] = item["unit"] + "/min"
    out["resources"] = resources
    return out


def pin_of(where: str, item: dict[str, Any], key: str) -> int:
    pin = item.get(key)
    if not isinstance(pin, int) or isinstance(pin, bool):
        raise BoardError(f"{where}: needs {key} = the GPIO number it is wired to")
    if pin in FLASH_PINS:
        raise BoardError(f"{where}: GPIO{pin} is wired to the board's flash chip (6-11 cannot be used)")
    if pin not in GPIOS:
        raise BoardError(f"{where}: an ESP32 has no GPIO{pin}")
    if pin in RESERVED:
        raise BoardError(f"{where}: GPIO{pin} is {RESERVED[pin]}")
    return pin


def claim(where: str, pin: int, pins_used: dict[int, str]) -> None:
    if pin in pins_used:
        raise BoardError(f"{where}: GPIO{pin} is used twice (also by {pins_used[pin]})")
    pins_used[pin] = where.split(": ", 1)[-1]


def check_wiring(where: str, driver: Driver, item: dict[str, Any], wifi: bool, pins_used: dict[int, str],
                 buses: dict[tuple[int, int], dict[int, str]]) -> dict[str, Any]:
    """The pins (or bus and address) of a component, each checked for what the ESP32 can do with it."""
    if driver.wiring == NONE:
        return {}
    if driver.wiring == I2C:
        sda, scl = pin_of(where, {"sda": 21, **item}, "sda"), pin_of(where, {"scl": 22, **item}, "scl")
        if sda == scl:
            raise BoardError(f"{where}: sda and scl are both GPIO{sda}: I2C needs two pins")
        for pin in (sda, scl):
            if pin in INPUT_ONLY:  # the bus pulls its lines low: both are outputs too
                raise BoardError(f"{where}: GPIO{pin} is an input only (34-39): I2C needs pins that can drive")
        address = item.get("address", driver.addresses[0])
        if address not in driver.addresses:
            raise BoardError(f"{where}: address {address!r}: this chip answers at "
                             f"{' or '.join(hex(a) for a in driver.addresses)}")
        bus = buses.get((sda, scl))
        if bus is None:  # a new bus claims its two pins; the next chip on the same pins shares it
            for pin in (sda, scl):
                claim(where, pin, pins_used)
            bus = buses[(sda, scl)] = {}
        if address in bus:
            raise BoardError(f"{where}: two chips at {hex(address)} on the bus on GPIO{sda}/GPIO{scl}")
        bus[address] = where
        return {"sda": sda, "scl": scl, "address": address}
    pin = pin_of(where, item, "pin")
    if driver.wiring == PIN_OUT and pin in INPUT_ONLY:
        raise BoardError(f"{where}: GPIO{pin} is an input only (34-39): an output needs another pin")
    if driver.wiring == ADC:
        if pin not in ADC1 | ADC2:
            raise BoardError(f"{where}: GPIO{pin} has no ADC (ADC1 is GPIO32-39)")
        if pin in ADC2 and wifi:
            raise BoardError(f"{where}: GPIO{pin} is on ADC2, which cannot be read while Wi-Fi is on: use GPIO32-39")
    claim(where, pin, pins_used)
    return {"pin": pin}


def check_settings(where: str, kind: str, item: dict[str, Any]) -> dict[str, Any]:
    """A driver's own settings, checked."""
    out: dict[str, Any] = {}
    for key in ("inverted", "restore"):
        if key in item:
            if not isinstance(item[key], bool):
                raise BoardError(f"{where}: {key} is true or false")
            out[key] = item[key]
    if "pull" in item:
        if item["pull"] not in ("up", "down", "none"):
            raise BoardError(f"{where}: pull is up, down or none")
        out["pull"] = item["pull"]
    if "mode" in item:
        if item["mode"] not in ("normal", "forced"):
            raise BoardError(f"{where}: mode is normal or forced")
        out["mode"] = item["mode"]
    numbers = {"debounce_ms": (0, 10_000), "count": (1, 16), "divider": (1, 100), "frequency": (1, 40_000_000),
               "per_pulse": (1e-9, 1e9)}
    for key, (low, high) in numbers.items():
        if key in item:
            value = item[key]
            if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
                raise BoardError(f"{where}: {key} is a number from {low:g} to {high:g}" if low >= 1 or low == 0
                                 else f"{where}: {key} is a number above 0, up to {high:g}")
            out[key] = value
    if "attenuation" in item:
        if item["attenuation"] not in ATTENUATIONS:
            raise BoardError(f"{where}: attenuation is one of {', '.join(ATTENUATIONS)}")
        out["attenuation"] = item["attenuation"]
    if "device_class" in item:
        if not isinstance(item["device_class"], str) or not NAME.match(item["device_class"]):
            raise BoardError(f"{where}: device_class is a Home Assistant class such as door, window or motion")
        out["device_class"] = item["device_class"]
    if "roms" in item:
        roms = item["roms"]
        if not isinstance(roms, dict) or not roms or not all(
                isinstance(k, str) and NAME.match(k) and isinstance(v, str) and re.fullmatch(r"28[0-9a-fA-F]{14}", v)
                for k, v in roms.items()):
            raise BoardError(f"{where}: roms maps names to DS18B20 ROM ids, e.g. {{ soil = \"28ff4a1b0516030e\" }}")
        if "count" in item:
            raise BoardError(f"{where}: give count or roms, not both")
        out["roms"] = {k: v.lower() for k, v in roms.items()}
    return out


def check_filters(where: str, filters: Any, resources: set[str]) -> dict[str, Any]:
    """Filters for all of a component's values, or per resource ({humidity = {offset = 2}})."""
    if not isinstance(filters, dict):
        raise BoardError(f"{where}: filters is a table such as {{ offset = -0.5, median = 5 }}")
    out: dict[str, Any] = {}
    if "median" in filters and "average" in filters:
        raise BoardError(f"{where}: median or average, not both")
    for key, value in filters.items():
        if key in resources:
            out[key] = check_filters(f"{where} {key}", value, set())
            continue
        if key not in FILTERS:
            values = f"; its values are {', '.join(sorted(resources))}" if len(resources) > 1 else ""
            raise BoardError(f"{where}: unknown filter {key!r} (known: {', '.join(sorted(FILTERS))}){values}")
        if key == "calibrate":
            if (not isinstance(value, list) or len(value) != 2
                    or not all(isinstance(p, list) and len(p) == 2
                               and all(isinstance(x, int | float) and math.isfinite(x) for x in p) for p in value)
                    or value[0][0] == value[1][0]):
                raise BoardError(f"{where}: calibrate is two [measured, true] points with different measured "
                                 "values, e.g. [[0.5, 0], [2.9, 100]]")
        elif key in ("median", "average"):
            if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 32:
                raise BoardError(f"{where}: {key} is the number of readings it takes, 2 to 32")
        elif (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
              or (key in ("delta", "throttle") and value <= 0) or (key == "throttle" and value > 86400)):
            raise BoardError(f"{where}: {key} is a number" + (" above 0" if key == "delta" else
                                                              ", 0 to 86400 seconds" if key == "throttle" else ""))
        out[key] = value
    return out


def resources_of(kind: str, driver: Driver, name: str | None, component: dict[str, Any]) -> list[dict[str, Any]]:
    """The model's resources for one component."""
    out = []
    names: list[str]
    for suffix, rtype, unit, low, high in driver.resources:
        if kind == "ds18b20":  # one resource per sensor on the wire
            base = name or driver.default_name
            names = (sorted(component["roms"]) if "roms" in component else
                     [base] if component.get("count", 1) == 1 else
                     [f"{base}_{i}" for i in range(1, component["count"] + 1)])
        elif suffix == "":
            names = [name or driver.default_name]
        elif kind == "pulse_counter":
            names = [f"{name or driver.default_name}_{suffix}"]
        else:
            names = [f"{name}_{suffix}" if name else suffix]
        for i, resource_name in enumerate(names):
            # key: what the firmware's driver calls the value (a ROM id for a named DS18B20, its order otherwise)
            key = (component["roms"][resource_name] if "roms" in component else str(i)) if kind == "ds18b20" else suffix
            resource: dict[str, Any] = {"key": key, "name": resource_name, "type": rtype, "unit": unit,
                                        "access": "rw" if driver.writable else "r"}
            if kind == "adc" and high is None:
                high = 3.3 * component.get("divider", 1)
            if low is not None:
                resource["min"] = low
            if high is not None:
                resource["max"] = high
            if component.get("device_class"):
                resource["device_class"] = component["device_class"]
            if kind == "pulse_counter" and suffix == "":  # a meter's total: counts up, from 0 again at a reboot
                resource["state_class"] = "total_increasing"
            out.append(resource)
    return out


REFERENCE_BOARD: dict[str, Any] = {  # what a board flashed without --board has: the reference wiring
    "board": {"model": "esp32-sensor"},
    "component": [{"driver": "bme280", "sda": 21, "scl": 22}, {"driver": "adc", "name": "analog", "pin": 34},
                  {"driver": "chip"}]}


def reference_board(forced: bool = False) -> Board:
    doc = {**REFERENCE_BOARD, "component": [dict(c) for c in REFERENCE_BOARD["component"]]}
    if forced:
        doc["component"][0]["mode"] = "forced"
    return check_board(Path("reference-board.toml"), doc)


def i2c_scan_script(board: Board) -> str:
    """MicroPython that prints each I2C bus's answering addresses, one line per bus: `sda scl [addresses]`."""
    lines = ["import machine"]
    for sda, scl in board.i2c_buses:
        lines.append(f"print({sda}, {scl}, machine.SoftI2C(scl=machine.Pin({scl}), sda=machine.Pin({sda})).scan())")
    return "\n".join(lines) + "\n"


def missing_chips(board: Board, scan_output: str) -> str | None:
    """The first chip the board file names that did not answer the scan, said for the user; None if all did."""
    found: dict[tuple[int, int], set[int]] = {}
    for line in scan_output.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            found[(int(parts[0]), int(parts[1]))] = {int(a) for a in re.findall(r"\d+", parts[2])}
    for (sda, scl), expected in board.i2c_buses.items():
        answered = found.get((sda, scl), set())
        for address, where in expected.items():
            if address not in answered:
                seen = ", ".join(hex(a) for a in sorted(answered)) or "nothing"
                return (f"{where}: nothing answers at {hex(address)} on GPIO{sda} (SDA) / GPIO{scl} (SCL); the bus "
                        f"has {seen}: check the wiring, the address, and the pins")
    return None
