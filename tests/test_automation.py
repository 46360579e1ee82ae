"""Automation against the real daemon: rules on committed readings set desired state and raise alerts, notifications
reach a real local HTTP receiver through apprise exactly once (target down, kill -9), schedules and missed runs."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgetrio.tools.testkit import Daemon, Probe, Receiver, Relay, free_port, telemetry, wait_until


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def rule_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GREENHOUSE = """
[[rule]]
name = "greenhouse-hot"
devices = ["{device}"]
when = "temperature > 30"
clear = "temperature < 28"
for = "{hold}"
cooldown = "1s"
severity = "critical"
notify = ["{url}"]
actions = [{{ set = {{ led = true }} }}]
on_clear = [{{ set = {{ led = false }} }}]
"""


def desired(probe: Probe, device: str, timeout: float = 15) -> dict[str, Any]:
    """The next desired state the device is told that is not its current (empty) one, sent when it connects."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = probe.next_json(f"edgetrio/{device}/twin/desired", max(0.1, deadline - time.monotonic()))
        if body["state"] or time.monotonic() > deadline:
            return body


def test_rule_fires_sets_desired_state_notifies_and_resolves(daemon: Daemon, device: Any, receiver: Receiver,
                                                             tmp_path: Path) -> None:
    device_id, _, probe = device()
    rules = rule_file(tmp_path / "rules.toml", GREENHOUSE.format(device=device_id, hold="2s", url=receiver.url))
    assert "added greenhouse-hot" in daemon.cli("rule", "add", str(rules)).stdout
    topic = f"edgetrio/{device_id}/telemetry"
    probe.publish(topic, telemetry(1, ts=time.time(), temperature=35.0))
    wait_until(lambda: [a["state"] for a in daemon.alerts()] == ["pending"], timeout=10)
    assert receiver.posts == []  # pending is not yet worth a message
    time.sleep(2.1)
    probe.publish(topic, telemetry(2, ts=time.time(), temperature=35.5))
    assert desired(probe, device_id)["state"] == {"led": True}
    wait_until(lambda: len(receiver.posts) == 1, timeout=15)
    assert receiver.posts[0]["title"] == f"[FIRING] greenhouse-hot on {device_id} (critical)"
    assert "temperature=35.5" in receiver.posts[0]["message"] and receiver.posts[0]["type"] == "failure"
    [alert] = daemon.alerts()
    assert alert["state"] == "firing" and alert["severity"] == "critical" and alert["values"] == {"temperature": 35.5}
    assert daemon.status()["daemon"]["automation"]["firing"] == 1
    assert "1 rules, 0 schedules, 1 firing" in daemon.cli("status").stdout
    # hysteresis: 29 is neither hot nor clear
    probe.publish(topic, telemetry(3, ts=time.time(), temperature=29.0))
    probe.publish(topic, telemetry(4, ts=time.time(), temperature=25.0))
    assert probe.next_json(f"edgetrio/{device_id}/twin/desired")["state"] == {"led": False}
    wait_until(lambda: len(receiver.posts) == 2, timeout=15)
    assert receiver.posts[1]["title"].startswith("[RESOLVED]") and receiver.posts[1]["type"] == "success"
    assert daemon.alerts() != [] and daemon.alerts()[0]["state"] == "resolved"  # resolved, not yet acknowledged
    alert_id = str(daemon.alerts()[0]["id"])
    assert "acknowledged" in daemon.cli("alerts", "ack", alert_id).stdout
    assert daemon.alerts() == [] and daemon.alerts("--all")[0]["acked"]
    events = [h["event"] for h in json.loads(daemon.cli("rule", "history", "greenhouse-hot", "--json").stdout)]
    assert events == ["added", "pending", "firing", "action_ok", "resolved", "action_ok"]
    assert "no alert 99999" in daemon.cli("alerts", "ack", "99999", check=False).stderr
    # dry run: what would fire, without the daemon doing anything
    out = daemon.cli("rule", "test", str(rules), "--device", device_id, "--values", "temperature=31").stdout
    assert "greenhouse-hot: fires after holding 2 s (critical); set {\"led\":true} on the device" in out
    assert "does not fire" in daemon.cli("rule", "test", str(rules), "--device", device_id, "--values",
                                         "temperature=20").stdout
    assert "removed" in daemon.cli("rule", "remove", "greenhouse-hot").stdout
    # a removed rule judges nothing: a hot reading, then a frosty one for a canary rule; readings are judged in
    # order, so once the canary fires the hot reading has been judged too (no fixed sleep that passes vacuously)
    daemon.cli("rule", "add", str(rule_file(daemon.data_dir.parent / "canary.toml",
                                            f'[[rule]]\nname = "canary"\ndevices = ["{device_id}"]\n'
                                            'when = "temperature < -30"\n')))
    probe.publish(topic, telemetry(5, ts=time.time(), temperature=40.0))
    probe.publish(topic, telemetry(6, ts=time.time(), temperature=-35.0))
    wait_until(lambda: [a["rule"] for a in daemon.alerts()] == ["canary"], timeout=30)
    daemon.cli("rule", "remove", "canary")


