"""Automation at the edge: rules on committed readings, schedules, alerts, and their notifications.

Ingest tells `Automation` (a `Watch`) what it committed; the rules engine turns readings into transitions without I/O,
and tasks of this component carry them out: an alert transition, its history and its notifications are one
transaction; actions (desired state, commands) run with retries beside ingest, never in its way; notifications go out
from a durable outbox through apprise, each marked sent once its target took it, so a restart sends what was not.
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
from sqlite_utils import Database

from edgetrio.accounts import NotFound
from edgetrio.daemon.broker import BrokerLink
from edgetrio.daemon.changes import Changes
from edgetrio.daemon.commands import CommandFailed, Commands, set_desired
from edgetrio.daemon.ingest import Reading
from edgetrio.daemon.pipeline import Watch
from edgetrio.daemon.registry import Model
from edgetrio.daemon.roster import Roster
from edgetrio.identity import RegistryError
from edgetrio.rules import (
    Action,
    Engine,
    Rule,
    RuleError,
    Schedule,
    Subject,
    Transition,
    Window,
    budget_problem,
    check_notify_urls,
    check_rule,
    compile_condition,
    holds,
    parse_document,
    parse_rule,
    parse_schedule,
)
from edgetrio.writer import Writer

log = logging.getLogger("edgetrio.automation")
TRANSITIONS_WAITING = 10_000  # transitions not yet recorded; past it new ones are dropped (counted, logged)
READINGS_WAITING = 100_000  # committed readings not yet judged by the rules; past it the oldest are skipped (counted)
NOTIFY_RETRY_CAP = 300.0  # seconds between tries of a notification whose target is down, at most
NOTIFY_TIMEOUT = 30.0  # seconds one notification may take
HISTORY_LIMIT = 100
# at most this many alerts of one rule notify within the period, whatever its cooldown: a flapping sensor on a rule
# without one cannot flood a phone. The alerts are still recorded; their history says what was held back.
NOTIFY_LIMIT = 10
NOTIFY_LIMIT_SECONDS = 600.0


# -- the store's side (runs in the writer, or in the CLI when no daemon runs) ----------------------------------------

def check_exports(rule: Rule, sinks: Collection[str]) -> None:
    """An `export` action must name a sink of the daemon's config that takes what rules send (select = "rules")."""
    for action in (*rule.actions, *rule.on_clear):
        if action.export is not None and action.export not in sinks:
            known = ", ".join(sorted(sinks)) or "none"
            raise RuleError(f"rule {rule.name!r}: export to {action.export!r}: no such sink with select = \"rules\" "
                            f"in the daemon's config (those there: {known})")


def _check_budget(db: Database, bodies: dict[str, dict[str, Any]], keep: str) -> None:
    """Refuse what would take the gateway's rules together past their budget (rules.budget_problem); `bodies` replace
    rules by name, `keep` is the SQL condition of the stored rules that stay."""
    kept = [json.loads(r["body"]) for r in db.query(
        f"SELECT name, body FROM automations WHERE kind = 'rule' AND ({keep})") if r["name"] not in bodies]
    problem = budget_problem([*kept, *bodies.values()])
    if problem:
        raise RuleError(f"the gateway's rules would have {problem}: remove rules, or share them between devices")


def add_automations(db: Database, doc: dict[str, Any], models: dict[str, Model | None], source: str = "local",
                    now: float | None = None, sinks: Collection[str] | None = None) -> list[str]:
    """Add (or replace, by name) the rules and schedules of a rule file's document; checked against the models of
    the registered devices (and the sinks, when known) first. Returns the names."""
    rules, schedules = parse_document(doc)
    for rule in rules:
        check_rule(rule, models)
        if sinks is not None:
            check_exports(rule, sinks)
    check_notify_urls(rules)
    _check_budget(db, {r.name: r.body for r in rules}, "1")
    now = time.time() if now is None else now
    for kind, items in (("rule", rules), ("schedule", schedules)):
        for item in items:
            db.table("automations").upsert({"name": item.name, "kind": kind, "source": source,
                                            "body": json.dumps(item.body), "added": now, "problem": None}, pk="name")
            note(db, item.name, "", "added", f"from {source}", now)
    return [r.name for r in rules] + [s.name for s in schedules]


