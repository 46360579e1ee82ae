"""The parts most of the gateway's components work with, made once by the gateway's root and handed on as one."""

from __future__ import annotations

from dataclasses import dataclass

from edgetrio.daemon.broker import BrokerLink
from edgetrio.daemon.changes import StateChanges
from edgetrio.daemon.commands import Commands
from edgetrio.daemon.roster import Roster
from edgetrio.writer import Writer


@dataclass(frozen=True)
class Parts:
    """The bus (the embedded broker), the store's one writer, the registered devices and who is online, the state
    changes written with their mirror to the cloud, and the commands waiting for a device's answer."""

    link: BrokerLink
    writer: Writer
    roster: Roster
    changes: StateChanges
    commands: Commands