def test_bad_rule_files_are_refused_with_one_line(daemon: Daemon, device: Any, tmp_path: Path) -> None:
    device_id, _, _ = device()
    model = tmp_path / "env.json"
    model.write_text(json.dumps({"name": "env-rules", "resources": [{"name": "temperature", "type": "float"}]}))
    daemon.cli("model", "add", str(model))
    typed, _, _ = device(model="env-rules")
    cases = {
        "when = \"temperature >\"": "syntax error at the end",
        "when = \"humidity > 3\"": "unknown resource 'humidity' for model 'env-rules'",
        "when = \"temperature > 'hot'\"": "data type mismatch",
    }
    for line, message in cases.items():
        bad = rule_file(tmp_path / "bad.toml", f'[[rule]]\nname = "r"\ndevices = ["{typed}"]\n{line}\n')
        out = daemon.cli("rule", "add", str(bad), check=False)
        assert out.returncode != 0 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    bad = rule_file(tmp_path / "bad.toml", f'[[schedule]]\nname = "s"\ndevices = ["{device_id}"]\ncron = "99 * * * *"\n'
                                           'actions = [{ set = { led = true } }]\n')
    out = daemon.cli("rule", "add", str(bad), check=False)
    assert out.returncode == 2 and "is not a cron expression" in out.stderr
    bad = rule_file(tmp_path / "bad.toml", f'[[rule]]\nname = "r"\ndevices = ["{device_id}"]\nwhen = "t > 1"\n'
                                           'notify = ["telepathy://me"]\n')
    out = daemon.cli("rule", "add", str(bad), check=False)
    assert out.returncode == 2 and "apprise" in out.stderr
    assert json.loads(daemon.cli("rule", "list", "--json").stdout) == []


def test_notification_survives_a_down_target_and_kill_9_exactly_once(tmp_path: Path) -> None:
    port = free_port()  # the receiver is not there yet: the notification waits in the outbox
    gw = Daemon(tmp_path / "data").start()
    try:
        password = gw.add_device("gh-kill")
        rules = rule_file(tmp_path / "rules.toml",
                          GREENHOUSE.format(device="gh-kill", hold="0s", url=f"json://127.0.0.1:{port}/hook"))
        gw.cli("rule", "add", str(rules))
        probe = Probe(gw, "gh-kill", password, "gh-kill")
        assert probe.accepted()
        probe.publish("edgetrio/gh-kill/telemetry", telemetry(1, ts=time.time(), temperature=35.0))
        db = tmp_path / "data" / "edgetrio.db"

        def attempts() -> int:
            with sqlite3.connect(db) as conn:
                row = conn.execute("SELECT attempts, sent FROM notifications").fetchone()
            return int(row[0]) if row and row[1] is None else 0

        wait_until(lambda: attempts() >= 1, timeout=15)
        probe.close()
        gw.stop(signal.SIGKILL)
        receiver = Receiver(port)
        try:
            gw = Daemon(tmp_path / "data").start()
            wait_until(lambda: len(receiver.posts) == 1, timeout=20)

            def marked_sent() -> bool:  # once marked sent it is never sent again: no repeat can follow
                with sqlite3.connect(db) as conn:
                    return [row[0] is not None for row in conn.execute("SELECT sent FROM notifications")] == [True]
            wait_until(marked_sent, timeout=20)
            assert len(receiver.posts) == 1 and receiver.posts[0]["title"].startswith("[FIRING] greenhouse-hot")
            assert gw.alerts()[0]["state"] == "firing"  # and the rule still knows it fired: it resolves it
            probe = Probe(gw, "gh-kill", password, "gh-kill")
            assert probe.accepted()
            probe.publish("edgetrio/gh-kill/telemetry", telemetry(2, ts=time.time(), temperature=20.0))
            wait_until(lambda: len(receiver.posts) == 2, timeout=15)
            assert [p["title"].split("]")[0] for p in receiver.posts] == ["[FIRING", "[RESOLVED"]  # no repeat between
            probe.close()
        finally:
            receiver.close()
    finally:
        gw.stop()


