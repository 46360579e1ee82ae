"""Ingest rules: the device topic space, parsing what devices send, and the ack watermark (pure functions)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edgetrio import wire
from edgetrio.twin import Twin

ROOT = "edgetrio"
# What a device may send; everything else under its root is refused and counted.
DEVICE_CHANNELS = frozenset({"status", "meta", "telemetry", "twin/reported", "cmd/result", "log", "ota/status"})
# Local apps and the CLI talk to the daemon here (admin credential only); outside every device's root.
CONTROL_REQUEST = "edgetrio-api/request"
CONTROL_REPLY_ROOT = "edgetrio-api/reply/"
# Home Assistant: discovery configs under its prefix; entity states and its commands under the gateway's own root
HA_DISCOVERY = "homeassistant"
HA_BIRTH = "homeassistant/status"
HA_ROOT = "edgetrio-ha"


EARLIEST_TRUE_TIME = 1577836800.0  # 2020-01-01: earlier readings come from a board whose clock was never set
MAX_CLOCK_AHEAD = 600.0  # seconds a board's clock may run ahead of the gateway's before its times are not trusted
MAX_TS_MS = 1 << 53  # integers a float holds exactly


class Rejected(Exception):
    """A message that cannot be accepted: `reason` is a short counter name, the message says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Reading:
    device: str
    boot: int
    seq: int
    ts: float | None  # true UTC, or None: stamped with its arrival when committed
    values: dict[str, Any]
    # Lowest seq of this boot the device still buffers: lower ones were dropped on the device (buffer full),
    # so the watermark may pass them instead of waiting forever.
    first: int = 1


def desired_message(device_id: str, twin: Twin) -> tuple[str, bytes]:
    """The message that tells a device its desired state."""
    return device_topic(device_id, "twin/desired"), json.dumps(twin.desired_message()).encode()


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching for one concrete topic."""
    fparts, tparts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(fparts):
        if part == "#":
            return True
        if i >= len(tparts) or (part != "+" and part != tparts[i]):
            return False
    return len(fparts) == len(tparts)


def time_message(device_id: str, now: float) -> tuple[str, bytes]:
    """The gateway's clock for a board that connects (milliseconds as an integer: a board's floats are single)."""
    return device_topic(device_id, "time"), json.dumps({"unix_ms": int(now * 1000)}).encode()


def device_topic(device_id: str, channel: str) -> str:
    return f"{ROOT}/{device_id}/{channel}"


def parse_topic(topic: str) -> tuple[str, str] | None:
    """Split `edgetrio/{device}/{channel}` into (device, channel); None for anything else."""
    parts = topic.split("/", 2)
    if len(parts) != 3 or parts[0] != ROOT or not parts[1]:
        return None
    return parts[1], parts[2]


def in_device_space(device_id: str, topic: str) -> bool:
    """True if a topic or filter lies inside the device's own root (wildcards allowed only below it)."""
    prefix = f"{ROOT}/{device_id}/"
    return topic.startswith(prefix) and len(topic) > len(prefix)


def filter_within(inner: str, outer: str) -> bool:
    """True if every topic the filter `inner` matches is also matched by the filter `outer`."""
    iparts, oparts = inner.split("/"), outer.split("/")
    for i, part in enumerate(oparts):
        if part == "#":
            return True
        if i >= len(iparts) or iparts[i] == "#" or (part != "+" and part != iparts[i]):
            return False
    return len(iparts) == len(oparts)


@dataclass(frozen=True)
class Confinement:
    """What an integration's credential may do: publish on topics its `publish` filters match, subscribe to and
    receive what lies within its `read` filters. Nothing of the devices' own topics."""

    publish: tuple[str, ...]
    read: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return "+" not in topic and "#" not in topic and any(topic_matches(f, topic) for f in self.publish)

    def may_read(self, topic_or_filter: str) -> bool:
        return any(filter_within(topic_or_filter, f) for f in self.read)


INTEGRATIONS = {
    # its birth and will, and the switches, numbers and buttons it offers; it reads discovery and entity states
    "homeassistant": Confinement(publish=(HA_BIRTH, f"{HA_ROOT}/+/set/+", f"{HA_ROOT}/+/press/+"),
                                 read=(f"{HA_DISCOVERY}/#", f"{HA_ROOT}/#")),
}


