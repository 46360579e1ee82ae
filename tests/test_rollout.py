"""Firmware rollouts from the cloud: a relay, two gateways linked to it, virtual boards running the real firmware.

A bundle that cannot start on one gateway's boards is rolled out in waves; the relay restarts in the middle; the
gateway holding the failing boards is offline when its wave starts, and catches up when it returns; the rollout halts
by itself at its failure threshold, and the boards after it keep the firmware they run."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from edgetrio.accounts import NotFound
from edgetrio.bundles import bundle_files, bundle_id
from edgetrio.cloud import rollouts, store
from edgetrio.cloud.rollouts import RolloutError, parse_waves, wave_ends
from edgetrio.tools.testkit import Daemon, Relay, make_bundle, virtual_boards, wait_until


def test_waves_are_cumulative_and_the_last_takes_every_board() -> None:
    assert wave_ends(parse_waves("1,10%,100%"), 10) == [1, 2, 10]
    assert wave_ends(parse_waves("1,10%,100%"), 100) == [1, 10, 100]
    assert wave_ends(parse_waves("2,4,100%"), 10) == [2, 6, 10]
    assert wave_ends(parse_waves("2,4"), 10) == [2, 10]
    assert wave_ends(parse_waves("50%"), 3) == [3]
    assert wave_ends(parse_waves("5,5"), 3) == [3, 3]  # more waves than boards: the later ones are empty
    for bad in ("", "0", "-1", "150%", "x", ",".join(["1"] * 21)):
        with pytest.raises(RolloutError):
            parse_waves(bad)


def fleet(tmp_path: Path, boards: int) -> Any:
    """A relay store with one node and `boards` registered boards, and a bundle's files."""
    db = store.open_db(tmp_path)
    store.add_node(db, "gw")
    for i in range(1, boards + 1):
        store.register_device(db, "gw", f"b-{i}", "esp32-sensor")
    db.execute("DELETE FROM downqueue")  # the registrations: this store has no edge to take them
    return db, {name: b"\x4d\x06" + name.encode() for name in ("node.mpy", "ota.mpy", "trial.mpy")}


def take(db: Any, now: float) -> dict[str, str]:
    """Play the gateway: take every queued `ota` message (the update starts there); returns device -> message."""
    taken = {}
    for row in store.pending_down(db, "gw"):
        store.down_applied(db, "gw", row["id"], {"ok": True})
        if row["resource"] == "ota" and not row["body"].get("cancel"):
            taken[row["body"]["device"]] = row["id"]
    return taken


def test_a_wave_short_of_its_success_halts_and_a_board_past_its_timeout_is_stopped_at_its_gateway(
        tmp_path: Path) -> None:
    db, files = fleet(tmp_path, 4)
    now = time.time()  # the gateway's taking of an update is stamped with the relay's clock
    r = rollouts.create(db, files, {"node": "gw"}, parse_waves("2,100%"), 1.0, 5, 60, 300, "op", now)
    assert r["counts"] == {"pending": 4}
    rollouts.drive(db, now)
    assert take(db, now).keys() == {"b-1", "b-2"}
    rollouts.progress(db, "gw", {"device": "b-1", "bundle": r["bundle"], "state": "confirmed"}, now + 5)
    rollouts.drive(db, now + 61)  # b-2 took longer than the timeout: it failed, and its gateway is told to stop
    status = rollouts.view(db, r["id"])
    assert {b["device"]: b["state"] for b in status["boards"]} == {"b-1": "confirmed", "b-2": "timed out",
                                                                    "b-3": "pending", "b-4": "pending"}
    cancels = [m["body"] for m in store.pending_down(db, "gw") if m["resource"] == "ota"]
    assert cancels == [{"device": "b-2", "cancel": True, "rollout": r["id"]}]
    rollouts.drive(db, now + 62)  # 1 of 2 confirmed, --success 100%: halted with why, within the failure budget
    status = rollouts.view(db, r["id"])
    assert status["state"] == "halted" and "wave 1: 1 of 2 confirmed, --success needs 2" in status["reason"]
    resumed, _ = rollouts.set_state(db, r["id"], "resume", now + 63)
    assert resumed["state"] == "running" and "accepted" in resumed["reason"]
    rollouts.drive(db, now + 64)  # what halted it is accepted: wave 2 starts
    assert take(db, now + 64).keys() == {"b-3", "b-4"}
    for device in ("b-3", "b-4"):
        rollouts.progress(db, "gw", {"device": device, "bundle": r["bundle"], "state": "confirmed"}, now + 70)
    rollouts.drive(db, now + 71)
    done = rollouts.view(db, r["id"])
    assert done["state"] == "done" and done["reason"] == "3 of 4 boards confirmed" and done["failed"] == 1
    # a board's later word on an ended update changes nothing
    rollouts.progress(db, "gw", {"device": "b-2", "bundle": r["bundle"], "state": "confirmed"}, now + 80)
    assert {b["device"]: b["state"] for b in rollouts.view(db, r["id"])["boards"]}["b-2"] == "timed out"