def test_schedules_run_and_missed_runs_follow_their_policy(tmp_path: Path) -> None:
    gw = Daemon(tmp_path / "data").start()
    try:
        password = gw.add_device("gh-sched")
        probe = Probe(gw, "gh-sched", password, "gh-sched")
        assert probe.accepted() and probe.subscribe("edgetrio/gh-sched/twin/desired")
        schedules = rule_file(tmp_path / "schedules.toml", """
[[schedule]]
name = "blink"
devices = ["gh-*"]
every = "2s"
actions = [{ set = { period = 7 } }]

[[schedule]]
name = "catch-up"
devices = ["gh-sched"]
every = "1h"
missed = "run_once"
actions = [{ set = { led = true } }]

[[schedule]]
name = "no-catch-up"
devices = ["gh-sched"]
cron = "0 * * * *"
missed = "skip"
actions = [{ set = { label = "skipped" } }]
""")
        gw.cli("rule", "add", str(schedules))
        assert desired(probe, "gh-sched")["state"] == {"period": 7}
        probe.close()
        gw.stop()
        # the daemon was down for three hours (as far as the schedules can tell)
        with sqlite3.connect(tmp_path / "data" / "edgetrio.db") as conn:
            conn.execute("DELETE FROM schedule_runs")
            conn.executemany("INSERT INTO schedule_runs VALUES (?, ?)",
                             [("catch-up", time.time() - 3 * 3600), ("no-catch-up", time.time() - 3 * 3600),
                              ("blink", time.time() + 3600)])
        # added while no daemon runs: what needs the daemon's config is checked when it loads the rule
        orphan = rule_file(tmp_path / "orphan.toml", '[[rule]]\nname = "orphan"\ndevices = ["gh-*"]\n'
                                                     'when = "temperature > 30"\nactions = [{ export = "nowhere" }]\n')
        assert "added orphan" in gw.cli("rule", "add", str(orphan)).stdout
        gw = Daemon(tmp_path / "data").start()
        listed = {r["name"]: r for r in json.loads(gw.cli("rule", "list", "--json").stdout)}
        assert "no such sink" in listed["orphan"]["problem"] and listed["blink"]["problem"] is None
        assert "left out by the daemon: rule 'orphan': export to 'nowhere'" in gw.cli("rule", "list").stdout
        probe = Probe(gw, "gh-sched", password, "gh-sched")
        assert probe.accepted()
        wait_until(lambda: any(h["event"] == "run" for h in json.loads(
            gw.cli("rule", "history", "catch-up", "--json").stdout)[1:]), timeout=10)
        history = json.loads(gw.cli("rule", "history", "no-catch-up", "--json").stdout)
        assert [h["event"] for h in history] == ["added", "missed"] and "skipped" in history[-1]["detail"]
        twin = json.loads(gw.cli("twin", "get", "gh-sched", "--json").stdout)
        assert twin["desired"]["state"] == {"period": 7, "led": True}  # caught up once; the skipped one did not run
        probe.close()
    finally:
        gw.stop()


