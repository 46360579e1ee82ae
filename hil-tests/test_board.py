"""Device-level scenarios, written once: a virtual board by default, a real ESP32 with --port."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from edgetrio.tools.testkit import Board, cli, contiguous_per_boot, make_bundle, wait_until


def test_boots_goes_online_and_telemetry_is_stored_and_acked(board: Board) -> None:
    rows = wait_until(lambda: (r := board.readings()) and len(r) >= 20 and r, timeout=90)
    boots = contiguous_per_boot(rows)
    assert len(boots) == 1
    values = rows[-1]["values"]
    assert "chip_temperature" in values or "temperature" in values
    meta = board.device()["meta"]
    assert meta["firmware"] and not meta["safe_mode"] and meta["free_heap"] > 0
    if board.virtual:
        assert 0 < values["temperature"] < 35 and 0 < values["humidity"] < 100  # the room the board is in
        board.env(temperature=21.5)  # the BME280 driver reads what the simulated chip measures
        wait_until(lambda: board.readings()[-1]["values"]["temperature"] == 21.5)
        wait_until(lambda: len(board.buffered()) < 5)  # acknowledged readings leave the flash buffer
        lines = len((board.flash_dir / "buffer.log").read_text().splitlines())
        assert lines < len(rows)


def test_desired_state_is_applied_and_reported(board: Board) -> None:
    wait_until(lambda: (board.device().get("meta") or {}).get("controls"))  # the board has told its settings
    # a setting the board does not have is refused at once, with the settings it has (it would refuse it itself)
    refused = board.daemon.cli("twin", "set", board.id, "period=0.2", "led=true", "colour=red", check=False)
    assert refused.returncode == 1 and "colour: not a setting of this device" in refused.stderr
    board.daemon.cli("twin", "set", board.id, "period=0.2", "led=true")
    twin = wait_until(lambda: (t := board.twin())["reported"]["state"].get("led") and t)
    assert twin["reported"]["state"]["period"] == 0.2 and twin["reported"]["state"]["led"] is True
    assert twin["delta"] == {}
    board.daemon.cli("twin", "set", board.id, "led=false")
    wait_until(lambda: board.twin()["reported"]["state"]["led"] is False)
    assert board.twin()["delta"] == {}


def test_each_command_returns_its_result(board: Board) -> None:
    assert board.cmd("ping")["value"] == "pong"
    assert board.cmd("blink", "times=2")["value"] == "blinked"
    now = board.cmd("read_now")
    # what the board reads now: every resource it announced, each in its range
    resources = {r["name"]: r for r in board.device()["meta"]["resources"]}
    assert now["ok"] is True and set(now["value"]) == set(resources), now
    assert all(resources[k]["min"] <= v <= resources[k]["max"] for k, v in now["value"].items()), now
    if board.virtual:
        board.daemon.cli("fault", board.id, "env", "temperature=30.25")
        assert board.cmd("read_now")["value"]["temperature"] == 30.25
    unknown = board.cmd("selfdestruct", check=False)
    assert unknown["ok"] is False and "unknown command" in unknown["error"]
    assert board.cmd("reboot")["value"] == "rebooting"
    wait_until(lambda: len(board.boots()) == 2, timeout=90)


def test_wifi_down_30_s_then_up_loses_nothing(board: Board) -> None:
    wait_until(lambda: len(board.readings()) >= 3)
    board.wifi(False)
    wait_until(lambda: not board.online())
    time.sleep(30)
    held = board.buffered()
    assert len(held) >= 30, "readings taken offline wait on flash"
    board.wifi(True)
    wait_until(lambda: set(held) <= {(r["boot"], r["seq"]) for r in board.readings()}, timeout=90)
    contiguous_per_boot(board.readings())
    # an ESP32 fails a connect() made while its driver is still connecting: the firmware waits instead
    assert b"Wifi Internal Error" not in (board.flash_dir / "console.log").read_bytes()


def test_daemon_restarted_loses_nothing(board: Board) -> None:
    wait_until(lambda: len(board.readings()) >= 3)
    board.daemon.stop()
    time.sleep(5)
    board.daemon.start()  # same port
    wait_until(board.online, timeout=90)
    seen = len(board.readings())
    wait_until(lambda: len(board.readings()) > seen + 5, timeout=90)
    contiguous_per_boot(board.readings())


def test_daemon_killed_9_loses_nothing_the_board_took(board: Board) -> None:
    # kill -9 of the gateway: what it acknowledged is in its store, what it did not the board still holds on flash
    wait_until(lambda: len(board.readings()) >= 3)
    board.daemon.stop(signal.SIGKILL)
    held: list[tuple[int, int]] = []
    if board.virtual:  # readings taken while the gateway is gone wait in the board's flash buffer
        held = wait_until(lambda: len(h := board.buffered()) >= 5 and h, timeout=60)
    else:
        time.sleep(5)
    board.daemon.start()  # same port
    wait_until(lambda: set(held) <= {(r["boot"], r["seq"]) for r in board.readings()}, timeout=90)
    seen = len(board.readings())
    wait_until(lambda: len(board.readings()) > seen + 3, timeout=90)
    contiguous_per_boot(board.readings())  # every reading of the boot, each once


def test_power_cycle_with_readings_buffered_delivers_them_all_once(board: Board) -> None:
    board.wifi(False)
    wait_until(lambda: len(board.buffered()) >= 5)
    board.power_cycle()
    wait_until(lambda: board.state()["boot"] == 2)
    held = board.buffered()
    assert 1 in {b for b, _ in held}  # boot 1's unsent readings survived the power cut
    board.wifi(True)
    wait_until(lambda: set(held) <= {(r["boot"], r["seq"]) for r in board.readings()}, timeout=90)
    boots = contiguous_per_boot(board.readings())
    assert {1, 2} <= set(boots)


def test_a_boot_loop_ends_in_safe_mode(board: Board) -> None:
    board.wifi(False)  # no ack reaches the board, so no boot counts as good
    for boot in range(2, 9):
        board.power_cycle()
        wait_until(lambda boot=boot: board.state()["boot"] == boot)
    board.wifi(True)
    meta = wait_until(lambda: (m := board.device().get("meta") or {}).get("safe_mode") and m, timeout=90)
    assert meta["resources"] == []  # sensors are off
    assert board.cmd("ping")["value"] == "pong"  # the command channel works
    refused = board.cmd("read_now", check=False)
    assert refused["ok"] is False and "safe mode" in refused["error"]
    board.cmd("reboot", "normal=true")  # the operator takes it out of safe mode
    wait_until(lambda: 9 in board.boots(), timeout=90)


def test_a_hung_board_is_reset_by_its_watchdog_and_loses_nothing(board: Board) -> None:
    if not board.virtual:
        pytest.skip("needs a sensor bus the test can lock up (virtual board only)")
    board.flash(watchdog=4)  # reflashed with a short watchdog, so the test need not wait the default minute
    boot = board.state()["boot"]
    wait_until(lambda: len([r for r in board.readings() if r["boot"] == boot]) >= 3)
    board.hang()  # the sensor bus locks up: the read blocks the event loop, nothing feeds the watchdog
    wait_until(lambda: board.state()["boot"] == boot + 1, timeout=60)
    meta = wait_until(lambda: (m := board.device().get("meta") or {}).get("boot") == boot + 1 and m)
    assert meta["reset_cause"] == "watchdog" and not meta["safe_mode"]
    wait_until(lambda: len([r for r in board.readings() if r["boot"] == boot + 1]) >= 3)  # sampling again
    boots = contiguous_per_boot(board.readings())  # what the hung boot had buffered arrived, each reading once
    assert boot in boots and boot + 1 in boots


def test_flash_then_reflash(board: Board) -> None:
    wait_until(lambda: board.readings())
    board.daemon.cli("twin", "set", board.id, "threshold=0.001")
    again = board.flash()
    assert "issuing a new credential" in again.stdout and f"{board.id} is online" in again.stdout
    assert board.twin()["desired"]["state"] == {"threshold": 0.001}  # a reflash keeps the twin
    wait_until(lambda: len(board.boots()) == 2, timeout=90)
    contiguous_per_boot(board.readings())
    assert json.loads(board.daemon.cli("device", "list", "--json").stdout)[0]["online"] is True


def test_readings_carry_true_utc_even_when_taken_before_the_clock_was_set(board: Board) -> None:
    # A board's clock counts from 2000-01-01 at power-on until the gateway sets it when the board connects.
    live = wait_until(lambda: (r := board.readings()) and len(r) >= 5 and r, timeout=90)
    now = time.time()
    assert all(abs(r["ts"] - now) < 120 and not r.get("ts_arrival") for r in live), live[-3:]

    # Power is cut with Wi-Fi down: the clock is lost and readings are taken with no one to set it.
    board.wifi(False)
    board.power_cycle()
    powered = time.time()
    boot = wait_until(lambda: (s := board.state())["boot"] > live[-1]["boot"] and s["boot"])
    wait_until(lambda: len([b for b, _ in board.buffered() if b == boot]) >= 5, timeout=60)
    changed = time.time()
    board.env(temperature=31.5)  # a change at a known moment: readings before it and after it are told apart
    # held readings taken after the change, however long the board took to take them (a loaded machine)
    wait_until(lambda: len([v for b, _, v in board.buffered_values() if b == boot and v.get("temperature") == 31.5])
               >= 3 and len([b for b, _ in board.buffered() if b == boot]) >= 12, timeout=90)
    assert not board.state()["clock"].get("set"), "the board's clock was set before Wi-Fi came back"
    held = {seq for b, seq in board.buffered() if b == boot}  # taken offline, waiting on the board's flash
    board.wifi(True)
    back = time.time()
    # every held reading arrives (new ones may overtake them: the wait is for these, not for a count)
    taken = wait_until(lambda: (r := [x for x in board.readings() if x["boot"] == boot])
                       and held <= {x["seq"] for x in r} and r, timeout=90)
    offline = [r for r in taken if r["seq"] in held]
    assert len(offline) >= 12 and all(r["ts"] < back for r in offline), taken  # the time taken, not of arrival
    assert not [r for r in taken if r.get("ts_arrival")]
    assert all(powered - 2 <= r["ts"] for r in taken)
    before = [r for r in offline if r["values"].get("temperature") != 31.5]
    after = [r for r in offline if r["values"].get("temperature") == 31.5]
    assert before and after, offline
    # a reading with the new value was taken after the change was made (true UTC, not the board's 2000 clock), and
    # every reading before it earlier: no bound that depends on how fast a loaded machine runs the board
    assert min(r["ts"] for r in after) >= changed - 1 and max(r["ts"] for r in before) < min(r["ts"] for r in after)
    stamps = [r["ts"] for r in sorted(taken, key=lambda r: r["seq"])]
    assert stamps == sorted(stamps)


def test_mpremote_soft_resets_are_not_boots(board: Board) -> None:
    # A board runs boot.py at every soft reset, mpremote's too; only a start of the firmware is a boot, so tooling
    # never pushes a board towards safe mode.
    boot = wait_until(board.boot, timeout=90)

    def marked_good(boot: int) -> bool:  # the first acknowledged reading of a boot marks it good
        if board.virtual:
            return bool(board.state()["failed_boots"] == 0)
        return any(r["boot"] == boot for r in board.readings())

    wait_until(lambda: marked_good(boot), timeout=90)
    for _ in range(3):
        board.mpremote("soft-reset")
    board.mpremote("reset")
    # the next boot is boot + 1: the soft resets before it were not boots
    wait_until(lambda: board.boot() == boot + 1 and any(r["boot"] == boot + 1 for r in board.readings()), timeout=90)
    wait_until(lambda: marked_good(boot + 1), timeout=90)
    assert board.boot() == boot + 1


def test_a_command_too_large_for_the_board_gets_an_error_instead_of_a_timeout(board: Board) -> None:
    answer = board.cmd("blink", "times=1", f"note={'x' * 6000}", check=False)
    assert answer["ok"] is False and "too large" in answer["error"], answer
    assert board.cmd("ping")["value"] == "pong"  # and the board goes on


def test_a_long_session_then_a_short_gateway_restart_is_not_a_reboot(board: Board) -> None:
    # `reboot_after` is a long time without the gateway, counted from when the board last had it, not from when a
    # session began: a board connected for longer than that must not reset at the first restart of the gateway.
    if not board.virtual:
        pytest.skip("sets reboot_after in the board's config.json (virtual board only)")
    config_path = board.flash_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "reboot_after": 15}))
    boot = board.state()["boot"]
    board.power_cycle()  # the board reads its config at boot
    wait_until(lambda: board.state()["boot"] == boot + 1)
    wait_until(lambda: len([r for r in board.readings() if r["boot"] == boot + 1]) >= 3, timeout=60)
    time.sleep(20)  # one session, longer than reboot_after
    board.daemon.stop()
    time.sleep(2)
    board.daemon.start()  # same port
    seen = len(board.readings())
    wait_until(lambda: len(board.readings()) > seen + 3, timeout=60)
    assert board.state()["boot"] == boot + 1  # no reset


def test_a_board_left_in_the_repl_by_mpremote_comes_back_by_its_watchdog(board: Board) -> None:
    # `mpremote ls` interrupts the firmware and leaves the board in the REPL; its watchdog brings it back.
    board.flash(watchdog=4)  # a short watchdog, so the test need not wait the default minute
    boot = board.state()["boot"]
    wait_until(lambda: len([r for r in board.readings() if r["boot"] == boot]) >= 2)
    assert "config.json" in board.mpremote("ls")
    wait_until(lambda: board.state()["boot"] == boot + 1, timeout=60)
    meta = wait_until(lambda: (m := board.device().get("meta") or {}).get("boot") == boot + 1 and m, timeout=60)
    assert meta["reset_cause"] == "watchdog"
    wait_until(lambda: len([r for r in board.readings() if r["boot"] == boot + 1]) >= 2)  # reporting again


@pytest.mark.board_file
def test_a_board_from_a_file_reports_each_part_and_takes_its_outputs(board: Board) -> None:
    """Flashed with a board file (--board-file on a real board; the greenhouse example on a virtual one): every part
    the file describes reports at the gateway in its range, and each output follows the twin. On a real board this
    covers what the unix port only simulates: SoftI2C's scan at flash time, the dht/onewire modules, PWM duty."""
    meta = wait_until(lambda: (board.device().get("meta") or {}).get("resources") and board.device()["meta"],
                      timeout=90)
    resources = {r["name"]: r for r in meta["resources"]}
    readable = {n for n, r in resources.items() if r["access"] == "r"}
    latest: dict[str, object] = {}

    def every_part_read() -> bool:
        for row in board.readings():
            latest.update(row["values"])
        return readable <= set(latest)

    wait_until(every_part_read, timeout=120)
    for name in readable:
        r, v = resources[name], latest[name]
        if r["type"] == "bool":
            assert isinstance(v, bool), (name, v)
        else:
            assert r.get("min", v) <= v <= r.get("max", v), (name, v, r)
    outputs = [r for r in resources.values() if r["access"] == "rw"]
    for r in outputs:  # on, then off again: what the board reports is what it set
        on = "true" if r["type"] == "bool" else str(r.get("max", 1))
        board.daemon.cli("twin", "set", board.id, f"{r['name']}={on}")
        wait_until(lambda r=r: board.twin()["reported"]["state"].get(r["name"]) not in (None, False, 0))
        board.daemon.cli("twin", "set", board.id, f"{r['name']}={'false' if r['type'] == 'bool' else 0}")
        wait_until(lambda r=r: board.twin()["reported"]["state"].get(r["name"]) in (False, 0))
    if board.virtual and board.wired[-1].endswith("greenhouse.toml"):
        # the example's door contact (GPIO13) closing is reported within a second or so, not at the next period
        assert latest["door"] is True  # open: the pull-up holds the pin high
        board.daemon.cli("fault", board.id, "env", "gpio13=0")
        wait_until(lambda: board.readings()[-1]["values"].get("door") is False, timeout=10)