def parse_object(payload: bytes) -> dict[str, Any]:
    try:
        body = wire.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejected("malformed_json", f"not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise Rejected("malformed_json", "expected a JSON object")
    return body


MAX_COUNTER = wire.MAX_INTEGER  # a larger seq would fail the whole group commit, every device's


def parse_note(payload: bytes) -> Any:
    """A log or status line as the device sent it: JSON when it is, else its text (at most 4 KiB)."""
    try:
        return wire.loads(payload)
    except ValueError:
        return payload[:4096].decode("utf-8", "replace")


def _counter(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
        raise Rejected("bad_envelope", f"'{key}' must be an integer from 0 to {MAX_COUNTER}")
    return value


MAX_BATCH = 100  # readings in one telemetry message


def parse_telemetry(device: str, payload: bytes, now: float) -> Reading:
    """Parse one reading `{"boot", "seq", "ts" or "ts_ms", "values"}`; raise Rejected if the envelope is unusable."""
    return parse_reading(device, parse_object(payload), now)


def parse_batch(device: str, payload: bytes, now: float) -> list[Reading | Rejected]:
    """A telemetry message: one reading, or a batch `{"batch": [reading, ...]}` of one boot (a board catching up
    sends several in one message; the watermark acknowledges them as a whole). Each reading of a batch is parsed on
    its own: a bad one is refused (a Rejected in its place), the others are taken."""
    body = parse_object(payload)
    if "batch" not in body:
        return [parse_reading(device, body, now)]
    batch = body["batch"]
    if not isinstance(batch, list) or not 0 < len(batch) <= MAX_BATCH:
        raise Rejected("bad_envelope", f"'batch' must be a list of 1 to {MAX_BATCH} readings")
    out: list[Reading | Rejected] = []
    for item in batch:
        try:
            if not isinstance(item, dict):
                raise Rejected("bad_envelope", "a reading in a batch must be an object")
            out.append(parse_reading(device, item, now))
        except Rejected as exc:
            out.append(exc)
    boots = {r.boot for r in out if isinstance(r, Reading)}
    if len(boots) > 1:
        raise Rejected("bad_envelope", "a batch carries the readings of one boot")
    return out


def parse_reading(device: str, body: dict[str, Any], now: float) -> Reading:
    """Parse `{"boot", "seq", "ts" or "ts_ms", "values"}`; raise Rejected if the envelope is unusable. A time that
    cannot be true UTC (see `trusted_time`) becomes None: the reading is then stamped with its arrival, and marked."""
    boot = _counter(body, "boot")
    seq = _counter(body, "seq")
    ts = body.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts)):
        raise Rejected("bad_envelope", "'ts' must be a number of seconds")
    ts_ms = body.get("ts_ms")
    if ts_ms is not None:
        if isinstance(ts_ms, bool) or not isinstance(ts_ms, int) or abs(ts_ms) > MAX_TS_MS:
            raise Rejected("bad_envelope", "'ts_ms' must be an integer of milliseconds")
        ts = ts_ms / 1000
    values = body.get("values")
    if not isinstance(values, dict) or not values:
        raise Rejected("bad_envelope", "'values' must be a non-empty object")
    first = _counter(body, "first") if "first" in body else 1
    return Reading(device, boot, seq, trusted_time(float(ts) if ts is not None else None, now), values,
                   min(first, seq))


def trusted_time(ts: float | None, now: float) -> float | None:
    """A reading's time if it can be true UTC, else None (the reading is then stamped with its arrival, and marked).

    A board's clock counts from 2000 until it is set, and one set wrong may run ahead."""
    if ts is None or ts < EARLIEST_TRUE_TIME or ts > now + MAX_CLOCK_AHEAD:
        return None
    return ts


def advance_watermark(watermark: int, seqs: Iterable[int]) -> int:
    """Highest contiguous seq reached from `watermark` through the sorted committed `seqs`."""
    for seq in seqs:
        if seq <= watermark:
            continue
        if seq != watermark + 1:
            break
        watermark = seq
    return watermark