def apply_rule_set(db: Database, version: int, doc: dict[str, Any], now: float) -> dict[str, Any]:
    """The cloud's rule set for this node replaces the previous one, if it is newer. Rules that do not fit the
    devices here are stored, and left out at load with an 'invalid' entry in their history."""
    rules, schedules = parse_document(doc)
    check_notify_urls(rules)
    current = next(iter(db.query("SELECT version FROM rule_sets WHERE source = 'cloud'")), {"version": 0})["version"]
    if version <= current:
        return {"ok": True, "version": current, "applied": False}
    local = {r["name"] for r in db.query("SELECT name FROM automations WHERE source != 'cloud'")}
    clash = sorted(local & ({r.name for r in rules} | {s.name for s in schedules}))
    if clash:
        raise RuleError(f"{clash[0]!r} is a local rule or schedule of this gateway; the cloud's set may not replace it")
    _check_budget(db, {r.name: r.body for r in rules}, "source != 'cloud'")
    db.execute("DELETE FROM automations WHERE source = 'cloud'")
    for kind, items in (("rule", rules), ("schedule", schedules)):
        for item in items:
            db.table("automations").insert({"name": item.name, "kind": kind, "source": "cloud",
                                            "body": json.dumps(item.body), "added": now})
    db.table("rule_sets").upsert({"source": "cloud", "version": version}, pk="source")
    note(db, "", "", "rule_set", f"cloud version {version}: {len(rules)} rules, {len(schedules)} schedules", now)
    return {"ok": True, "version": version, "applied": True}


def remove_automation(db: Database, name: str) -> None:
    if not list(db.query("SELECT 1 FROM automations WHERE name = ?", [name])):
        raise RegistryError(f"no rule or schedule {name!r} (see `edgetrio rule list`)")
    db.execute("DELETE FROM automations WHERE name = ?", [name])
    note(db, name, "", "removed", "", time.time())


def list_automations(db: Database) -> list[dict[str, Any]]:
    out = []
    for row in db.query("SELECT name, kind, source, body, added, problem FROM automations ORDER BY name"):
        body = json.loads(row["body"])
        out.append({"name": row["name"], "kind": row["kind"], "source": row["source"], "added": row["added"],
                    "problem": row["problem"],
                    "devices": body.get("devices") or ([f"model {body['model']}"] if body.get("model") else []),
                    "when": body.get("when") or body.get("cron") or f"every {body.get('every')}", "body": body})
    return out


