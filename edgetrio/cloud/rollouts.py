"""Staged firmware rollouts across the fleet: a bundle, the boards it goes to, waves, and thresholds.

The relay keeps each rollout and each board's part of it in its store; a drive every few seconds (`drive`) moves them
on. A wave's boards get the bundle through their gateway's durable down queue (once per gateway) and an `ota` message
each; the gateway runs the per-board update (daemon/ota.py) and mirrors each state change up (`ota` items), which
`progress` records. The next wave starts when this one's boards have each ended or wait on a gateway that is offline
(those catch up when it returns, in their wave) and enough of the wave confirmed (`success`); the rollout halts by
itself when more boards failed than `max_failures`. A relay or gateway restart loses nothing: every step is a row, and
a board that confirmed is never sent the bundle again.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from typing import Any

from sqlite_utils import Database

from edgetrio import wire
from edgetrio.accounts import NotFound
from edgetrio.bundles import BundleError, bundle_id, files_of
from edgetrio.cloud.downqueue import queue_down

# a board's states: pending (its wave has not started), queued (in its gateway's down queue), started (the gateway
# took it), the gateway's own (restarting, sending, installed, trial), and the ends (reverted: confirmed, then sent
# back to its earlier firmware by an abort with rollback; reverting: on its way there)
ENDS = frozenset({"confirmed", "failed", "rolled back", "cancelled", "timed out", "refused", "reverted"})
FAILED = ENDS - {"confirmed", "reverted", "cancelled"}  # cancelled: by an operator (abort, `ota --cancel`)
STATES = ("running", "paused", "halted", "aborted", "done")
MAX_WAVES = 20


class RolloutError(ValueError):
    """A rollout that cannot be created or changed; the message says why in one line."""


class BoardsBusy(RolloutError):
    """Some of the boards are in another rollout still running (409)."""


def create_tables(db: Database) -> None:
    db.table("bundles").create({"id": str, "created": float, "files": str}, pk="id", if_not_exists=True)
    db.table("rollouts").create(
        {"id": str, "bundle": str, "created": float, "by": str, "state": str, "reason": str, "selector": str,
         "waves": str, "wave": int, "success": float, "max_failures": int, "timeout": float, "confirm_s": int,
         "updated": float, "accepted": int}, pk="id", if_not_exists=True)
    if "accepted" not in db.table("rollouts").columns_dict:  # the wave a resume after a halt let pass
        db.table("rollouts").add_column("accepted", int, not_null_default=-1)
    db.table("rollout_boards").create(
        {"rollout": str, "node": str, "device": str, "wave": int, "state": str, "message": str, "started": float,
         "finished": float, "detail": str}, pk=("rollout", "node", "device"), if_not_exists=True)
    db.table("rollout_boards").create_index(["node", "device", "state"], if_not_exists=True)


def parse_waves(text: str) -> list[str]:
    """'1,10%,100%': each wave's size, a count of boards or a share of them; the last is always everything."""
    waves = [w.strip() for w in str(text).split(",")]
    if not 0 < len(waves) <= MAX_WAVES or "" in waves:
        raise RolloutError(f"1 to {MAX_WAVES} sizes separated by commas, e.g. 1,10%,100%")
    for wave in waves:
        try:
            value = int(wave[:-1]) if wave.endswith("%") else int(wave)
        except ValueError:
            raise RolloutError(f"{wave[:40]!r}: a whole number of boards or a percentage (10%)") from None
        if not (0 < value <= 100 if wave.endswith("%") else 0 < value <= 999999):
            raise RolloutError(f"{wave[:40]!r}: 1 to 999999 boards, or 1% to 100%")
    return waves


def wave_ends(waves: list[str], total: int) -> list[int]:
    """How many boards have their update started by the end of each wave (cumulative; the last takes all)."""
    ends, done = [], 0
    for wave in waves:
        size = math.ceil(total * int(wave[:-1]) / 100) if wave.endswith("%") else int(wave)
        done = min(total, max(done + 1, size if wave.endswith("%") else done + size))
        ends.append(done)
    ends[-1] = total
    return ends


