"""The gateway's rules and schedules as stored: added from a rule file or the cloud's versioned set (checked against
the devices' models and the rules' budget first), listed, removed, and their history. These functions run in the
writer's transaction, or in the CLI when no daemon runs."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any

from sqlite_utils import Database

from edgetrio.identity import RegistryError
from edgetrio.models import Model
from edgetrio.rules import (
    Rule,
    RuleError,
    Subject,
    Window,
    budget_problem,
    check_notify_urls,
    check_rule,
    compile_condition,
    holds,
    parse_document,
)

HISTORY_LIMIT = 100


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