def history(db: Database, name: str, limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
    rows = db.query("SELECT ts, name, device, event, detail FROM rule_history WHERE name = ? ORDER BY id DESC LIMIT ?",
                    [name, limit])
    return list(reversed(list(rows)))


def _alert_json(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["values"] = json.loads(out.pop("values_") or "{}")
    return out


def list_alerts(db: Database, everything: bool = False, limit: int = 500) -> list[dict[str, Any]]:
    where = "" if everything else "WHERE state != 'resolved' OR acked IS NULL"
    return [_alert_json(r) for r in db.query(f"SELECT * FROM alerts {where} ORDER BY id DESC LIMIT ?", [limit])]


def mirror_open_alerts(db: Database, mirror: Any) -> None:
    """Mirror the alerts still open (or not acknowledged): the link's first sync, for alerts raised before it existed
    (the relay takes an alert by id, so sending one again at every start is harmless)."""
    for alert in list_alerts(db):
        mirror(db, "alert", alert)


def ack_alert(db: Database, alert_id: int, who: str, now: float, mirror: Any = None) -> dict[str, Any]:
    row = next(iter(db.query("SELECT * FROM alerts WHERE id = ?", [alert_id])), None)
    if row is None:
        raise NotFound(f"no alert {alert_id} (see `edgetrio alerts --all`)")
    if row["acked"] is None:
        db.execute("UPDATE alerts SET acked = ?, acked_by = ? WHERE id = ?", [now, who, alert_id])
        row.update(acked=now, acked_by=who)
        if mirror is not None:
            mirror(db, "alert", _alert_json(row))
    return _alert_json(row)


def _summary(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(values.items()))


def record_transition(db: Database, t: Transition, mirror: Any, notify: bool = True) -> int:
    """Record one transition: the alert's new state, the rule's history, and (firing, resolved) one notification
    per target unless the rule's notifications are held back, all in one transaction. Returns the number of
    notifications queued."""
    rule, values = t.rule, json.dumps(t.values)
    note(db, rule.name, t.device, t.state, _summary(t.values), t.at)
    open_row = next(iter(db.query("SELECT * FROM alerts WHERE rule = ? AND device = ? AND state != 'resolved' "
                                  "ORDER BY id DESC LIMIT 1", [rule.name, t.device])), None)
    if t.state == "cancelled":  # pending, and it did not hold: gone, at the relay too
        if open_row is not None and open_row["state"] == "pending":
            db.execute("DELETE FROM alerts WHERE id = ?", [open_row["id"]])
            mirror(db, "alert", {**_alert_json(open_row), "state": "cancelled"})
        return 0
    if t.state == "pending":  # the relay's fleet page shows pending alerts as the gateway's does
        if open_row is None:
            pending_id = db.table("alerts").insert({"rule": rule.name, "device": t.device, "severity": rule.severity,
                                                    "state": "pending", "values_": values, "started": t.at}).last_rowid
            mirror(db, "alert", _alert_json(next(iter(db.query("SELECT * FROM alerts WHERE id = ?", [pending_id])))))
        return 0
    if t.state == "firing":
        if open_row is None:
            alert_id = int(db.table("alerts").insert({
                "rule": rule.name, "device": t.device, "severity": rule.severity, "state": "firing",
                "values_": values, "started": t.at, "fired": t.at}).last_rowid or 0)
        else:
            alert_id = open_row["id"]
            db.execute("UPDATE alerts SET state = 'firing', fired = ?, values_ = ? WHERE id = ?",
                       [t.at, values, alert_id])
    else:  # resolved
        if open_row is None:
            return 0
        alert_id = open_row["id"]
        db.execute("UPDATE alerts SET state = 'resolved', resolved = ? WHERE id = ?", [t.at, alert_id])
    row = next(iter(db.query("SELECT * FROM alerts WHERE id = ?", [alert_id])))
    mirror(db, "alert", _alert_json(row))
    for action in rule.actions if t.state == "firing" else rule.on_clear:
        if action.export is not None:  # the reading goes to the sink with the alert, in this transaction
            db.execute("INSERT INTO export_queue (sink, ts, body) VALUES (?, ?, ?)", [action.export, t.at, json.dumps(
                {"device": t.device, "ts": t.at, "values": t.values, "rule": rule.name, "state": t.state})])
    title = f"[{t.state.upper()}] {rule.name} on {t.device} ({rule.severity})"
    body = f"{rule.name} {t.state} on {t.device}: {_summary(t.values)}"
    if t.state == "resolved":
        body += f" (firing since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(row['fired'] or t.at))})"
    if not notify:
        if rule.notify:
            note(db, rule.name, t.device, "notify_held",
                 f"{t.state}: over {NOTIFY_LIMIT} notifications in {NOTIFY_LIMIT_SECONDS:g} s", t.at)
        return 0
    for url in rule.notify:
        db.table("notifications").insert({"alert": alert_id, "url": url, "kind": t.state, "title": title,
                                          "body": body, "created": t.at, "attempts": 0, "next_try": t.at})
    return len(rule.notify)


def due_notifications(db: Database, now: float, limit: int = 20) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM notifications WHERE sent IS NULL AND next_try <= ? ORDER BY id LIMIT ?",
                         [now, limit]))


def next_notification(db: Database) -> float | None:
    row = next(iter(db.query("SELECT MIN(next_try) AS t FROM notifications WHERE sent IS NULL")))
    return row["t"]