def test_an_action_that_fails_is_noted_and_retried_and_never_holds_up_ingest(daemon: Daemon, device: Any,
                                                                            tmp_path: Path) -> None:
    device_id, _, probe = device()
    vent = f"{device_id}-vent"
    daemon.add_device(vent)  # registered, never connected: a command to it fails (offline)
    rules = rule_file(tmp_path / "rules.toml", f"""
[[rule]]
name = "vent-open"
devices = ["{device_id}"]
when = "temperature > 30"
actions = [{{ command = "open", device = "{vent}", timeout = "1s", retries = 1 }}, {{ set = {{ led = true }} }}]
""")
    daemon.cli("rule", "add", str(rules))
    topic = f"edgetrio/{device_id}/telemetry"
    probe.publish(topic, telemetry(1, ts=time.time(), temperature=35.0))
    for seq in range(2, 6):  # ingest goes on while the action waits and retries
        probe.publish(topic, telemetry(seq, ts=time.time(), temperature=36.0))
    while probe.next_json(f"edgetrio/{device_id}/ack")["seq"] != 5:
        pass

    def events() -> list[tuple[str, str]]:
        rows = json.loads(daemon.cli("rule", "history", "vent-open", "--json").stdout)
        return [(r["event"], r["detail"]) for r in rows]

    wait_until(lambda: [e for e, _ in events()].count("action_ok") == 1, timeout=20)
    failed = [detail for event, detail in events() if event == "action_failed"]
    assert len(failed) == 2 and "is not connected (try 1)" in failed[0] and "(try 2)" in failed[1]
    assert desired(probe, device_id)["state"] == {"led": True}  # the next action ran after the failed one
    daemon.cli("rule", "remove", "vent-open")


def test_a_flapping_sensor_on_a_rule_without_cooldown_cannot_flood_notifications(daemon: Daemon, device: Any,
                                                                                 receiver: Receiver,
                                                                                 tmp_path: Path) -> None:
    device_id, _, probe = device()
    rules = rule_file(tmp_path / "rules.toml", f"""
[[rule]]
name = "flappy"
devices = ["{device_id}"]
when = "temperature > 30"
cooldown = 0
notify = ["{receiver.url}"]
""")
    daemon.cli("rule", "add", str(rules))
    topic = f"edgetrio/{device_id}/telemetry"
    for seq in range(1, 201):  # hot, cool, hot, cool ... as fast as it can
        probe.publish(topic, telemetry(seq, ts=time.time(), temperature=35.0 if seq % 2 else 20.0))
    while probe.next_json(f"edgetrio/{device_id}/ack")["seq"] != 200:
        pass
    def events(name: str) -> list[dict[str, Any]]:
        rows = json.loads(daemon.cli("rule", "history", "flappy", "--limit", "1000", "--json").stdout)
        return [h for h in rows if h["event"] == name]

    wait_until(lambda: len(events("resolved")) == 100, timeout=30)  # every alert is recorded

    def outbox() -> tuple[int, int]:  # notifications queued, and those of them not sent yet
        with sqlite3.connect(f"file:{daemon.data_dir / 'edgetrio.db'}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*), count(*) - count(sent) FROM notifications n JOIN alerts a "
                              "ON a.id = n.alert WHERE a.rule = 'flappy'").fetchone()
    wait_until(lambda: outbox() == (20, 0), timeout=30)  # what was queued is sent: nothing more can come
    # ten firings and their ten resolves notified; the other 90 alerts are recorded, their notifications held back
    assert len(receiver.posts) == 20
    assert sum(p["title"].startswith("[FIRING]") for p in receiver.posts) == 10
    held = events("notify_held")
    assert len(held) == 180 and "over 10 notifications in 600 s" in held[0]["detail"]
    daemon.cli("rule", "remove", "flappy")


def test_retention_deletes_old_acknowledged_alerts_and_sent_notifications_only(tmp_path: Path) -> None:
    from edgetrio.daemon import store

    db = store.open_db(tmp_path)
    old, now = time.time() - 100 * 86400, time.time()
    for state, acked in (("resolved", old), ("resolved", None), ("firing", None)):
        db.table("alerts").insert({"rule": "r", "device": "d", "severity": "warning", "state": state, "values_": "{}",
                                   "started": old, "fired": old, "resolved": old if state == "resolved" else None,
                                   "acked": acked})
    for sent in (old, None):
        db.table("notifications").insert({"alert": 1, "url": "json://x", "kind": "firing", "title": "t", "body": "b",
                                          "created": old, "attempts": 1, "next_try": old, "sent": sent})
    db.conn.commit()
    while store.prune(db, now - 90 * 86400):
        pass
    assert [(r["state"], r["acked"]) for r in db.query("SELECT state, acked FROM alerts")] == [
        ("resolved", None), ("firing", None)]  # what nobody acknowledged yet, and what is still open, stay
    assert [r["sent"] for r in db.query("SELECT sent FROM notifications")] == [None]  # not yet sent: stays


