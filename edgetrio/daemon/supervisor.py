"""Components as the daemon runs them: each with a state, since when, and its last error, for `edgetrio status`.

An optional component (a serial bridge, the edge link, the control server, metrics) that fails is restarted with
jittered backoff and the failure recorded; a vital one (broker, store, ingest) that fails stops the daemon with a
one-line reason (`VitalFailure`), so the service manager restarts it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from edgetrio import wire

log = logging.getLogger("edgetrio.supervisor")
BACKOFF_CAP = 60.0


class VitalFailure(Exception):
    """A component the daemon cannot run without failed; the message is one line for the user."""


@dataclass
class Component:
    """One component's state as `status` and /healthz show it: vital ones stop the daemon when they fail for good."""
    name: str
    vital: bool
    state: str = "starting"  # starting, running, restarting, off, stopped
    since: float = 0.0
    last_error: str | None = None
    restarts: int = 0

    def become(self, state: str, error: str | None = None) -> None:
        self.state, self.since = state, time.time()
        if error is not None:
            self.last_error = error

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vital": self.vital, "state": self.state, "since": self.since,
                "last_error": self.last_error, "restarts": self.restarts}


class Supervisor:
    """The daemon's components and their states: optional ones restarted with backoff, vital ones stop the daemon."""

    def __init__(self) -> None:
        self.components: dict[str, Component] = {}

    def add(self, name: str, vital: bool, state: str = "starting") -> Component:
        component = Component(name, vital)
        component.become(state)
        self.components[name] = component
        return component

    def states(self) -> list[dict[str, Any]]:
        return [c.as_dict() for c in self.components.values()]

    async def keep(self, name: str, run: Callable[[], Awaitable[Any]], *, vital: bool = False,
                   base_delay: float = 1.0) -> None:
        """Run `run` until cancelled. If it fails: a vital component raises VitalFailure; an optional one is started
        again after a jittered backoff (0..base, 0..2*base, ... capped), its error kept for `status`. If it returns,
        it is recorded as stopped."""
        component = self.add(name, vital)
        attempt = 0
        while True:
            component.become("running")
            try:
                await run()
            except Exception as exc:
                error = f"{type(exc).__name__}: {wire.clip(str(exc))}"
                if vital:
                    component.become("failed", error)
                    raise VitalFailure(f"{name} failed: {error}") from exc
                delay = random.uniform(0, min(BACKOFF_CAP, base_delay * 2**attempt))
                log.error("%s failed (%s); restarting in %.1f s", name, error, delay, exc_info=exc)
                component.become("restarting", error)
                component.restarts += 1
                attempt += 1
                await trio.sleep(delay)
                continue
            component.become("stopped")
            return