def selected(db: Database, selector: dict[str, str]) -> list[tuple[str, str]]:
    """(node, device) of the registered devices a selector names: node=, device=, model= (all must hold)."""
    where, params = ["registered = 1"], []
    # a device's model is the one it was registered with, else the one its board says it is
    for key, column in (("node", "node"), ("device", "id"), ("model", "COALESCE(model, json_extract(meta, '$.model'))")):
        if selector.get(key):
            where.append(f"{column} = ?")
            params.append(selector[key])
    rows = db.execute(f"SELECT node, id FROM devices WHERE {' AND '.join(where)} ORDER BY node, id", params)
    return [(str(n), str(d)) for n, d in rows]


def create(db: Database, contents: dict[str, bytes], selector: dict[str, str], waves: list[str], success: float,
           max_failures: int, timeout: float, confirm_s: int, by: str, now: float) -> dict[str, Any]:
    unknown = set(selector) - {"node", "device", "model"}
    if unknown or not selector or not all(isinstance(v, str) and v for v in selector.values()):
        raise RolloutError("select boards with node=NAME, device=ID or model=NAME (each at most once)")
    if not 0 < success <= 1:
        raise RolloutError("success: the share of a wave that must confirm, above 0% and at most 100%")
    if not 0 <= max_failures <= 1_000_000:
        raise RolloutError("max_failures: 0 to 1000000")
    if not 30 <= confirm_s <= 86400:
        raise RolloutError("confirm_s: 30 to 86400 seconds")
    if not 60 <= timeout <= 7 * 86400:
        raise RolloutError("timeout: 60 s to 7 days per board")
    try:
        files = files_of(contents, "bundle")
    except BundleError as exc:
        raise RolloutError(str(exc)) from None
    ident = bundle_id(files)
    boards = selected(db, selector)
    if not boards:
        raise NotFound(f"no registered device matches {' '.join(f'{k}={v}' for k, v in selector.items())}")
    busy = db.execute(
        f"SELECT b.node, b.device, b.rollout FROM rollout_boards b JOIN rollouts r ON r.id = b.rollout "
        f"WHERE r.state IN ('running', 'paused', 'halted') AND b.state NOT IN ({','.join('?' * len(ENDS))})",
        list(ENDS)).fetchall()
    taken = {(n, d): r for n, d, r in busy}
    clash = [(n, d) for n, d in boards if (n, d) in taken]
    if clash:
        raise BoardsBusy(f"{len(clash)} of these boards are in rollout {taken[clash[0]]}, not ended ("
                           f"{', '.join(f'{n}/{d}' for n, d in clash[:3])}): wait for it or abort it")
    db.table("bundles").upsert({"id": ident, "created": now, "files": json.dumps(
        {name: base64.b64encode(data).decode() for name, data in contents.items()})}, pk="id")
    rollout = uuid.uuid4().hex[:12]
    ends = wave_ends(waves, len(boards))
    db.table("rollouts").insert({"id": rollout, "bundle": ident, "created": now, "by": by, "state": "running",
                                 "reason": "", "selector": json.dumps(selector), "waves": json.dumps(waves), "wave": 0,
                                 "success": success, "max_failures": max_failures, "timeout": timeout,
                                 "confirm_s": confirm_s, "updated": now, "accepted": -1})
    wave_of = [next(i for i, end in enumerate(ends) if n < end) for n in range(len(boards))]
    db.table("rollout_boards").insert_all(
        [{"rollout": rollout, "node": n, "device": d, "wave": wave_of[i], "state": "pending", "message": None,
          "started": None, "finished": None, "detail": ""} for i, (n, d) in enumerate(boards)])
    return view(db, rollout)


