"""Schedules on the gateway: each runs its actions on the devices it covers at its times (cron or every N), records
each run, and after a restart runs a missed one once or skips it, as the schedule says."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from edgetrio.daemon.roster import Roster
from edgetrio.daemon.rulestore import note, record_run, schedule_runs
from edgetrio.rules import Action, Schedule
from edgetrio.writer import Writer

log = logging.getLogger("edgetrio.schedules")
# (schedule name, device, actions): runs them, with their retries, and notes what happened
Act = Callable[[str, str, tuple[Action, ...]], Awaitable[None]]


class Scheduler:
    """Fires the loaded schedules; `load` replaces them (a schedule that did not change keeps its planned run)."""

    def __init__(self, writer: Writer, roster: Roster, act: Act) -> None:
        self.writer, self.roster, self.act = writer, roster, act
        self.schedules: dict[str, Schedule] = {}
        self._planned: dict[str, tuple[Schedule, float]] = {}  # each schedule's next run, as it was planned
        self._reschedule = trio.Event()

    def load(self, schedules: dict[str, Schedule]) -> None:
        self.schedules = schedules
        self._reschedule.set()

    async def run(self, actions: trio.Nursery) -> None:
        """Fire each schedule at its time (actions start in `actions`), replanning when the schedules change."""
        next_at: dict[str, float] = {}
        while True:
            if self._reschedule.is_set():
                self._reschedule = trio.Event()
                next_at = await self._plan()
            now = time.time()
            for name, at in sorted(next_at.items(), key=lambda item: item[1]):
                schedule = self.schedules.get(name)
                if at > now or schedule is None:  # not yet, or removed while this round ran
                    continue
                devices = [d for d in self.roster.models if schedule.watches(d)]
                detail = f"{len(devices)} devices: {', '.join(devices[:10])}"
                try:
                    await self.writer.write(partial(record_run, name=name, at=at, detail=detail))
                except Exception as exc:  # not recorded: it may run again after a restart
                    log.error("schedule %s: run not recorded: %s", name, exc)
                for device in devices:
                    actions.start_soon(self.act, name, device, schedule.actions)
                following = schedule.next_run(at)
                while following <= now:
                    following = schedule.next_run(following)
                next_at[name] = following
                self._planned[name] = (schedule, following)
            wait = min(next_at.values(), default=now + 3600) - time.time()
            with trio.move_on_after(max(0.0, min(wait, 3600))):
                await self._reschedule.wait()

    async def _plan(self) -> dict[str, float]:
        """Next run of each schedule (kept for those that did not change); a run missed while the daemon was down
        runs once now or is skipped, as the schedule says."""
        last_runs = await self.writer.write(schedule_runs)
        now, out = time.time(), {}
        for name, schedule in self.schedules.items():
            planned = self._planned.get(name)
            if planned is not None and planned[0] == schedule:
                out[name] = planned[1]
                continue
            last = last_runs.get(name)
            if last is None:
                out[name] = schedule.next_run(now)
                continue
            due = schedule.next_run(last)
            if due > now:
                out[name] = due
            elif schedule.missed == "run_once":
                out[name] = now
            else:
                out[name] = schedule.next_run(now)
                await self.writer.write(partial(note, name=name, device="", event="missed",
                                                detail=f"run due {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(due))}"
                                                       " UTC skipped", now=now))
        self._planned = {name: (self.schedules[name], at) for name, at in out.items()}
        return out
