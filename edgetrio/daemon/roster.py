"""The roster: which devices are registered (with their models) and which are connected, as the daemon sees it now.

Ingest classifies against it, commands check it, and the control channel and the cloud change it through the store.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial

from sqlite_utils import Database

from edgetrio.daemon import store
from edgetrio.daemon.broker import BrokerLink, Credentials
from edgetrio.models import Model
from edgetrio.writer import Writer

log = logging.getLogger("edgetrio.roster")


class Roster:
    """Who is registered (with their model) and who is connected now: presence from the broker's connects and wills,
    with the last seen time kept in the store."""

    def __init__(self, db: Database, writer: Writer, link: BrokerLink, credentials: Credentials) -> None:
        self.writer = writer
        self.link = link
        self.credentials = credentials
        self.models: dict[str, Model | None] = store.device_models(db)
        # a device may hold two connections for a moment: the will of a replaced one arrives after the new birth
        self.connections: Counter[str] = Counter()
        # battery boards asleep, and until about when (they say so before they sleep; a connection clears it)
        self.asleep: dict[str, float] = {r[0]: r[1] for r in db.execute(
            "SELECT id, asleep_until FROM devices WHERE asleep_until IS NOT NULL")}
        # presence left over from a previous run that ended abruptly
        db.execute("UPDATE devices SET online = 0 WHERE online = 1")
        db.conn.commit()

    def __contains__(self, device: object) -> bool:
        return device in self.models

    def online(self, device: str) -> bool:
        return device in self.connections

    def connected(self) -> list[str]:
        return sorted(d for d in self.connections if d in self.models)

    def connection_opened(self, device: str) -> bool:
        """Count a connection; True when the device just came online."""
        self.connections[device] += 1
        self.asleep.pop(device, None)
        return self.connections[device] == 1 and device in self.models

    def connection_closed(self, device: str) -> bool:
        """Count a connection gone; True when the device just went offline."""
        self.connections[device] -= 1
        if self.connections[device] > 0:
            return False
        del self.connections[device]
        return device in self.models

    def set_model(self, device: str, model: Model | None) -> None:
        if device in self.models:
            self.models[device] = model

    async def reload(self, device: str) -> None:
        """After the registry changed in the store: take up the new credentials; a removed device is disconnected."""
        self.credentials.devices = await self.writer.write(store.device_secrets)
        if device in self.credentials.devices:
            self.models[device] = await self.writer.write(partial(store.device_model, device_id=device))
        else:
            self.models.pop(device, None)
            self.link.disconnect(device)

    async def reload_integrations(self) -> None:
        self.credentials.integrations = await self.writer.write(store.integration_secrets)

    async def reload_models(self) -> None:
        for device in list(self.models):
            self.models[device] = await self.writer.write(partial(store.device_model, device_id=device))
