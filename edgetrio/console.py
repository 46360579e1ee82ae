"""How the command line talks to a person, for every tier's sub-commands: exit codes, errors, JSON, times, logging."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from edgetrio import wire

EXIT_FAILED = 1  # the operation was refused or did not complete (conflict, timeout, unknown device)
EXIT_USAGE = 2  # bad arguments, bad config, cannot start


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def edgetrio_version() -> str:
    try:
        return importlib.metadata.version("edgetrio")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def default_data_dir() -> Path:
    return Path(os.environ.get("EDGETRIO_DATA_DIR", "edgetrio-data")).expanduser().absolute()


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """key=value pairs; a value is JSON where it parses (21.5, true, null, {...}), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"expected key=value, got {item!r}", EXIT_USAGE)
        try:
            out[key] = wire.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def require_positive(**options: float | None) -> None:
    """A count, period or limit that is zero, negative or not a number is a usage error, not a traceback later."""
    for name, value in options.items():
        if value is not None and not value > 0:
            raise CliError(f"--{name} must be more than 0, not {value:g}", EXIT_USAGE)


def fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def emit(args: argparse.Namespace, value: Any, human: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(value, indent=2))
    else:
        human()


def parse_since(text: str) -> float:
    """A time given as epoch seconds, an ISO date/time, or an age like 10m, 2h, 3d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1]]
    try:
        value = float(text)
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise ValueError(f"cannot read time {text!r}: use epoch seconds, an ISO time, or an age such as 10m") from exc


def setup_logging(level: str) -> None:
    # under journald (it sets JOURNAL_STREAM) every line gets its time stamped already: no second timestamp
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=stamp + "%(levelname)s %(name)s %(message)s")
    if level.lower() != "debug":
        # amqtt logs tracebacks for what the daemon reports itself in one line
        for noisy in ("amqtt", "transitions", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)


# -- the command registry ----------------------------------------------------------------------------------------------
# Each command declares its options beside its function; option groups shared by many commands (the data dir, --json)
# are declared once as tuples and passed the same way, as sqlite-utils does with its decorators.

Arg = tuple[tuple[str, ...], dict[str, Any]]
Handler = Callable[[argparse.Namespace], None]
H = TypeVar("H", bound=Handler)


def arg(*names: str, **options: Any) -> Arg:
    """One argument or option, as `argparse.ArgumentParser.add_argument` takes it."""
    return names, options


JSON = (arg("--json", action="store_true", help="print JSON (an error is a JSON object on stderr)"),)


def data_dir_option(default: Path | Callable[[], Path] | None, help: str) -> tuple[Arg, ...]:
    """--data-dir; a default given as a function is read when the parser is built (an environment variable)."""
    return (arg("--data-dir", type=Path, default=default, help=help),)


class Commands:
    """A tier's sub-commands by path ("node add"), each with its help, its arguments and its function."""

    def __init__(self) -> None:
        self.groups: dict[str, str] = {}
        self.entries: list[tuple[str, str, tuple[Arg, ...], Handler]] = []

    def group(self, path: str, help: str) -> None:
        """The help of a word that only leads to sub-commands (`edgetrio model ...`)."""
        self.groups[path] = help

    def command(self, path: str, help: str, *args: Arg | tuple[Arg, ...]) -> Callable[[H], H]:
        flat: list[Arg] = []
        for item in args:
            if len(item) == 2 and isinstance(item[1], dict):  # one argument, else a group of them
                flat.append(cast(Arg, item))
            else:
                flat.extend(cast(tuple[Arg, ...], item))

        def register(handler: H) -> H:
            self.entries.append((path, help, tuple(flat), handler))
            return handler

        return register

    def install(self, root: Any) -> None:
        """Add every command under `root` (the sub-parsers of `edgetrio`)."""
        handled = {path for path, *_ in self.entries}
        parsers: dict[str, argparse.ArgumentParser] = {}
        subs: dict[str, Any] = {"": root}

        def parser_of(path: str, help: str | None) -> argparse.ArgumentParser:
            if path in parsers:
                return parsers[path]
            parent, _, word = path.rpartition(" ")
            if parent not in subs:  # a command with both a function and sub-commands makes them optional
                subs[parent] = parser_of(parent, self.groups.get(parent)).add_subparsers(required=parent not in handled)
            parsers[path] = subs[parent].add_parser(word, help=help, description=help)
            return parsers[path]

        for path, help, args, handler in self.entries:
            parser = parser_of(path, help)
            for names, options in args:
                default = options.get("default")
                parser.add_argument(*names, **{**options, "default": default()} if callable(default) else options)
            parser.set_defaults(func=handler)


def time_option(text: str | None) -> float | None:
    """--since/--until as the user gave them (epoch, ISO, an age), or a usage error that says what is accepted."""
    try:
        return parse_since(text) if text else None
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
