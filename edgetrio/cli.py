"""The `edgetrio` command line: one root that assembles the gateway's, the cloud's and the device tier's commands."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sqlite3
import sys
from pathlib import Path

from edgetrio import console
from edgetrio.daemon import cli as daemon_cli
from edgetrio.daemon.config import ConfigError


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; for `edgetrio daemon ...` only the gateway's commands: the relay's and the tools'
    modules would stay in the daemon's memory for its whole life (9.6 MB of a gateway's 58, psycopg among them)."""
    parser = argparse.ArgumentParser(prog="edgetrio", description="edgetrio gateway, devices and fleet")
    parser.add_argument("--version", action="version", version=f"edgetrio {console.edgetrio_version()}")
    sub = parser.add_subparsers(required=True)
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    daemon_cli.COMMANDS.install(sub)
    if words[:1] != ["daemon"]:
        from edgetrio.cloud import cli as cloud_cli
        from edgetrio.tools import cli as tools_cli

        cloud_cli.COMMANDS.install(sub)
        tools_cli.COMMANDS.install(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the command, and turn what went wrong into one line and an exit code."""
    args = build_parser(argv).parse_args(argv)
    os.umask(0o077)  # data dirs hold readings and credential hashes: what edgetrio creates is its user's alone
    # Every path is resolved here, once, before it is handed on: a child process (a virtual board, the relay of the
    # demo) runs in another directory and would read a relative path against its own.
    for name, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, name, value.expanduser().absolute())
    if getattr(args, "data_dir", None) is not None:
        act_as_owner(args.data_dir)
    try:
        args.func(args)
    except (console.CliError, ConfigError) as exc:
        fail(args, str(exc), getattr(exc, "code", console.EXIT_USAGE))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except sqlite3.OperationalError as exc:  # the store busy past its 30 s wait, a full disk, a read-only file
        fail(args, f"the store could not be used ({exc}); the command did not complete; try again", 1)
    except OSError as exc:
        fail(args, f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)


def act_as_owner(data_dir: Path) -> None:
    """Root working on a service's data dir (owned by the user the service runs as) works as that user: a file root
    made there (a new WAL, a journal) would lock the service out of its own store."""
    if os.geteuid() != 0:
        return
    try:
        owner = data_dir.stat()
    except OSError:
        return
    if owner.st_uid == 0:
        return
    try:
        os.initgroups(pwd.getpwuid(owner.st_uid).pw_name, owner.st_gid)  # its groups too: dialout for serial boards
    except KeyError:
        os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)


def fail(args: argparse.Namespace, message: str, code: int) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code}), file=sys.stderr)
    else:
        print(f"edgetrio: error: {message}", file=sys.stderr)
    raise SystemExit(code) from None
