"""Broker security against the real daemon: credentials, topic confinement, and the amqtt defect workarounds."""

from __future__ import annotations

import json
from typing import Any

from edgetrio.identity import new_secret
from edgetrio.tools.testkit import Daemon, wait_until


def test_device_with_its_credential_is_accepted(device: Any) -> None:
    device_id, _password, probe = device()
    probe.publish(f"edgetrio/{device_id}/telemetry", json.dumps({"boot": 1, "seq": 1, "values": {"t": 1.5}}))
    assert probe.next_json(f"edgetrio/{device_id}/ack") == {"boot": 1, "seq": 1}


def test_wrong_password_unknown_device_and_anonymous_are_refused(daemon: Daemon, connect: Any, device: Any) -> None:
    device_id, password, probe = device(subscribe=False)
    probe.close()
    before = daemon.counters().get("auth_refused", 0)
    assert not connect(device_id, password + "x").accepted()
    assert not connect("no-such-device", "whatever").accepted()
    assert not connect(None, None, "anonymous-client").accepted()
    # a device must use its own id as client id, so it cannot take over another device's session
    assert not connect(device_id, password, "someone-else").accepted()
    assert connect(device_id, password).accepted()
    assert daemon.counters()["auth_refused"] - before == 4


def test_admin_credential_is_accepted_and_a_wrong_one_refused(daemon: Daemon, connect: Any) -> None:
    user, password = daemon.admin()
    assert connect(user, password, "admin-app").accepted()
    assert not connect(user, "not-the-password", "admin-app-2").accepted()


def test_device_cannot_subscribe_outside_its_space(device: Any) -> None:
    a_id, _, a = device(subscribe=False)
    b_id, _, _b = device(subscribe=False)
    assert a.subscribe(f"edgetrio/{a_id}/cmd")
    for topic in (f"edgetrio/{b_id}/cmd", "edgetrio/+/telemetry", "#", "edgetrio/#", f"edgetrio/{a_id}"):
        assert not a.subscribe(topic), topic


def test_device_cannot_publish_outside_its_space(daemon: Daemon, device: Any, connect: Any) -> None:
    a_id, _, a = device(subscribe=False)
    b_id, _, b = device()
    user, password = daemon.admin()
    watcher = connect(user, password, "watcher")
    assert watcher.accepted() and watcher.subscribe("edgetrio/#")
    refused = daemon.counters().get("acl_refused_publish", 0)
    # A pretends to be B: the broker drops it, so B's store and B's subscribers see nothing
    a.publish(f"edgetrio/{b_id}/telemetry", json.dumps({"boot": 1, "seq": 1, "values": {"t": 1}}))
    a.publish(f"edgetrio/{a_id}/telemetry", json.dumps({"boot": 1, "seq": 1, "values": {"t": 2}}))
    # the broker forwards in order, so a forwarded impostor message would arrive before A's own
    telemetry = [t for t, _ in watcher.until(f"edgetrio/{a_id}/telemetry") if t.endswith("/telemetry")]
    assert telemetry == [f"edgetrio/{a_id}/telemetry"]  # the refused message never reached anyone
    assert b.nothing(0.5, topic=f"edgetrio/{b_id}/telemetry")
    assert json.loads(daemon.cli("readings", b_id, "--json").stdout) == []
    assert daemon.counters()["acl_refused_publish"] == refused + 1  # counted, once


def test_device_receives_nothing_retained_from_another(device: Any) -> None:
    """amqtt sent retained messages to any subscriber without an ACL check; the daemon keeps none."""
    b_id, _, b = device()  # b's own subscription is the filter amqtt used to walk for every new client
    b.publish(f"edgetrio/{b_id}/status", "secret-b", retain=True)
    a_id, _, a = device()
    # retained messages come with the SUBACK, before the daemon's desired state; a little more time for stragglers
    received = [topic for topic, _ in a.until(f"edgetrio/{a_id}/twin/desired") + a.drain(0.5)]
    assert not [t for t in received if b_id in t]  # a is served, but gets nothing of b's


def test_dollar_topic_publish_disconnects_the_client(daemon: Daemon, device: Any) -> None:
    _device_id, _, probe = device()
    invalid = daemon.counters().get("invalid_topic", 0)
    probe.client.publish("$SYS/hack", "x", qos=0)
    assert probe.closed.wait(10), "a client publishing to a $ topic must not be left as a zombie"
    wait_until(lambda: daemon.counters().get("invalid_topic", 0) == invalid + 1)


def test_second_connection_with_same_client_id_replaces_the_first(daemon: Daemon, device: Any, connect: Any) -> None:
    device_id, password, first = device()
    first.client.reconnect_delay_set(30, 60)  # keep the replaced client away
    second = connect(device_id, password)
    assert second.accepted()
    assert first.closed.wait(10), "the first connection must be closed (MQTT-3.1.4-2)"
    assert second.subscribe(f"edgetrio/{device_id}/#")
    second.publish(f"edgetrio/{device_id}/telemetry", json.dumps({"boot": 1, "seq": 1, "values": {"t": 3}}))
    assert second.next_json(f"edgetrio/{device_id}/ack") == {"boot": 1, "seq": 1}
    devices = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
    assert devices[device_id]["online"] is True


def test_removing_a_device_disconnects_it_and_revokes_its_credential(daemon: Daemon, device: Any, connect: Any) -> None:
    device_id, password, probe = device()
    probe.client.reconnect_delay_set(30, 60)
    daemon.cli("device", "remove", device_id)
    assert probe.closed.wait(10), "a removed device must not stay connected"
    assert not connect(device_id, password).accepted()
    listed = [d["id"] for d in json.loads(daemon.cli("device", "list", "--json").stdout)]
    assert device_id not in listed


def test_secrets_never_start_with_a_dash() -> None:
    # a token such as '-I4l...' after `--token` is read as an option by argparse: one in 64 would break the CLI
    drawn = [new_secret() for _ in range(3000)]
    assert not [s for s in drawn if s.startswith("-")]
    assert len(set(drawn)) == len(drawn) and {len(s) for s in drawn} == {24}
