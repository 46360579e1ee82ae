"""Client side of the local control channel: the CLI and local apps ask the running daemon over its own broker."""

from __future__ import annotations

import contextlib
import json
import queue
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgetrio.daemon.config import admin_credential
from edgetrio.daemon.gateway import read_run_file
from edgetrio.daemon.ingest import CONTROL_REPLY_ROOT, CONTROL_REQUEST


class ControlError(Exception):
    """The daemon refused the request or could not be reached; `code` is conflict, invalid, offline, timeout, ..."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class ControlClient:
    """One admin MQTT connection to the daemon found through its data dir."""

    def __init__(self, data_dir: Path, connect_timeout: float = 5.0) -> None:
        info = read_run_file(data_dir)
        username, password = admin_credential(data_dir)
        self.client_id = f"edgetrio-cli-{uuid.uuid4().hex[:12]}"
        self.reply_topic = CONTROL_REPLY_ROOT + self.client_id
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready: queue.Queue[str | None] = queue.Queue()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        client.username_pw_set(username, password)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *_args: self._ready.put(None)
        client.on_message = self._on_message
        self.client = client
        try:
            client.connect(info["mqtt_host"], int(info["mqtt_port"]), keepalive=30)
        except (TimeoutError, OSError) as exc:
            raise ControlError(
                f"cannot reach the daemon at {info['mqtt_host']}:{info['mqtt_port']}: {exc}", "unreachable"
            ) from exc
        client.loop_start()
        try:
            problem = self._ready.get(timeout=connect_timeout)
        except queue.Empty:
            problem = "no answer from the daemon's broker"
        if problem:
            self.close()
            raise ControlError(problem, "unreachable")

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._ready.put(f"the daemon refused the admin credential ({reason})")
            return
        client.subscribe(self.reply_topic, qos=1)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            self._replies.put(json.loads(message.payload))

    def request(self, op: str, args: dict[str, Any], timeout: float = 15.0) -> Any:
        """Send one request and return its result; raise ControlError with the daemon's message on failure."""
        request_id = uuid.uuid4().hex
        body = {"id": request_id, "reply_to": self.reply_topic, "op": op, "args": args}
        self.client.publish(CONTROL_REQUEST, json.dumps(body), qos=1)
        while True:
            try:
                reply = self._replies.get(timeout=timeout)
            except queue.Empty:
                raise ControlError(f"the daemon did not answer {op!r} within {timeout:g} s", "timeout") from None
            if reply.get("id") != request_id:
                continue
            if "error" in reply:
                raise ControlError(reply["error"], reply.get("code", "error"))
            return reply.get("result")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
