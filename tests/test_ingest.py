"""Durable ingest against the real daemon: exactly-once storage, the ack watermark, and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgetrio.tools.testkit import Daemon, telemetry, wait_until

T0 = 1_700_000_000  # the readings' own clock, fixed, so a test can check the time stored


def test_resent_telemetry_is_stored_once(daemon: Daemon, device: Any) -> None:
    device_id, _, probe = device()
    ack = f"edgetrio/{device_id}/ack"
    for _ in range(3):
        for seq in (1, 2, 3):
            probe.publish(f"edgetrio/{device_id}/telemetry", telemetry(seq, boot=4, ts=T0 + seq, t=20.0 + seq))
        # every resend is acknowledged again, so a device that missed an ack is not stuck
        while probe.next_json(ack) != {"boot": 4, "seq": 3}:
            pass
    stored = daemon.readings(device_id)
    assert [(r["boot"], r["seq"]) for r in stored] == [(4, 1), (4, 2), (4, 3)]
    assert stored[0]["values"] == {"t": 21.0} and stored[0]["ts"] == 1_700_000_001


def test_ack_is_the_highest_contiguous_committed_seq_of_the_boot(daemon: Daemon, device: Any) -> None:
    device_id, _, probe = device()
    topic, ack = f"edgetrio/{device_id}/telemetry", f"edgetrio/{device_id}/ack"
    probe.publish(topic, telemetry(1, boot=9, ts=T0 + 1, t=21.0))
    assert probe.next_json(ack) == {"boot": 9, "seq": 1}
    probe.publish(topic, telemetry(3, boot=9, ts=T0 + 3, t=23.0))  # seq 2 is missing: 3 is stored but not acknowledged
    assert probe.next_json(ack) == {"boot": 9, "seq": 1}
    probe.publish(topic, telemetry(4, boot=9, ts=T0 + 4, t=24.0))
    assert probe.next_json(ack) == {"boot": 9, "seq": 1}
    probe.publish(topic, telemetry(2, boot=9, ts=T0 + 2, t=22.0))
    assert probe.next_json(ack) == {"boot": 9, "seq": 4}
    # each boot has its own sequence
    probe.publish(topic, telemetry(1, boot=10, ts=T0 + 1, t=21.0))
    assert probe.next_json(ack) == {"boot": 10, "seq": 1}
    # a device that dropped its oldest readings (buffer full) says so with "first"; the watermark passes the gap
    probe.publish(topic, json.dumps({"boot": 11, "seq": 7, "first": 7, "values": {"t": 1}}))
    assert probe.next_json(ack) == {"boot": 11, "seq": 7}
    assert len(daemon.readings(device_id)) == 6


def test_a_batch_of_readings_is_stored_and_acknowledged_as_a_whole(daemon: Daemon, device: Any) -> None:
    device_id, _, probe = device()
    topic, ack = f"edgetrio/{device_id}/telemetry", f"edgetrio/{device_id}/ack"
    batch = [json.loads(telemetry(seq, boot=5, ts=T0 + seq, t=20.0 + seq)) for seq in range(1, 51)]
    probe.publish(topic, json.dumps({"batch": batch}))
    assert probe.next_json(ack) == {"boot": 5, "seq": 50}  # one ack for the fifty
    probe.publish(topic, json.dumps({"batch": batch[:10]}))  # a batch sent again is stored once, and acked again
    assert probe.next_json(ack) == {"boot": 5, "seq": 50}
    stored = daemon.readings(device_id, "--limit", "100")
    assert [r["seq"] for r in stored] == list(range(1, 51)) and stored[0]["values"] == {"t": 21.0}
    # a bad reading in a batch is refused on its own; the rest are taken
    bad = [*[json.loads(telemetry(seq, boot=6, t=1.0)) for seq in (1, 2)],
           *[{"boot": 6, "seq": seq, "values": {}} for seq in (3, 4)]]
    probe.publish(topic, json.dumps({"batch": bad}))
    assert probe.next_json(ack) == {"boot": 6, "seq": 2}
    # what is no batch at all is refused whole: several boots, too many readings, not a list
    wrongs: list[dict[str, Any]] = [
        {"batch": [json.loads(telemetry(1, boot=7, t=1.0)), json.loads(telemetry(1, boot=8, t=1.0))]},
        {"batch": [json.loads(telemetry(s, boot=9, t=1.0)) for s in range(1, 102)]}, {"batch": {}}]
    for wrong in wrongs:
        probe.publish(topic, json.dumps(wrong))
    wait_until(lambda: len([r for r in json.loads(daemon.cli("rejects", "--device", device_id, "--json").stdout)
                            if r["reason"] == "bad_envelope"]) == 4, timeout=30)  # the two empty readings as one, three batches
    assert {r["boot"] for r in daemon.readings(device_id, "--limit", "100")} == {5, 6}


def test_bad_input_is_rejected_counted_and_the_daemon_keeps_serving(daemon: Daemon, device: Any, tmp_path: Path,
                                                                     connect: Any) -> None:
    model = tmp_path / "climate.toml"
    model.write_text('name = "climate"\n[[resources]]\nname = "temperature"\ntype = "float"\nunit = "C"\n'
                     'min = -40\nmax = 85\n[[resources]]\nname = "door"\ntype = "bool"\n')
    daemon.cli("model", "add", str(model))
    device_id, _, probe = device(model="climate")
    topic, ack = f"edgetrio/{device_id}/telemetry", f"edgetrio/{device_id}/ack"
    before = daemon.counters()

    probe.publish(topic, b"{not json")
    probe.publish(topic, json.dumps({"boot": 1, "values": {"temperature": 1.0}}))  # no seq
    probe.publish(topic, json.dumps([1, 2, 3]))
    probe.publish(topic, b"x" * (1024 * 1024))  # 1 MB
    probe.publish(topic, telemetry(1, boot=1, ts=T0 + 1, temperature="warm"))  # wrong type
    probe.publish(topic, telemetry(2, boot=1, ts=T0 + 2, temperature=120.0))  # out of range
    probe.publish(topic, telemetry(3, boot=1, ts=T0 + 3, humidity=40.0))  # not a resource of the model
    # a seq SQLite cannot hold must not fail the commit
    probe.publish(topic, telemetry(10**23, boot=1, ts=T0 + 10**23, temperature=21.0))
    probe.publish(topic, telemetry(4, boot=1, ts=T0 + 4, temperature=21.5, door=True))  # valid
    # invalid readings are settled (kept in `rejects`), so the watermark is not stuck behind them
    while (got := probe.next_json(ack)) != {"boot": 1, "seq": 4}:
        assert got["boot"] == 1

    # a registered-nowhere device id, published by an admin app on the device's behalf
    user, password = daemon.admin()
    app = connect(user, password, "bad-input-app")
    assert app.accepted()
    app.publish("edgetrio/ghost-device/telemetry", telemetry(1, boot=1, ts=T0 + 1, t=21.0))

    # the daemon still serves: another reading from the same device is stored and acknowledged
    probe.publish(topic, telemetry(5, boot=1, ts=T0 + 5, temperature=22.0))
    assert probe.next_json(ack) == {"boot": 1, "seq": 5}
    assert [r["values"] for r in daemon.readings(device_id)] == [{"temperature": 21.5, "door": True},
                                                                  {"temperature": 22.0}]
    after = daemon.counters()

    def grew(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    assert grew("rejected_malformed_json") == 2
    assert grew("rejected_bad_envelope") == 2
    assert grew("oversize") == 1
    assert grew("rejected_invalid_value") == 3
    assert grew("rejected_unknown_device") == 1
    log = daemon.log_text()
    assert "reason=invalid_value" in log and "above maximum 85" in log and "not a resource" in log


def test_meta_announces_a_model_that_checks_telemetry(daemon: Daemon, device: Any) -> None:
    device_id, _, probe = device()
    meta = {"firmware": "1.0", "resources": [{"name": "lux", "type": "int", "min": 0, "max": 100000, "unit": "lx"}]}
    probe.publish(f"edgetrio/{device_id}/meta", json.dumps(meta))
    # meta is handled beside the readings: wait for it to be stored, then for the model it announced to be in force
    wait_until(lambda: ({d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}[device_id]
                        ["meta"] or {}).get("firmware") == "1.0")
    probe.publish(f"edgetrio/{device_id}/telemetry", telemetry(1, boot=1, ts=T0 + 1, lux=1.5))  # not an int
    probe.publish(f"edgetrio/{device_id}/telemetry", telemetry(2, boot=1, ts=T0 + 2, lux=300))
    while probe.next_json(f"edgetrio/{device_id}/ack") != {"boot": 1, "seq": 2}:
        pass
    assert [r["values"] for r in daemon.readings(device_id)] == [{"lux": 300}]


def test_status_log_and_presence_are_recorded(daemon: Daemon, device: Any) -> None:
    device_id, _, probe = device()
    probe.publish(f"edgetrio/{device_id}/log", json.dumps({"level": "warning", "message": "low battery"}))
    probe.publish(f"edgetrio/{device_id}/telemetry", telemetry(1, boot=1, ts=T0 + 1, t=21.0))
    probe.next_json(f"edgetrio/{device_id}/ack")
    listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
    assert listed[device_id]["online"] is True and listed[device_id]["last_seen"] is not None
    probe.close()
    for _ in range(50):
        listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
        if not listed[device_id]["online"]:
            break
    assert listed[device_id]["online"] is False
    from edgetrio.daemon import store

    db = store.open_db(daemon.data_dir)
    kinds = [e["kind"] for e in store.events(db, device_id)]
    assert "log" in kinds


def test_a_board_gets_the_time_and_readings_from_an_unset_clock_are_stamped_on_arrival(daemon: Daemon,
                                                                                       device: Any) -> None:
    device_id, _, probe = device(subscribe=False)
    counted = daemon.counters()  # the daemon serves the whole module: compare with what it had counted
    before = time.time()
    assert probe.subscribe(f"edgetrio/{device_id}/time")  # a board asks for the time by subscribing
    told = probe.next_json(f"edgetrio/{device_id}/time")
    assert isinstance(told["unix_ms"], int) and before - 1 <= told["unix_ms"] / 1000 <= time.time() + 1
    assert probe.subscribe(f"edgetrio/{device_id}/ack")
    topic, ack = f"edgetrio/{device_id}/telemetry", f"edgetrio/{device_id}/ack"
    probe.publish(topic, json.dumps({"boot": 1, "seq": 1, "ts": 86_400.0, "values": {"t": 1}}))  # a 2000 clock
    probe.publish(topic, json.dumps({"boot": 1, "seq": 2, "values": {"t": 2}}))  # no time at all
    probe.publish(topic, json.dumps({"boot": 1, "seq": 3, "ts": time.time() + 86_400, "values": {"t": 3}}))
    taken = 1_764_000_000_123
    probe.publish(topic, json.dumps({"boot": 1, "seq": 4, "ts_ms": taken, "values": {"t": 4}}))
    probe.publish(topic, json.dumps({"boot": 1, "seq": 5, "ts_ms": 1.5e12, "values": {"t": 5}}))  # not an integer
    while probe.next_json(ack) != {"boot": 1, "seq": 4}:
        pass
    after = time.time()
    stored = daemon.readings(device_id)
    for row in stored[:3]:  # the board's time could not be true: its arrival, marked so
        assert row["ts_arrival"] is True and before <= row["ts"] <= after
    assert stored[3]["ts"] == taken / 1000 and "ts_arrival" not in stored[3]
    # seq 5 was refused after seq 4 was acknowledged: wait for its count rather than read it at once
    now = wait_until(lambda: (c := daemon.counters()).get("rejected_bad_envelope", 0)
                     - counted.get("rejected_bad_envelope", 0) == 1 and c)
    assert now["readings_arrival_time"] - counted.get("readings_arrival_time", 0) >= 3  # a resent one counts again


def test_a_model_can_keep_the_values_that_fit_and_drop_only_the_bad_one(daemon: Daemon, device: Any,
                                                                         tmp_path: Path) -> None:
    model = tmp_path / "lenient.toml"
    model.write_text('name = "lenient"\non_invalid = "drop_value"\n'
                     '[[resources]]\nname = "temperature"\ntype = "float"\nmin = -40\nmax = 85\n'
                     '[[resources]]\nname = "humidity"\ntype = "float"\nmin = 0\nmax = 100\n')
    daemon.cli("model", "add", str(model))
    device_id, _, probe = device(model="lenient")
    topic, ack = f"edgetrio/{device_id}/telemetry", f"edgetrio/{device_id}/ack"
    probe.publish(topic, json.dumps({"boot": 1, "seq": 1, "values": {"temperature": 21.0, "humidity": 140.0}}))
    probe.publish(topic, json.dumps({"boot": 1, "seq": 2, "values": {"humidity": -5.0}}))  # nothing fits: refused
    probe.publish(topic, json.dumps({"boot": 1, "seq": 3, "values": {"temperature": 22.0, "humidity": 50.0}}))
    while probe.next_json(ack) != {"boot": 1, "seq": 3}:
        pass
    assert [r["values"] for r in daemon.readings(device_id)] == [{"temperature": 21.0},
                                                                 {"temperature": 22.0, "humidity": 50.0}]
    refused = json.loads(daemon.cli("rejects", "--device", device_id, "--json").stdout)
    assert [r["reason"] for r in refused] == ["invalid_value", "invalid_value"]
    assert "humidity" in refused[0]["detail"] and "seq 1" in refused[0]["detail"]
    bad = tmp_path / "bad.toml"
    bad.write_text(model.read_text().replace("drop_value", "shrug"))
    wrong = daemon.cli("model", "add", str(bad), check=False)
    assert wrong.returncode == 2 and "on_invalid" in wrong.stderr


def test_a_failing_watcher_costs_its_own_view_never_ingest() -> None:
    from edgetrio.daemon.ingest import Watch, Watchers
    from edgetrio.daemon.topics import Reading

    class Broken(Watch):
        def committed(self, readings: list[Reading]) -> None:
            raise RuntimeError("a watcher's bug")

    class Seen(Watch):
        def __init__(self) -> None:
            self.readings: list[Reading] = []

        def committed(self, readings: list[Reading]) -> None:
            self.readings += readings

    seen = Seen()
    reading = Reading("d1", 1, 1, 1.7e9, {"t": 1.0})
    Watchers([Broken(), seen]).committed([reading])  # on the commit path: must not raise
    assert seen.readings == [reading]


def test_a_board_gone_silent_is_disconnected_after_its_keep_alive(daemon: Daemon) -> None:
    """A board that loses power sends no FIN: the gateway must notice its silence (1.5x its keep-alive, MQTT-3.1.2-24),
    close the connection, send its will and show it offline. amqtt 0.12.1 read with the keep-alive as a timeout and
    then did nothing: such a board stayed online for good."""
    import socket

    import paho.mqtt.client as mqtt

    from edgetrio.daemon import store

    device_id = "silent-board"
    password = daemon.add_device(device_id)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
    client.username_pw_set(device_id, password)
    client.will_set(f"edgetrio/{device_id}/status", json.dumps({"state": "lost"}))
    client.connect("127.0.0.1", daemon.port, keepalive=1)
    wait_until(lambda: client.loop(0.05) is not None and client.is_connected())
    listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
    assert listed[device_id]["online"] is True
    sock = client.socket()  # from here on the board says nothing, not even PINGREQ (no more loop calls)
    assert isinstance(sock, socket.socket)
    sock.settimeout(30)
    assert sock.recv(100) == b""  # the gateway closed it
    wait_until(lambda: not {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}[device_id]
               ["online"])
    db = store.open_db(daemon.data_dir)
    wait_until(lambda: any(e["kind"] == "status" and "lost" in json.dumps(e) for e in store.events(db, device_id)))
    db.close()
