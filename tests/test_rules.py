"""Pure rules: twin merge and versions, topic space, telemetry parsing, watermark, models, credentials."""

from __future__ import annotations

import pytest

from edgetrio.daemon.topics import (
    Rejected,
    advance_watermark,
    in_device_space,
    parse_telemetry,
    parse_topic,
    topic_matches,
)
from edgetrio.identity import RegistryError, check_device_id, hash_secret, verify_secret
from edgetrio.models import Model
from edgetrio.twin import Twin, VersionConflict, set_desired, set_reported


def test_twin_delta_and_versions() -> None:
    twin = set_desired(Twin(), {"period": 10, "led": True})
    twin = set_reported(twin, {"period": 10, "led": False, "extra": 1})
    assert twin.delta == {"led": True}
    twin = set_desired(twin, {"led": None}, based_on=1)
    assert twin.desired == {"period": 10} and twin.desired_version == 2 and twin.delta == {}
    with pytest.raises(VersionConflict) as info:
        set_desired(twin, {"period": 5}, based_on=1)
    assert info.value.current == 2


def test_topic_space() -> None:
    assert parse_topic("edgetrio/dev-1/twin/reported") == ("dev-1", "twin/reported")
    assert parse_topic("edgetrio//telemetry") is None and parse_topic("other/dev/telemetry") is None
    assert in_device_space("a", "edgetrio/a/#") and not in_device_space("a", "edgetrio/ab/x")
    assert not in_device_space("a", "edgetrio/a/") and not in_device_space("a", "edgetrio/+/x")
    assert topic_matches("edgetrio/a/#", "edgetrio/a/twin/desired")
    assert topic_matches("edgetrio/+/twin/desired", "edgetrio/a/twin/desired")
    assert not topic_matches("edgetrio/a/cmd", "edgetrio/a/twin/desired")


@pytest.mark.parametrize("payload, reason", [
    (b"\xff\xfe", "malformed_json"),
    (b"[]", "malformed_json"),
    (b'{"boot": -1, "seq": 1, "values": {"t": 1}}', "bad_envelope"),
    (b'{"boot": 1, "seq": true, "values": {"t": 1}}', "bad_envelope"),
    (b'{"boot": 1, "seq": 1, "values": {}}', "bad_envelope"),
    (b'{"boot": 1, "seq": 1, "ts": "noon", "values": {"t": 1}}', "bad_envelope"),
])
def test_telemetry_envelope_errors(payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_telemetry("d", payload, 1_764_000_000.0)
    assert info.value.reason == reason


def test_watermark_stops_at_the_first_gap() -> None:
    assert advance_watermark(0, [1, 2, 3, 5]) == 3
    assert advance_watermark(3, [2, 3, 4]) == 4
    assert advance_watermark(0, [2, 3]) == 0


def test_model_checks_types_and_ranges() -> None:
    model = Model.from_dict({"name": "m", "resources": [
        {"name": "t", "type": "DOUBLE", "min": -40, "max": 85},
        {"name": "n", "type": "int"}, {"name": "on", "type": "boolean"}, {"name": "s", "type": "string"}]})
    assert model.check_values({"t": 21, "n": 3, "on": False, "s": "x"}) is None
    assert "expected int" in (model.check_values({"n": True}) or "")
    assert "expected float" in (model.check_values({"t": float("nan")}) or "")
    assert "below minimum" in (model.check_values({"t": -41}) or "")
    assert "not a resource" in (model.check_values({"x": 1}) or "")
    with pytest.raises(RegistryError):
        Model.from_dict({"name": "m", "resources": [{"name": "t", "type": "float", "access": "sometimes"}]})


def test_credentials() -> None:
    stored = hash_secret("s3cret")
    assert verify_secret("s3cret", stored) and verify_secret(b"s3cret", stored)
    assert not verify_secret("s3cret!", stored) and not verify_secret(None, stored) and not verify_secret("x", "junk")
    assert hash_secret("s3cret") != stored  # salted
    for bad in ("", "a/b", "+", "#", "edgetrio-admin", "x" * 65, "-lead"):
        with pytest.raises(RegistryError):
            check_device_id(bad)


def test_fast_judge_answers_as_the_engine_does() -> None:
    """The closures a condition is turned into give the engine's answer on every reading: numbers of both kinds, NaN,
    infinities, null, bools against numbers, strings, lists (judged by the engine), missing values, windows; and a
    condition with a part they do not cover (arithmetic) is left to the engine."""
    import random

    from edgetrio import rules

    rng = random.Random(7)
    conditions = ["temperature > 60 and humidity < 90", "avg_temperature > 61 or delta_humidity > 50", "not led",
                  "led == true", 'name == "x" or name != "y"', "temperature >= 21.5", "temperature == 21",
                  "temperature <= 21.5 and not (humidity > 40)", "humidity != null", "temperature > 1e308",
                  "temperature < 0.1000000000000000000001", "led != 1", 'name > "a"', "temperature + 1 > 3",
                  "count > 2 and max_temperature < 30", "temperature == null or temperature > -5",
                  "null >= null and not null", "min_humidity <= 1 or count == 0"]
    values = [None, True, False, 0, 1, 21, 21.5, 21.500000001, -3.2, float("nan"), float("inf"), "x", "y", "", [1],
              30, 0.1, 1e308, -5, 2**60]
    fast = 0
    for text in conditions:
        condition = rules.compile_condition("r", "when", text)
        judge = rules.fast_judge(condition)
        fast += judge is not None
        for _ in range(300):
            reading = {k: rng.choice(values) for k in ("temperature", "humidity", "led", "name") if rng.random() < 0.9}
            window = rules.Window(seconds=30, resources=("temperature", "humidity"))
            for i in range(rng.randint(0, 3)):
                window.add(i, {k: rng.choice([1.0, 2.5, 30.0, 1]) for k in ("temperature", "humidity")})
            subject = rules.Subject(reading, window)
            assert rules.holds(condition, subject, judge) == rules.holds(condition, subject), (text, reading)
    assert fast == len(conditions) - 2  # arithmetic, and a literal with more digits than a float keeps


def test_rules_with_the_same_window_share_it_and_take_each_reading_once() -> None:
    """Two rules with the same window keep one window per device (memory), into which each reading goes once: `count`
    says 3 after three readings for both, and each device has its own."""
    from edgetrio import rules

    doc = {"rule": [{"name": "a", "devices": ["*"], "window": "30s", "when": "count >= 3 and avg_t > 1"},
                    {"name": "b", "devices": ["*"], "window": "30s", "when": "count >= 3 and max_h > 1"}],
           "schedule": []}
    engine = rules.Engine(rules.parse_document(doc)[0])
    fired: list[tuple[str, str]] = []
    for i in range(3):
        for device in ("d1", "d2"):
            fired += [(t.rule.name, t.device) for t in engine.evaluate(device, None, 100.0 + i, {"t": 2.0, "h": 2.0})
                      if t.state == "firing"]
    assert sorted(fired) == [("a", "d1"), ("a", "d2"), ("b", "d1"), ("b", "d2")]  # at the third reading, not before
    assert len(engine.windows) == 2 and all(len(w) == 3 for w in engine.windows.values())
    assert engine.tracks[("a", "d1")].window is engine.tracks[("b", "d1")].window
