"""What comes down from the cloud (twins, registrations, models, alert acks, rule sets, commands), each message
applied once, in one transaction, by a handler for its resource; what follows the commit (a desired state published,
the roster reloaded, a command dispatched) runs after it."""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
from sqlite_utils import Database

from edgetrio import wire
from edgetrio.bundles import stage
from edgetrio.daemon import store
from edgetrio.daemon.alerts import ack_alert
from edgetrio.daemon.commands import CommandFailed
from edgetrio.daemon.ota import CONFIRM_S, UpdateError, Updates, save_update
from edgetrio.daemon.parts import Parts
from edgetrio.daemon.rulestore import apply_rule_set
from edgetrio.daemon.topics import desired_message
from edgetrio.identity import RegistryError
from edgetrio.models import Model
from edgetrio.twin import Twin, VersionConflict

log = logging.getLogger("edgetrio.down")
Body = dict[str, Any]
Result = dict[str, Any]


class Down:
    """Applies what comes down from the cloud, each message once (the inbox keeps each id's result)."""

    def __init__(self, parts: Parts, nursery: trio.Nursery,
                 rules_changed: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.parts = parts
        self.rules_changed = rules_changed
        self._commands_running = nursery
        # resource -> (its change, in the message's transaction; what follows once that committed)
        self.handlers: dict[str, tuple[Callable[[Database, Body], Result],
                                       Callable[[Body, Result], Awaitable[Result]]]] = {
            "twin": (self._twin, self._publish_desired),
            "device": (self._device, self._reload_device),
            "model": (self._model, self._reload_models),
            "alert_ack": (self._alert_ack, self._nothing),
            "rules": (self._rules, self._rules_applied),
            "cmd": (self._cmd, self._dispatch),
            "bundle": (self._bundle, self._nothing),
            "ota": (self._ota, self._start_update),
        }
        self.updates: Updates | None = None  # set once the gateway has its firmware updates

    async def apply(self, message_id: str, resource: str, body: Body) -> Result:
        """Apply one message in one transaction, once: a repeated id returns the first result.

        A command is dispatched here and runs on; its result goes up through the outbox."""
        now = time.time()
        change, then = self.handlers.get(resource, (partial(self._unknown, resource), self._nothing))

        def apply(db: Database) -> tuple[bool, Result]:
            prior = store.inbox_result(db, message_id)
            if prior is not None:
                return False, prior
            try:
                with db.atomic():
                    result = change(db, body)
            except (RegistryError, VersionConflict, KeyError, TypeError, ValueError, binascii.Error, OSError) as exc:
                result = {"ok": False, "error": str(exc) or type(exc).__name__}
            store.inbox_record(db, message_id, result, now)
            return True, result

        new, result = await self.parts.writer.write(apply)
        if not new or not result.get("ok"):
            return result
        return await then(body, result)

    # -- each resource's change, in the transaction ---------------------------------------------------------------

    def _unknown(self, resource: str, _db: Database, _body: Body) -> Result:
        raise ValueError(f"unknown resource {resource!r}")

    def _twin(self, db: Database, body: Body) -> Result:
        twin = self.parts.changes.desired(db, str(body["device"]), dict(body["patch"]), None)
        return {"ok": True, "twin": twin.as_json()}

    def _device(self, db: Database, body: Body) -> Result:
        if body.get("remove"):
            self.parts.changes.unregister(db, str(body["device"]))
        else:
            self.parts.changes.register(db, str(body["device"]), body.get("model"), str(body["secret_hash"]))
        return {"ok": True}

    def _model(self, db: Database, body: Body) -> Result:
        store.add_model(db, Model.from_dict(body["model"]))
        return {"ok": True}

    def _alert_ack(self, db: Database, body: Body) -> Result:  # an operator acknowledged it on the relay's page
        alert = ack_alert(db, int(body["id"]), str(body.get("by") or "cloud"), time.time(), self.parts.changes.mirror)
        return {"ok": True, "acked_by": alert["acked_by"]}

    def _rules(self, db: Database, body: Body) -> Result:  # versioned: an older set than the applied one is not
        return apply_rule_set(db, int(body["version"]), dict(body["doc"]), time.time())

    def _cmd(self, _db: Database, body: Body) -> Result:
        if body.get("device") not in self.parts.roster:
            raise store.UnknownDevice(str(body.get("device")))
        return {"ok": True, "dispatched": True}

    def _bundle(self, _db: Database, body: Body) -> Result:  # a rollout's bundle, before its boards' updates
        if self.updates is None:
            raise ValueError("this gateway does not take firmware updates")
        files = body["files"]
        if not isinstance(files, dict) or len(files) > 200:
            raise ValueError("files: an object of up to 200 names and their base64 bytes")
        contents = {str(name): base64.b64decode(str(data), validate=True) for name, data in files.items()}
        ident = stage(self.updates.folder, contents)  # checked: names, the modules every update needs
        if ident != body.get("id"):
            raise ValueError(f"the bundle's files are bundle {ident[:12]}, not {wire.clip(body.get('id'), 64)}")
        return {"ok": True, "bundle": ident}

    def _ota(self, db: Database, body: Body) -> Result:
        """A rollout's update of one board: checked, and kept as a row in this transaction (so a restart before it
        starts still starts it: the row is loaded); started once committed."""
        if self.updates is None:
            raise ValueError("this gateway does not take firmware updates")
        device = str(body["device"])
        if body.get("cancel"):
            return {"ok": True, "cancel": True}
        if body.get("rollback"):  # back to the firmware the board kept from before (an aborted rollout)
            if device not in self.parts.roster:
                raise store.UnknownDevice(device)
            return {"ok": True, "rollback": True}
        update = self.updates.check(device, str(body["bundle"]), int(body.get("confirm_s") or CONFIRM_S))
        if update is not None:
            save_update(db, update.row())
        return {"ok": True}

    # -- what follows each, once committed ------------------------------------------------------------------------

    async def _nothing(self, _body: Body, result: Result) -> Result:
        return result

    async def _publish_desired(self, body: Body, result: Result) -> Result:
        twin = Twin(result["twin"]["desired"]["state"], result["twin"]["desired"]["version"])
        self.parts.link.publish([desired_message(str(body["device"]), twin)])
        return result

    async def _reload_device(self, body: Body, result: Result) -> Result:
        await self.parts.roster.reload(str(body["device"]))
        return result

    async def _reload_models(self, _body: Body, result: Result) -> Result:
        await self.parts.roster.reload_models()
        return result

    async def _rules_applied(self, _body: Body, result: Result) -> Result:
        if result.get("applied") and self.rules_changed is not None:
            # what the edge made of the set goes back with the confirmation: rules left out or applied in part
            return {**result, "problems": await self.rules_changed()}
        return result

    async def _start_update(self, body: Body, result: Result) -> Result:
        assert self.updates is not None
        device = str(body["device"])
        try:
            if result.get("cancel"):
                return {"ok": True, "update": self.updates.cancel(device)}
            if result.get("rollback"):
                answer = await self.parts.commands.send(device, "rollback", {}, 30)
                return {"ok": bool(answer.get("ok")), "rollback": True,
                        **({"value": answer.get("value")} if answer.get("ok") else {"error": answer.get("error")})}
            update = await self.updates.start(device, str(body["bundle"]), int(body.get("confirm_s") or CONFIRM_S))
        except (UpdateError, store.UnknownDevice, CommandFailed) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "state": update["state"]}

    async def _dispatch(self, body: Body, result: Result) -> Result:
        self._commands_running.start_soon(self._command, body)
        return result

    async def _command(self, body: Body) -> None:
        outcome_: Result
        try:
            result = await self.parts.commands.send(str(body["device"]), str(body["name"]), body.get("args") or {},
                                                    float(body.get("timeout", 10)))
            outcome_ = {"result": result}
        except (CommandFailed, RegistryError) as exc:
            outcome_ = {"error": str(exc), "code": getattr(exc, "code", "invalid")}
        except Exception as exc:  # a store that cannot write, say: the command fails, the daemon goes on
            outcome_ = {"error": f"{type(exc).__name__}: {exc}", "code": "failed"}
        up = {"cmd": body.get("cmd"), "device": body.get("device"), **outcome_}
        try:
            await self.parts.writer.write(partial(self.parts.changes.command_result, result=up))
        except Exception as exc:  # the relay times the command out; the daemon goes on
            log.error("result of cloud command %s not queued for the cloud: %s", wire.clip(body.get("cmd")), exc)


@asynccontextmanager
async def open_down(parts: Parts, rules_changed: Callable[[], Awaitable[Any]] | None = None) -> AsyncIterator[Down]:
    """A `Down` whose commands run within this block; leaving it cancels the ones still waiting for a device."""
    async with trio.open_nursery() as nursery:
        yield Down(parts, nursery, rules_changed)
        nursery.cancel_scope.cancel()
