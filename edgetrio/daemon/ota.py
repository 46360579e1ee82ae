"""Firmware updates over the air: a bundle (the .mpy files flashing writes into a board's lib/) sent to a board in
chunks on its own `ota` topic, and the board's answers on `ota/status` followed to the end.

The board leads: each answer says where it wants the next chunk (file, offset, the largest chunk it takes), so a
transfer cut by a power loss or a dropped link resumes from what its staging folder holds, and a repeated or lost
chunk costs one round trip. The board checks every file's sha256 and the file list against the bundle id, swaps in
one atomic rename, restarts into the new bundle, and confirms it only once a reading is acknowledged; otherwise it goes
back by itself and says why (firmware/lib/ota.py, firmware/main.py).

Bundles are kept content-addressed in DATA/bundles/<id>/, put there by `edgetrio ota`; only the admin path (the
control channel) starts an update, and only the gateway publishes on a device's `ota` topic (the ACL keeps every
device to sending on its own channels).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from sqlite_utils import Database

from edgetrio import wire
from edgetrio.bundles import BundleError, bundle_files, bundle_id, manifest
from edgetrio.daemon import store
from edgetrio.daemon.ingest import Watch
from edgetrio.daemon.parts import Parts
from edgetrio.daemon.topics import device_topic

log = logging.getLogger("edgetrio.ota")

BUNDLES = "bundles"
ANSWER_WAIT = 10.0  # no answer from an online board this long: ask it where it is
MAX_DROPS = 3  # a board that drops its link this often while receiving, without progress, cannot take the update
MAX_UNANSWERED = 6  # asked where it is this often with no answer (a minute): the board cannot take the update
MAX_FILE_RETRIES = 3  # a file whose sha256 fails this often at the board: the update fails
BUNDLE_KEEP_S = 86400  # a stored bundle no update in progress uses goes after a day (a new `ota` stages it again)
CONFIRM_S = 300  # how long a board runs a new bundle without an acknowledged reading before it restarts to retry
DONE = frozenset({"confirmed", "failed", "rolled back", "cancelled"})


class UpdateError(BundleError):
    """An update that cannot start (no such bundle, a device not registered, one already running)."""


def prune_bundles(folder: Path, keep: set[str], now: float, max_age: float = BUNDLE_KEEP_S) -> list[str]:
    """Remove stored bundles (and staging leftovers) older than `max_age` that no update in progress uses; returns
    the names removed."""
    removed = []
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        if path.name not in keep and now - path.stat().st_mtime > max_age:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def create_table(db: Database) -> None:
    db.table("firmware_updates").create(
        {"device": str, "bundle": str, "state": str, "detail": str, "started": float, "finished": float,
         "total": int, "sent": int, "chunks": int, "resumed_from": int, "confirm_s": int},
        pk="device", if_not_exists=True)


def save_update(db: Database, row: dict[str, Any]) -> None:
    db.table("firmware_updates").upsert(row, pk="device")


def list_updates(db: Database) -> list[dict[str, Any]]:
    return list(db.table("firmware_updates").rows_where(order_by="started"))


@dataclass
class Update:
    """One board's update, as far as the gateway knows it."""

    device: str
    bundle: str
    total: int
    # queued, restarting (into its update mode: sensors off, the heap free), sending, installed (restarting into
    # it), trial (running it, not yet confirmed), and the ends: confirmed, failed, rolled back, cancelled
    state: str = "queued"
    detail: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    sent: int = 0  # bytes sent, resends included
    chunks: int = 0
    resumed_from: int | None = None  # what the board held when it last answered a `begin` (a resume if above 0)
    confirm_s: int = CONFIRM_S
    position: int = 0  # bytes of the bundle the board holds
    asked: float = 0.0  # when the board was last sent something it answers
    retries: int = 0
    begun: bool = False  # a `begin` went out: the next answer says where the board resumes
    drops: int = 0  # links lost while the board had a message to answer, since it last made progress
    unanswered: int = 0  # times in a row the board was asked where it is and said nothing

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        for transient in ("position", "asked", "retries", "begun", "drops", "unanswered"):
            del row[transient]
        return row

    def view(self) -> dict[str, Any]:
        return {**self.row(), "position": self.position}


