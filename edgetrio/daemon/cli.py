"""`edgetrio daemon|device|model|twin|cmd|readings|status`: run the gateway, manage its devices, read what it stored."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import fields
from pathlib import Path
from typing import Any

import trio

from edgetrio import wire
from edgetrio.common_cli import (
    asleep,
    desired_patch,
    firmware_of,
    log_line,
    print_readings,
    print_twin,
    readings_options,
    user_commands,
)
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
    fmt_time,
    parse_assignments,
    require_positive,
    setup_logging,
    time_option,
)
from edgetrio.daemon import alerts, rulestore, store
from edgetrio.daemon.broker import BrokerStartError
from edgetrio.daemon.config import (
    ADMIN_FILE,
    ConfigError,
    DaemonConfig,
    DaemonError,
    build_config,
    daemon_running,
    load_config_file,
    read_run_file,
)
from edgetrio.daemon.control import ControlClient, ControlError
from edgetrio.daemon.gateway import node_report, run
from edgetrio.daemon.homeassistant import ha_unit
from edgetrio.daemon.ingest import missing_from_model
from edgetrio.daemon.supervisor import VitalFailure
from edgetrio.daemon.topics import INTEGRATIONS
from edgetrio.identity import RegistryError, check_device_id, integration_user
from edgetrio.models import load_model_file
from edgetrio.rules import RuleError, check_notify_urls, parse_document, read_rule_file
from edgetrio.twin import VersionConflict, set_desired
from edgetrio.writer import offline_write

COMMANDS = Commands()
DATA_HELP = "the gateway's data directory (default: $EDGETRIO_DATA_DIR or ./edgetrio-data)"
# what the gateway's data commands take; the daemon's own --data-dir (below) is None unless given, as its config file
# may name one
LOCAL = (*data_dir_option(default_data_dir, DATA_HELP), *JSON)
SETTINGS = (  # the daemon's settings, shared with `config show`
    *data_dir_option(None, DATA_HELP),
    arg("--mqtt-host", help="address to listen on for devices (default 0.0.0.0)"),
    arg("--mqtt-port", type=int, help="MQTT port (default 1883; 0 picks a free one)"),
    arg("--metrics-host", help="address for /metrics and /healthz (default 127.0.0.1)"),
    arg("--metrics-port", type=int,
        help="port for /metrics and /healthz (default 9883; 0 picks a free one, -1 turns them off)"),
    arg("--http-host", help="address of the dashboard (default 127.0.0.1)"),
    arg("--http-port", type=int, help="port of the dashboard (default 8080; 0 picks a free one, -1 turns it off)"),
    arg("--ha", action="store_true", help="announce devices to Home Assistant by MQTT discovery (its credential: "
                                          "`edgetrio integration add homeassistant`)"),
    arg("--config", type=Path, help="TOML file with any of the settings above"),
    arg("--log-level", help="debug, info, warning or error"),
    arg("--serial", action="append", default=[], metavar="PORT",
        help="a board on a serial port speaking JSON lines (repeatable)"),
    arg("--cloud", metavar="URL", help="relay to dial out to: ws://HOST:PORT or wss://HOST:PORT"),
    arg("--node-id", help="this gateway's node name at the relay"),
    arg("--token", help="this node's token (from `edgetrio cloud node add`); visible in `ps`, so prefer --token-file "
                        "or $EDGETRIO_CLOUD_TOKEN"),
    arg("--token-file", type=Path, metavar="FILE", help="read this node's token from FILE"),
)
for path, help in (("config", "the daemon's settings"), ("device", "register, list and remove devices"),
                   ("integration", "credentials for what else uses the gateway's broker (Home Assistant)"),
                   ("model", "device models"), ("twin", "desired and reported state"),
                   ("rule", "automation: rules on readings and schedules")):
    COMMANDS.group(path, help)


def open_store(data_dir: Path, must_exist: bool = True) -> Any:
    if must_exist and not (data_dir / store.DB_FILE).exists():
        raise CliError(f"no gateway data in {data_dir} (set --data-dir, or start with `edgetrio device add`)", EXIT_USAGE)
    try:
        return store.open_db(data_dir)
    except RegistryError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def via_daemon_or_store(data_dir: Path, op: str, op_args: dict[str, Any], offline: Callable[[Any], Any]) -> Any:
    """Write commands go through the running daemon (the one writer); with no daemon they write the store directly."""
    if daemon_running(data_dir):
        try:
            with ControlClient(data_dir) as control:
                return control.request(op, op_args)
        except ControlError as exc:
            raise CliError(str(exc)) from exc
    db = open_store(data_dir, must_exist=False)
    try:
        with offline_write(db):
            return offline(db)
    except (RegistryError, VersionConflict, RuleError) as exc:
        raise CliError(str(exc)) from exc


def gateway_write(args: argparse.Namespace, op: str, op_args: dict[str, Any], offline: Callable[[Any], Any]) -> Any:
    return via_daemon_or_store(args.data_dir, op, op_args, offline)


# -- commands -------------------------------------------------------------------------------------------------------

def daemon_settings(args: argparse.Namespace) -> tuple[DaemonConfig, dict[str, str]]:
    """The effective settings from defaults, the config file, the environment and flags (flags win), and where each
    value came from."""
    file_settings = load_config_file(args.config) if args.config else {}
    token_env = os.environ.get("EDGETRIO_CLOUD_TOKEN") or None
    flags = {
        "data_dir": args.data_dir, "mqtt_host": args.mqtt_host, "mqtt_port": args.mqtt_port,
        "log_level": args.log_level, "serial": args.serial, "cloud_url": args.cloud, "node_id": args.node_id,
        "cloud_token": args.token or token_env, "cloud_token_file": args.token_file,
        "metrics_host": args.metrics_host, "metrics_port": args.metrics_port,
        "homeassistant": True if args.ha else None, "http_host": args.http_host, "http_port": args.http_port,
    }
    cfg = build_config(file_settings, flags)
    sources = {}
    for name in (f.name for f in fields(DaemonConfig)):
        given = flags.get(name)
        if given is not None and given != []:
            sources[name] = "environment" if name == "cloud_token" and not args.token else "flag"
        elif name in file_settings:
            sources[name] = f"file {args.config}"
        else:
            sources[name] = "default"
    if sources["data_dir"] == "default":  # $EDGETRIO_DATA_DIR, as every other command takes it
        cfg.data_dir = default_data_dir()
        if os.environ.get("EDGETRIO_DATA_DIR"):
            sources["data_dir"] = "environment"
    if sources["cloud_token"] == "default" and cfg.cloud_token and cfg.cloud_token_file:
        sources["cloud_token"] = f"token file {cfg.cloud_token_file}"
    return cfg, sources


SWITCH_INTERVAL = 0.001  # seconds a thread may hold the interpreter while another waits for it
M_ARENA_MAX = -8  # glibc's mallopt(3) parameter


def one_malloc_arena() -> None:
    """glibc gives each thread that allocates its own malloc arena (the broker's, the SQLite writer's): their free
    memory is not shared, and with the interpreter's lock only one runs at a time anyway. One arena: 1.3 MB less with
    500 devices streaming, latency unchanged (bench_crowd). Before any thread starts; nothing elsewhere than glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)


