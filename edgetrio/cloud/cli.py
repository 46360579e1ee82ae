"""`edgetrio cloud ...`: run the relay, add nodes, and steer the fleet through the relay's HTTP API."""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trio

from edgetrio import accounts, rules, web
from edgetrio.cloud import store
from edgetrio.cloud.relay import RUN_FILE, RelayConfig, operator_token, serve
from edgetrio.console import EXIT_USAGE, CliError, fmt_time, parse_assignments, parse_since, setup_logging
from edgetrio.identity import RegistryError, hash_password, new_secret
from edgetrio.writer import offline_write


def api_target(args: argparse.Namespace) -> tuple[str, str]:
    """The API base URL and operator token: from --url/--token, else from the relay's data dir."""
    if args.url and args.token:
        return http_url(args.url), args.token
    data_dir = args.data_dir or Path("edgetrio-relay").absolute()
    try:
        info = json.loads((data_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        raise CliError(f"no running relay found in {data_dir}; give --url and --token, or --data-dir", EXIT_USAGE) from None
    return http_url(args.url or info["api_url"]), args.token or operator_token(data_dir)


def relay_port(data_dir: Path | None) -> str:
    """The port the relay in this data dir serves on, when it runs; else its default."""
    try:
        info = json.loads(((data_dir or Path("edgetrio-relay").absolute()) / RUN_FILE).read_text())
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
    base, token = api_target(args)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers={
        "authorization": f"Bearer {token}", "content-type": "application/json"})
    context = ssl.create_default_context(cafile=args.cafile) if base.startswith("https") else None
    try:
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


def show(args: argparse.Namespace, value: Any, lines: list[str]) -> None:
    print(json.dumps(value, indent=2) if args.json else "\n".join(lines))


def run(args: argparse.Namespace) -> None:
    action = args.cloud_action
    if action == "serve":
        setup_logging(args.log_level or "info")
        logging.getLogger("trio-websocket").setLevel(logging.WARNING)
        cfg = RelayConfig(args.data_dir or Path("edgetrio-relay").absolute(), args.host or "0.0.0.0",
                          8765 if args.port is None else args.port, args.cert, args.key, args.retention_days,
                          args.http_timeout, args.metrics_host, args.metrics_port, args.max_devices_per_node,
                          args.edge_keepalive)
        if not 1 <= cfg.edge_keepalive <= 3600:
            raise CliError("--edge-keepalive must be from 1 to 3600 seconds", EXIT_USAGE)
        if not -1 <= cfg.metrics_port <= 65535:
            raise CliError("--metrics-port: use a port, 0 for a free one, or -1 to turn metrics off", EXIT_USAGE)
        if (cfg.cert is None) != (cfg.key is None):
            raise CliError("--cert and --key go together", EXIT_USAGE)
        if cfg.retention_days < 0:
            raise CliError("--retention-days must be 0 (keep everything) or more", EXIT_USAGE)
        if not 0.5 <= cfg.http_timeout <= 3600:
            raise CliError("--http-timeout must be from 0.5 to 3600 seconds", EXIT_USAGE)
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
        return
    if action == "user":
        users(args)
        return
    if action == "node" and args.node_action in ("remove", "rotate"):
        if args.node_action == "remove":
            call(args, "DELETE", f"/api/nodes/{args.name}")
            show(args, {"node": args.name, "removed": True},
                 [f"removed {args.name}: its token, devices, queue and readings are gone; its link is closed"])
        else:
            token = call(args, "POST", f"/api/nodes/{args.name}/token")["token"]
            show(args, {"node": args.name, "token": token}, [
                f"node {args.name} has a new token (the old one is refused, its link closed)\n  token: {token}",
                "Give it to the gateway (--token-file or $EDGETRIO_CLOUD_TOKEN) and restart it."])
        return
    if action == "node":
        db = store.open_db(args.data_dir or Path("edgetrio-relay").absolute())
        try:
            with offline_write(db):
                token = store.add_node(db, args.name)
        except RegistryError as exc:
            raise CliError(str(exc)) from None
        show(args, {"node": args.name, "token": token}, [
            f"node {args.name} added\n  token: {token}",
            f"Start its gateway with the token in a file only its user reads (a --token shows in `ps`):\n"
            f"  edgetrio daemon --cloud ws://RELAY:{relay_port(args.data_dir)} --node-id {args.name} "
            "--token-file /etc/edgetrio/cloud-token",
            "Keep the token now: it is stored only hashed and cannot be shown again."])
        return
    if action == "rules":
        fleet_rules(args)
        return
    if action == "alerts" and getattr(args, "alerts_action", None) == "ack":
        done = call(args, "POST", f"/api/nodes/{args.node_name}/alerts/{args.id}/ack")
        show(args, done, [f"alert {args.id} of {args.node_name} acknowledged by {done['acked_by']} (the node is told)"])
        return
    if action == "alerts":
        filters = "?all=1" if args.all else ""
        if args.node:
            filters += ("&" if filters else "?") + f"node={args.node}"
        found = call(args, "GET", "/api/alerts" + filters)
        show(args, found, [f"{'NODE':<14} {'ID':>5} {'STATE':<9} {'SEVERITY':<9} {'RULE':<20} {'DEVICE':<16} SINCE"] + [
            f"{a['node']:<14} {a['id']:>5} {a['state']:<9} {a['severity']:<9} {a['rule']:<20} {a['device']:<16} "
            f"{fmt_time(a['fired'] or a['started'])}  "
            + ", ".join(f"{k}={json.dumps(v)}" for k, v in a["values"].items())
            + (f"  acked by {a['acked_by']}" if a["acked"] else "") for a in found]
            if found else ["no open alerts" + ("" if args.all else " (--all shows resolved ones too)")])
        return
    if action == "nodes":
        nodes = call(args, "GET", "/api/nodes")
        show(args, nodes, [f"{'NODE':<20} {'STATE':<8} {'DEVICES':>7} {'QUEUED':>6}  LAST SEEN"] + [
            f"{n['name']:<20} {'online' if n['online'] else 'offline':<8} {n['devices']:>7} {n['queued']:>6}  "
            f"{fmt_time(n['last_seen'])}" for n in nodes])
    elif action == "devices":
        devices = call(args, "GET", (f"/api/nodes/{args.node}/devices" if args.node else "/api/devices") + "?limit=5000")
        show(args, devices, [f"{'NODE':<16} {'DEVICE':<20} {'STATE':<8} LAST SEEN"] + [
            f"{d['node']:<16} {d['id']:<20} {'online' if d['online'] else 'offline':<8} {fmt_time(d['last_seen'])}"
            for d in devices])
    elif action == "twin":
        if args.twin_action == "get":
            twin = call(args, "GET", f"/api/nodes/{args.node}/devices/{args.device}/twin")
        elif args.twin_action == "set-all":
            patch = parse_assignments(args.assignments)
            if not patch:
                raise CliError("give at least one key=value", EXIT_USAGE)
            done = call(args, "PATCH", "/api/fleet/twin", {"desired": patch, "node": args.node,
                                                           "device": args.device_name})
            show(args, done, [f"queued for {done['devices']} devices on {done['nodes']} nodes"])
            return
        else:
            patch = parse_assignments(args.assignments)
            if not patch:
                raise CliError("give at least one key=value", EXIT_USAGE)
            twin = call(args, "PATCH", f"/api/nodes/{args.node}/devices/{args.device}/twin",
                        {"desired": patch, "version": args.version})
        show(args, twin, [
            f"desired  (version {twin['desired']['version']}): {json.dumps(twin['desired']['state'])}",
            f"reported (version {twin['reported']['version']}): {json.dumps(twin['reported']['state'])}",
            f"delta: {json.dumps(twin['delta'])}"])
    elif action == "cmd":
        result = call(args, "POST", f"/api/nodes/{args.node}/devices/{args.device}/commands",
                      {"name": args.name, "args": parse_assignments(args.assignments), "timeout": args.timeout},
                      timeout=args.timeout + 30)
        show(args, result, [json.dumps(result.get("value")) if result.get("ok") else f"error: {result.get('error')}"])
        if not result.get("ok"):
            raise SystemExit(1)
    elif action == "readings":
        query = []
        if args.since:
            query.append(f"since={store_since(args.since)}")
        if args.until:
            query.append(f"until={store_since(args.until)}")
        if args.limit:
            query.append(f"limit={args.limit}")
        rows = call(args, "GET", f"/api/nodes/{args.node}/devices/{args.device}/readings"
                    + ("?" + "&".join(query) if query else ""))
        if args.format == "csv":
            sys.stdout.write(web.readings_csv_text(rows))
            return
        if args.format == "jsonl":
            sys.stdout.writelines(json.dumps(r) + "\n" for r in rows)
            return
        show(args, rows, [f"{fmt_time(r['ts'])}  boot {r['boot']:<4} seq {r['seq']:<8} "
                          + " ".join(f"{k}={v}" for k, v in sorted(r["values"].items())) for r in rows] or ["no readings"])
    elif action == "device":
        added = call(args, "POST", f"/api/nodes/{args.node}/devices", {"id": args.device, "model": args.model})
        show(args, added, [f"registered {added['id']} on {args.node}\n  username: {added['username']}\n"
                           f"  password: {added['password']}\nIt reaches the gateway when the node is connected."])


def users(args: argparse.Namespace) -> None:
    """Operator accounts, written into the relay's store (on the relay's machine, like `node add`)."""
    db = store.open_db(args.data_dir or Path("edgetrio-relay").absolute())
    try:
        if args.user_action == "add":
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else new_secret()
            if len(password) < 8:
                raise CliError("a password needs at least 8 characters", EXIT_USAGE)
            hashed = hash_password(password)
            with offline_write(db):
                accounts.add_user(db, args.name, args.role, hashed)
            shown = {"name": args.name, "role": args.role}
            if not args.password_stdin:
                shown["password"] = password
            show(args, shown, [f"user {args.name} added ({args.role})"]
                 + ([f"  password: {password}", "Keep it now: it is stored only hashed."] if not args.password_stdin
                    else []))
        elif args.user_action == "list":
            rows = accounts.list_users(db)
            show(args, rows, [f"{'USER':<20} {'ROLE':<7} {'TOKENS':>6}  CREATED"] + [
                f"{u['name']:<20} {u['role']:<7} {u['tokens']:>6}  {fmt_time(u['created'])}" for u in rows])
        elif args.user_action == "remove":
            with offline_write(db):
                accounts.remove_user(db, args.name)
            show(args, {"name": args.name, "removed": True}, [f"removed {args.name}: its sessions and tokens end now"])
        elif args.user_action == "token":
            with offline_write(db):
                token_id, token = accounts.add_token(db, args.name)
            show(args, {"name": args.name, "id": token_id, "token": token}, [
                f"API token {token_id} for {args.name}\n  token: {token}",
                "Scripts send it as `authorization: Bearer TOKEN`; `edgetrio cloud user revoke ID` ends it."])
        elif args.user_action == "revoke":
            with offline_write(db):
                accounts.revoke_token(db, args.token_id)
            show(args, {"id": args.token_id, "revoked": True}, [f"token {args.token_id} revoked"])
    except RegistryError as exc:
        raise CliError(str(exc)) from None


def fleet_rules(args: argparse.Namespace) -> None:
    """`cloud rules apply NODE FILE` / `--all FILE`, `cloud rules show NODE`."""
    if args.rules_action == "show":
        found = call(args, "GET", f"/api/nodes/{args.node}/rules")
        doc = found["doc"]
        problems = (found["result"] or {}).get("problems") or {}
        state = ("applied" + (" in part" if problems else "") if found["applied"] == found["version"] else
                 f"not applied: {found['result']['error']}" if found["result"] and not found["result"].get("ok") else
                 "waiting for the node")
        show(args, found, [f"{args.node}: rule set version {found['version']} ({state}): "
                           f"{len(doc['rule'])} rules, {len(doc['schedule'])} schedules"]
             + [f"  rule {r['name']}: {r.get('when')}" + (f"\n    ! {problems[r['name']]}" if r["name"] in problems else "")
                for r in doc["rule"]]
             + [f"  schedule {s['name']}: {s.get('cron') or 'every ' + str(s.get('every'))}" for s in doc["schedule"]])
        return
    if len(args.targets) != (1 if args.all else 2):
        raise CliError("give NODE FILE, or --all FILE for every node", EXIT_USAGE)
    node, path = (None, Path(args.targets[0])) if args.all else (args.targets[0], Path(args.targets[1]))
    try:
        doc = rules.read_rule_file(path)
        rules.check_notify_urls(rules.parse_document(doc)[0])
    except rules.RuleError as exc:
        raise CliError(f"{path}: {exc}", EXIT_USAGE) from None
    if node is None:
        done = call(args, "PUT", "/api/fleet/rules", {"doc": doc})
    else:
        done = [call(args, "PUT", f"/api/nodes/{node}/rules", {"doc": doc})]
    show(args, done, [f"{d['node']}: rule set version {d['version']} queued ({d['rules']} rules, {d['schedules']} "
                      "schedules); it takes effect when the node has it" for d in done])


def store_since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def add_parser(sub: Any) -> None:
    cloud = sub.add_parser("cloud", help="the cloud relay and the fleet")
    actions = cloud.add_subparsers(dest="cloud_action", required=True)
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data-dir", type=Path, help="the relay's data directory (default ./edgetrio-relay)")
    api = argparse.ArgumentParser(add_help=False, parents=[data])
    api.add_argument("--url", help="relay API URL, e.g. http://relay:8765")
    api.add_argument("--token", help="operator token")
    api.add_argument("--cafile", help="CA file to trust for https")
    api.add_argument("--json", action="store_true")

    p = actions.add_parser("serve", parents=[data], help="run the relay in the foreground")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="port for edges (WebSocket /edge) and the API (default 8765)")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--log-level")
    p.add_argument("--retention-days", type=float, default=90.0, metavar="D",
                   help="delete readings and finished commands older than D days, hourly (default 90; 0 keeps all)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics and /healthz (default 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, default=9884,
                   help="their port (default 9884; 0 picks a free one, -1 turns them off)")
    p.add_argument("--max-devices-per-node", type=int, default=10_000, metavar="N",
                   help="devices the relay keeps for one node; what an edge sends for more is refused and counted "
                        "(default 10000)")
    p.add_argument("--edge-keepalive", type=float, default=20.0, metavar="S",
                   help="ping each linked edge every S seconds; one that does not answer within S is disconnected "
                        "(default 20)")
    p.add_argument("--http-timeout", type=float, default=15.0, metavar="S",
                   help="close a connection whose request headers or body take longer, or that idles longer between "
                        "requests (default 15)")
    p = actions.add_parser("node", help="nodes")
    node_actions = p.add_subparsers(dest="node_action", required=True)
    p = node_actions.add_parser("add", parents=[data], help="add a node and print its token once")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = node_actions.add_parser("remove", parents=[api], help="forget a node (token, devices, readings); ends its link")
    p.add_argument("name")
    p = node_actions.add_parser("rotate", parents=[api],
                                help="give a node a new token: the old one is refused and its link closed at once")
    p.add_argument("name")
    p = actions.add_parser("user", help="operator accounts for the dashboard and the API")
    user_actions = p.add_subparsers(dest="user_action", required=True)
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true")
    p = user_actions.add_parser("add", parents=[data, json_flag], help="add an account and print its password once")
    p.add_argument("name")
    p.add_argument("--role", choices=accounts.ROLES, default="viewer", help="admin changes things, viewer only looks "
                                                                          "(default viewer)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin instead of making one")
    p = user_actions.add_parser("list", parents=[data, json_flag])
    p = user_actions.add_parser("remove", parents=[data, json_flag], help="remove an account; its sessions and "
                                                                          "tokens end at once")
    p.add_argument("name")
    p = user_actions.add_parser("token", parents=[data, json_flag], help="make an API token for an account's scripts")
    p.add_argument("name")
    p = user_actions.add_parser("revoke", parents=[data, json_flag], help="revoke an API token by its id")
    p.add_argument("token_id")
    actions.add_parser("nodes", parents=[api], help="nodes with online state")
    p = actions.add_parser("devices", parents=[api], help="devices of all nodes or one")
    p.add_argument("node", nargs="?")
    p = actions.add_parser("twin", help="twin of a device")
    twin_actions = p.add_subparsers(dest="twin_action", required=True)
    p = twin_actions.add_parser("get", parents=[api])
    p.add_argument("node")
    p.add_argument("device")
    p = twin_actions.add_parser("set-all", parents=[api], help="one desired change for the whole fleet")
    p.add_argument("assignments", nargs="*", metavar="key=value")
    p.add_argument("--node", help="only this node's devices")
    p.add_argument("--device", dest="device_name", help="only devices with this id")
    p = twin_actions.add_parser("set", parents=[api])
    p.add_argument("node")
    p.add_argument("device")
    p.add_argument("assignments", nargs="*", metavar="key=value")
    p.add_argument("--version", type=int)
    p = actions.add_parser("cmd", parents=[api], help="run a command on a device")
    p.add_argument("node")
    p.add_argument("device")
    p.add_argument("name")
    p.add_argument("assignments", nargs="*", metavar="key=value")
    p.add_argument("--timeout", type=float, default=10.0)
    p = actions.add_parser("readings", parents=[api])
    p.add_argument("node")
    p.add_argument("device")
    p.add_argument("--since", help="epoch seconds, ISO time, or an age like 10m, 2h, 1d")
    p.add_argument("--until", help="only readings before this time (the next page of older ones)")
    p.add_argument("--limit", type=int, help=f"only the newest N (at most and by default {web.READINGS_LIMIT})")
    p.add_argument("--format", choices=("text", "csv", "jsonl"), help="csv or jsonl for other tools")
    p = actions.add_parser("rules", help="the rules and schedules each node runs (sent down, versioned)")
    rules_actions = p.add_subparsers(dest="rules_action", required=True)
    p = rules_actions.add_parser("apply", parents=[api],
                                 help="replace a node's rule set (or every node's, --all) with a rule file's")
    p.add_argument("targets", nargs="+", metavar="NODE FILE | FILE")
    p.add_argument("--all", action="store_true", help="every node (then give only the FILE)")
    p = rules_actions.add_parser("show", parents=[api], help="a node's rule set and whether it has applied it")
    p.add_argument("node")
    p = actions.add_parser("alerts", parents=[api], help="alerts of the fleet (open ones; --all: resolved too); ack")
    p.add_argument("--all", action="store_true")
    p.add_argument("--node", help="only this node's")
    alert_actions = p.add_subparsers(dest="alerts_action")
    p = alert_actions.add_parser("ack", parents=[api], help="acknowledge an alert (NODE ID, as listed)")
    p.add_argument("node_name", metavar="NODE")
    p.add_argument("id", type=int)
    p = actions.add_parser("device", help="register a device from the cloud")
    device_actions = p.add_subparsers(dest="device_action", required=True)
    p = device_actions.add_parser("add", parents=[api])
    p.add_argument("node")
    p.add_argument("device")
    p.add_argument("--model")
    cloud.set_defaults(func=run)
