"""The local control channel: the CLI and local apps ask the running daemon over its own broker (admin credential).

`ControlClient` is the asking side, `ControlServer` the daemon's answering side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from edgetrio import accounts
from edgetrio.daemon import alerts, rulestore, store
from edgetrio.daemon import automation as auto
from edgetrio.daemon.commands import CommandFailed, set_desired
from edgetrio.daemon.config import admin_credential, read_run_file
from edgetrio.daemon.ota import CONFIRM_S, Updates
from edgetrio.daemon.parts import Parts
from edgetrio.daemon.topics import CONTROL_REPLY_ROOT, CONTROL_REQUEST, Rejected, parse_object
from edgetrio.identity import RegistryError, integration_user
from edgetrio.models import Model
from edgetrio.twin import VersionConflict

if TYPE_CHECKING:  # paho is imported where a client is made: the daemon seldom needs one (0.9 MB)
    import paho.mqtt.client as mqtt

log = logging.getLogger("edgetrio.control")


class ControlError(Exception):
    """The daemon refused the request or could not be reached; `code` is conflict, invalid, offline, timeout, ..."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class ControlClient:
    """One admin MQTT connection to the daemon found through its data dir."""

    def __init__(self, data_dir: Path, connect_timeout: float = 5.0) -> None:
        info = read_run_file(data_dir)
        self.max_payload = int(info.get("max_payload") or 64 * 1024)
        username, password = admin_credential(data_dir)
        self.client_id = f"edgetrio-cli-{uuid.uuid4().hex[:12]}"
        self.reply_topic = CONTROL_REPLY_ROOT + self.client_id
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready: queue.Queue[str | None] = queue.Queue()
        import paho.mqtt.client as mqtt

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
        body = json.dumps({"id": request_id, "reply_to": self.reply_topic, "op": op, "args": args})
        if len(body.encode()) > self.max_payload:  # the broker would drop it, and this would wait for nothing
            raise ControlError(f"the request is {len(body.encode()):,} bytes; the daemon takes messages of at most "
                               f"{self.max_payload:,} (max_payload): split it (a rule file into several)", "too_large")
        self.client.publish(CONTROL_REQUEST, body, qos=1)
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