@COMMANDS.command("daemon", "run the gateway daemon in the foreground", SETTINGS, JSON)
def cmd_daemon(args: argparse.Namespace) -> None:
    cfg, _ = daemon_settings(args)
    setup_logging(cfg.log_level)

    failure: BaseException | None = None
    try:
        # three threads share the interpreter (the broker's loop, trio, the SQLite writer): at the default 5 ms a
        # thread back from its socket or its fsync waits up to 5 ms for the others at each step of a reading's path
        # (bench_crowd, 500 devices at 2,000 msg/s: p99 26-30 ms at 5 ms, 16 ms at 1 ms, 20 ms at 0.5 ms)
        sys.setswitchinterval(SWITCH_INTERVAL)
        one_malloc_arena()
        trio.run(run, cfg)
    except* (BrokerStartError, DaemonError, ConfigError, VitalFailure) as group:  # out of nested nurseries
        failure = group
        while isinstance(failure, BaseExceptionGroup):
            failure = failure.exceptions[0]
    if failure is not None:  # a vital component failed while running: exit 1 so the service manager restarts it
        raise CliError(str(failure), EXIT_FAILED if isinstance(failure, VitalFailure) else EXIT_USAGE)


@COMMANDS.command("device add", "register a device and print its credential once", LOCAL, arg("id"),
                  arg("--model", help="device model name (see `edgetrio model add`)"))