def notification_done(db: Database, notification_id: int, ok: bool, error: str, now: float) -> None:
    if ok:
        db.execute("UPDATE notifications SET sent = ?, attempts = attempts + 1, error = NULL WHERE id = ?",
                   [now, notification_id])
        return
    row = next(iter(db.query("SELECT attempts FROM notifications WHERE id = ?", [notification_id])))
    delay = min(NOTIFY_RETRY_CAP, 2.0 ** min(row["attempts"], 10))
    db.execute("UPDATE notifications SET attempts = attempts + 1, next_try = ?, error = ? WHERE id = ?",
               [now + delay, error, notification_id])


def open_alerts(db: Database) -> list[dict[str, Any]]:
    return list(db.query("SELECT rule, device, state, started, fired FROM alerts WHERE state != 'resolved'"))


def forget_pending(db: Database) -> None:
    """Pending alerts of a previous run start over (the rule's `for` is timed anew)."""
    db.execute("DELETE FROM alerts WHERE state = 'pending'")


def load_automations(db: Database) -> list[dict[str, Any]]:
    return list(db.query("SELECT name, kind, source, body FROM automations ORDER BY name"))


def schedule_runs(db: Database) -> dict[str, float]:
    return {r["name"]: r["last_run"] for r in db.query("SELECT name, last_run FROM schedule_runs")}


def record_run(db: Database, name: str, at: float, detail: str) -> None:
    db.table("schedule_runs").upsert({"name": name, "last_run": at}, pk="name")
    note(db, name, "", "run", detail, at)


def record_problems(db: Database, problems: dict[str, str]) -> None:
    """Why each rule left out at the last load was (the others have none)."""
    db.execute("UPDATE automations SET problem = NULL WHERE problem IS NOT NULL")
    for name, problem in problems.items():
        db.execute("UPDATE automations SET problem = ? WHERE name = ?", [problem, name])


def note(db: Database, name: str, device: str, event: str, detail: str, now: float) -> None:
    db.table("rule_history").insert({"ts": now, "name": name, "device": device, "event": event, "detail": detail})