class ControlServer:
    """The daemon's side of the control channel: each request found on the bus is answered in a task of its own."""

    def __init__(self, parts: Parts, status: Callable[[], dict[str, Any]],
                 automation: auto.Automation | None = None, updates: Updates | None = None) -> None:
        self.automation = automation
        self.updates = updates
        self.link, self.writer, self.roster = parts.link, parts.writer, parts.roster
        self.changes, self.commands = parts.changes, parts.commands
        self.status = status

    async def serve(self, requests: trio.MemoryReceiveChannel[bytes]) -> None:
        """Answer requests until the channel closes (the broker stopped) or this is cancelled."""
        async with requests, trio.open_nursery() as nursery:
            async for payload in requests:
                try:
                    request = parse_object(payload)
                except Rejected as exc:
                    log.warning("control request is not a JSON object: %s", exc)
                    continue
                reply_to = request.get("reply_to")
                if not isinstance(reply_to, str) or not reply_to.startswith(CONTROL_REPLY_ROOT):
                    log.warning("control request without a usable reply_to")
                    continue
                nursery.start_soon(self._answer, request, reply_to)

    async def _answer(self, request: dict[str, Any], reply_to: str) -> None:
        reply: dict[str, Any] = {"id": request.get("id")}
        try:
            reply["result"] = await self.handle(str(request.get("op")), request.get("args") or {})
        except VersionConflict as exc:
            reply["error"], reply["code"] = str(exc), "conflict"
        except (RegistryError, ValueError, KeyError, TypeError) as exc:
            reply["error"], reply["code"] = str(exc), "invalid"
        except CommandFailed as exc:
            reply["error"], reply["code"] = str(exc), exc.code
        except Exception as exc:  # a request the daemon did not foresee must not stop it
            log.exception("control request %r failed", request.get("op"))
            reply["error"], reply["code"] = f"internal error: {type(exc).__name__}: {exc}", "internal"
        self.link.publish([(reply_to, json.dumps(reply).encode())])

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        """Carry out one control operation; raises RegistryError/ValueError/VersionConflict/CommandFailed."""
        if op == "device.add":
            device_id, model = args["id"], args.get("model")
            secret = await self.writer.write(partial(self.changes.register, device=device_id, model=model))
            await self.roster.reload(device_id)
            return {"id": device_id, "username": device_id, "password": secret}
        if op == "device.rotate":  # a new credential; the device's session with the old one ends now
            device_id = args["id"]
            secret = await self.writer.write(partial(store.rotate_secret, device_id=device_id))
            await self.roster.reload(device_id)
            self.link.disconnect(device_id)
            return {"id": device_id, "username": device_id, "password": secret}
        if op == "device.model":  # a board flashed from a board file: the model its components make
            device_id, model = args["id"], args.get("model")
            await self.writer.write(partial(self.changes.set_model, device=device_id, model=model))
            await self.roster.reload(device_id)
            return {"id": device_id, "model": model}
        if op == "device.remove":
            device_id = args["id"]
            await self.writer.write(partial(self.changes.unregister, device=device_id))
            await self.roster.reload(device_id)
            return {"id": device_id, "removed": True}
        if op == "integration.add":  # a new credential; a session with the old one ends now
            name = str(args["name"])
            secret = await self.writer.write(partial(store.add_integration, name=name))
            await self.roster.reload_integrations()
            self.link.disconnect_user(integration_user(name))
            return {"name": name, "username": integration_user(name), "password": secret}
        if op == "integration.remove":
            name = str(args["name"])
            await self.writer.write(partial(store.remove_integration, name=name))
            await self.roster.reload_integrations()
            self.link.disconnect_user(integration_user(name))
            return {"name": name, "removed": True}
        if op == "user.add":  # the password arrives hashed: the slow KDF ran in the CLI
            await self.writer.write(partial(accounts.add_user, name=str(args["name"]), role=str(args["role"]),
                                            password_hash=str(args["password_hash"])))
            return {"name": args["name"], "role": args["role"]}
        if op == "user.remove":
            await self.writer.write(partial(accounts.remove_user, name=str(args["name"])))
            return {"name": args["name"], "removed": True}
        if op == "user.token":
            token_id, token = await self.writer.write(partial(accounts.add_token, user=str(args["name"])))
            return {"name": args["name"], "id": token_id, "token": token}
        if op == "user.revoke":
            await self.writer.write(partial(accounts.revoke_token, token_id=str(args["id"])))
            return {"id": args["id"], "revoked": True}
        if op == "model.add":  # source: "file" (`model add`) or "board" (a board file's, which a reflash replaces)
            model = Model.from_dict(args.get("model"))
            source = "board" if args.get("source") == "board" else "file"
            device = args.get("device") if isinstance(args.get("device"), str) else None
            await self.writer.write(partial(store.add_model, model=model, source=source, device=device))
            await self.roster.reload_models()
            return model.as_dict()
        if op == "twin.set":
            device_id, patch, version = args["id"], args["patch"], args.get("version")
            if not isinstance(patch, dict) or not patch:
                raise ValueError("twin set needs at least one key=value")
            twin = await set_desired(self.writer, self.changes, self.link, device_id, patch, version)
            return twin.as_json()
        if op == "cmd":
            return await self.commands.send(args["id"], str(args["name"]), args.get("args") or {},
                                            float(args.get("timeout", 10)))
        if op == "status":
            return self.status()
        if op.startswith(("rule.", "alerts.")):
            return await self.automate(op, args)
        if op.startswith("ota.") and self.updates is not None:
            return await self.update(op, args)
        raise ValueError(f"unknown operation {op!r}")

    async def update(self, op: str, args: dict[str, Any]) -> Any:
        """Firmware updates over the air: start one (its bundle already in the data dir), follow it, cancel it."""
        assert self.updates is not None
        if op == "ota.start":
            return await self.updates.start(str(args["id"]), str(args["bundle"]),
                                            int(args.get("confirm_s") or CONFIRM_S))
        if op == "ota.status":
            return self.updates.status(str(args["id"]))
        if op == "ota.cancel":
            return self.updates.cancel(str(args["id"]))
        if op == "ota.list":
            return self.updates.all()
        raise ValueError(f"unknown operation {op!r}")

    async def automate(self, op: str, args: dict[str, Any]) -> Any:
        """Rules, schedules and alerts; a changed rule set takes effect at once."""
        if op == "rule.add":
            names = await self.writer.write(partial(
                rulestore.add_automations, doc=args["doc"], models=dict(self.roster.models),
                sinks=self.automation.sinks if self.automation is not None else None))
            problems = await self.automation.reload() if self.automation is not None else {}
            return {"added": names, "problems": {n: p for n, p in problems.items() if n in names}}
        if op == "rule.remove":
            await self.writer.write(partial(rulestore.remove_automation, name=str(args["name"])))
            if self.automation is not None:
                await self.automation.reload()
            return {"name": args["name"], "removed": True}
        if op == "rule.list":
            return await self.writer.write(rulestore.list_automations)
        if op == "rule.history":
            return await self.writer.write(partial(rulestore.history, name=str(args["name"]),
                                                   limit=int(args.get("limit", rulestore.HISTORY_LIMIT))))
        if op == "rule.test":
            return rulestore.dry_run(args["doc"], dict(self.roster.models), str(args["device"]), dict(args["values"]))
        if op == "alerts.list":
            return await self.writer.write(partial(alerts.list_alerts, everything=bool(args.get("all"))))
        if op == "alerts.ack":
            return await self.writer.write(partial(alerts.ack_alert, alert_id=int(args["id"]),
                                                   who=str(args.get("by") or "cli"), now=time.time(),
                                                   mirror=self.changes.mirror))
        raise ValueError(f"unknown operation {op!r}")