def cmd_device_add(args: argparse.Namespace) -> None:
    try:
        check_device_id(args.id)  # a bad argument: exit 2, before anything is opened
    except RegistryError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    result = via_daemon_or_store(
        args.data_dir, "device.add", {"id": args.id, "model": args.model},
        lambda db: {"id": args.id, "username": args.id,
                    "password": store.add_device(db, args.id, args.model)},
    )
    emit(args, result, lambda: print(
        f"registered {result['id']}\n  username: {result['username']}\n  password: {result['password']}\n"
        "Keep the password now: it is stored only hashed and cannot be shown again."))


@COMMANDS.command("device set-model", "give a device a model (without MODEL: none, the one its board announces)",
                  LOCAL, arg("id"), arg("model", nargs="?"))
def cmd_device_set_model(args: argparse.Namespace) -> None:
    via_daemon_or_store(args.data_dir, "device.model", {"id": args.id, "model": args.model},
                        lambda db: store.set_device_model(db, args.id, args.model))
    emit(args, {"id": args.id, "model": args.model}, lambda: print(
        f"{args.id} now has model {args.model}" if args.model else
        f"{args.id} has no model: the one its board announces applies"))


@COMMANDS.command("device remove", "remove a device (its readings stay)", LOCAL, arg("id"))
def cmd_device_remove(args: argparse.Namespace) -> None:
    via_daemon_or_store(args.data_dir, "device.remove", {"id": args.id},
                        lambda db: store.remove_device(db, args.id))
    emit(args, {"id": args.id, "removed": True}, lambda: print(f"removed {args.id} (its stored readings are kept)"))


@COMMANDS.command("device list", "devices with online state and last seen", LOCAL)
def cmd_device_list(args: argparse.Namespace) -> None:
    db = open_store(args.data_dir)
    devices = store.list_devices(db)
    for d in devices:
        d["readings"] = store.reading_count(db, d["id"])
        last = store.last_received(db, d["id"])
        if last is not None and (d["last_seen"] or 0) < last:
            d["last_seen"] = last  # presence is stamped at connect; a reading is a later sign of life
        if not d["model"] and (d["meta"] or {}).get("model"):
            d["announced_model"] = d["meta"]["model"]
        d["refused"] = store.refusing(db, d["id"], time.time() - 3600)  # the last hour
        model = store.get_model(db, d["model"]) if d["model"] else None
        d["model_lacks"] = missing_from_model(model, d["meta"] or {})  # what the board sends that its model refuses

    def human() -> None:
        if not devices:
            print("no devices registered")
            return
        width = max([16, *(len(d["model"] or d.get("announced_model") or "") + 1 for d in devices)])
        fw_width = max([8, *(len(firmware_of(d["meta"] or {})) for d in devices)])
        print(f"{'DEVICE':<20} {'MODEL':<{width}} {'FIRMWARE':<{fw_width}} {'STATE':<8} {'LAST SEEN':<20} {'READINGS':>8}  "
              "REFUSED (1 h)")
        for d in devices:
            state = "online" if d["online"] else "asleep" if asleep(d) else "offline"
            model = d["model"] or (f"{d['announced_model']}*" if d.get("announced_model") else "-")
            refused = d["refused"]["count"] if d["refused"] else 0
            print(f"{d['id']:<20} {model:<{width}} {firmware_of(d['meta'] or {}):<{fw_width}} {state:<8} "
                  f"{fmt_time(d['last_seen']):<20} {d['readings']:>8}  "
                  f"{refused}{' !' if d['refused'] and d['refused']['readings_refused'] else ''}")
        if any(d.get("announced_model") and not d["model"] for d in devices):
            print("* as the device announced it (no model registered)")
        for d in devices:
            if not d["online"] and d.get("asleep_until"):
                print(f"~ {d['id']}: " + (f"asleep, next wake ~{fmt_time(d['asleep_until'])}" if asleep(d) else
                                          f"missed its wake at ~{fmt_time(d['asleep_until'])} (battery? out of range?)"))
        for d in devices:
            if d["model_lacks"]:
                print(f"! {d['id']}: the board announces {', '.join(d['model_lacks'])}, which its model "
                      f"{d['model']!r} lacks: readings with them are refused (reflash with its board file, or add them "
                      "to the model)")
            if d["refused"] and d["refused"]["readings_refused"]:
                print(f"! {d['id']}: its readings are being refused: {d['refused']['detail']}\n"
                      f"  {refusal_advice(d['id'], d['model'])}")

    emit(args, devices, human)