class Updates(Watch):
    """The gateway's side of firmware updates: starts them on the admin path's request, sends each board the chunk it
    asks for, resumes when a board comes back, and keeps the outcome in the store."""

    def __init__(self, parts: Parts, data_dir: Path) -> None:
        self.link, self.writer, self.roster = parts.link, parts.writer, parts.roster
        self.mirror = parts.changes.mirror
        self.folder = data_dir / BUNDLES
        self.updates: dict[str, Update] = {}
        self._bundles: dict[str, tuple[list[list[Any]], list[bytes]]] = {}
        self._rows_in, self._rows = trio.open_memory_channel[dict[str, Any]](1000)

    async def load(self) -> None:
        """The updates left unfinished by the last run go on where their boards are."""
        await self.writer.write(create_table)
        for row in await self.writer.write(list_updates):
            update = Update(**{k: v for k, v in row.items() if k in Update.__dataclass_fields__})
            if update.state in ("installed", "trial", "confirmed"):
                update.position = update.total  # the board had it all
            if update.state in DONE:
                self.updates[update.device] = update
                continue
            try:
                self.bundle(update.bundle)
            except UpdateError as exc:
                self._finish(update, "failed", f"the bundle is gone from {self.folder}: {exc}")
            self.updates[update.device] = update
        in_use = {u.bundle for u in self.updates.values() if u.state not in DONE}
        for name in prune_bundles(self.folder, in_use, time.time()):
            log.info("stored firmware bundle %s removed (unused for a day)", name[:12])

    def bundle(self, bundle: str) -> tuple[list[list[Any]], list[bytes]]:
        """A stored bundle's files and their bytes, checked against its id once."""
        if bundle not in self._bundles:
            lib = self.folder / bundle
            if len(bundle) != 64 or not lib.is_dir():
                raise UpdateError(f"no bundle {bundle[:64]!r} in {self.folder} (`edgetrio ota` puts it there)")
            files = bundle_files(lib)
            if bundle_id(files) != bundle:
                raise UpdateError(f"bundle {bundle[:12]} in {lib} does not match its id: put it there again")
            # what a board receives: the manifest (its sha256 is the bundle id), then each file it lists
            self._bundles[bundle] = ([["manifest.txt", len(manifest(files)), bundle], *files],
                                     [manifest(files), *[(lib / name).read_bytes() for name, _, _ in files]])
        return self._bundles[bundle]

    def check(self, device: str, bundle: str, confirm_s: int = CONFIRM_S) -> Update | None:
        """The update `start` would begin (None: this one is in progress already); UpdateError if it cannot."""
        if device not in self.roster:
            raise store.UnknownDevice(device)
        if device in self.link.sinks:  # attached by a serial line
            raise UpdateError(f"{device} is on a serial line, which carries JSON only: update it with `edgetrio "
                              f"flash` (over the air needs its Wi-Fi link)")
        files, _ = self.bundle(bundle)
        current = self.updates.get(device)
        if current is not None and current.state not in DONE:
            if current.bundle == bundle:
                return None  # asked again (a CLI that reconnected): the same update goes on
            raise UpdateError(f"{device} is being updated to bundle {current.bundle[:12]} ({current.state}): "
                              f"wait for it or `edgetrio ota {device} --cancel`")
        if not 30 <= confirm_s <= 86400:
            raise UpdateError("confirm_s: 30 to 86400 seconds")
        return Update(device, bundle, sum(size for _, size, _ in files[1:]), confirm_s=confirm_s)

    async def start(self, device: str, bundle: str, confirm_s: int = CONFIRM_S) -> dict[str, Any]:
        update = self.check(device, bundle, confirm_s)
        if update is None:
            return self.updates[device].view()
        self.updates[device] = update
        await self.writer.write(partial(self._store_row, row=update.row()))
        log.info("firmware update queued device=%s bundle=%s bytes=%d", device, bundle[:12], update.total)
        online = self.roster.online(device)
        if online:
            self._begin(update)
        return {**update.view(), "online": online}

    def cancel(self, device: str) -> dict[str, Any]:
        update = self.updates.get(device)
        if update is None or update.state in DONE:
            raise UpdateError(f"no update of {device} is in progress")
        if update.state in ("installed", "trial"):
            raise UpdateError(f"{device} already runs the new bundle on trial: it confirms or goes back by itself")
        self._finish(update, "cancelled", "cancelled (what the board received stays in its staging folder, and "
                                          "the same bundle resumes from there)")
        return update.view()

    def status(self, device: str) -> dict[str, Any] | None:
        update = self.updates.get(device)
        if update is None and device not in self.roster:
            raise store.UnknownDevice(device)
        return update.view() if update else None

    def all(self) -> list[dict[str, Any]]:
        return [u.view() for u in sorted(self.updates.values(), key=lambda u: u.started)]

    # -- what the board says ------------------------------------------------------------------------------------

    def presence(self, device: str, online: bool) -> None:
        update = self.updates.get(device)
        # back online, a board is asked where it is once it listens on its `ota` topic (ota_listening): a `begin`
        # sent at its connect, before its subscription, was lost and cost the 10 s wait for the retry
        if update is None or update.state in DONE or online:
            return
        if update.asked and update.state in ("queued", "sending"):
            update.drops += 1  # it went while it had something of ours to answer: out of memory, perhaps
            if update.drops >= MAX_DROPS:
                self._finish(update, "failed", f"the board dropped its link {MAX_DROPS} times while receiving, "
                                               "without progress (out of memory? see its console)")

    def ota_listening(self, device: str) -> None:
        update = self.updates.get(device)
        if update is not None and update.state not in DONE:
            self._begin(update)  # after a restart or a dropped link: the board says where it is

    def ota(self, device: str, body: dict[str, Any]) -> None:
        update = self.updates.get(device)
        state = body.get("state")
        if update is None or update.state in DONE or body.get("bundle") != update.bundle:
            if state in ("rolled back", "failed"):  # an earlier update's outcome, reported at every connect
                log.info("firmware update of %s: %s (%s)", device, state, wire.clip(body.get("reason"), 300))
            return
        update.asked, update.unanswered = 0.0, 0
        if state == "receiving":
            self._send_chunk(update, body)
        elif state in ("restarting", "installed", "trial"):  # it restarts (or did): it is asked again when back
            if update.state != state:
                update.state = state
                if state != "restarting":
                    update.position = update.total
                self._persist(update)
                log.info("firmware update device=%s bundle=%s %s", device, update.bundle[:12], state)
        elif state == "confirmed":  # what a board says is shown to the admin: clipped, control characters escaped
            self._finish(update, "confirmed", f"running bundle {update.bundle[:12]}"
                         + (f" (firmware {wire.clip(body['version'], 40)})" if body.get("version") else ""))
        elif state in ("failed", "rolled back"):
            self._finish(update, str(state), wire.clip(body.get("reason") or "no reason given", 300))

    def _send_chunk(self, update: Update, body: dict[str, Any]) -> None:
        files, data = self.bundle(update.bundle)
        index, offset, size = body.get("file"), body.get("offset"), body.get("chunk")
        if not (isinstance(index, int) and isinstance(offset, int) and isinstance(size, int)
                and 0 <= index < len(files) and 0 <= offset <= files[index][1] and size > 0):
            self._finish(update, "failed", f"the board asked for a chunk that does not exist: {json.dumps(body)[:200]}")
            return
        if body.get("error"):
            update.retries += 1
            error = wire.clip(body["error"], 200)
            log.warning("firmware update device=%s: %s", update.device, error)
            if update.retries > MAX_FILE_RETRIES:
                self._finish(update, "failed", f"{error} ({MAX_FILE_RETRIES} times)")
                return
        position = sum(f[1] for f in files[1:index]) + (offset if index else 0)  # the manifest is not counted
        if position > update.position:
            update.drops = 0
        update.position = position
        if update.begun:
            update.begun = False
            if update.position and update.resumed_from is not None:
                log.info("firmware update device=%s resumes at %d of %d bytes", update.device, update.position,
                         update.total)
            update.resumed_from, update.state = update.position, "sending"
            self._persist(update)
        piece = data[index][offset:offset + size]
        head = {"op": "chunk", "bundle": update.bundle, "file": index, "offset": offset}
        self.link.publish([(device_topic(update.device, "ota"), json.dumps(head).encode() + b"\n" + piece)])
        update.sent += len(piece)
        update.chunks += 1
        update.asked = time.monotonic()

    def _begin(self, update: Update) -> None:
        files, _ = self.bundle(update.bundle)
        message = {"op": "begin", "bundle": update.bundle, "count": len(files), "size": files[0][1],
                   "total": update.total, "confirm_s": update.confirm_s}
        if update.state == "queued":  # asked anew: a bundle this board rolled back before may be tried again
            message["again"] = True
        self.link.publish([(device_topic(update.device, "ota"), json.dumps(message).encode())])
        update.asked, update.begun = time.monotonic(), True

    def _finish(self, update: Update, state: str, detail: str) -> None:
        update.state, update.detail, update.finished = state, detail, time.time()
        if state == "confirmed":
            update.position = update.total
        (log.info if state == "confirmed" else log.warning)(
            "firmware update device=%s bundle=%s %s: %s", update.device, update.bundle[:12], state, detail)
        self._persist(update)

    def _persist(self, update: Update) -> None:
        try:
            self._rows_in.send_nowait(update.row())
        except trio.WouldBlock:
            log.warning("firmware update state of %s not stored: too many waiting", update.device)

    async def run(self) -> None:
        """Store state changes, and ask a board that stopped answering where it is."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._store_rows)
            while True:
                await trio.sleep(1)
                now = time.monotonic()
                for update in list(self.updates.values()):
                    if (update.state in ("queued", "restarting", "sending") and update.asked and now - update.asked > ANSWER_WAIT
                            and self.roster.online(update.device)):
                        update.unanswered += 1
                        if update.unanswered > MAX_UNANSWERED:
                            self._finish(update, "failed", f"the board stopped answering ({MAX_UNANSWERED} times "
                                                           f"in {MAX_UNANSWERED * ANSWER_WAIT:g} s; see its console)")
                            continue
                        log.info("firmware update device=%s: no answer, asking where it is", update.device)
                        self._begin(update)

    async def _store_rows(self) -> None:
        async for row in self._rows:
            await self.writer.write(partial(self._store_row, row=row))

    def _store_row(self, db: Database, row: dict[str, Any]) -> None:
        save_update(db, row)
        self.mirror(db, "ota", row)  # to the relay, when linked: a rollout follows its boards by these
