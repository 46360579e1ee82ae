"""The firmware against a broker nobody here wrote: Debian's mosquitto, with the test playing the gateway's acks.

A reading lost between the board and the gateway (a broker that refused it under load) leaves a gap the cumulative
ack waits at. While readings keep coming, the board must notice that acks stopped moving and send the gap again.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import trio

from edgetrio.tools.bundle import build_bundle, device_config
from edgetrio.tools.testkit import Mosquitto, needs
from edgetrio.tools.vdev import VirtualDevice


@pytest.fixture(autouse=True)
def _mosquitto() -> None:
    needs(Mosquitto.available(), "mosquitto (Debian package)")


class AckingGateway:
    """Acks the highest contiguous seq it has seen, like the daemon, but loses seq `lose` the first time it comes."""

    def __init__(self, port: int, device: str, lose: int) -> None:
        self.device, self.lose = device, lose
        self.seen: set[int] = set()
        self.lost_once = False
        self.resent = threading.Event()
        self.acked = 0
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gateway")
        client.on_connect = lambda c, *_a: c.subscribe(f"edgetrio/{device}/telemetry", qos=1)
        client.on_message = self._on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client

    def _on_message(self, client: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        readings = body.get("batch") or [body]  # a board with several waiting sends them in one message
        seqs = {int(r["seq"]) for r in readings}
        if self.lose in seqs and not self.lost_once:
            self.lost_once = True
            return
        if self.lose in seqs:
            self.resent.set()
        self.seen |= seqs
        while self.acked + 1 in self.seen:
            self.acked += 1
        client.publish(f"edgetrio/{self.device}/ack", json.dumps({"boot": readings[0]["boot"], "seq": self.acked}))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_a_lost_reading_is_sent_again_while_readings_keep_coming(tmp_path: Path) -> None:
    mosquitto = Mosquitto(tmp_path, "allow_anonymous true", "persistence false").start()
    port = mosquitto.port
    try:
        gateway = AckingGateway(port, "m1", lose=5)
        board = VirtualDevice("m1", tmp_path / "flash", ("127.0.0.1", port))
        board.install(build_bundle(tmp_path / "bundle"), device_config("m1", "any", period=0.5))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(board.run)
                # readings every 0.5 s, so "30 s without a new reading" never comes: only the stalled acks can
                # make the board send seq 5 again
                with trio.move_on_after(75):
                    while not gateway.resent.is_set():
                        await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
        finally:
            gateway.close()
        assert gateway.lost_once, "the board never sent seq 5; the test proves nothing"
        assert gateway.resent.is_set(), f"seq 5 was never sent again; acks stuck at {gateway.acked}"
        assert gateway.acked > 5
        # and not by a reboot, which would resend everything anyway
        assert (tmp_path / "flash" / "console.log").read_text().count("online, boot") == 1
    finally:
        mosquitto.stop()