@COMMANDS.command("integration add", "make (or replace) an integration's credential and print it once", LOCAL,
                  arg("name", choices=sorted(INTEGRATIONS)))
def cmd_integration_add(args: argparse.Namespace) -> None:
    replaced = integration_user(args.name) in store.integration_secrets(open_store(args.data_dir))
    result = via_daemon_or_store(
        args.data_dir, "integration.add", {"name": args.name},
        lambda db: {"name": args.name, "username": integration_user(args.name),
                    "password": store.add_integration(db, args.name)},
    )
    info = read_run_file(args.data_dir) if daemon_running(args.data_dir) else {}
    host = str(info.get("mqtt_listen") or "0.0.0.0")
    # a daemon listening on every address is reached at this machine's address on the network, not at 0.0.0.0 (nor
    # at 127.0.0.1, unless Home Assistant runs on this machine)
    everywhere = host in ("0.0.0.0", "::", "")
    result["broker"] = f"{'<this gateway address>' if everywhere else host}:{info.get('mqtt_port', 1883)}"
    emit(args, result, lambda: print(
        f"credential for {result['name']}{' (a new one: the earlier one no longer works)' if replaced else ''}\n"
        f"  broker:   {result['broker']}"
        f"{'  (its address on your network; 127.0.0.1 if Home Assistant runs here)' if everywhere else ''}\n"
        f"  username: {result['username']}\n  password: {result['password']}\n"
        "Keep the password now: it is stored only hashed. In Home Assistant add the MQTT integration with these,\n"
        "and run the daemon with --ha (or homeassistant = true in its config) so the devices are announced."))


@COMMANDS.command("integration remove", "remove an integration's credential", LOCAL, arg("name"))
def cmd_integration_remove(args: argparse.Namespace) -> None:
    via_daemon_or_store(args.data_dir, "integration.remove", {"name": args.name},
                        lambda db: store.remove_integration(db, args.name))
    emit(args, {"name": args.name, "removed": True},
         lambda: print(f"removed {args.name}: its credential no longer works"))


@COMMANDS.command("integration list", "integrations and their broker user", LOCAL)
def cmd_integration_list(args: argparse.Namespace) -> None:
    rows = store.list_integrations(open_store(args.data_dir))

    def human() -> None:
        if not rows:
            print("no integrations (add one with `edgetrio integration add homeassistant`)")
        for r in rows:
            print(f"{r['name']:<16} user {r['username']:<28} since {fmt_time(r['created'])}")

    emit(args, rows, human)



@COMMANDS.command("model add", "add or replace a model from a .json or .toml file", LOCAL, arg("file", type=Path))
def cmd_model_add(args: argparse.Namespace) -> None:
    try:
        model = load_model_file(args.file)
    except RegistryError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    via_daemon_or_store(args.data_dir, "model.add", {"model": model.as_dict()},
                        lambda db: store.add_model(db, model))
    emit(args, model.as_dict(), lambda: print(f"model {model.name} stored with {len(model.resources)} resources"))


@COMMANDS.command("model list", "device models and their resources", LOCAL)
def cmd_model_list(args: argparse.Namespace) -> None:
    models = store.list_models(open_store(args.data_dir))

    def human() -> None:
        for m in models:
            names = ", ".join(f"{r['name']}:{r['type']}" for r in m["resources"])
            print(f"{m['name']:<24} ({m['source']}) {names}")

    emit(args, models, human)


@COMMANDS.command("twin get", "a device's desired and reported state", LOCAL, arg("id"))
def cmd_twin_get(args: argparse.Namespace) -> None:
    try:
        twin = store.get_twin(open_store(args.data_dir), args.id).as_json()
    except RegistryError as exc:
        raise CliError(str(exc)) from exc
    emit(args, twin, lambda: print_twin(twin))


@COMMANDS.command("twin set", "change desired state: key=value ... (null removes)", LOCAL, arg("id"),
                  arg("assignments", nargs="*", metavar="key=value"),
                  arg("--version", type=int, help="the desired version this change is based on (refused if stale)"))
def cmd_twin_set(args: argparse.Namespace) -> None:
    patch = desired_patch(args)

    def offline(db: Any) -> dict[str, Any]:
        twin = set_desired(store.get_twin(db, args.id), patch, args.version)
        store.save_twin(db, args.id, twin)
        return twin.as_json()

    twin = via_daemon_or_store(args.data_dir, "twin.set", {"id": args.id, "patch": patch, "version": args.version},
                               offline)
    emit(args, twin, lambda: print_twin(twin))