def view(db: Database, rollout: str) -> dict[str, Any]:
    row = db.execute("SELECT * FROM rollouts WHERE id = ?", [rollout]).fetchone()
    if row is None:
        raise NotFound(f"no rollout {wire.clip(rollout, 40)!r} (`edgetrio cloud rollout list` shows them)")
    found = dict(zip([c[0] for c in db.execute("SELECT * FROM rollouts LIMIT 0").description], row, strict=True))
    boards = list(db.query("SELECT node, device, wave, state, started, finished, detail FROM rollout_boards "
                           "WHERE rollout = ? ORDER BY wave, node, device", [rollout]))
    counts: dict[str, int] = {}
    for board in boards:
        counts[board["state"]] = counts.get(board["state"], 0) + 1
    waves = json.loads(found["waves"])
    return {**found, "selector": json.loads(found["selector"]), "waves": waves, "boards": boards, "counts": counts,
            "total": len(boards), "confirmed": counts.get("confirmed", 0),
            "failed": sum(n for s, n in counts.items() if s in FAILED)}


def list_rollouts(db: Database) -> list[dict[str, Any]]:
    return [{k: v for k, v in view(db, r["id"]).items() if k != "boards"}
            for r in db.query("SELECT id FROM rollouts ORDER BY created DESC LIMIT 100")]


def set_state(db: Database, rollout: str, action: str, now: float,
              rollback: bool = False) -> tuple[dict[str, Any], set[str]]:
    """pause, resume or abort; returns the rollout and the nodes that have something new queued. The actor is in the
    relay's log."""
    current = view(db, rollout)
    state = current["state"]
    nodes: set[str] = set()
    if action == "pause":
        if state != "running":
            raise RolloutError(f"rollout {rollout} is {state}: only a running one pauses")
        new = "paused"
    elif action == "resume":
        if state not in ("paused", "halted"):
            raise RolloutError(f"rollout {rollout} is {state}: only a paused or halted one resumes")
        new = "running"
        if state == "halted":  # what stopped it is accepted: the failures so far, a wave short of --success
            db.execute("UPDATE rollouts SET max_failures = ?, accepted = wave WHERE id = ?",
                       [current["failed"] + current["max_failures"], rollout])
    elif action == "abort":
        if state in ("aborted", "done"):
            raise RolloutError(f"rollout {rollout} is already {state}")
        new = "aborted"
        nodes = _withdraw(db, rollout, "cancelled", "the rollout was aborted", now)
        if rollback:  # the boards that took the bundle go back to the firmware they kept from before
            for board in current["boards"]:
                if board["state"] == "confirmed":
                    message = queue_down(db, board["node"], "ota", {"device": board["device"], "rollback": True,
                                                                "rollout": rollout})
                    db.execute("UPDATE rollout_boards SET state = 'reverting', message = ?, detail = '' WHERE "
                               "rollout = ? AND node = ? AND device = ?", [message, rollout, board["node"],
                                                                           board["device"]])
                    nodes.add(board["node"])
    elif rollback:
        raise RolloutError("rollback goes with abort")
    else:
        raise RolloutError(f"unknown action {action!r}")
    reason = (f"resumed; what halted it is accepted ({plural(current['failed'], 'failure')} so far)"
              if action == "resume" and state == "halted" else "")
    db.execute("UPDATE rollouts SET state = ?, reason = ?, updated = ? WHERE id = ?", [new, reason, now, rollout])
    return view(db, rollout), nodes


def _withdraw(db: Database, rollout: str, state: str, detail: str, now: float) -> set[str]:
    """Boards not started yet leave the rollout; those queued lose their message if the gateway has not taken it,
    those in progress are cancelled at their gateway (one already running the new bundle confirms or goes back)."""
    nodes = set()
    for board in db.query("SELECT node, device, state, message FROM rollout_boards WHERE rollout = ? AND state NOT IN "
                          f"({','.join('?' * len(ENDS))})", [rollout, *ENDS]):
        if board["state"] == "queued" and board["message"]:
            db.execute("DELETE FROM downqueue WHERE id = ?", [board["message"]])
        elif board["state"] != "pending":
            queue_down(db, board["node"], "ota", {"device": board["device"], "cancel": True, "rollout": rollout})
            nodes.add(board["node"])
        db.execute("UPDATE rollout_boards SET state = ?, finished = ?, detail = ? WHERE rollout = ? AND node = ? AND "
                   "device = ?", [state, now, detail, rollout, board["node"], board["device"]])
    return nodes


