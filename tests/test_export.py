"""Export sinks against receivers nobody here wrote: Debian's mosquitto as a plant's broker, and a plain HTTP server
as a webhook. Each sink resumes where it stopped: a receiver that is down, then back, gets every reading once."""

from __future__ import annotations

import getpass
import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgetrio.tools.testkit import Daemon, Mosquitto, Probe, Receiver, cli, free_port, needs, telemetry, wait_until


def gateway(tmp_path: Path, sinks: str) -> tuple[Daemon, Probe]:
    config = tmp_path / "gw.toml"
    config.write_text(sinks)
    gw = Daemon(tmp_path / "data", extra=("--config", str(config)))
    gw.data_dir.mkdir(parents=True, exist_ok=True)
    password = gw.add_device("sensor-1")
    gw.start()
    probe = Probe(gw, "sensor-1", password, "sensor-1")
    assert probe.accepted() and probe.subscribe("edgetrio/sensor-1/ack")
    return gw, probe


def sink_idle(gw: Daemon, name: str) -> bool:
    """The sink has sent all it has to send (its cursor is at the end): nothing more can come without new readings."""
    return bool(gw.status()["daemon"]["export"][name]["state"] == "idle")


def publish(probe: Probe, seqs: range) -> None:
    for seq in seqs:
        probe.publish("edgetrio/sensor-1/telemetry", telemetry(seq, ts=time.time(), temperature=20.0 + seq))
    while probe.next_json("edgetrio/sensor-1/ack")["seq"] != seqs[-1]:
        pass


def webhook_seqs(receiver: Receiver) -> list[int]:
    return [r["seq"] for post in receiver.posts for r in post["readings"]]


def test_webhook_down_then_back_and_a_restart_lose_and_repeat_nothing(tmp_path: Path) -> None:
    port = free_port()  # nobody listens yet
    gw, probe = gateway(tmp_path, f'[[export]]\nname = "hook"\ntype = "webhook"\nurl = "http://127.0.0.1:{port}/in"\n'
                                  'batch = 7\nheaders = { authorization = "Bearer s3cret" }\n')
    try:
        publish(probe, range(1, 21))
        wait_until(lambda: gw.status()["daemon"]["export"]["hook"]["state"] == "down", timeout=15)
        receiver = Receiver(port)
        try:
            wait_until(lambda: len(webhook_seqs(receiver)) == 20, timeout=30)
            assert webhook_seqs(receiver) == list(range(1, 21))
            first = receiver.posts[0]
            assert first["node"] == "local" and first["sink"] == "hook" and len(first["readings"]) == 7
            assert first["readings"][0]["device"] == "sensor-1" and first["readings"][0]["values"]["temperature"] == 21
            # the daemon stops with readings the sink has not sent: they go after the restart, nothing twice
            receiver.close()
            publish(probe, range(21, 31))
            probe.close()
            gw.stop()
        finally:
            receiver.close()
        receiver = Receiver(port)
        gw.start()
        try:
            wait_until(lambda: len(webhook_seqs(receiver)) == 10, timeout=30)
            wait_until(lambda: sink_idle(gw, "hook"))
            assert webhook_seqs(receiver) == list(range(21, 31))
        finally:
            receiver.close()
    finally:
        gw.stop()


class Subscriber:
    """A persistent-session MQTT client on the plant's broker: what the broker holds for it survives restarts."""

    def __init__(self, port: int) -> None:
        self.got: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plant-historian", clean_session=False)
        self.client.on_connect = lambda c, *_: c.subscribe("plant/#", qos=1)
        self.client.on_message = lambda _c, _u, m: self.got.put((m.topic, json.loads(m.payload)))
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def take(self, count: int, timeout: float = 30) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            out.append(self.got.get(timeout=max(0.1, deadline - time.monotonic())))
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def plant_broker(tmp_path: Path) -> Iterator[tuple[int, Any]]:
    needs(Mosquitto.available(), "mosquitto (Debian package)")
    # persistence keeps the historian's session (and what waits for it) across the restart; as root mosquitto would
    # drop to its own user, which cannot write into the test's folder
    broker = Mosquitto(tmp_path, "allow_anonymous true", "persistence true", f"persistence_location {tmp_path}/",
                       f"user {getpass.getuser()}").start()
    yield broker.port, (broker.start, broker.stop)
    broker.stop()