@COMMANDS.command("cmd", "send a command to a device and print its result", LOCAL, arg("id"), arg("name"),
                  arg("assignments", nargs="*", metavar="key=value"),
                  arg("--timeout", type=float, default=10.0, help="seconds to wait for the result (default 10)"))
def cmd_cmd(args: argparse.Namespace) -> None:
    require_positive(timeout=args.timeout)
    if not daemon_running(args.data_dir):
        raise CliError(f"no daemon is running on {args.data_dir}: commands need the daemon and the device online")
    try:
        with ControlClient(args.data_dir) as control:
            result = control.request("cmd", {"id": args.id, "name": args.name,
                                             "args": parse_assignments(args.assignments), "timeout": args.timeout},
                                     timeout=args.timeout + 10)
    except ControlError as exc:
        if exc.code == "held":  # a sleeping board gets it at its next wake: accepted, not failed
            held = str(exc)
            emit(args, {"held": True, "message": held}, lambda: print(held))
            return
        raise CliError(str(exc)) from exc

    def human() -> None:
        if result.get("ok"):
            print(json.dumps(result.get("value")))
        else:
            print(f"{args.id} answered with an error: {result.get('error')}")

    emit(args, result, human)
    if not result.get("ok"):
        raise SystemExit(EXIT_FAILED)


@COMMANDS.command("readings", "stored readings of a device", LOCAL, arg("id"),
                  readings_options("only the newest N"))
def cmd_readings(args: argparse.Namespace) -> None:
    require_positive(limit=args.limit)
    since, until = time_option(args.since), time_option(args.until)
    db = open_store(args.data_dir)
    if store.get_device(db, args.id) is None and store.reading_count(db, args.id) == 0:
        raise CliError(f"unknown device {args.id!r} (see `edgetrio device list`)")
    print_readings(args, store.query_readings(db, args.id, since, args.limit, until), units_of(db, args.id))


def units_of(db: Any, device_id: str) -> dict[str, str]:
    """Each resource's unit as the device's model has it, else as the board announced it (meta)."""
    device = store.get_device(db, device_id) or {}
    meta = json.loads(device["meta"]) if device.get("meta") else {}
    units = {str(r["name"]): str(r["unit"]) for r in meta.get("resources") or []
             if isinstance(r, dict) and r.get("name") and r.get("unit")}
    model = store.get_model(db, device["model"]) if device.get("model") else None
    units.update({r.name: r.unit for r in (model.resources.values() if model else []) if r.unit})
    return {k: f" {ha_unit(v)}" for k, v in units.items()}  # "C" as °C, the way Home Assistant is told


@COMMANDS.command("backup", "copy the gateway's data (safe while the daemon runs) into a new folder", LOCAL,
                  arg("dest", type=Path))
def cmd_backup(args: argparse.Namespace) -> None:
    """A copy of the data dir that restores by copying it back (with the daemon stopped): the database through
    SQLite's online backup, safe while the daemon runs, and the admin credential beside it."""
    data_dir: Path = args.data_dir
    if not (data_dir / store.DB_FILE).exists():
        raise CliError(f"no gateway data in {data_dir} (see --data-dir)", EXIT_USAGE)
    dest: Path = args.dest
    if dest.exists() and any(dest.iterdir()):
        raise CliError(f"{dest} is not empty: back up into a new folder", EXIT_USAGE)
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    pages = store.backup(data_dir, dest / store.DB_FILE)
    copied = [store.DB_FILE]
    if (data_dir / ADMIN_FILE).exists():
        (dest / ADMIN_FILE).write_bytes((data_dir / ADMIN_FILE).read_bytes())
        (dest / ADMIN_FILE).chmod(0o600)
        copied.append(ADMIN_FILE)
    emit(args, {"backup": str(dest), "files": copied, "pages": pages},
         lambda: print(f"backed up {data_dir} to {dest} ({', '.join(copied)}; {pages} database pages); restore by "
                       f"stopping the daemon and copying these files back"))


@COMMANDS.command("logs", "a device's log lines; --follow for new ones", LOCAL, arg("id"),
                  arg("--since", help="epoch seconds, ISO time, or an age like 10m, 2h, 1d"),
                  arg("--limit", type=int, default=200, help="the newest N lines first (default 200)"),
                  arg("--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C"))