def test_an_abort_leaves_boards_not_started_alone_and_counts_them_as_no_failure(tmp_path: Path) -> None:
    db, files = fleet(tmp_path, 3)
    r = rollouts.create(db, files, {"model": "esp32-sensor"}, parse_waves("1,100%"), 1.0, 0, 600, 300, "op", 0.0)
    rollouts.drive(db, 1.0)
    aborted, _ = rollouts.set_state(db, r["id"], "abort", 2.0)
    assert aborted["state"] == "aborted" and aborted["failed"] == 0 and aborted["counts"] == {"cancelled": 3}
    assert not [m for m in store.pending_down(db, "gw") if m["resource"] == "ota"]  # the queued one withdrawn
    with pytest.raises(NotFound, match="no registered device matches node=nowhere"):
        rollouts.create(db, files, {"node": "nowhere"}, parse_waves("1"), 1.0, 0, 600, 300, "op", 3.0)
    with pytest.raises(RolloutError, match="node=NAME, device=ID or model=NAME"):  # an empty name is not "all"
        rollouts.create(db, files, {"node": ""}, parse_waves("1"), 1.0, 0, 600, 300, "op", 3.0)
    again = rollouts.create(db, files, {"node": "gw"}, parse_waves("100%"), 1.0, 0, 600, 300, "op", 3.0)
    with pytest.raises(rollouts.BoardsBusy, match=f"1 of these boards are in rollout {again['id']}, not ended \\(gw/b-2\\)"):
        rollouts.create(db, files, {"device": "b-2"}, parse_waves("1"), 1.0, 0, 600, 300, "op", 4.0)


def boards_of(relay: Relay, rollout: str) -> dict[str, dict[str, Any]]:
    return {b["device"]: b for b in relay.json("rollout", "status", rollout)["boards"]}


def relay_meta(relay: Relay) -> dict[str, dict[str, Any]]:
    return {d["id"]: d.get("meta") or {} for d in relay.json("devices")}