def test_mqtt_sink_to_a_plant_broker_resumes_after_the_broker_restarts(tmp_path: Path,
                                                                       plant_broker: tuple[int, Any]) -> None:
    port, (start, stop) = plant_broker
    historian = Subscriber(port)
    gw, probe = gateway(tmp_path, f'[[export]]\nname = "plant"\ntype = "mqtt"\nurl = "mqtt://127.0.0.1:{port}"\n'
                                  'topic = "plant/{node}/{device}"\n')
    try:
        publish(probe, range(1, 11))
        first = historian.take(10)
        assert [body["seq"] for _, body in first] == list(range(1, 11))
        assert first[0][0] == "plant/local/sensor-1" and first[0][1]["values"] == {"temperature": 21.0}
        stop()  # the plant's broker goes away; readings keep coming and wait
        publish(probe, range(11, 31))
        wait_until(lambda: gw.status()["daemon"]["export"]["plant"]["state"] == "down", timeout=15)
        start()
        # every one arrives (at least once: the broker may hand the historian again what it had in flight)
        seqs: set[int] = set()
        deadline = time.monotonic() + 60
        while not set(range(11, 31)) <= seqs and time.monotonic() < deadline:
            seqs.update(body["seq"] for _, body in historian.take(1))
        assert set(range(11, 31)) <= seqs <= set(range(1, 31))
        wait_until(lambda: gw.status()["daemon"]["export"]["plant"]["state"] in ("idle", "sending"), timeout=15)
    finally:
        probe.close()
        historian.close()
        gw.stop()


def test_bad_sink_configuration_is_one_line_at_start(tmp_path: Path) -> None:
    cases = {
        '[[export]]\nname = "x"\ntype = "kafka"\nurl = "http://h"\n': "export 'x': type must be one of webhook, mqtt",
        '[[export]]\nname = "x"\ntype = "mqtt"\nurl = "http://h"\n': "export 'x': url must be mqtt://host...",
        '[[export]]\nname = "x"\ntype = "mqtt"\nurl = "mqtt://h"\ntopic = "plant/#"\n': "topic must be a topic",
        '[[export]]\nname = "x"\ntype = "webhook"\nurl = "http://h:port"\n': "export 'x': url 'http://h:port'",
        '[[export]]\nname = "x"\ntype = "webhook"\nurl = "http://h"\nbatchsize = 3\n': "unknown key 'batchsize'",
    }
    for text, message in cases.items():
        config = tmp_path / "gw.toml"
        config.write_text(text)
        out = cli(tmp_path / "data", "daemon", "--config", str(config), "--mqtt-port", "0", check=False, timeout=30)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_rule_exports_the_readings_that_fire_it_to_its_own_sink(tmp_path: Path) -> None:
    receiver = Receiver()
    gw, probe = gateway(tmp_path, f'[[export]]\nname = "incidents"\ntype = "webhook"\nurl = "http://127.0.0.1:'
                                  f'{receiver.port}/in"\nselect = "rules"\n')
    try:
        rules = tmp_path / "rules.toml"
        rules.write_text('[[rule]]\nname = "hot"\ndevices = ["sensor-1"]\nwhen = "temperature > 30"\ncooldown = 0\n'
                         'actions = [{ export = "incidents" }]\non_clear = [{ export = "incidents" }]\n')
        gw.cli("rule", "add", str(rules))
        unknown = tmp_path / "unknown.toml"
        unknown.write_text('[[rule]]\nname = "x"\ndevices = ["*"]\nwhen = "temperature > 1"\n'
                           'actions = [{ export = "nowhere" }]\n')
        out = gw.cli("rule", "add", str(unknown), check=False)
        assert out.returncode != 0 and "no such sink" in out.stderr and "incidents" in out.stderr
        for seq, temperature in enumerate([20.0, 31.0, 32.0, 25.0, 20.0, 33.0], start=1):
            probe.publish("edgetrio/sensor-1/telemetry", json.dumps(
                {"boot": 1, "seq": seq, "ts": time.time(), "values": {"temperature": temperature}}))
        wait_until(lambda: sum(len(p["readings"]) for p in receiver.posts) == 3, timeout=20)
        # every reading judged (the last one fired again) and the sink caught up: nothing more can come
        wait_until(lambda: [h["event"] for h in json.loads(gw.cli("rule", "history", "hot", "--json").stdout)
                            ].count("firing") == 2 and sink_idle(gw, "incidents"))
        sent = [r for p in receiver.posts for r in p["readings"]]
        # the readings that fired it and that resolved it, nothing else
        assert [(r["state"], r["values"]["temperature"]) for r in sent] == [
            ("firing", 31.0), ("resolved", 25.0), ("firing", 33.0)]
        assert all(r["rule"] == "hot" and r["device"] == "sensor-1" for r in sent)
    finally:
        probe.close()
        gw.stop()
        receiver.close()