def test_numbers_no_float_holds_are_refused_and_the_rules_go_on(daemon: Daemon, device: Any, tmp_path: Path) -> None:
    device_id, _, probe = device()  # no model: any scalar values, but numbers must be numbers a float can hold
    rules = rule_file(tmp_path / "rules.toml", f'[[rule]]\nname = "big"\ndevices = ["{device_id}"]\n'
                                               'when = "avg_t > 30"\nwindow = 5\n')
    daemon.cli("rule", "add", str(rules))
    topic = f"edgetrio/{device_id}/telemetry"
    # JSON reads 1e999 as inf and a 400-digit integer as an int no float can hold: a sum of them fails
    probe.publish(topic, '{"boot": 1, "seq": 1, "values": {"t": 1' + "0" * 400 + "}}")
    probe.publish(topic, '{"boot": 1, "seq": 2, "values": {"t": 1e999}}')
    probe.publish(topic, telemetry(3, ts=time.time(), t=40.0))
    while probe.next_json(f"edgetrio/{device_id}/ack")["seq"] != 3:
        pass
    refused = json.loads(daemon.cli("rejects", "--device", device_id, "--json").stdout)
    assert sorted(r["seq"] for r in refused if r["reason"] == "invalid_value") == [1, 2]
    wait_until(lambda: [a["state"] for a in daemon.alerts() if a["rule"] == "big"] == ["firing"], timeout=15)
    daemon.cli("rule", "remove", "big")


def test_a_relay_set_up_anew_still_sends_rule_sets_the_edge_takes_as_newer(tmp_path: Path) -> None:
    """A gateway linked to a relay takes its rule sets; the relay is installed again from scratch (its versions start
    over) and the gateway linked to it: the new relay's first set still replaces what the old one sent."""
    gw = Daemon(tmp_path / "gw")
    gw.data_dir.mkdir()
    gw.add_device("d1")
    for relay_dir, rule, gone in (("old", "first", None), ("new", "second", "first")):
        relay = Relay(tmp_path / relay_dir).start()
        gw.extra = ("--cloud", relay.url, "--node-id", "gw1", "--token", relay.add_node("gw1"))
        gw.start()
        try:
            rules = rule_file(tmp_path / f"{rule}.toml", f'[[rule]]\nname = "{rule}"\ndevices = ["d1"]\n'
                                                         'when = "temperature > 99"\n')
            relay.cli("rules", "apply", "gw1", str(rules))  # as an operator does
            shown = wait_until(lambda r=relay: (out := r.cli("rules", "show", "gw1").stdout) and "(applied" in out
                               and out, timeout=60)
            assert f"rule {rule}:" in shown, shown
            listed = gw.cli("rule", "list").stdout
            assert rule in listed and (gone is None or gone not in listed), listed
        finally:
            gw.stop()
            relay.stop()


def test_an_alert_raised_before_the_cloud_link_existed_reaches_the_relay(tmp_path: Path) -> None:
    gw = Daemon(tmp_path / "gw")
    gw.data_dir.mkdir()
    gw.start()
    relay = None
    try:
        password = gw.add_device("hot-1")
        probe = Probe(gw, "hot-1", password, "hot-1")
        assert probe.accepted() and probe.subscribe("edgetrio/hot-1/ack")
        gw.cli("rule", "add", str(rule_file(tmp_path / "hot.toml", '[[rule]]\nname = "hot"\ndevices = ["hot-1"]\n'
                                                                   'when = "temperature > 30"\n')))
        probe.publish("edgetrio/hot-1/telemetry", telemetry(1, ts=time.time(), temperature=35.0))
        wait_until(lambda: [(a["rule"], a["state"]) for a in gw.alerts()] == [("hot", "firing")], timeout=30)
        probe.close()
        gw.stop()
        relay = Relay(tmp_path / "relay").start()
        token = relay.add_node("gw1")
        gw.extra = ("--cloud", relay.url, "--node-id", "gw1", "--token", token)
        gw.start()  # linked for the first time: its first sync carries the alert that is still open
        in_cloud = wait_until(lambda: relay.json("alerts"), timeout=30)
        assert [(a["node"], a["rule"], a["device"], a["state"]) for a in in_cloud] == [("gw1", "hot", "hot-1", "firing")]
    finally:
        gw.stop()
        if relay is not None:
            relay.stop()


