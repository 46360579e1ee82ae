"""Device twin rules: desired and reported state with versions, the delta, and version conflicts (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


class VersionConflict(Exception):
    """A desired change was based on a version that is no longer current (HTTP 409 in spirit)."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"version conflict: change was based on version {expected}, current desired version is {current}")
        self.expected = expected
        self.current = current


@dataclass(frozen=True)
class Twin:
    """A device's desired and reported state, each versioned, and the delta between them."""

    desired: dict[str, Any] = field(default_factory=dict)
    desired_version: int = 0
    reported: dict[str, Any] = field(default_factory=dict)
    reported_version: int = 0

    @property
    def delta(self) -> dict[str, Any]:
        """Desired keys whose value differs from what the device reported."""
        return {k: v for k, v in self.desired.items() if k not in self.reported or self.reported[k] != v}

    def as_json(self) -> dict[str, Any]:
        return {
            "desired": {"state": self.desired, "version": self.desired_version},
            "reported": {"state": self.reported, "version": self.reported_version},
            "delta": self.delta,
        }

    def desired_message(self) -> dict[str, Any]:
        """What goes to the device on `twin/desired`."""
        return {"state": self.desired, "version": self.desired_version}


def merge(state: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Shallow merge; a null value removes the key."""
    out = dict(state)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def set_desired(twin: Twin, patch: dict[str, Any], based_on: int | None = None) -> Twin:
    """Apply a desired change. `based_on` is the version the writer saw; a stale one raises VersionConflict."""
    if based_on is not None and based_on != twin.desired_version:
        raise VersionConflict(based_on, twin.desired_version)
    return replace(twin, desired=merge(twin.desired, patch), desired_version=twin.desired_version + 1)


def set_reported(twin: Twin, patch: dict[str, Any]) -> Twin:
    return replace(twin, reported=merge(twin.reported, patch), reported_version=twin.reported_version + 1)