def dry_run(doc: dict[str, Any], models: dict[str, Model | None], device: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """What the rules of a document would do on one reading of a device (ignoring `for` and windows' history)."""
    rules, _ = parse_document(doc)
    model = models.get(device)
    out = []
    for parsed in rules:
        rule = check_rule(parsed, models)
        if not rule.watches(device, model.name if model else None):
            continue
        window = Window(readings=1)
        window.add(0.0, values)
        result = holds(compile_condition(rule.name, "when", rule.when), Subject(values, window))
        out.append({"rule": rule.name, "fires": bool(result), "judged": result is not None,
                    "after": rule.for_seconds, "severity": rule.severity,
                    "actions": [a.describe() for a in rule.actions] if result else [],
                    "notify": len(rule.notify) if result else 0})
    return out


# -- the daemon's side -----------------------------------------------------------------------------------------------

class Automation(Watch):
    """Rules, alerts and schedules on the gateway: judges each committed reading against the rules that cover its
    device, raises and resolves alerts, runs their actions (desired state, commands, exports) and the notification
    outbox, and fires schedules; reloads when rules change here or come from the cloud."""

    def __init__(self, link: BrokerLink, writer: Writer, roster: Roster, changes: Changes, commands: Commands,
                 sinks: Collection[str] = (), exported: Callable[[], None] = lambda: None) -> None:
        self.sinks = frozenset(sinks)  # the export sinks rules may send readings to
        self.exported = exported  # wakes them
        self.link = link
        self.writer = writer
        self.roster = roster
        self.changes = changes
        self.commands = commands
        self.engine = Engine()
        self.schedules: dict[str, Schedule] = {}
        self._planned: dict[str, tuple[Schedule, float]] = {}  # each schedule's next run, as it was planned
        self.counts: Counter[str] = Counter()
        self._send, self._receive = trio.open_memory_channel[Transition](TRANSITIONS_WAITING)
        self._judge: deque[tuple[float, list[Reading]]] = deque()  # commits waiting for the rules
        self._judge_count = 0
        self._judge_wake = trio.Event()
        self._notified: dict[str, deque[float]] = {}  # per rule: when its last alerts notified
        self._held: set[tuple[str, str]] = set()  # (rule, device) firing without a notification: resolve quietly
        self._notify = trio.Event()
        self._reschedule = trio.Event()

    def state(self) -> dict[str, Any]:
        """What `edgetrio status` shows: the rules and schedules loaded, what waits, what fires."""
        firing = sum(1 for track in self.engine.tracks.values() if track.state == "firing")
        return {"rules": len(self.engine.rules), "schedules": len(self.schedules), "firing": firing,
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
        self.schedules = schedules
        self._reschedule.set()
        log.info("automation: %d rules, %d schedules loaded", len(rules), len(schedules))
        return {name: problem if name not in left_out else f"left out: {problem}" for name, problem in problems.items()}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Record transitions, run actions and schedules, send notifications (the rules are loaded by `reload`)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._judge_commits)
            nursery.start_soon(self._record_transitions, nursery)
            nursery.start_soon(self._send_notifications)
            nursery.start_soon(self._run_schedules, nursery)
            task_status.started()

    def may_notify(self, t: Transition, now: float) -> bool:
        """Whether this transition notifies: a firing within the rule's limit, and the resolve of one that did."""
        key = (t.rule.name, t.device)
        if t.state == "resolved":
            if key in self._held:
                self._held.discard(key)
                return False
            return True
        if t.state != "firing":
            return True
        sent = self._notified.setdefault(t.rule.name, deque())
        while sent and sent[0] < now - NOTIFY_LIMIT_SECONDS:
            sent.popleft()
        if len(sent) >= NOTIFY_LIMIT:
            self._held.add(key)
            self.counts["notifications_held"] += 1
            return False
        sent.append(now)
        return True

    async def _record_transitions(self, actions: trio.Nursery) -> None:
        async for t in self._receive:
            notify = self.may_notify(t, time.monotonic())
            try:
                queued = await self.writer.write(partial(record_transition, t=t, mirror=self.changes.mirror,
                                                         notify=notify))
            except Exception as exc:  # the store cannot write: the alert is lost, its actions still run
                log.error("rule %s: %s of %s not recorded: %s", t.rule.name, t.state, t.device, exc)
                queued = 0
            if queued:
                self._notify.set()
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

    async def _send_notifications(self) -> None:
        while True:
            self._notify = trio.Event()
            try:
                due = await self.writer.write(partial(due_notifications, now=time.time()))
                for row in due:
                    ok, error = await send_notification(row["url"], row["title"], row["body"], row["kind"])
                    await self.writer.write(partial(notification_done, notification_id=row["id"], ok=ok, error=error,
                                                    now=time.time()))
                    if not ok:
                        log.warning("notification %d (%s) not sent: %s", row["id"], row["title"], error)
                wake = await self.writer.write(next_notification)
            except Exception as exc:  # the store cannot read or write now: look again soon
                log.error("notifications: %s", exc)
                due, wake = [], time.time() + 5
            if due and len(due) == 20:
                continue
            with trio.move_on_after(min(60.0, max(0.05, (wake or time.time() + 60) - time.time()))):
                await self._notify.wait()

    async def _run_schedules(self, actions: trio.Nursery) -> None:
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
                    actions.start_soon(self._act, name, device, schedule.actions)
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


async def send_notification(url: str, title: str, body: str, kind: str) -> tuple[bool, str]:
    """Send one notification through apprise, in a thread (it blocks); (sent, why not)."""
    import apprise

    def send() -> bool:
        sender = apprise.Apprise()
        if not sender.add(url):
            return False
        notify_type = apprise.NotifyType.FAILURE if kind == "firing" else apprise.NotifyType.SUCCESS
        return bool(sender.notify(body=body, title=title, notify_type=notify_type))

    with trio.move_on_after(NOTIFY_TIMEOUT):
        try:
            if await trio.to_thread.run_sync(send, abandon_on_cancel=True):
                return True, ""
            return False, "the target did not take it (see the log)"
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
    return False, f"no answer within {NOTIFY_TIMEOUT:g} s"
