"""Alerts and their notifications: a rule's transition recorded with its history and its notifications in one
transaction, and the notification outbox sent through apprise, each marked sent once its target took it (a restart
sends what was not), at most NOTIFY_LIMIT of one rule in a period."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from functools import partial
from typing import Any

import trio
from sqlite_utils import Database

from edgetrio.accounts import NotFound
from edgetrio.daemon.rulestore import note
from edgetrio.rules import Transition
from edgetrio.writer import Writer

log = logging.getLogger("edgetrio.alerts")
NOTIFY_RETRY_CAP = 300.0  # seconds between tries of a notification whose target is down, at most
NOTIFY_TIMEOUT = 30.0  # seconds one notification may take
NOTIFY_BATCH = 20  # notifications taken from the outbox at a time
# at most this many alerts of one rule notify within the period, whatever its cooldown: a flapping sensor on a rule
# without one cannot flood a phone. The alerts are still recorded; their history says what was held back.
NOTIFY_LIMIT = 10
NOTIFY_LIMIT_SECONDS = 600.0


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


def due_notifications(db: Database, now: float, limit: int = NOTIFY_BATCH) -> list[dict[str, Any]]:
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



class Notifier:
    """Decides which transitions notify (the per-rule limit) and sends the notification outbox."""

    def __init__(self, writer: Writer, counts: Counter[str]) -> None:
        self.writer = writer
        self.counts = counts
        self._notified: dict[str, deque[float]] = {}  # per rule: when its last alerts notified
        self._held: set[tuple[str, str]] = set()  # (rule, device) firing without a notification: resolve quietly
        self._wake = trio.Event()

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

    def queued(self) -> None:
        """New notifications are in the outbox: send them now."""
        self._wake.set()

    async def run(self) -> None:
        """Send what is due in the notification outbox, then sleep until the next is due or new ones are queued."""
        while True:
            self._wake = trio.Event()
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
            if len(due) == NOTIFY_BATCH:
                continue
            with trio.move_on_after(min(60.0, max(0.05, (wake or time.time() + 60) - time.time()))):
                await self._wake.wait()
