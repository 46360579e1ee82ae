"""Device models: what a device reports and the rules its readings are checked against (no I/O but model files);
shared: the gateway checks readings and desired state with them, the relay desired state."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetrio import wire
from edgetrio.identity import RegistryError

# Resource value types, with the KubeEdge / EdgeX spellings users bring along.
TYPE_ALIASES = {
    "int": "int", "integer": "int", "int32": "int", "int64": "int",
    "float": "float", "double": "float", "float32": "float", "float64": "float", "number": "float",
    "bool": "bool", "boolean": "bool",
    "string": "string", "str": "string",
}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # ':' for a device's announced one, device:ID
ACCESS_ALIASES = {"r": "r", "ro": "r", "readonly": "r", "read": "r", "rw": "rw", "readwrite": "rw", "w": "rw"}


@dataclass(frozen=True)
class Resource:
    """One value of a model: its type, unit, access (r or rw) and bounds."""

    name: str
    type: str
    unit: str = ""
    access: str = "r"
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: Any) -> str | None:
        """None if the value fits this resource, else the reason it does not."""
        if self.type == "bool":
            ok = isinstance(value, bool)
        elif self.type == "int":
            ok = isinstance(value, int) and finite_number(value)
        elif self.type == "float":
            ok = finite_number(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            return f"{self.name}: expected {self.type}, got {json.dumps(value)[:40]}"
        if self.type in ("int", "float"):
            if self.minimum is not None and value < self.minimum:
                return f"{self.name}: {value} below minimum {self.minimum}"
            if self.maximum is not None and value > self.maximum:
                return f"{self.name}: {value} above maximum {self.maximum}"
        return None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "unit": self.unit, "access": self.access}
        if self.minimum is not None:
            out["min"] = self.minimum
        if self.maximum is not None:
            out["max"] = self.maximum
        return out


ON_INVALID = ("reject", "drop_value")


@dataclass(frozen=True)
class Model:
    """A device model: the resources a device of it reports or takes, and what to do with a value that does not fit."""

    name: str
    resources: dict[str, Resource] = field(default_factory=dict)
    # a reading with a value that does not fit: refuse the whole reading, or keep the values that fit
    on_invalid: str = "reject"

    @classmethod
    def from_dict(cls, body: Any, name: str | None = None) -> Model:
        """Parse a model document; raise RegistryError naming the first thing wrong."""
        if not isinstance(body, dict):
            raise RegistryError("a model must be an object with 'name' and 'resources'")
        name = name or body.get("name")
        if not isinstance(name, str) or not name:
            raise RegistryError("a model needs a non-empty 'name'")
        if not MODEL_NAME.fullmatch(name):  # it names a model in URLs, Home Assistant's topics and file names
            raise RegistryError(f"invalid model name {name!r}: use 1-64 letters, digits, '_', '.', ':' or '-', "
                                "starting with a letter or digit")
        items = body.get("resources")
        if not isinstance(items, list) or not items:
            raise RegistryError(f"model {name!r}: 'resources' must be a non-empty list")
        resources: dict[str, Resource] = {}
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
                raise RegistryError(f"model {name!r}: resource #{i + 1} needs a 'name'")
            rname = item["name"]
            rtype = TYPE_ALIASES.get(str(item.get("type", "")).lower())
            if rtype is None:
                raise RegistryError(
                    f"model {name!r}: resource {rname!r} has type {item.get('type')!r}; use int, float, bool or string"
                )
            access = ACCESS_ALIASES.get(str(item.get("access", "r")).lower())
            if access is None:
                raise RegistryError(f"model {name!r}: resource {rname!r} has access {item.get('access')!r}; use r or rw")
            bounds = []
            for key in ("min", "max"):
                bound = item.get(key, item.get(key + "imum"))
                if bound is not None and not finite_number(bound):  # a NaN bound would let every value pass
                    raise RegistryError(f"model {name!r}: resource {rname!r} has a non-numeric {key}")
                bounds.append(bound)
            unit = item.get("unit", item.get("units", ""))
            resources[rname] = Resource(rname, rtype, str(unit), access, bounds[0], bounds[1])
        on_invalid = body.get("on_invalid", "reject")
        if on_invalid not in ON_INVALID:
            raise RegistryError(f"model {name!r}: on_invalid is {on_invalid!r}; use reject or drop_value")
        return cls(name, resources, on_invalid)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "resources": [r.as_dict() for r in self.resources.values()]}
        if self.on_invalid != "reject":
            out["on_invalid"] = self.on_invalid
        return out

    def check_values(self, values: dict[str, Any]) -> str | None:
        """None if every value names a resource of this model and fits it, else the first reason it does not."""
        for key, value in values.items():
            resource = self.resources.get(key)
            if resource is None:
                return f"{key}: not a resource of model {self.name!r}"
            reason = resource.check(value)
            if reason:
                return reason
        return None


    def split_values(self, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The values that fit this model, and why each of the others does not."""
        kept: dict[str, Any] = {}
        reasons = []
        for key, value in values.items():
            resource = self.resources.get(key)
            reason = f"{key}: not a resource of model {self.name!r}" if resource is None else resource.check(value)
            if reason:
                reasons.append(reason)
            else:
                kept[key] = value
        return kept, reasons


def finite_number(value: Any) -> bool:
    """A number a float can hold: JSON also parses 1e999 (inf) and integers of a thousand digits, which nothing
    downstream (aggregates, rules, plots) can use."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max


def check_values_without_model(values: dict[str, Any]) -> str | None:
    """A device without a model may report any scalar values."""
    for key, value in values.items():
        if not isinstance(value, str | bool) and not finite_number(value):
            return f"{key}: expected a number (within a float's range), boolean or string"
    return None


def load_model_file(path: Path) -> Model:
    """Read a model from a .json or .toml file; raise RegistryError with the file name on any problem."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RegistryError(f"cannot read model file {path}: {exc.strerror}") from exc
    try:
        body = wire.loads_toml(text) if path.suffix == ".toml" else wire.loads(text)
    except ValueError as exc:
        raise RegistryError(f"model file {path} is not valid {path.suffix.lstrip('.') or 'json'}: {exc}") from exc
    return Model.from_dict(body)


def settings_of(model: Model | None, meta: dict[str, Any]) -> dict[str, Resource]:
    """What can be set on a device: its model's rw resources, and the controls its board announced in meta."""
    settings = {r.name: r for r in model.resources.values() if r.access == "rw"} if model is not None else {}
    announced = meta.get("controls")
    controls = [dict(c, access="rw") for c in (announced if isinstance(announced, list) else [])
                if isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] not in settings]
    if controls:  # a board that describes its controls badly: it judges its own desired state
        with contextlib.suppress(RegistryError):
            settings.update(Model.from_dict({"resources": controls}, name="controls").resources)
    return settings


def check_desired(settings: dict[str, Resource], patch: dict[str, Any]) -> str | None:
    """None if every desired value is a setting the device has and fits it (null removes a key), else why not.
    A device that has told nothing of its settings yet is not judged here: the board judges."""
    if not settings:
        return None
    for key, value in patch.items():
        if value is None:
            continue
        setting = settings.get(key)
        if setting is None:
            return f"{key}: not a setting of this device (it has {', '.join(sorted(settings))})"
        reason = setting.check(value)
        if reason:
            return reason
    return None
