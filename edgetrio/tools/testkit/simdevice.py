"""A load client in CPython for the soak run (tools/bench/soak.py): a real MQTT client (paho) that follows the device
contract, so hundreds can run in one process. Not a stand-in for a board: the tests run the real firmware on virtual
boards (`edgetrio vdev`, testkit.virtual_boards). Like the firmware it keeps every reading until the daemon's `ack`
says it is committed, and resends what is still buffered on reconnect.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt


class SimDevice:
    def __init__(self, device_id: str, password: str, host: str, port: int, boot: int = 1) -> None:
        self.device_id = device_id
        self.root = f"edgetrio/{device_id}/"
        self.boot = boot
        self.seq = 0
        self.lock = threading.Lock()
        self.buffer: dict[int, dict[str, Any]] = {}  # seq -> telemetry message, until acked
        self.acked = 0
        self.desired: dict[str, Any] = {}
        self.desired_version = -1
        self.desired_seen = threading.Event()
        self.acks = threading.Condition(self.lock)
        self.connected = threading.Event()
        self.commands: list[dict[str, Any]] = []
        self.answer_commands = True
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        client.username_pw_set(device_id, password)
        client.will_set(self.root + "status", "offline", qos=1)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_a: self.connected.clear()
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 2)
        self.client = client
        self.host, self.port = host, port

    def start(self, timeout: float = 10) -> SimDevice:
        self.client.connect(self.host, self.port, keepalive=15)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(f"{self.device_id} could not connect")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe([(self.root + "ack", 1), (self.root + "twin/desired", 1), (self.root + "cmd", 1)])
        client.publish(self.root + "status", "online", qos=1)
        client.publish(self.root + "meta", json.dumps({"firmware": "sim-0.1", "model": "sim", "boot": self.boot}), qos=1)
        with self.lock:
            pending = [self.buffer[s] for s in sorted(self.buffer)]
        for message in pending:  # resend what the daemon has not confirmed
            client.publish(self.root + "telemetry", json.dumps(message), qos=1)
        self.connected.set()

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        channel = message.topic[len(self.root):]
        body = json.loads(message.payload)
        if channel == "ack":
            with self.lock:
                if body["boot"] == self.boot:
                    self.acked = max(self.acked, body["seq"])
                    for seq in [s for s in self.buffer if s <= self.acked]:
                        del self.buffer[seq]
                self.acks.notify_all()
        elif channel == "twin/desired":
            self.desired, self.desired_version = body["state"], body["version"]
            client.publish(self.root + "twin/reported", json.dumps({"state": self.desired}), qos=1)
            self.desired_seen.set()
        elif channel == "cmd":
            self.commands.append(body)
            if not self.answer_commands:
                return
            result: dict[str, Any] = {"id": body["id"], "ok": True}
            if body["name"] == "ping":
                result["value"] = "pong"
            elif body["name"] == "echo":
                result["value"] = body.get("args")
            else:
                result = {"id": body["id"], "ok": False, "error": f"unknown command {body['name']}"}
            client.publish(self.root + "cmd/result", json.dumps(result), qos=1)

    def read(self, values: dict[str, Any] | None = None) -> int:
        """Take a reading, buffer it, and publish it; returns its seq."""
        with self.lock:
            self.seq += 1
            seq = self.seq
            message = {"boot": self.boot, "seq": seq, "ts": time.time(),
                       "values": values or {"temperature": round(random.uniform(18, 26), 2)}}
            self.buffer[seq] = message
        self.client.publish(self.root + "telemetry", json.dumps(message), qos=1)
        return seq

    def wait_acked(self, seq: int, timeout: float = 10) -> bool:
        with self.acks:
            return self.acks.wait_for(lambda: self.acked >= seq, timeout)
