"""What the gateway and the relay do alike as long-running processes: a run file that tells the CLI where they
listen, written whole and removed when they stop, and the wait for SIGINT or SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("edgetrio.process")


def write_run_file(path: Path, info: dict[str, Any]) -> None:
    """Replace the run file whole (with this process's pid): a reader never sees it half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(path)


@contextmanager
def run_file_removed(path: Path) -> Iterator[None]:
    """Remove the run file when the block ends, however it ends: a stale one would send the CLI to a dead port."""
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def stop_signals() -> Iterator[AsyncIterator[int]]:
    """SIGINT and SIGTERM, caught from here on (a stop asked early waits for `until_stopped`, not lost)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        yield signals


async def until_stopped(signals: AsyncIterator[int]) -> None:
    """Return at the first SIGINT or SIGTERM, saying which."""
    async for signum in signals:
        log.info("stopping on %s", signal.Signals(signum).name)
        return
