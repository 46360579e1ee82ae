"""Commands to devices: send one, wait for its result within a timeout, and record both in the store."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from functools import partial
from typing import Any

import trio
from sqlite_utils import Database

from edgetrio.daemon import store
from edgetrio.daemon.broker import BrokerLink
from edgetrio.daemon.changes import StateChanges
from edgetrio.daemon.roster import Roster
from edgetrio.daemon.topics import desired_message, device_topic
from edgetrio.twin import Twin
from edgetrio.writer import Writer

log = logging.getLogger("edgetrio.commands")


class CommandFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Commands:
    """Commands to devices: sends one, waits for its result (or a timeout) and stores both."""

    def __init__(self, link: BrokerLink, writer: Writer, roster: Roster) -> None:
        self.link = link
        self.writer = writer
        self.roster = roster
        self._waiting: dict[str, tuple[str, trio.MemorySendChannel[dict[str, Any]]]] = {}

    async def send(self, device: str, name: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a command and wait for its result; raises UnknownDevice, or CommandFailed (offline, timeout)."""
        if device not in self.roster:
            raise store.UnknownDevice(device)
        wakes = None if self.roster.online(device) else self.roster.asleep.get(device)
        if not self.roster.online(device) and wakes is None:
            raise CommandFailed("offline", f"device {device!r} is not connected")
        cmd_id = uuid.uuid4().hex[:16]
        await self.writer.write(partial(store.record_command, cmd_id=cmd_id, device_id=device, name=name, args=args,
                                        now=time.time(), status="sent" if wakes is None else "held"))
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[cmd_id] = (device, send)
        try:
            if wakes is None:
                self.link.publish([command_message(device, cmd_id, name, args)])
            # else held: sent when the board, awake again, subscribes to its commands (`release`)
            with trio.move_on_after(timeout):
                result = await receive.receive()
                status = "ok" if result.get("ok") else "error"
                await self.writer.write(partial(store.finish_command, cmd_id=cmd_id, status=status, result=result,
                                                now=time.time()))
                return result
        finally:
            del self._waiting[cmd_id]
        if wakes is not None:  # still held (or sent at a wake and not answered yet): its result is recorded when it comes
            wake = time.strftime("%H:%M:%S", time.localtime(wakes))
            raise CommandFailed("held", f"device {device!r} is asleep (next wake ~{wake}): command {name!r} is held "
                                        f"for its next wake; its result is recorded then (command id {cmd_id})")
        await self.writer.write(partial(store.finish_command, cmd_id=cmd_id, status="timeout", result=None,
                                        now=time.time()))
        raise CommandFailed("timeout", f"device {device!r} did not answer command {name!r} within {timeout:g} s")

    def release(self, device: str, held: list[dict[str, Any]]) -> None:
        """A sleeping board woke and listens for commands: what was held for it goes out now."""
        if held:
            log.info("sending %d held commands to device=%s", len(held), device)
            self.link.publish([command_message(device, c["id"], c["name"], c["args"]) for c in held])

    def deliver(self, device: str, cmd_id: str, body: dict[str, Any]) -> bool:
        """Hand a result to the command waiting for it; False when none waits (a late result)."""
        waiter = self._waiting.get(cmd_id)
        if waiter is None or waiter[0] != device:
            return False
        with contextlib.suppress(trio.WouldBlock):  # a repeated result: the first one counts
            waiter[1].send_nowait(body)
        return True


def command_message(device: str, cmd_id: str, name: str, args: dict[str, Any]) -> tuple[str, bytes]:
    return device_topic(device, "cmd"), json.dumps({"id": cmd_id, "name": name, "args": args}).encode()


def record_late_result(db: Database, cmd_id: str, body: dict[str, Any], now: float) -> None:
    """A result that came after its command timed out still goes into the command's row."""
    status = "ok" if body.get("ok") else "error"
    if store.finish_command(db, cmd_id, status, body, now):
        log.info("late command result stored id=%s", cmd_id)


async def set_desired(writer: Writer, changes: StateChanges, link: BrokerLink, device: str, patch: dict[str, Any],
                      version: int | None) -> Twin:
    """Change a device's desired state (with its cloud mirror) and tell the device: the one way the CLI, the
    dashboard and Home Assistant set it. Raises VersionConflict on a stale version, UnknownDevice."""
    twin: Twin = await writer.write(partial(changes.desired, device=device, patch=patch, version=version))
    link.publish([desired_message(device, twin)])
    return twin