def test_an_update_over_the_air_is_confirmed_and_a_rollback_goes_back(board: Board, tmp_path: Path) -> None:
    """What the unix port can only simulate: LittleFS's rename under the swap, the watchdog fed while chunks are
    written to flash, the heap of a real ESP32 through two restarts (docs/firmware.md, Updates over the air)."""
    flashed = wait_until(lambda: (board.device().get("meta") or {}).get("bundle"), timeout=90)
    new = make_bundle(tmp_path, "0.9.0-hil")
    done = cli(board.daemon.data_dir, "ota", board.id, "--bundle", str(new), timeout=600)
    assert f"{board.id} confirmed bundle" in done.stdout and "firmware 0.9.0-hil" in done.stdout, done.stdout
    wait_until(lambda: (board.device().get("meta") or {}).get("firmware") == "0.9.0-hil", timeout=60)
    went = board.cmd("rollback")  # back to what was flashed, kept beside it
    assert went["ok"] and went["value"]["bundle"] == flashed, went
    meta = wait_until(lambda: (m := board.device().get("meta") or {}).get("bundle") == flashed and m, timeout=120)
    assert meta["firmware"] == "0.1.0"
    boot = meta["boot"]
    wait_until(lambda: any(r["boot"] == boot for r in board.readings()), timeout=60)  # and it reads again
    contiguous_per_boot(board.readings())
