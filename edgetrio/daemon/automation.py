"""Automation at the edge: rules on committed readings, and the actions of rules and schedules.

Ingest tells `Automation` (a `Watch`) what it committed; the rules engine turns readings into transitions without I/O,
and tasks of this component carry them out: an alert transition, its history and its notifications are one
transaction (alerts.py); actions (desired state, commands) run with retries beside ingest, never in its way. The
stored rules are in rulestore.py, schedules in schedules.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from functools import partial
from typing import Any

import trio

from edgetrio.daemon.alerts import Notifier, open_alerts, record_transition
from edgetrio.daemon.commands import CommandFailed, set_desired
from edgetrio.daemon.ingest import Watch
from edgetrio.daemon.parts import Parts
from edgetrio.daemon.rulestore import check_exports, load_automations, note, record_problems
from edgetrio.daemon.schedules import Scheduler
from edgetrio.daemon.topics import Reading
from edgetrio.identity import RegistryError
from edgetrio.rules import Action, Engine, RuleError, Transition, check_rule, parse_rule, parse_schedule

log = logging.getLogger("edgetrio.automation")
TRANSITIONS_WAITING = 10_000  # transitions not yet recorded; past it new ones are dropped (counted, logged)
READINGS_WAITING = 100_000  # committed readings not yet judged by the rules; past it the oldest are skipped (counted)


class Automation(Watch):
    """Rules on the gateway: judges each committed reading against the rules that cover its device, records the
    alerts they raise and resolve, and runs their actions (desired state, commands, exports); owns the notifier and
    the scheduler, and reloads all when rules change here or come from the cloud."""

    def __init__(self, parts: Parts, sinks: Collection[str] = (), exported: Callable[[], None] = lambda: None) -> None:
        self.sinks = frozenset(sinks)  # the export sinks rules may send readings to
        self.exported = exported  # wakes them
        self.link, self.writer, self.roster = parts.link, parts.writer, parts.roster
        self.changes, self.commands = parts.changes, parts.commands
        self.engine = Engine()
        self.counts: Counter[str] = Counter()
        self.notifier = Notifier(self.writer, self.counts)
        self.scheduler = Scheduler(self.writer, self.roster, self._act)
        self._send, self._receive = trio.open_memory_channel[Transition](TRANSITIONS_WAITING)
        self._judge: deque[tuple[float, list[Reading]]] = deque()  # commits waiting for the rules
        self._judge_count = 0
        self._judge_wake = trio.Event()

    def state(self) -> dict[str, Any]:
        """What `edgetrio status` shows: the rules and schedules loaded, what waits, what fires."""
        firing = sum(1 for track in self.engine.tracks.values() if track.state == "firing")
        return {"rules": len(self.engine.rules), "schedules": len(self.scheduler.schedules), "firing": firing,
                "readings_waiting": self._judge_count, "transitions_waiting": self._send.statistics().current_buffer_used}

    # what ingest tells it: the commit's readings are judged in this component's own task, so the rules never hold
    # up the next commit (SQLite writes in its thread meanwhile)
    def committed(self, readings: list[Reading]) -> None:
        if not self.engine.rules:
            return
        self._judge.append((time.time(), readings))
        self._judge_count += len(readings)
        while self._judge_count > READINGS_WAITING:
            _, skipped = self._judge.popleft()
            self._judge_count -= len(skipped)
            self.counts["rules_skipped"] += len(skipped)
            log.error("rules: %d readings skipped: the rules fell behind ingest", len(skipped))
        self._judge_wake.set()

    def judge(self, readings: list[Reading], now: float) -> None:
        """Run the rules on committed readings and queue the transitions."""
        for reading in readings:
            model = self.roster.models.get(reading.device)
            try:
                transitions = self.engine.evaluate(reading.device, model.name if model else None, reading.ts or now,
                                                   reading.values)
            except Exception:  # what no check foresaw costs this reading's judgement, never the rules' task
                self.counts["rules_failed"] += 1
                log.exception("rules: reading of %s not judged", reading.device)
                continue
            for transition in transitions:
                try:
                    self._send.send_nowait(transition)
                except trio.WouldBlock:
                    self.counts["automation_dropped"] += 1
                    log.error("rule %s: transition %s of %s dropped: too many waiting", transition.rule.name,
                              transition.state, transition.device)

    async def _judge_commits(self) -> None:
        while True:
            await self._judge_wake.wait()
            self._judge_wake = trio.Event()
            while self._judge:
                now, readings = self._judge.popleft()
                self._judge_count -= len(readings)
                self.judge(readings, now)
                await trio.sleep(0)  # ingest goes on between commits

    def meta(self, device: str) -> None:
        self.engine.models_changed()

    # run
    async def reload(self) -> dict[str, str]:
        """Load the stored rules and schedules; a rule that does not fit the devices' models is left out (logged, and
        noted in its history), one that fits some of them applied to those. Returns each such rule's problem."""
        rows = await self.writer.write(load_automations)
        rules, schedules, left_out = [], {}, []
        problems: dict[str, str] = {}
        models = dict(self.roster.models)
        for row in rows:
            body = json.loads(row["body"])
            try:
                if row["kind"] == "rule":
                    rule = check_rule(parse_rule(body), models)
                    check_exports(rule, self.sinks)
                    rules.append(rule)
                    if rule.skipped:  # applied to the devices it can judge; which it skips, and why, is said
                        skips = "; ".join(f"devices of model {name!r} skipped ({why})" for name, why in rule.skipped)
                        log.warning("%s applied in part: %s", row["name"], skips)
                        problems[row["name"]] = f"applied in part: {skips}"
                else:
                    schedules[row["name"]] = parse_schedule(body)
            except RuleError as exc:
                left_out.append(row["name"])
                log.error("%s left out: %s", row["name"], exc)
                await self.writer.write(partial(note, name=row["name"], device="", event="invalid", detail=str(exc),
                                                now=time.time()))
                problems[row["name"]] = str(exc)
        await self.writer.write(partial(record_problems, problems=problems))
        self.engine.load(rules)
        for alert in await self.writer.write(open_alerts):
            self.engine.restore(alert["rule"], alert["device"], alert["state"], alert["fired"] or alert["started"])
        self.scheduler.load(schedules)
        log.info("automation: %d rules, %d schedules loaded", len(rules), len(schedules))
        return {name: problem if name not in left_out else f"left out: {problem}" for name, problem in problems.items()}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Record transitions, run actions and schedules, send notifications (the rules are loaded by `reload`)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._judge_commits)
            nursery.start_soon(self._record_transitions, nursery)
            nursery.start_soon(self.notifier.run)
            nursery.start_soon(self.scheduler.run, nursery)
            task_status.started()

    async def _record_transitions(self, actions: trio.Nursery) -> None:
        async for t in self._receive:
            notify = self.notifier.may_notify(t, time.monotonic())
            try:
                queued = await self.writer.write(partial(record_transition, t=t, mirror=self.changes.mirror,
                                                         notify=notify))
            except Exception as exc:  # the store cannot write: the alert is lost, its actions still run
                log.error("rule %s: %s of %s not recorded: %s", t.rule.name, t.state, t.device, exc)
                queued = 0
            if queued:
                self.notifier.queued()
            if any(a.export for a in (t.rule.actions if t.state == "firing" else t.rule.on_clear)):
                self.exported()
            if t.state == "firing" and t.rule.actions:
                actions.start_soon(self._act, t.rule.name, t.device, t.rule.actions)
            elif t.state == "resolved" and t.rule.on_clear:
                actions.start_soon(self._act, t.rule.name, t.device, t.rule.on_clear)

    async def _act(self, name: str, device: str, actions: tuple[Action, ...]) -> None:
        for action in actions:
            if action.export is not None:
                continue  # queued with the alert (record_transition)
            target = action.device or device
            for attempt in range(action.retries + 1):
                try:
                    if action.set is not None:
                        await set_desired(self.writer, self.changes, self.link, target, action.set, None)
                    else:
                        assert action.command is not None
                        await self.commands.send(target, action.command, action.args, action.timeout)
                    event, detail = "action_ok", action.describe().replace("the device", target)
                except (CommandFailed, RegistryError) as exc:
                    event, detail = "action_failed", f"{action.describe()}: {exc} (try {attempt + 1})"
                except Exception as exc:  # the store cannot write, say: noted, retried
                    event, detail = "action_failed", f"{action.describe()}: {type(exc).__name__}: {exc}"
                try:
                    await self.writer.write(partial(note, name=name, device=target, event=event, detail=detail,
                                                    now=time.time()))
                except Exception as exc:
                    log.error("rule %s: %s not noted: %s", name, detail, exc)
                if event == "action_ok":
                    break
                log.warning("rule %s: %s", name, detail)
                if attempt < action.retries:
                    await trio.sleep(2.0 ** attempt)
