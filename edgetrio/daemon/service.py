"""The service manager's side: systemd's notify protocol (readiness, watchdog, status) spoken over its socket.

systemd starts a `Type=notify` service with NOTIFY_SOCKET set; the daemon says READY=1 once the broker listens and the
store is open, and, when the unit has `WatchdogSec=`, sends WATCHDOG=1 from the trio loop at half the interval, so a
wedged loop stops the pings and systemd restarts the daemon. Without NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger("edgetrio.service")


def notify(*fields: str) -> bool:
    """Send `KEY=value` lines to the service manager; False when there is none (or it cannot be reached)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings the service manager asks for (half its timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


async def feed_watchdog() -> None:
    """Ping the service manager's watchdog until cancelled (from the trio loop: a blocked loop stops the pings)."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)