def cmd_logs(args: argparse.Namespace) -> None:
    """A device's log lines (like `esphome logs`); --follow keeps printing new ones until Ctrl-C."""
    require_positive(limit=args.limit)
    since = time_option(args.since)
    db = open_store(args.data_dir)
    if store.get_device(db, args.id) is None and not store.device_logs(db, args.id, limit=1):
        raise CliError(f"unknown device {args.id!r} (see `edgetrio device list`)")

    line = log_line
    rows = store.device_logs(db, args.id, since=since, limit=args.limit)
    last = rows[-1]["id"] if rows else 0
    def human() -> None:
        for row in rows:
            print(line(row), flush=True)

    emit(args, rows, human)
    while args.follow:  # the daemon writes; this reads the same WAL database every half second
        time.sleep(0.5)
        for row in store.device_logs(db, args.id, after_id=last):
            print(json.dumps(row) if args.json else line(row), flush=True)
            last = row["id"]


@COMMANDS.command("rejects", "refused messages with the reason", LOCAL,
                  arg("--device", help="only this device's"),
                  arg("--since", help="epoch seconds, ISO time, or an age like 10m, 2h, 1d"),
                  arg("--limit", type=int, default=50, help="the newest N (default 50)"))
def cmd_rejects(args: argparse.Namespace) -> None:
    require_positive(limit=args.limit)
    rows = store.rejects(open_store(args.data_dir), args.device, time_option(args.since), args.limit)

    def human() -> None:
        for r in rows:
            where = f"boot {r['boot']} seq {r['seq']}" if r["seq"] is not None else ""
            print(f"{fmt_time(r['received'])}  {r['device'] or '-'}  {r['reason']}: {r['detail']}  {where}".rstrip())
            print(f"    sent: {wire.clip(r['payload'] or '', 200)}")
        if not rows:
            print("nothing refused")

    emit(args, rows, human)


def rule_document(path: Path) -> dict[str, Any]:
    """A rule file read and checked for what can be checked without the devices (syntax, keys, cron, time zones)."""
    try:
        doc = read_rule_file(path)
        check_notify_urls(parse_document(doc)[0])
    except RuleError as exc:  # each message names the file once
        raise CliError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}", EXIT_USAGE) from exc
    return doc


@COMMANDS.command("rule add", "add (or replace, by name) the rules and schedules of a TOML or JSON file", LOCAL,
                  arg("file", type=Path))
def cmd_rule_add(args: argparse.Namespace) -> None:
    doc = rule_document(args.file)
    result = via_daemon_or_store(args.data_dir, "rule.add", {"doc": doc}, lambda db: {
        "added": rulestore.add_automations(db, doc, store.device_models(db))})
    def human() -> None:
        print(f"added {', '.join(result['added'])}")
        for name, problem in (result.get("problems") or {}).items():
            print(f"  ! {name}: {problem}")

    emit(args, result, human)


@COMMANDS.command("rule remove", "remove a rule or schedule by name", LOCAL, arg("name"))
def cmd_rule_remove(args: argparse.Namespace) -> None:
    def offline(db: Any) -> dict[str, Any]:
        rulestore.remove_automation(db, args.name)
        return {"name": args.name, "removed": True}

    result = via_daemon_or_store(args.data_dir, "rule.remove", {"name": args.name}, offline)
    emit(args, result, lambda: print(f"removed {args.name}"))


@COMMANDS.command("rule list", "rules and schedules, local and from the cloud", LOCAL)
def cmd_rule_list(args: argparse.Namespace) -> None:
    rows = rulestore.list_automations(open_store(args.data_dir))

    def human() -> None:
        for r in rows:
            devices = ", ".join(r["devices"])
            print(f"{r['name']:<24} {r['kind']:<8} {r['source']:<6} {devices:<24} {r['when']}")
            if r["problem"]:
                partly = r["problem"].startswith("applied in part")
                print(f"    ! {r['problem'] if partly else 'left out by the daemon: ' + r['problem']}")
        if not rows:
            print("no rules or schedules (add some with `edgetrio rule add FILE`)")

    emit(args, rows, human)


@COMMANDS.command("rule history", "what a rule or schedule did: fired, resolved, actions and their failures", LOCAL,
                  arg("name"), arg("--limit", type=int, default=rulestore.HISTORY_LIMIT, help="the newest N (default 100)"))
