"""Commands the gateway and the relay both have, written once: operator accounts and their API tokens, and readings
printed as text, CSV or JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from edgetrio import accounts, web, wire
from edgetrio.console import EXIT_USAGE, JSON, Arg, CliError, Commands, arg, emit, fmt_time, parse_assignments
from edgetrio.identity import hash_password, new_secret

# write(args, op, op_args, offline): the change through whatever owns the store (the running daemon's control
# socket for `op` and `op_args`), else `offline(db)` on the store itself
Write = Callable[[argparse.Namespace, str, dict[str, Any], Callable[[Any], Any]], Any]


def user_commands(commands: Commands, prefix: str, data: tuple[Arg, ...], open_db: Callable[[argparse.Namespace], Any],
                  write: Write) -> None:
    """`PREFIX user add|list|remove|token|revoke`: accounts for a tier's dashboard and API."""
    options = (*data, *JSON)
    commands.group(f"{prefix}user", "accounts for the dashboard and the API")

    @commands.command(f"{prefix}user add", "add an account and print its password once", options, arg("name"),
                      arg("--role", choices=accounts.ROLES, default="viewer",
                          help="admin changes things, viewer only looks (default viewer)"),
                      arg("--password-stdin", action="store_true",
                          help="read the password from stdin instead of making one"))
    def user_add(args: argparse.Namespace) -> None:
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else new_secret()
        if len(password) < 8:
            raise CliError("a password needs at least 8 characters", EXIT_USAGE)
        op_args = {"name": args.name, "role": args.role, "password_hash": hash_password(password)}
        write(args, "user.add", op_args, lambda db: accounts.add_user(db, args.name, args.role, op_args["password_hash"]))
        shown = {"name": args.name, "role": args.role, **({} if args.password_stdin else {"password": password})}
        emit(args, shown, lambda: print(f"user {args.name} added ({args.role})" + (
            "" if args.password_stdin else f"\n  password: {password}\nKeep it now: it is stored only hashed.")))

    @commands.command(f"{prefix}user list", "accounts with their role and API tokens", options)
    def user_list(args: argparse.Namespace) -> None:
        rows = accounts.list_users(open_db(args))
        emit(args, rows, lambda: print("\n".join(
            [f"{'USER':<20} {'ROLE':<7} {'TOKENS':>6}  CREATED"]
            + [f"{u['name']:<20} {u['role']:<7} {u['tokens']:>6}  {fmt_time(u['created'])}" for u in rows])))

    @commands.command(f"{prefix}user remove", "remove an account; its sessions and tokens end at once", options,
                      arg("name"))
    def user_remove(args: argparse.Namespace) -> None:
        write(args, "user.remove", {"name": args.name}, lambda db: accounts.remove_user(db, args.name))
        emit(args, {"name": args.name, "removed": True},
             lambda: print(f"removed {args.name}: its sessions and tokens end now"))

    @commands.command(f"{prefix}user token", "make an API token for an account's scripts", options, arg("name"))
    def user_token(args: argparse.Namespace) -> None:
        made = write(args, "user.token", {"name": args.name},
                     lambda db: dict(zip(("id", "token"), accounts.add_token(db, args.name), strict=True)))
        emit(args, {"name": args.name, "id": made["id"], "token": made["token"]}, lambda: print(
            f"API token {made['id']} for {args.name}\n  token: {made['token']}\n"
            f"Scripts send it as `authorization: Bearer TOKEN`; `edgetrio {prefix}user revoke {made['id']}` ends it."))

    @commands.command(f"{prefix}user revoke", "revoke an API token by its id", options, arg("token_id"))
    def user_revoke(args: argparse.Namespace) -> None:
        write(args, "user.revoke", {"id": args.token_id}, lambda db: accounts.revoke_token(db, args.token_id))
        emit(args, {"id": args.token_id, "revoked": True}, lambda: print(f"token {args.token_id} revoked"))


def print_twin(twin: dict[str, Any]) -> None:
    print(f"desired  (version {twin['desired']['version']}): {json.dumps(twin['desired']['state'])}\n"
          f"reported (version {twin['reported']['version']}): {json.dumps(twin['reported']['state'])}\n"
          f"delta: {json.dumps(twin['delta'])}")


def desired_patch(args: argparse.Namespace) -> dict[str, Any]:
    """The key=value ... of `twin set`: at least one, each value JSON where it parses."""
    patch = parse_assignments(args.assignments)
    if not patch:
        raise CliError("give at least one key=value", EXIT_USAGE)
    return patch


def readings_options(limit_help: str) -> tuple[Arg, ...]:
    return (arg("--since", help="epoch seconds, ISO time, or an age like 10m, 2h, 1d"),
            arg("--until", help="only readings before this time (the next page of older ones)"),
            arg("--limit", type=int, help=limit_help),
            arg("--format", choices=("text", "csv", "jsonl"),
                help="csv (a column per resource) or jsonl (a JSON object per line) for other tools"))


def print_readings(args: argparse.Namespace, rows: list[dict[str, Any]], units: dict[str, str]) -> None:
    """Readings as --format asks (CSV, JSON lines), as --json, or as text with each value's unit."""
    if args.format == "csv":
        sys.stdout.write(web.readings_csv_text(rows))
    elif args.format == "jsonl":
        sys.stdout.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        emit(args, rows, lambda: print("\n".join(
            f"{fmt_time(r['ts'])}  boot {r['boot']:<4} seq {r['seq']:<8} "
            + "  ".join(f"{k}={v}{units.get(k, '')}" for k, v in sorted(r["values"].items())) for r in rows)
            or "no readings"))


def log_line(row: dict[str, Any]) -> str:
    """One line of a device's log (its log and status lines, the steps of its firmware updates), for a terminal."""
    body = row["body"]
    if row["kind"] == "status":
        text = f"[status] {wire.clip(body, 40)}"
    elif row["kind"] == "ota" and isinstance(body, dict):
        text = (f"[firmware update] bundle {wire.clip(str(body.get('bundle'))[:12])} {wire.clip(body.get('state'), 20)}"
                + (f": {wire.clip(body['reason'], 300)}" if body.get("reason") else ""))
    elif isinstance(body, dict):  # what a board says: clipped, and no escape codes on a terminal
        text = f"[{wire.clip(body.get('level', 'info'), 10)}] {wire.clip(body.get('message', json.dumps(body)), 2000)}"
    else:
        text = wire.clip(body, 2000)
    return f"{fmt_time(row['ts'])}  {text}"


WAKE_GRACE_S = 60  # past its announced wake by this much: a sleeping board is shown as having missed it


def asleep(device: dict[str, Any], now: float | None = None) -> bool:
    """A battery board asleep: it said when it wakes next, and that is not long past (a wake takes a few seconds)."""
    until = device.get("asleep_until")
    return until is not None and not device.get("online") and (now or time.time()) < until + WAKE_GRACE_S


def firmware_of(meta: dict[str, Any]) -> str:
    """The version a board runs, and whether it is a firmware update on trial or one is being received."""
    version = wire.clip(meta.get("firmware") or "-", 16)  # what a board says: no escape codes on a terminal
    return version + (" trial" if meta.get("trial") else " updating" if meta.get("updating") else "")