def prune_bundles(db: Database, now: float, keep_s: float = 86400) -> int:
    """Bundles of rollouts that ended (aborted, done) a day ago go; those a rollout may still send stay."""
    return db.execute(
        "DELETE FROM bundles WHERE created < ? AND id NOT IN (SELECT bundle FROM rollouts WHERE state IN "
        "('running', 'paused', 'halted') OR updated > ?)", [now - keep_s, now - keep_s]).rowcount


def drive(db: Database, now: float) -> tuple[set[str], list[str]]:
    """Move every running rollout on; returns the nodes that have something new queued, and the rollouts that
    changed (a wave started, halted, done: the dashboards are told)."""
    nodes: set[str] = set()
    changed = []
    for rollout, updated in db.execute("SELECT id, updated FROM rollouts WHERE state = 'running'").fetchall():
        nodes |= _drive_one(db, rollout, now)
        if db.execute("SELECT updated FROM rollouts WHERE id = ?", [rollout]).fetchone()[0] != updated:
            changed.append(rollout)
    return nodes, changed


def _drive_one(db: Database, rollout: str, now: float) -> set[str]:
    r = view(db, rollout)
    nodes: set[str] = set()
    for board in r["boards"]:  # a board that took longer than the per-board timeout failed: stopped at its gateway
        if board["started"] and board["state"] not in ENDS and now - board["started"] > r["timeout"]:
            _end_board(db, rollout, board["node"], board["device"], "timed out",
                       f"not confirmed within {r['timeout']:g} s of its gateway taking the update", now)
            queue_down(db, board["node"], "ota", {"device": board["device"], "cancel": True, "rollout": rollout})
            nodes.add(board["node"])
    r = view(db, rollout)
    if r["failed"] > r["max_failures"]:
        worst = [b for b in r["boards"] if b["state"] in FAILED][:3]
        return nodes | _halt(db, r, f"{plural(r['failed'], 'board')} failed, more than the {r['max_failures']} "
                                    "allowed (" + "; ".join(f"{b['device']}: {b['state']}, {wire.clip(b['detail'], 120)}"
                                                             for b in worst) + ")", now)
    wave = r["wave"]
    in_wave = [b for b in r["boards"] if b["wave"] == wave]
    if any(b["state"] == "pending" for b in in_wave):
        return nodes | _start_wave(db, r, wave, now)
    if any(b["state"] not in ENDS and b["state"] != "queued" for b in in_wave):
        return nodes  # boards still updating
    confirmed = sum(b["state"] == "confirmed" for b in in_wave)
    needed = math.ceil(r["success"] * len(in_wave) - 1e-9)
    if confirmed < needed and wave > r["accepted"]:
        if any(b["state"] == "queued" for b in in_wave):
            return nodes  # some wait on a gateway that is offline: they may yet confirm
        return nodes | _halt(db, r, f"wave {wave + 1}: {confirmed} of {len(in_wave)} confirmed, --success needs "
                                    f"{needed} (resume goes on to the next wave)", now)
    if wave + 1 >= len(r["waves"]) or not any(b["wave"] > wave for b in r["boards"]):
        if all(b["state"] in ENDS for b in r["boards"]):
            db.execute("UPDATE rollouts SET state = 'done', reason = ?, updated = ? WHERE id = ?",
                       [f"{r['confirmed']} of {plural(r['total'], 'board')} confirmed", now, rollout])
        return nodes
    db.execute("UPDATE rollouts SET wave = ?, updated = ? WHERE id = ?", [wave + 1, now, rollout])
    return nodes | _start_wave(db, {**r, "wave": wave + 1}, wave + 1, now)


