"""`edgetrio vdev|flash|ota|fault|demo`: the device tier's commands (virtual boards, flashing, faults, the demo)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from edgetrio.console import (
    EXIT_FAILED,
    EXIT_USAGE,
    JSON,
    CliError,
    Commands,
    arg,
    data_dir_option,
    default_data_dir,
    emit,
    parse_assignments,
    require_positive,
)
from edgetrio.daemon.config import daemon_running
from edgetrio.identity import RegistryError, check_device_id
from edgetrio.tools.boards import BoardError, load_board
from edgetrio.tools.bundle import require_device_tools
from edgetrio.tools.demo import run_demo
from edgetrio.tools.flash import FlashError, FlashTimeout, flash
from edgetrio.tools.ota import OtaError, control_op, ota, print_update
from edgetrio.tools.service import install as install_service
from edgetrio.tools.vdev import main_vdev, set_fault

COMMANDS = Commands()
LOCAL = (*data_dir_option(default_data_dir, "the gateway's data directory (default: $EDGETRIO_DATA_DIR or "
                                            "./edgetrio-data)"), *JSON)
COMMANDS.group("service", "run the daemon or the relay as a systemd service")


def require_battery(battery: int | None) -> None:
    if battery is not None and not 1 <= battery <= 1000:  # as a board file's [board] battery
        raise CliError(f"--battery {battery}: online every 1 to 1000 readings (deep sleep between)", EXIT_USAGE)


@COMMANDS.command(
    "vdev", "run virtual ESP32s (the real firmware) against the daemon", LOCAL,
    arg("--count", type=int, default=1, help="how many virtual boards (default 1)"),
    arg("--prefix", default="vdev", help="device ids are PREFIX-1..PREFIX-N (default vdev)"),
    arg("--period", type=float, help="sample period in seconds until the twin sets one (default: the board file's, "
                                     "else 5)"),
    arg("--heap", help="MicroPython heap size (default 128K: the unix port's 64-bit objects make that less than an "
                       "ESP32 without PSRAM holds of this firmware, docs/benchmarks.md; 200K with --board, whose "
                       "simulated parts take heap here that is hardware on a real board)"),
    arg("--buffer", type=int, default=500, metavar="N",
        help="readings a board keeps on flash until acknowledged; past N the oldest go (default 500)"),
    arg("--repl-pty", type=Path, metavar="PATH",
        help="expose the device's REPL on a pty linked at PATH, like a board's USB serial port"),
    arg("--blank", action="store_true",
        help="a new board with an empty flash, for `edgetrio flash` to fill: the first PREFIX-N not taken"),
    arg("--board", type=Path, metavar="FILE",
        help="a board file (TOML): the boards have these parts wired and run with this config (docs/firmware.md)"),
    arg("--sensor", choices=["bme280", "bmp280"], default="bme280",
        help="the chip on the boards' I2C bus (a BMP280 has no humidity; default bme280)"),
    arg("--forced", action="store_true",
        help="run the sensor in forced mode, one measurement per reading, as battery boards do"),
    arg("--uart", type=Path, metavar="PATH",
        help="use the serial transport on this pty (one end of a socat pair; the daemon gets the other)"),
    arg("--battery", type=int, metavar="N",
        help="battery mode: deep sleep between readings (one per period), connecting every N readings"))
def cmd_vdev(args: argparse.Namespace) -> None:
    require_positive(count=args.count, period=args.period, buffer=args.buffer, battery=args.battery)
    require_battery(args.battery)
    try:
        require_device_tools(virtual=True)
    except RuntimeError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    if not args.blank and not daemon_running(args.data_dir):
        raise CliError(f"no daemon is running on {args.data_dir}: start `edgetrio daemon` first", EXIT_USAGE)
    try:
        board = load_board(args.board, wifi=args.uart is None) if args.board else None
    except BoardError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    try:
        heap = args.heap or ("200K" if board else "128K")
        period = args.period if args.period is not None else board.period if board else 5.0
        main_vdev(args.data_dir, args.count, args.prefix, period, heap, args.repl_pty, args.blank, args.uart,
                  args.buffer, args.sensor, args.forced, board, args.battery)
    except RuntimeError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


@COMMANDS.command(
    "flash", "install the firmware on a board (or a virtual one) with mpremote", LOCAL,
    arg("--port", help="the board's port: /dev/ttyUSB0, a virtual device's pty, socket://HOST:PORT"),
    arg("--device-id", required=True),
    arg("--broker", required=True, metavar="HOST[:PORT]", help="the gateway's MQTT address as the board sees it"),
    arg("--wifi-ssid", default=""),
    arg("--wifi-password", default=""),
    arg("--board", type=Path, metavar="FILE",
        help="a board file (TOML) describing what is wired to the board: its components, their pins and filters; "
             "its model is registered for the device (docs/firmware.md). Default: the reference board"),
    arg("--period", type=float, help="sample period in seconds (default: the board file's, else 10; the twin can "
                                     "change it)"),
    arg("--watchdog", type=float, default=60.0, metavar="S",
        help="reset the board when its firmware stops for this long (default 60 s; 2-3600; keep it above the time a "
             "reflash takes, which the running watchdog also covers)"),
    arg("--erase", action="store_true",
        help="also delete the board's boot counter, twin state and unsent readings (a board moving to a new "
             "gateway); by default a reflash keeps them, so nothing buffered is lost"),
    arg("--battery", type=int, metavar="N",
        help="battery mode: deep sleep between readings, online every N readings (docs/firmware.md)"),
    arg("--out", type=Path, help="write the bundle to this folder instead of flashing"),
    arg("--password", help="a credential made elsewhere (e.g. by `edgetrio cloud device add`): nothing is registered "
                           "here"),
    arg("--wait", type=float, default=60.0, help="seconds to wait for the device to come online"))
def cmd_flash(args: argparse.Namespace) -> None:
    require_positive(battery=args.battery)
    require_battery(args.battery)
    try:
        flash(args.port, args.device_id, args.broker, args.data_dir, args.wifi_ssid, args.wifi_password, args.out,
              args.period, args.wait, watchdog=args.watchdog, erase=args.erase, password=args.password,
              board_file=args.board, battery=args.battery)
    except FlashTimeout as exc:  # flashed, but not online: a failure to look into, not a usage error
        raise CliError(str(exc), EXIT_FAILED) from exc
    except (FlashError, RuntimeError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


@COMMANDS.command(
    "bundle", "write this edgetrio's firmware as a bundle (OUT/lib/*.mpy), for `ota --bundle` and `cloud rollout`",
    arg("out", type=Path, metavar="OUT", help="a new (or empty) folder"), *JSON)
def cmd_bundle(args: argparse.Namespace) -> None:
    from edgetrio.bundles import bundle_files, bundle_id
    from edgetrio.tools.bundle import build_bundle

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CliError(f"{args.out} exists and is not an empty folder: give a new one", EXIT_USAGE)
    try:
        require_device_tools()
    except RuntimeError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    build_bundle(args.out)
    files = bundle_files(args.out / "lib")
    made = {"bundle": bundle_id(files), "files": len(files), "bytes": sum(size for _, size, _ in files),
            "path": str(args.out)}
    emit(args, made, lambda: print(f"bundle {made['bundle'][:12]} ({made['files']} files, {made['bytes']:,} bytes) "
                                   f"in {args.out}"))


@COMMANDS.command(
    "ota", "update a board's firmware over the air, through the running gateway", LOCAL, arg("id"),
    arg("--bundle", type=Path, metavar="DIR",
        help="a bundle folder `edgetrio bundle DIR` wrote (its lib/*.mpy); default: this edgetrio's firmware"),
    arg("--status", action="store_true", help="show the board's last update and return"),
    arg("--cancel", action="store_true", help="stop sending an update (the same bundle later resumes where it was)"),
    arg("--no-wait", action="store_true", help="start the update and return; follow it with --status"),
    arg("--timeout", type=float, default=900.0, metavar="S", help="seconds to follow the update (default 900)"),
    arg("--confirm-timeout", type=float, default=300.0, metavar="S",
        help="seconds the board runs the new firmware without an acknowledged reading before it restarts to try "
             "again; after 3 tries it goes back to the firmware that worked (default 300; 30-86400)"))
def cmd_ota(args: argparse.Namespace) -> None:
    require_positive(timeout=args.timeout)
    try:
        check_device_id(args.id)
    except RegistryError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    if args.status and args.cancel:
        raise CliError("--status or --cancel, not both", EXIT_USAGE)
    if not (math.isfinite(args.confirm_timeout) and 30 <= args.confirm_timeout <= 86400):
        raise CliError("--confirm-timeout: 30 to 86400 seconds", EXIT_USAGE)
    if not daemon_running(args.data_dir):
        raise CliError(f"no daemon is running on {args.data_dir}: updates go through it", EXIT_USAGE)
    try:
        if args.status or args.cancel:
            update = control_op(args.data_dir, "ota.cancel" if args.cancel else "ota.status", args.id)
            emit(args, update, lambda: print_update(update, args.id))
            return
        update = ota(args.data_dir, args.id, args.bundle, args.json, not args.no_wait, args.timeout,
                     args.confirm_timeout)
    except OtaError as exc:
        raise CliError(str(exc), EXIT_FAILED) from exc
    if args.json:
        print(json.dumps(update))


@COMMANDS.command(
    "fault", "inject a fault into a running virtual device", LOCAL, arg("id"),
    arg("kind", choices=["wifi", "env", "power", "hang"]),
    arg("values", nargs="*", help="wifi: up|down; env: key=value ...; power: nothing (pull the plug); hang: nothing "
                                  "(the sensor bus locks up until the watchdog resets the board)"))
def cmd_fault(args: argparse.Namespace) -> None:
    value: Any
    if args.kind == "wifi":
        if args.values not in (["up"], ["down"]):
            raise CliError("wifi takes up or down", EXIT_USAGE)
        value = args.values[0]
    elif args.kind == "env":
        value = parse_assignments(args.values)
    else:
        value = None
    try:
        set_fault(args.data_dir, args.id, args.kind, value)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    emit(args, {"id": args.id, "fault": args.kind, "value": value},
         lambda: print(f"{args.id}: {args.kind} {' '.join(args.values)}".rstrip()))


@COMMANDS.command("demo", "run a daemon with simulated devices and show readings arriving", LOCAL,
                  arg("--devices", type=int, default=3),
                  arg("--duration", type=float, default=0, help="seconds to run (default: until Ctrl-C)"))
def cmd_demo(args: argparse.Namespace) -> None:
    require_positive(devices=args.devices)
    run_demo(args.data_dir, args.devices, args.duration)


@COMMANDS.command(
    "service install", "write the systemd unit, a config file and a data dir", JSON,
    arg("what", nargs="?", choices=["daemon", "relay"], default="daemon"),
    arg("--user", action="store_true", help="a user service (~/.config/systemd/user) instead of a system one"),
    arg("--dry-run", action="store_true", help="print the files instead of writing them"))
def cmd_service_install(args: argparse.Namespace) -> None:
    try:
        done, notes = install_service(args.what, args.user, args.dry_run)
    except OSError as exc:
        raise CliError(f"cannot install the service: {exc.strerror or exc}"
                       f"{' (as root, or with --user)' if isinstance(exc, PermissionError) else ''}", EXIT_USAGE) from exc
    scope = "--user " if args.user else ""

    def human() -> None:
        for path, text, written in done:
            if args.dry_run:
                print(f"# {path}\n{text}")
            else:
                print(f"{'wrote' if written else 'kept  '} {path}")
        for note in notes:
            print(note)
        if not args.dry_run:
            print(f"then: systemctl {scope}enable --now edgetrio-{args.what}.service")

    emit(args, {"files": [{"path": str(p), "written": w, "text": t} for p, t, w in done], "notes": notes}, human)
