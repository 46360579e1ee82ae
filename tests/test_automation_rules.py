"""Rules and schedules without I/O: the rule file's checks (one-line errors naming the rule and the position) and the
engine's state machine (for, clear, cooldown, windows)."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from edgetrio.models import Model
from edgetrio.rules import (
    MAX_WINDOW,
    Engine,
    RuleError,
    Subject,
    Window,
    check_notify_urls,
    check_rule,
    parse_document,
    parse_rule,
    read_rule_file,
    resolve,
)

ENV = Model.from_dict({"name": "env", "resources": [
    {"name": "temperature", "type": "float"}, {"name": "humidity", "type": "float"}, {"name": "led", "type": "bool"}]})


def rule(**extra: Any) -> dict[str, Any]:
    return {"name": "hot", "devices": ["gh-*"], "when": "temperature > 30", **extra}


def states(engine: Engine, device: str, *points: tuple[float, float]) -> list[str]:
    out = []
    for at, temperature in points:
        out += [t.state for t in engine.evaluate(device, "env", at, {"temperature": temperature})]
    return out


def error(body: dict[str, Any], models: dict[str, Model | None] | None = None) -> str:
    with pytest.raises(RuleError) as info:
        check_rule(parse_rule(body), models or {})
    text = str(info.value)
    assert "\n" not in text
    return text


def test_bad_rules_are_one_line_errors_naming_the_rule_and_the_position() -> None:
    assert error(rule(when="temperature > 30 oops")) == \
        "rule 'hot': when 'temperature > 30 oops': syntax error at column 18"
    assert "syntax error at the end" in error(rule(when="(temperature > 30"))
    # against the model of the devices it watches: an unknown resource, with where it is and what was meant
    text = error(rule(when="led or humidty > 80"), {"gh-1": ENV})
    assert "unknown resource 'humidty' for model 'env' at column 8" in text and "did you mean 'humidity'" in text
    assert "data type mismatch" in error(rule(when="temperature > 'warm'"), {"gh-1": ENV})
    assert "data type mismatch" in error(rule(clear="led + 1"), {"gh-1": ENV})
    # window aggregates exist only with a window, and only for numbers
    assert "unknown resource 'avg_temperature'" in error(rule(when="avg_temperature > 30"), {"gh-1": ENV})
    check_rule(parse_rule(rule(when="avg_temperature > 30 and delta_humidity < 5", window="5m")), {"gh-1": ENV})
    assert "unknown resource 'avg_led'" in error(rule(when="avg_led > 1", window=10), {"gh-1": ENV})
    assert "unknown model 'nope'" in error({"name": "m", "model": "nope", "when": "x > 1"})
    assert "unknown key 'wehn'" in error({"name": "x", "devices": ["*"], "wehn": "t > 1"})
    assert "not a duration" in error(rule(**{"for": "2 minutes"}))
    assert "severity" in error(rule(severity="panic"))
    assert "has one of 'set'" in error(rule(actions=[{"set": {"led": True}, "command": "reboot"}]))
    assert "say which devices" in error({"name": "x", "when": "t > 1"})
    # a device without a model: conditions are judged at run time, not refused
    check_rule(parse_rule(rule(when="whatever > 3")), {"gh-1": None})


def test_bad_schedules_and_notification_urls() -> None:
    def doc_error(doc: dict[str, Any]) -> str:
        with pytest.raises(RuleError) as info:
            rules, _ = parse_document(doc)
            check_notify_urls(rules)
        return str(info.value)

    sched = {"name": "morning", "devices": ["gh-*"], "actions": [{"set": {"led": True}}]}
    assert "is not a cron expression" in doc_error({"schedule": [{**sched, "cron": "61 * * * *"}]})
    assert "is not a cron expression" in doc_error({"schedule": [{**sched, "cron": "every morning"}]})
    assert "unknown time zone \"Mars/Olympus\"" in doc_error(
        {"schedule": [{**sched, "cron": "30 6 * * *", "timezone": "Mars/Olympus"}]})
    assert "either 'cron'" in doc_error({"schedule": [sched]})
    assert "missed" in doc_error({"schedule": [{**sched, "every": "1h", "missed": "sometimes"}]})
    assert "named twice" in doc_error({"rule": [rule(), rule()]})
    assert "apprise" in doc_error({"rule": [rule(notify=["nonsense://x"])]})
    assert "apprise" in doc_error({"rule": [rule(notify=["not a url"])]})
    rules, _ = parse_document({"rule": [rule(notify=["json://127.0.0.1:9/hook", "ntfys://topic"])]})
    check_notify_urls(rules)


def test_cron_schedules_run_in_their_time_zone() -> None:
    _, [schedule] = parse_document({"schedule": [{"name": "m", "devices": ["gh-1"], "cron": "30 6 * * *",
                                                  "timezone": "Europe/Berlin", "actions": [{"set": {"led": True}}]}]})
    zone = ZoneInfo("Europe/Berlin")
    after = datetime(2026, 7, 1, 12, 0, tzinfo=zone).timestamp()
    assert datetime.fromtimestamp(schedule.next_run(after), zone) == datetime(2026, 7, 2, 6, 30, tzinfo=zone)
    # across the change to winter time: still 06:30 on the wall clock
    after = datetime(2026, 10, 24, 12, 0, tzinfo=zone).timestamp()
    nxt = schedule.next_run(schedule.next_run(after))
    assert datetime.fromtimestamp(nxt, zone) == datetime(2026, 10, 26, 6, 30, tzinfo=zone)


def test_rule_files_in_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "rules.toml"
    toml.write_text('[[rule]]\nname = "hot"\ndevices = ["gh-*"]\nwhen = "temperature > 30"\nfor = "2m"\n'
                    'actions = [{ set = { led = true } }]\n')
    rules, _ = parse_document(read_rule_file(toml))
    assert rules[0].for_seconds == 120 and rules[0].actions[0].set == {"led": True}
    as_json = tmp_path / "rules.json"
    as_json.write_text(json.dumps({"rule": [rule()]}))
    assert parse_document(read_rule_file(as_json))[0][0].name == "hot"
    broken = tmp_path / "broken.toml"
    broken.write_text('[[rule]]\nname = "hot\n')
    with pytest.raises(RuleError, match="not TOML"):
        read_rule_file(broken)
    with pytest.raises(RuleError, match="unknown section 'rules'"):
        (tmp_path / "s.json").write_text(json.dumps({"rules": []}))
        read_rule_file(tmp_path / "s.json")


def test_for_duration_clear_condition_and_cooldown() -> None:
    engine = Engine([parse_rule(rule(**{"for": 60, "clear": "temperature < 28", "cooldown": 300}))])
    # pending at the first hot reading, firing once it held for 60 s, not again while it stays hot
    assert states(engine, "gh-1", (0, 31), (30, 32), (61, 33), (90, 34)) == ["pending", "firing"]
    # hysteresis: 29 is not hot but not clear either
    assert states(engine, "gh-1", (100, 29), (110, 27.5)) == ["resolved"]
    # the cooldown: hot again soon after is not a new alert; after the cooldown it is
    assert states(engine, "gh-1", (200, 35), (300, 35), (420, 35), (481, 35)) == ["pending", "firing"]
    # a dip below the threshold while pending starts the wait over
    assert states(engine, "gh-2", (0, 31), (50, 25), (70, 31), (120, 31), (131, 31)) == \
        ["pending", "cancelled", "pending", "firing"]
    # other devices and readings without the value leave it alone
    assert engine.evaluate("other", "env", 0, {"temperature": 99}) == []
    assert engine.evaluate("gh-3", "env", 0, {"humidity": 99}) == []


def test_flapping_sensor_fires_once_per_cooldown() -> None:
    engine = Engine([parse_rule(rule(cooldown="10m"))])
    flapping = [(float(i), 35.0 if i % 2 else 20.0) for i in range(1200)]  # 20 minutes, hot every other second
    fired = [s for s in states(engine, "gh-1", *flapping) if s == "firing"]
    assert len(fired) == 2


def test_window_aggregates() -> None:
    engine = Engine([parse_rule(rule(when="avg_temperature > 30 and count >= 3", window="60s")),
                     parse_rule({"name": "rising", "devices": ["gh-*"], "when": "delta_temperature >= 5",
                                 "window": 3})])
    fired = []
    for at, temperature in [(0, 20), (10, 40), (20, 35), (100, 31), (110, 26), (120, 40)]:
        fired += [(t.rule.name, t.state, at) for t in engine.evaluate("gh-1", "env", at, {"temperature": temperature})]
    # avg over 60 s with 3 readings: fires at 20 (20, 40, 35); at 100 the window holds 31 alone: resolved.
    # rising over the last 3 readings: 20 -> 40 fires at 10; 40, 35, 31 resolves at 100. At 120 both would hold
    # again, within their cooldown (60 s by default): quiet.
    assert fired == [("rising", "firing", 10), ("hot", "firing", 20), ("hot", "resolved", 100),
                     ("rising", "resolved", 100)]


def test_window_aggregates_match_a_plain_recount() -> None:
    rng = random.Random(7)
    for seconds, readings in ((30.0, None), (None, 25), (10.0, 5)):
        window, kept = Window(seconds, readings), []
        at = 0.0
        for _ in range(3000):
            at += rng.choice((0.1, 0.5, 2.0, 7.0))
            values: dict[str, Any] = {"t": round(rng.uniform(-10, 40), 2), "ok": rng.random() < 0.5}
            if rng.random() < 0.3:
                del values["t"]  # readings without the resource count, but not in its aggregates
            window.add(at, values)
            kept.append((at, values))
            if seconds:
                kept = [(t, v) for t, v in kept if t >= at - seconds]
            kept = kept[-(readings or MAX_WINDOW):]
            numbers = [v["t"] for _, v in kept if "t" in v]
            subject = Subject(values, window)
            assert len(window) == len(kept)
            if numbers:
                for kind, expected in (("avg", sum(numbers) / len(numbers)), ("min", min(numbers)),
                                       ("max", max(numbers)), ("delta", numbers[-1] - numbers[0])):
                    assert abs(resolve(subject, f"{kind}_t") - expected) < 1e-6
            assert "ok" not in window.series  # booleans are not aggregated


def test_conditions_and_files_nested_too_deep_are_one_line_errors(tmp_path: Path) -> None:
    assert error(rule(when="not " * 490 + "led")) == "rule 'hot': when is nested too deep"
    deep = tmp_path / "deep.json"
    deep.write_text('{"rule": [{"name": "x", "devices": ["*"], "when": "t > 1", "actions": [{"set": '
                    + '{"a": ' * 5000 + "1" + "}" * 5000 + "}]}]}")
    with pytest.raises(RuleError, match=r"JSON nested \d+ levels deep \(limit 32\)"):
        read_rule_file(deep)
    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RuleError, match="too deep"):
        read_rule_file(deep_toml)