def _halt(db: Database, r: dict[str, Any], why: str, now: float) -> set[str]:
    """Stop starting boards: those not taken by their gateway yet go back to waiting (a resume sends them again)."""
    for board in r["boards"]:
        if board["state"] == "queued":
            db.execute("DELETE FROM downqueue WHERE id = (SELECT message FROM rollout_boards WHERE rollout = ? "
                       "AND node = ? AND device = ?)", [r["id"], board["node"], board["device"]])
            db.execute("UPDATE rollout_boards SET state = 'pending', message = NULL WHERE rollout = ? AND "
                       "node = ? AND device = ?", [r["id"], board["node"], board["device"]])
    db.execute("UPDATE rollouts SET state = 'halted', reason = ?, updated = ? WHERE id = ?",
               [f"halted: {why}", now, r["id"]])
    return set()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _start_wave(db: Database, r: dict[str, Any], wave: int, now: float) -> set[str]:
    """Queue the bundle (once per gateway in this rollout) and an update per board of the wave."""
    nodes = set()
    bundle_sent = {b["node"] for b in r["boards"] if b["state"] != "pending"}
    files = None
    for board in r["boards"]:
        if board["wave"] != wave or board["state"] != "pending":
            continue
        node = board["node"]
        if node not in bundle_sent:
            if files is None:
                files = json.loads(db.execute("SELECT files FROM bundles WHERE id = ?", [r["bundle"]]).fetchone()[0])
            queue_down(db, node, "bundle", {"id": r["bundle"], "files": files})
            bundle_sent.add(node)
        message = queue_down(db, node, "ota", {"device": board["device"], "bundle": r["bundle"], "rollout": r["id"],
                                           "confirm_s": r["confirm_s"]})
        db.execute("UPDATE rollout_boards SET state = 'queued', message = ? WHERE rollout = ? AND node = ? AND "
                   "device = ?", [message, r["id"], node, board["device"]])
        nodes.add(node)
    db.execute("UPDATE rollouts SET updated = ? WHERE id = ?", [now, r["id"]])
    return nodes


def _end_board(db: Database, rollout: str, node: str, device: str, state: str, detail: str, now: float) -> None:
    db.execute("UPDATE rollout_boards SET state = ?, detail = ?, finished = ? WHERE rollout = ? AND node = ? AND "
               "device = ?", [state, detail, now, rollout, node, device])


def taken(db: Database, node: str, message_id: str, body: dict[str, Any], result: dict[str, Any], now: float) -> None:
    """The gateway applied a board's `ota` message: its update started there (the timeout counts from now), or it
    was refused (a serial board, a device it no longer has)."""
    if body.get("cancel"):
        return
    row = db.execute("SELECT rollout, device FROM rollout_boards WHERE node = ? AND message = ?",
                     [node, message_id]).fetchone()
    if row is None:
        return
    if body.get("rollback"):  # an aborted rollout's board asked to go back
        went = result.get("ok")
        _end_board(db, row[0], node, row[1], "reverted" if went else "confirmed",
                   "back on the firmware it ran before" if went else
                   f"not rolled back: {wire.clip(result.get('error') or 'refused', 200)}", now)
        return
    if result.get("ok"):
        db.execute("UPDATE rollout_boards SET state = CASE WHEN state = 'queued' THEN 'started' ELSE state END, "
                   "started = ? WHERE rollout = ? AND node = ? AND device = ?", [now, row[0], node, row[1]])
    else:
        _end_board(db, row[0], node, row[1], "refused", wire.clip(result.get("error") or "refused", 300), now)


def progress(db: Database, node: str, body: dict[str, Any], now: float) -> None:
    """A board's update state as its gateway has it now (an `ota` item from the edge)."""
    device, bundle, state = str(body["device"]), str(body["bundle"]), str(body["state"])
    row = db.execute(
        "SELECT b.rollout, b.state FROM rollout_boards b JOIN rollouts r ON r.id = b.rollout WHERE b.node = ? AND "
        f"b.device = ? AND r.bundle = ? AND b.state NOT IN ({','.join('?' * len(ENDS))}) AND b.state != 'pending'",
        [node, device, bundle, *ENDS]).fetchone()
    if row is None:
        return  # an update not of a rollout (`edgetrio ota` at the gateway), or one that ended here already
    detail = wire.clip(body.get("detail") or "", 300)
    if state in ENDS:
        _end_board(db, row[0], node, device, state, detail, now)
    elif state != "queued":
        db.execute("UPDATE rollout_boards SET state = ?, detail = ? WHERE rollout = ? AND node = ? AND device = ?",
                   [state, detail, row[0], node, device])