def cmd_rule_history(args: argparse.Namespace) -> None:
    require_positive(limit=args.limit)
    rows = rulestore.history(open_store(args.data_dir), args.name, args.limit)

    def human() -> None:
        for r in rows:
            print(f"{fmt_time(r['ts'])}  {r['device'] or '-':<16} {r['event']:<14} {r['detail']}")
        if not rows:
            print(f"nothing recorded for {args.name!r}")

    emit(args, rows, human)


@COMMANDS.command("rule test", "dry run: what the file's rules would do on one reading of a device", LOCAL,
                  arg("file", type=Path), arg("--device", required=True),
                  arg("--values", nargs="+", default=[], metavar="key=value"))
def cmd_rule_test(args: argparse.Namespace) -> None:
    doc = rule_document(args.file)
    values = parse_assignments(args.values)
    if not values:
        raise CliError("give the reading's values: --values temperature=35 ...", EXIT_USAGE)
    request = {"doc": doc, "device": args.device, "values": values}
    rows = via_daemon_or_store(args.data_dir, "rule.test", request,
                               lambda db: rulestore.dry_run(doc, store.device_models(db), args.device, values))

    def human() -> None:
        for r in rows:
            if not r["judged"]:
                print(f"{r['rule']}: cannot judge (a value it needs is missing or of another type)")
            elif r["fires"]:
                after = f" after holding {r['after']:g} s" if r["after"] else ""
                print(f"{r['rule']}: fires{after} ({r['severity']}); {'; '.join(r['actions']) or 'no actions'}; "
                      f"{r['notify']} notification{'' if r['notify'] == 1 else 's'}")
            else:
                print(f"{r['rule']}: does not fire")
        if not rows:
            print(f"no rule in {args.file} watches {args.device}")

    emit(args, rows, human)


@COMMANDS.command("alerts", "open alerts (--all: resolved ones too); ack", LOCAL,
                  arg("--all", action="store_true", help="resolved and acknowledged alerts too"))
def cmd_alerts(args: argparse.Namespace) -> None:
    rows = alerts.list_alerts(open_store(args.data_dir), args.all)

    def human() -> None:
        for r in rows:
            since = r["fired"] or r["started"]
            acked = f"  acked by {r['acked_by']}" if r["acked"] else ""
            values = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["values"].items())
            print(f"{r['id']:>5} {r['state']:<9} {r['severity']:<9} {r['rule']:<20} {r['device']:<16} "
                  f"{fmt_time(since)}  {values}{acked}")
        if not rows:
            print("no alerts" if args.all else "no open alerts (--all shows resolved ones too)")

    emit(args, rows, human)


@COMMANDS.command("alerts ack", "acknowledge an alert by its id", LOCAL, arg("id", type=int))
def cmd_alerts_ack(args: argparse.Namespace) -> None:
    who = os.environ.get("USER") or "cli"
    result = via_daemon_or_store(args.data_dir, "alerts.ack", {"id": args.id, "by": who}, lambda db: alerts.ack_alert(
        db, args.id, who, time.time()))
    emit(args, result, lambda: print(f"alert {args.id} acknowledged by {result['acked_by']}"))


@COMMANDS.command("config show", "the effective settings (the same flags as `daemon`) and where each came from",
                  SETTINGS, JSON)
def cmd_config_show(args: argparse.Namespace) -> None:
    cfg, sources = daemon_settings(args)
    shown = {}
    for name in (f.name for f in fields(DaemonConfig)):
        value = getattr(cfg, name)
        if name == "cloud_token" and value:
            value = "(set, not shown)"
        shown[name] = {"value": str(value) if isinstance(value, Path) else value, "from": sources[name]}

    def human() -> None:
        width = max(len(n) for n in shown)
        for name, item in shown.items():
            value = "-" if item["value"] is None else item["value"]
            print(f"{name:<{width}}  {value!s:<40} {item['from']}")

    emit(args, shown, human)


def refusal_advice(device: str, model: str | None) -> str:
    """What to do about a device whose readings are refused."""
    fix = (f"add what it sends to model {model!r} and load it again (`edgetrio model add FILE`)" if model
           else "it sends values its announced resources do not allow")
    return f"{fix}; `edgetrio rejects --device {device}` shows each refusal"