@pytest.fixture
def linked(tmp_path: Path) -> Iterator[tuple[Relay, Daemon]]:
    """A relay and a gateway linked to it as node gw1."""
    relay = Relay(tmp_path / "relay").start()
    token = relay.add_node("gw1")
    gw = Daemon(tmp_path / "gw", extra=("--cloud", relay.url, "--node-id", "gw1", "--token", token))
    gw.data_dir.mkdir()
    gw.start()
    try:
        yield relay, gw
    finally:
        gw.stop()
        relay.stop()


def test_a_fleet_rule_is_applied_to_the_devices_it_can_judge_and_the_relay_says_which_it_skips(
        linked: tuple[Relay, Daemon], tmp_path: Path) -> None:
    relay, gw = linked
    lite = tmp_path / "lite.toml"
    lite.write_text('name = "climate-lite"\n[[resources]]\nname = "temperature"\ntype = "float"\n')
    full = tmp_path / "full.toml"
    full.write_text('name = "climate-full"\n[[resources]]\nname = "temperature"\ntype = "float"\n'
                    '[[resources]]\nname = "humidity"\ntype = "float"\n')
    gw.cli("model", "add", str(lite))
    gw.cli("model", "add", str(full))
    gw.add_device("lite-1", "--model", "climate-lite")
    password = gw.add_device("full-1", "--model", "climate-full")
    rules = rule_file(tmp_path / "fleet.toml", '[[rule]]\nname = "damp"\ndevices = ["*"]\nwhen = "humidity > 40"\n')
    relay.cli("rules", "apply", "gw1", str(rules))  # as an operator does, through the relay, to the linked edge
    shown = wait_until(lambda: (out := relay.cli("rules", "show", "gw1").stdout) and "(applied" in out and out,
                       timeout=30)
    assert "(applied in part)" in shown, shown
    assert "devices of model 'climate-lite' skipped" in shown and "unknown resource 'humidity'" in shown, shown
    listed = gw.cli("rule", "list").stdout
    assert "applied in part" in listed and "left out" not in listed, listed
    # ... and it judges the device it can: a damp reading fires it
    probe = Probe(gw, "full-1", password, "full-1")
    assert probe.accepted()
    probe.publish("edgetrio/full-1/telemetry", telemetry(1, ts=time.time(), temperature=20.0, humidity=55.0))
    wait_until(lambda: [(a["rule"], a["device"]) for a in gw.alerts()] == [("damp", "full-1")], timeout=30)
    probe.close()


def test_a_pending_alert_shows_at_the_relay_and_goes_when_it_does_not_hold(linked: tuple[Relay, Daemon],
                                                                           tmp_path: Path) -> None:
    relay, gw = linked
    password = gw.add_device("slow-1")
    gw.cli("rule", "add", str(rule_file(tmp_path / "slow.toml", '[[rule]]\nname = "slow"\ndevices = ["slow-1"]\n'
                                                                'when = "temperature > 30"\nfor = "1h"\n')))
    probe = Probe(gw, "slow-1", password, "slow-1")
    assert probe.accepted()
    probe.publish("edgetrio/slow-1/telemetry", telemetry(1, ts=time.time(), temperature=35.0))
    wait_until(lambda: [(a["rule"], a["state"]) for a in relay.json("alerts")] == [("slow", "pending")], timeout=30)
    probe.publish("edgetrio/slow-1/telemetry", telemetry(2, ts=time.time(), temperature=20.0))  # it did not hold
    wait_until(lambda: gw.alerts() == [] and relay.json("alerts", "--all") == [], timeout=30)
    probe.close()
