"""`edgetrio cloud ...`: run the relay, add nodes, and steer the fleet through the relay's HTTP API."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trio

from edgetrio import rules, web
from edgetrio.cloud import database, rollouts, store
from edgetrio.cloud.relay import RUN_FILE, RelayConfig, operator_token, serve
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
    emit,
    fmt_time,
    parse_assignments,
    require_positive,
    setup_logging,
    time_option,
)
from edgetrio.identity import RegistryError, check_device_id
from edgetrio.writer import offline_write

COMMANDS = Commands()
COMMANDS.group("cloud", "the cloud relay and the fleet")
DATA = data_dir_option(Path("edgetrio-relay"), "the relay's data directory (default ./edgetrio-relay)")
DB = (arg("--database", metavar="URL", help="postgresql://USER:PASSWORD@HOST/NAME: the relay's state in PostgreSQL, "
          "shared by its replicas (default: $EDGETRIO_DATABASE, else `database` in DATA/relay.toml, else the SQLite "
          "file DATA/relay.db)"),)
API = (*DATA, arg("--url", help="relay API URL, e.g. http://relay:8765"), arg("--token", help="operator token"),
       arg("--cafile", help="CA file to trust for https"), *JSON)


def api_target(args: argparse.Namespace) -> tuple[str, str]:
    """The API base URL and operator token: from --url/--token, else from the relay's data dir."""
    if args.url and args.token:
        return http_url(args.url), args.token
    data_dir = args.data_dir
    try:
        info = json.loads((data_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        raise CliError(f"no running relay found in {data_dir}; give --url and --token, or --data-dir", EXIT_USAGE) from None
    return http_url(args.url or info["api_url"]), args.token or operator_token(data_dir)


def relay_port(data_dir: Path) -> str:
    """The port the relay in this data dir serves on, when it runs; else its default."""
    try:
        info = json.loads((data_dir / RUN_FILE).read_text())
        return str(info["api_url"]).rsplit(":", 1)[1].strip("/")
    except (OSError, ValueError, KeyError, IndexError):
        return "8765"


def http_url(url: str) -> str:
    """The API's address; the edges' ws:// (wss://) address of the same relay is taken too: one port serves both."""
    for edge, api in (("ws://", "http://"), ("wss://", "https://")):
        if url.startswith(edge):
            url = api + url[len(edge):]
    return url.rstrip("/").removesuffix("/edge")


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
    """One request to the relay's API as the operator; an error answer becomes a CliError with its message."""
    base, token = api_target(args)
    data = json.dumps(body).encode() if body is not None else None
    context = ssl.create_default_context(cafile=args.cafile) if base.startswith("https") else None
    try:
        request = urllib.request.Request(base + path, data=data, method=method, headers={
            "authorization": f"Bearer {token}", "content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise CliError(f"{message} (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach the relay at {base}: {getattr(exc, 'reason', exc)}") from None
    except ValueError as exc:  # not a URL at all
        raise CliError(f"--url {base!r}: {exc}; give http://HOST:PORT (or https://)", EXIT_USAGE) from None


def open_store(args: argparse.Namespace) -> Any:
    """The relay's database for this data dir (--database, $EDGETRIO_DATABASE, relay.toml or the SQLite file)."""
    try:
        return store.open_db(args.data_dir, database.database_url(args.data_dir, getattr(args, "database", None)))
    except (RegistryError, database.DatabaseError) as exc:
        raise CliError(str(exc)) from None


def relay_write(args: argparse.Namespace, op: str, op_args: dict[str, Any], offline: Any) -> Any:
    """What the relay's own machine writes into its store (accounts, nodes): straight into the database, beside the
    running relay (SQLite's locking allows it; PostgreSQL is made for it)."""
    db = open_store(args)
    try:
        with offline_write(db):
            return offline(db)
    except RegistryError as exc:
        raise CliError(str(exc)) from None


@COMMANDS.command(
    "cloud serve", "run the relay in the foreground", DATA, *DB,
    arg("--host", help="address to serve on (default 0.0.0.0)"),
    arg("--port", type=int, default=8765, help="port for edges (WebSocket /edge) and the API (default 8765)"),
    arg("--cert", help="TLS certificate (PEM), with --key"), arg("--key", help="its private key"),
    arg("--log-level", default="info", help="debug, info, warning or error"),
    arg("--retention-days", type=float, default=90.0, metavar="D",
        help="delete readings and finished commands older than D days, hourly (default 90; 0 keeps all)"),
    arg("--metrics-host", default="127.0.0.1", help="address of /metrics and /healthz (default 127.0.0.1)"),
    arg("--metrics-port", type=int, default=9884, help="their port (default 9884; 0 picks a free one, -1 turns them off)"),
    arg("--max-devices-per-node", type=int, default=10_000, metavar="N",
        help="devices the relay keeps for one node; what an edge sends for more is refused and counted (default 10000)"),
    arg("--edge-keepalive", type=float, default=20.0, metavar="S",
        help="ping each linked edge every S seconds; one that does not answer within S is disconnected (default 20)"),
    arg("--http-timeout", type=float, default=15.0, metavar="S",
        help="close a connection whose request headers or body take longer, or that idles longer between requests "
             "(default 15)"))
def cmd_serve(args: argparse.Namespace) -> None:
    setup_logging(args.log_level)
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
    cfg = RelayConfig(args.data_dir, args.host or "0.0.0.0", args.port, args.cert, args.key, args.retention_days,
                      args.http_timeout, args.metrics_host, args.metrics_port, args.max_devices_per_node,
                      args.edge_keepalive)
    try:
        cfg.database = database.database_url(args.data_dir, args.database)
    except database.DatabaseError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.database and cfg.database:  # the other commands of this data dir must use the same database, once it answers
        if "@" in cfg.database and ":" in cfg.database.split("://", 1)[1].split("@", 1)[0]:
            logging.getLogger("edgetrio.relay").warning(
                "--database holds a password, which `ps` shows: use $EDGETRIO_DATABASE, DATA/relay.toml or ~/.pgpass")
        try:
            db = database.open_database(args.data_dir, cfg.database)
            database.migrate(db)  # refused here (a newer database) before the data dir notes it
            db.close()
        except database.DatabaseError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        remember_database(args.data_dir, cfg.database)
    for problem in (
        not 1 <= cfg.edge_keepalive <= 3600 and "--edge-keepalive must be from 1 to 3600 seconds",
        not -1 <= cfg.metrics_port <= 65535 and "--metrics-port: use a port, 0 for a free one, or -1 to turn metrics off",
        (cfg.cert is None) != (cfg.key is None) and "--cert and --key go together",
        cfg.retention_days < 0 and "--retention-days must be 0 (keep everything) or more",
        not 0.5 <= cfg.http_timeout <= 3600 and "--http-timeout must be from 0.5 to 3600 seconds",
    ):
        if problem:
            raise CliError(problem, EXIT_USAGE)
    if cfg.cert is None and cfg.host not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger("edgetrio.relay").warning(
            "serving on %s without --cert/--key: passwords, session cookies and node tokens travel unencrypted; "
            "use TLS (or a TLS proxy in front) on any network but this machine's", cfg.host)
    try:
        trio.run(serve, cfg)
    except OSError as exc:
        raise CliError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}", EXIT_USAGE) from None
    except RegistryError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except database.DatabaseError as exc:  # the database does not answer at start: said, not a traceback
        raise CliError(str(exc), EXIT_USAGE) from None


def remember_database(data_dir: Path, url: str) -> None:
    """Write `database` into DATA/relay.toml (0600: the URL may hold a password) unless it says it already."""
    path = data_dir / database.CONFIG_FILE
    if database.database_url(data_dir) == url and not os.environ.get(database.ENV):
        return
    if path.exists():
        logging.getLogger("edgetrio.relay").warning("--database differs from %s; that file is left as it is", path)
        return
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# the relay's database: `edgetrio cloud ...` commands with this data dir use it too\n"
                f"database = {json.dumps(url)}\n")
    logging.getLogger("edgetrio.relay").info("the database is noted in %s for the other commands", path)


@COMMANDS.command("cloud migrate", "bring the relay's database to this version's schema (serve does it at start too)",
                  DATA, *DB, JSON, arg("--status", action="store_true", help="only say which version it is at"))
def cmd_migrate(args: argparse.Namespace) -> None:
    try:
        url = database.database_url(args.data_dir, args.database)
        where = database.redact(url) if url else str(args.data_dir / database.DB_FILE)
        if args.status and not url and not (args.data_dir / database.DB_FILE).exists():
            raise CliError(f"no relay database in {args.data_dir} (give --database, or the data dir of a relay)")
        db = database.open_database(args.data_dir, url)
        before = database.schema_version(db)
        applied = [] if args.status else database.migrate(db)
    except (RegistryError, database.DatabaseError) as exc:
        raise CliError(str(exc)) from None
    if url and args.database and not args.status:  # this data dir's other commands use it from now on
        remember_database(args.data_dir, url)
    result = {"database": where, "version": before if args.status else database.LATEST, "latest": database.LATEST,
              "applied": applied}
    emit(args, result, lambda: print(
        f"{where}: schema version {result['version']} of {database.LATEST}"
        + (f" (applied {', '.join(map(str, applied))})" if applied else " (nothing to do)" if not args.status else "")))
    if before > database.LATEST:
        raise CliError(f"the database is at schema version {before}, newer than this relay's {database.LATEST}: "
                       "upgrade edgetrio on this machine")


COMMANDS.group("cloud node", "nodes")


@COMMANDS.command("cloud node add", "add a node and print its token once", DATA, *DB, JSON, arg("name"))
def cmd_node_add(args: argparse.Namespace) -> None:
    try:
        check_device_id(args.name, "node name")
    except RegistryError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    token = relay_write(args, "node.add", {"name": args.name}, lambda db: store.add_node(db, args.name))
    # replicas on PostgreSQL: the gateway dials the balancer in front of them, not this replica
    relay = "BALANCER:PORT" if database.database_url(args.data_dir, args.database) else f"RELAY:{relay_port(args.data_dir)}"
    emit(args, {"node": args.name, "token": token}, lambda: print(
        f"node {args.name} added\n  token: {token}\n"
        f"Start its gateway with the token in a file only its user reads (a --token shows in `ps`):\n"
        f"  edgetrio daemon --cloud ws://{relay} --node-id {args.name} "
        "--token-file /etc/edgetrio/cloud-token\n"
        "Keep the token now: it is stored only hashed and cannot be shown again."))


@COMMANDS.command("cloud node remove", "forget a node (token, devices, readings); ends its link", API, arg("name"))
def cmd_node_remove(args: argparse.Namespace) -> None:
    call(args, "DELETE", f"/api/nodes/{args.name}")
    emit(args, {"node": args.name, "removed": True}, lambda: print(
        f"removed {args.name}: its token, devices, queue and readings are gone; its link is closed"))


@COMMANDS.command("cloud node rotate", "give a node a new token: the old one is refused and its link closed at once",
                  API, arg("name"))
def cmd_node_rotate(args: argparse.Namespace) -> None:
    token = call(args, "POST", f"/api/nodes/{args.name}/token")["token"]
    emit(args, {"node": args.name, "token": token}, lambda: print(
        f"node {args.name} has a new token (the old one is refused, its link closed)\n  token: {token}\n"
        "Give it to the gateway (--token-file or $EDGETRIO_CLOUD_TOKEN) and restart it."))


@COMMANDS.command("cloud nodes", "nodes with online state", API)
def cmd_nodes(args: argparse.Namespace) -> None:
    nodes = call(args, "GET", "/api/nodes")
    replicas = any(n.get("replica") and n["online"] for n in nodes) and len({n.get("replica") for n in nodes
                                                                             if n["online"]}) > 1
    emit(args, nodes, lambda: print("\n".join(
        [f"{'NODE':<20} {'STATE':<8} {'DEVICES':>7} {'QUEUED':>6}  LAST SEEN" + ("            REPLICA" if replicas else "")]
        + [f"{n['name']:<20} {'online' if n['online'] else 'offline':<8} {n['devices']:>7} {n['queued']:>6}  "
           f"{fmt_time(n['last_seen'])}" + (f"  {n.get('replica') or '-'}" if replicas and n["online"] else "")
           for n in nodes])))


@COMMANDS.command("cloud devices", "devices of all nodes or one", API, arg("node", nargs="?"))
def cmd_devices(args: argparse.Namespace) -> None:
    devices = call(args, "GET", (f"/api/nodes/{args.node}/devices" if args.node else "/api/devices") + "?limit=5000")
    emit(args, devices, lambda: print("\n".join([f"{'NODE':<16} {'DEVICE':<20} {'STATE':<8} {'FIRMWARE':<16} LAST SEEN"] + [
        f"{d['node']:<16} {d['id']:<20} {'online' if d['online'] else 'asleep' if asleep(d) else 'offline':<8} "
        f"{firmware_of(d['meta'] or {}):<16} {fmt_time(d['last_seen'])}" for d in devices])))


COMMANDS.group("cloud device", "register a device from the cloud")


@COMMANDS.command("cloud device add", "register a device on a node; its credential is printed once", API,
                  arg("node"), arg("device"), arg("--model", help="device model name on the node"))
def cmd_device_add(args: argparse.Namespace) -> None:
    added = call(args, "POST", f"/api/nodes/{args.node}/devices", {"id": args.device, "model": args.model})
    where = ("the gateway has it" if added.get("state") == "registered" else
             "queued: it reaches the gateway when the node connects")
    emit(args, added, lambda: print(f"registered {added['id']} on {args.node} ({where})\n"
                                    f"  username: {added['username']}\n  password: {added['password']}\n"
                                    "Keep the password now: it is stored only hashed."))


COMMANDS.group("cloud twin", "twin of a device")
ASSIGNMENTS = arg("assignments", nargs="*", metavar="key=value")


@COMMANDS.command("cloud twin get", "a device's desired and reported state", API, arg("node"), arg("device"))
def cmd_twin_get(args: argparse.Namespace) -> None:
    twin = call(args, "GET", f"/api/nodes/{args.node}/devices/{args.device}/twin")
    emit(args, twin, lambda: print_twin(twin))


@COMMANDS.command("cloud twin set", "change a device's desired state: key=value ... (null removes)", API, arg("node"),
                  arg("device"), ASSIGNMENTS,
                  arg("--version", type=int, help="the desired version this change is based on (refused if stale)"))
def cmd_twin_set(args: argparse.Namespace) -> None:
    twin = call(args, "PATCH", f"/api/nodes/{args.node}/devices/{args.device}/twin",
                {"desired": desired_patch(args), "version": args.version})
    emit(args, twin, lambda: print_twin(twin))


@COMMANDS.command("cloud twin set-all", "one desired change for the whole fleet", API, ASSIGNMENTS,
                  arg("--node", help="only this node's devices"),
                  arg("--device", dest="device_name", help="only devices with this id"))
def cmd_twin_set_all(args: argparse.Namespace) -> None:
    done = call(args, "PATCH", "/api/fleet/twin", {"desired": desired_patch(args), "node": args.node,
                                                   "device": args.device_name})
    skipped = done.get("skipped") or {}
    emit(args, done, lambda: print(f"queued for {done['devices']} devices on {done['nodes']} nodes" + "".join(
        f"\n  skipped {device}: {why}" for device, why in sorted(skipped.items())[:20])
        + (f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else "")))


@COMMANDS.command("cloud cmd", "run a command on a device", API, arg("node"), arg("device"), arg("name"), ASSIGNMENTS,
                  arg("--timeout", type=float, default=10.0, help="seconds to wait for the result (default 10)"))
def cmd_cmd(args: argparse.Namespace) -> None:
    require_positive(timeout=args.timeout)
    result = call(args, "POST", f"/api/nodes/{args.node}/devices/{args.device}/commands",
                  {"name": args.name, "args": parse_assignments(args.assignments), "timeout": args.timeout},
                  timeout=args.timeout + 30)
    emit(args, result, lambda: print(json.dumps(result.get("value")) if result.get("ok")
                                     else f"error: {result.get('error')}"))
    if not result.get("ok"):
        raise SystemExit(EXIT_FAILED)


@COMMANDS.command("cloud readings", "a device's readings as the relay has them", API, arg("node"), arg("device"),
                  readings_options(f"only the newest N (at most and by default {web.READINGS_LIMIT})"))
def cmd_readings(args: argparse.Namespace) -> None:
    require_positive(limit=args.limit)
    query = [f"{name}={value}" for name, value in (("since", time_option(args.since)), ("until", time_option(args.until)),
                                                    ("limit", args.limit)) if value]
    rows = call(args, "GET", f"/api/nodes/{args.node}/devices/{args.device}/readings"
                + ("?" + "&".join(query) if query else ""))
    print_readings(args, rows, {})


COMMANDS.group("cloud rules", "the rules and schedules each node runs (sent down, versioned)")


@COMMANDS.command("cloud rules apply", "replace a node's rule set (or every node's, --all) with a rule file's", API,
                  arg("targets", nargs="+", metavar="NODE FILE | FILE"),
                  arg("--all", action="store_true", help="every node (then give only the FILE)"))
def cmd_rules_apply(args: argparse.Namespace) -> None:
    if len(args.targets) != (1 if args.all else 2):
        raise CliError("give NODE FILE, or --all FILE for every node", EXIT_USAGE)
    node, path = (None, Path(args.targets[0])) if args.all else (args.targets[0], Path(args.targets[1]))
    try:
        doc = rules.read_rule_file(path)
        rules.check_notify_urls(rules.parse_document(doc)[0])
    except rules.RuleError as exc:  # each message names the file once
        raise CliError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}", EXIT_USAGE) from None
    if node is None:
        done = call(args, "PUT", "/api/fleet/rules", {"doc": doc})
    else:
        done = [call(args, "PUT", f"/api/nodes/{node}/rules", {"doc": doc})]
    emit(args, done, lambda: print("\n".join(
        f"{d['node']}: rule set version {d['version']} queued ({d['rules']} rules, {d['schedules']} schedules); it "
        "takes effect when the node has it" for d in done)))


@COMMANDS.command("cloud rules show", "a node's rule set and whether it has applied it", API, arg("node"))
def cmd_rules_show(args: argparse.Namespace) -> None:
    found = call(args, "GET", f"/api/nodes/{args.node}/rules")
    doc = found["doc"]
    problems = (found["result"] or {}).get("problems") or {}
    state = ("applied" + (" in part" if problems else "") if found["applied"] == found["version"] else
             f"not applied: {found['result']['error']}" if found["result"] and not found["result"].get("ok") else
             "waiting for the node")
    emit(args, found, lambda: print("\n".join(
        [f"{args.node}: rule set version {found['version']} ({state}): {len(doc['rule'])} rules, "
         f"{len(doc['schedule'])} schedules"]
        + [f"  rule {r['name']}: {r.get('when')}" + (f"\n    ! {problems[r['name']]}" if r["name"] in problems else "")
           for r in doc["rule"]]
        + [f"  schedule {s['name']}: {s.get('cron') or 'every ' + str(s.get('every'))}" for s in doc["schedule"]])))


@COMMANDS.command("cloud alerts", "alerts of the fleet (open ones; --all: resolved too); ack", API,
                  arg("--all", action="store_true", help="resolved and acknowledged alerts too"),
                  arg("--node", help="only this node's"))
def cmd_alerts(args: argparse.Namespace) -> None:
    query = "&".join(part for part in ("all=1" if args.all else "", f"node={args.node}" if args.node else "") if part)
    found = call(args, "GET", "/api/alerts" + (f"?{query}" if query else ""))
    emit(args, found, lambda: print("\n".join(
        [f"{'NODE':<14} {'ID':>5} {'STATE':<9} {'SEVERITY':<9} {'RULE':<20} {'DEVICE':<16} SINCE"] + [
            f"{a['node']:<14} {a['id']:>5} {a['state']:<9} {a['severity']:<9} {a['rule']:<20} {a['device']:<16} "
            f"{fmt_time(a['fired'] or a['started'])}  "
            + ", ".join(f"{k}={json.dumps(v)}" for k, v in a["values"].items())
            + (f"  acked by {a['acked_by']}" if a["acked"] else "") for a in found]
        if found else ["no alerts" if args.all else "no open alerts (--all shows resolved ones too)"])))


@COMMANDS.command("cloud alerts ack", "acknowledge an alert (NODE ID, as listed)", API,
                  arg("node_name", metavar="NODE"), arg("id", type=int))
def cmd_alerts_ack(args: argparse.Namespace) -> None:
    done = call(args, "POST", f"/api/nodes/{args.node_name}/alerts/{args.id}/ack")
    emit(args, done, lambda: print(f"alert {args.id} of {args.node_name} acknowledged by {done['acked_by']} "
                                   "(the node is told)"))


@COMMANDS.command("cloud logs", "a device's newest log lines as its gateway sent them up", API, arg("node"),
                  arg("device"))
def cmd_logs(args: argparse.Namespace) -> None:
    rows = call(args, "GET", f"/api/nodes/{args.node}/devices/{args.device}/logs")
    emit(args, rows, lambda: print("\n".join(log_line(r) for r in rows) if rows else "no log lines"))


COMMANDS.group("cloud rollout", "firmware rolled out across the fleet in waves, halting by itself when boards fail")


def percent(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / 100
    except ValueError:
        raise CliError(f"{text!r}: a percentage, e.g. 90%", EXIT_USAGE) from None
    if not 0 < value <= 1:
        raise CliError(f"{text!r}: above 0% and at most 100%", EXIT_USAGE)
    return value


def print_rollout(r: dict[str, Any], boards: bool = True) -> None:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(r["counts"].items()))
    print(f"rollout {r['id']}: {r['state']}{': ' + r['reason'].removeprefix(r['state'] + ': ') if r['reason'] else ''}\n"
          f"  bundle {r['bundle'][:12]} to {rollouts.plural(r['total'], 'board')} ("
          + " ".join(f"{k}={v}" for k, v in r["selector"].items()) + f"), waves {','.join(r['waves'])}, now wave "
          f"{r['wave'] + 1} of {len(r['waves'])}\n"
          f"  {r['confirmed']} confirmed, {r['failed']} failed (halts past {r['max_failures']}); {counts}")
    for b in r.get("boards", []) if boards else []:
        print(f"  wave {b['wave'] + 1:<3} {b['node'] + '/' + b['device']:<32} {b['state']:<12} {b['detail'] or ''}")


@COMMANDS.command("cloud rollout create", "roll a firmware bundle out to the boards --select names, in waves", API,
                  arg("--bundle", type=Path, required=True, metavar="DIR",
                      help="the firmware bundle: what `edgetrio bundle DIR` writes (DIR/lib/*.mpy)"),
                  arg("--select", action="append", required=True, metavar="KEY=VALUE",
                      help="node=NAME, device=ID or model=NAME (repeat: all must hold)"),
                  arg("--waves", default="1,10%,100%",
                      help="each wave's size, boards or a share of all (default 1,10%%,100%%)"),
                  arg("--success", default="100%", help="share of a wave that must confirm before the next one "
                                                         "starts (default 100%%)"),
                  arg("--max-failures", type=int, default=0,
                      help="the rollout halts when more boards than this failed (default 0: at the first)"),
                  arg("--timeout", type=float, default=1800.0,
                      help="seconds a board may take from its gateway starting the update to confirming (default "
                           "1800)"),
                  arg("--confirm-timeout", type=int, default=300,
                      help="seconds a board runs the new bundle without an acknowledged reading before it goes back "
                           "(default 300)"))
def cmd_rollout_create(args: argparse.Namespace) -> None:
    from edgetrio.bundles import BundleError, read_bundle

    selector: dict[str, str] = {}
    for item in args.select:
        key, sep, value = item.partition("=")
        if not sep or key not in ("node", "device", "model") or not value or key in selector:
            raise CliError(f"--select {item!r}: node=NAME, device=ID or model=NAME, each at most once", EXIT_USAGE)
        selector[key] = value
    try:
        rollouts.parse_waves(args.waves)
    except rollouts.RolloutError as exc:
        raise CliError(f"--waves {args.waves[:60]!r}: {exc}", EXIT_USAGE) from None
    for flag, value, low, high in (("--max-failures", args.max_failures, 0, 1_000_000),
                                   ("--timeout", args.timeout, 60, 7 * 86400),
                                   ("--confirm-timeout", args.confirm_timeout, 30, 86400)):
        if not low <= value <= high:
            raise CliError(f"{flag} {value:g}: {low} to {high}" + (" seconds" if "timeout" in flag else ""), EXIT_USAGE)
    try:
        contents = read_bundle(args.bundle)
    except (BundleError, OSError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    created = call(args, "POST", "/api/rollouts", {
        "files": {name: base64.b64encode(data).decode() for name, data in contents.items()}, "select": selector,
        "waves": args.waves, "success": percent(args.success), "max_failures": args.max_failures,
        "timeout": args.timeout, "confirm_s": args.confirm_timeout})
    if args.json:
        print(json.dumps(created, indent=2))
        return
    print_rollout(created, boards=False)
    print(f"follow it: edgetrio cloud rollout status {created['id']}")


@COMMANDS.command("cloud rollout list", "the newest rollouts", API)
def cmd_rollout_list(args: argparse.Namespace) -> None:
    found = call(args, "GET", "/api/rollouts")
    emit(args, found, lambda: print("\n".join(
        f"{r['id']}  {r['state']:<8} {fmt_time(r['created'])}  bundle {r['bundle'][:12]}  {r['confirmed']}/"
        f"{r['total']} confirmed, {r['failed']} failed" for r in found) if found else "no rollouts"))


@COMMANDS.command("cloud rollout status", "a rollout and each of its boards", API, arg("id"))
def cmd_rollout_status(args: argparse.Namespace) -> None:
    found = call(args, "GET", f"/api/rollouts/{args.id}")
    emit(args, found, lambda: print_rollout(found))


def rollout_action(action: str, what: str, *extra: Any) -> None:
    @COMMANDS.command(f"cloud rollout {action}", what, API, arg("id"), *extra)
    def cmd(args: argparse.Namespace) -> None:
        done = call(args, "POST", f"/api/rollouts/{args.id}/{action}",
                    {"rollback": True} if getattr(args, "rollback", False) else None)
        emit(args, done, lambda: print_rollout(done, boards=False))


rollout_action("pause", "no new wave starts (boards updating now go on)")
rollout_action("resume", "a paused or halted rollout goes on")
rollout_action("abort", "stop a rollout: boards not updated yet are left alone, those in progress cancelled",
               arg("--rollback", action="store_true",
                   help="and send the boards that took the bundle back to the firmware they ran before"))


user_commands(COMMANDS, "cloud ", (*DATA, *DB), open_store, relay_write)