@COMMANDS.command("status", "daemon state and counters", LOCAL)
def cmd_status(args: argparse.Namespace) -> None:
    db = open_store(args.data_dir)
    status: dict[str, Any] = {"data_dir": str(args.data_dir), "running": daemon_running(args.data_dir),
                              "devices": len(store.list_devices(db)), "readings": store.reading_count(db),
                              "counters": store.counters(db), "outbox": store.outbox_state(db)}
    hour_ago = time.time() - 3600
    status["refusing"] = {d["id"]: r for d in store.list_devices(db)
                          if (r := store.refusing(db, d["id"], hour_ago)) and r["readings_refused"]}
    status["model_lacks"] = {d["id"]: lacks for d in store.list_devices(db) if d["model"] and (lacks := missing_from_model(
        store.get_model(db, d["model"]), d["meta"] or {}))}
    if status["running"]:
        try:
            with ControlClient(args.data_dir) as control:
                status["daemon"] = control.request("status", {})
            status["mqtt"] = read_run_file(args.data_dir)
        except (ControlError, ConfigError) as exc:
            status["daemon_error"] = str(exc)
    # all time = what the store holds + what the running daemon counted since it last wrote its counters
    all_time = Counter(status["counters"])
    all_time.update(status.get("daemon", {}).get("counters_unflushed", {}))
    status["counters"] = dict(sorted(all_time.items()))

    def human() -> None:
        print(f"data dir:  {status['data_dir']}")
        print(f"daemon:    {'running' if status['running'] else 'stopped'}")
        if "mqtt" in status:
            print(f"mqtt:      {status['mqtt']['mqtt_host']}:{status['mqtt']['mqtt_port']}")
        if "daemon" in status:
            d = status["daemon"]
            print(f"uptime:    {d['uptime']} s   connected: {', '.join(d['devices_connected']) or '-'}")
            for c in d.get("components", []):
                extra = f"  last error: {c['last_error']}" if c["last_error"] else ""
                restarts = f", {c['restarts']} restarts" if c["restarts"] else ""
                print(f"  {c['name']:<22} {c['state']:<12} since {fmt_time(c['since'])}{restarts}{extra}")
            held = d["store"]
            print("store:     " + ("ok" if held["ok"] else f"cannot write ({held['error']}) since "
                                   f"{fmt_time(held['failing_since'])}; {held['readings_held']} readings held, "
                                   "none acknowledged until it can"))
            counters = d["counters"]
            totals = node_report(Counter(counters), 0, 0)
            print(f"this run:  {totals['readings']} readings; refused {totals['refused']} (logins, topics), rejected "
                  f"{totals['rejected']} (bad messages), dropped {totals['dropped']} (overload); `edgetrio rejects` "
                  "says what")
            print("           " + (", ".join(f"{k}={v}" for k, v in sorted(counters.items())) or "-"))
        cloud = status.get("daemon", {}).get("cloud")
        if cloud:
            state = "connected" if cloud["connected"] else f"disconnected ({cloud['last_error'] or 'connecting'})"
            print(f"cloud:     {cloud['url']} as {cloud['node']}: {state}, outbox {status['outbox']['rows']} rows, "
                  f"{cloud['dropped']} dropped")
        rules = status.get("daemon", {}).get("automation")
        if rules:
            print(f"rules:     {rules['rules']} rules, {rules['schedules']} schedules, {rules['firing']} firing"
                  + (f", {rules['readings_waiting']} readings waiting to be judged" if rules["readings_waiting"] else ""))
        for name, sink in status.get("daemon", {}).get("export", {}).items():
            why = f" ({sink['error']})" if sink.get("error") else ""
            print(f"export:    {name}: {sink['state']}{why}, {sink['sent']} readings sent by this run")
        print(f"devices:   {status['devices']}   readings stored: {status['readings']}")
        for device, lacks in status["model_lacks"].items():
            print(f"model:     {device} announces {', '.join(lacks)}, which its model lacks (`edgetrio device list`)")
        for device, refused in status["refusing"].items():
            print(f"refusing:  {device}: {refused['count']} refused in the last hour, the newest: {refused['detail']}")
        print("all time:  " + (", ".join(f"{k}={v}" for k, v in status["counters"].items()) or "-"))

    emit(args, status, human)


user_commands(COMMANDS, "", LOCAL[:1], lambda args: open_store(args.data_dir), gateway_write)