def test_a_rollout_halts_at_its_threshold_and_an_offline_gateway_catches_up_in_its_wave(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay").start()
    gateways = {}
    for name in ("gw-a", "gw-b"):
        token = relay.add_node(name)
        gateways[name] = Daemon(tmp_path / name, extra=("--cloud", relay.url, "--node-id", name, "--token", token))
    a, b = gateways["gw-a"].start(), gateways["gw-b"].start()
    # fails at import on gw-b's boards only (their ids start with rb): they go back to what they ran, by themselves
    bad = make_bundle(tmp_path, "0.6.0-half", 'import json as _j\nif _j.load(open("config.json"))["device_id"]'
                                              '.startswith("rb"): raise ImportError("not on this board")')
    bad_id = bundle_id(bundle_files(bad / "lib"))
    try:
        with virtual_boards(a, "ra", 2, period=0.5), contextlib.ExitStack() as site_b:
            site_b.enter_context(virtual_boards(b, "rb", 2, period=0.5))
            flashed = wait_until(lambda: (m := relay_meta(relay)) and len(m) == 4 and all(
                x.get("bundle") for x in m.values()) and m, timeout=120)
            site_b.close()  # gw-b's site loses power: its gateway and its boards are off when its wave starts
            b.stop()
            created = relay.json("rollout", "create", "--bundle", str(bad), "--select", "model=esp32-sensor",
                                 "--waves", "1,2,100%", "--max-failures", "0", "--timeout", "600")
            rollout = created["id"]
            assert created["total"] == 4 and created["state"] == "running" and created["bundle"] == bad_id
            # boards in (node, device) order: wave 1 ra-1; wave 2 ra-2, rb-1; wave 3 rb-2
            waves = {d: x["wave"] for d, x in boards_of(relay, rollout).items()}
            assert waves == {"ra-1": 0, "ra-2": 1, "rb-1": 1, "rb-2": 2}
            wait_until(lambda: boards_of(relay, rollout)["ra-1"]["state"] not in ("pending", "queued"), timeout=120)
            relay.stop()  # a relay restart in the middle: the rollout is rows, and goes on from them
            relay.start()
            wait_until(lambda: boards_of(relay, rollout)["ra-2"]["state"] == "confirmed", timeout=240)
            status = relay.json("rollout", "status", rollout)
            assert status["state"] == "running" and status["wave"] == 1  # waits for rb-1, whose gateway is offline
            assert boards_of(relay, rollout)["rb-1"]["state"] == "queued"
            b.start()  # back: rb-1 gets the bundle, in its wave, fails, and the rollout halts
            site_b.enter_context(virtual_boards(b, "rb", 2, period=0.5))
            halted = wait_until(lambda: (s := relay.json("rollout", "status", rollout))["state"] == "halted" and s,
                                timeout=240)
            boards = {x["device"]: x for x in halted["boards"]}
            assert [d for d, x in boards.items() if x["state"] == "confirmed"] == ["ra-1", "ra-2"]
            assert boards["rb-1"]["state"] == "rolled back" and "not on this board" in boards["rb-1"]["detail"]
            assert boards["rb-2"]["state"] == "pending"  # never sent: wave 3 did not start
            assert "halted: 1 board failed" in halted["reason"] and "rb-1" in halted["reason"]
            meta = wait_until(lambda: (m := relay_meta(relay)) and m["rb-1"]["bundle"] == flashed["rb-1"]["bundle"]
                              and m, timeout=60)
            assert all(meta[d]["bundle"] == bad_id[:12] for d in ("ra-1", "ra-2"))
            assert all(meta[d]["bundle"] == flashed[d]["bundle"] for d in ("rb-1", "rb-2"))  # the old one
            shown = relay.cli("rollout", "status", rollout).stdout
            assert f"rollout {rollout}: halted" in shown and "rolled back" in shown and "not on this board" in shown
            # the failure is in rb-1's log at the relay too
            logs = json.loads(relay.cli("logs", "gw-b", "rb-1", "--json").stdout)
            assert any(e["kind"] == "ota" and e["body"].get("state") == "rolled back" for e in logs), logs
            refused = relay.cli("rollout", "abort", rollout, "--rollback", "--select", "x", check=False)
            assert refused.returncode == 2  # a usage error, said before anything is done
            # aborted, and the boards that took the bundle sent back to what they ran before
            aborted = relay.json("rollout", "abort", rollout, "--rollback")
            assert aborted["state"] == "aborted" and aborted["counts"] == {"reverting": 2, "rolled back": 1, "cancelled": 1}
            wait_until(lambda: relay.json("rollout", "status", rollout)["counts"].get("reverted") == 2, timeout=120)
            wait_until(lambda: all(relay_meta(relay)[d].get("bundle") == flashed[d]["bundle"]
                                   for d in ("ra-1", "ra-2")), timeout=120)
        refused = relay.cli("rollout", "resume", rollout, check=False)
        assert refused.returncode != 0 and "only a paused or halted one resumes" in refused.stderr
    finally:
        for daemon in gateways.values():
            daemon.stop(signal.SIGTERM)
        relay.stop()
