"""The chaos run: virtual boards running the real firmware, a gateway linked to a relay, and faults from a seed.

Faults, one at a time in an order drawn from the seed: kill -9 of the daemon, kill -9 of the relay, a board's Wi-Fi
dropping, a board's power cut, and (as root) the gateway's disk full for a few seconds. When enough readings are
stored the boards stop and the edge's outbox drains; then every reading a board had acknowledged must be at the edge
and in the cloud exactly once. Prints the counts and the seed; exits 1 on any loss or duplicate.

    python -m edgetrio.tools.bench.chaos --boards 20 --readings 100000 --seed 7     (make chaos)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgetrio.tools.testkit import ROOT, Daemon, Relay, fill, small_disk
from edgetrio.tools.vdev import set_fault


@dataclass
class Tally:
    seed: int
    taken: int = 0  # readings the boards made: acknowledged, still buffered, or dropped on the board
    acknowledged: int = 0
    at_edge: int = 0
    in_cloud: int = 0
    duplicates: int = 0
    lost_at_edge: int = 0
    lost_in_cloud: int = 0
    dropped_on_boards: int = 0  # torn by a power cut or pushed out of a full buffer; never acknowledged
    faults: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.lost_at_edge or self.lost_in_cloud) and self.acknowledged > 0

    def report(self) -> str:
        return (f"chaos seed={self.seed}: taken {self.taken}, acknowledged {self.acknowledged}, stored at the edge "
                f"{self.at_edge}, in the cloud {self.in_cloud}, duplicates {self.duplicates}, lost at the edge "
                f"{self.lost_at_edge}, lost in the cloud {self.lost_in_cloud}, dropped on boards before any ack "
                f"{self.dropped_on_boards}; faults: {', '.join(self.faults) or '-'}")


def edge_count(data_dir: Path) -> int:
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(data_dir / "edgetrio.db")) as db:
        return int(db.execute("SELECT count(*) FROM readings").fetchone()[0])
    return 0


class BoardWatch:
    """Samples the boards' flash: the highest acknowledged and the highest taken seq of every boot seen.

    A board forgets the ack mark of an old boot once nothing of it is left to send, so the marks are collected
    while the run goes, four times a second, and once more at the end.
    """

    def __init__(self, flash_root: Path, boards: list[str]) -> None:
        self.flash_root, self.boards = flash_root, boards
        self.acked: dict[tuple[str, int], int] = {}
        self.taken: dict[tuple[str, int], int] = {}
        self.dropped: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BoardWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    def sample(self) -> None:
        for board in self.boards:
            flash = self.flash_root / board
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                saved = json.loads((flash / "buffer.log.ack").read_text())
                for boot, seq in saved["acked"].items():
                    key = (board, int(boot))
                    self.acked[key] = max(self.acked.get(key, 0), int(seq))
                self.dropped[board] = int(saved.get("dropped", 0))
            with contextlib.suppress(OSError):
                for line in (flash / "buffer.log").read_text(errors="replace").splitlines():
                    parts = line.split(" ", 2)
                    with contextlib.suppress(ValueError, IndexError):
                        key = (board, int(parts[0]))
                        self.taken[key] = max(self.taken.get(key, 0), int(parts[1]))


def keys(db_path: Path, sql: str) -> list[tuple[str, int, int]]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return [(str(d), int(b), int(s)) for d, b, s in db.execute(sql)]


def tally(seed: int, faults: list[str], gw_data: Path, relay_data: Path, watch: BoardWatch) -> Tally:
    t = Tally(seed, faults=faults)
    edge_rows = keys(gw_data / "edgetrio.db", "SELECT device, boot, seq FROM readings WHERE data IS NOT NULL")
    cloud_rows = keys(relay_data / "relay.db", "SELECT device, boot, seq FROM readings")
    edge, cloud = set(edge_rows), set(cloud_rows)
    t.at_edge, t.in_cloud = len(edge_rows), len(cloud_rows)
    t.duplicates = (len(edge_rows) - len(edge)) + (len(cloud_rows) - len(cloud))
    t.dropped_on_boards = sum(watch.dropped.values())
    for (board, boot), mark in watch.acked.items():
        t.acknowledged += mark
        wanted = {(board, boot, seq) for seq in range(1, mark + 1)}
        t.lost_at_edge += len(wanted - edge)
        t.lost_in_cloud += len(wanted - cloud)
    for key in watch.acked.keys() | watch.taken.keys():
        t.taken += max(watch.acked.get(key, 0), watch.taken.get(key, 0))
    return t


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"chaos: {what} within {timeout:g} s")
        time.sleep(0.5)


def run(workdir: Path, seed: int, boards: int, readings: int, period: float, disk_mb: int,
        progress: Callable[[str], None] = print, first: tuple[str, ...] = ()) -> Tally:
    """One chaos run in `workdir`; returns the tally (see Tally.ok). `first`: fault kinds to begin with, in order."""
    rng = random.Random(seed)
    relay = Relay(workdir / "relay")
    relay.data_dir.mkdir(parents=True, exist_ok=True)
    relay.start()
    token_file = workdir / "token"
    token_file.write_text(relay.add_node("chaos-gw"))
    flash_root = workdir / "boards"
    flash_root.mkdir(parents=True, exist_ok=True)
    faults: list[str] = []
    gw_data = workdir / "gw" / "data"  # the mount point itself: the daemon's log goes beside it, not on it
    with small_disk(gw_data, disk_mb) as mounted:
        (gw_data / "vdevs").symlink_to(flash_root)  # the boards' flash is not the gateway's disk
        daemon = Daemon(gw_data, extra=("--cloud", relay.url, "--node-id", "chaos-gw", "--token-file", str(token_file),
                                        "--log-level", "warning"))
        daemon.start()
        vdevs = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--count", str(boards), "--prefix", "chaos",
                                  "--period", str(period), "--buffer", "50000", "--data-dir", str(gw_data)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(workdir / "vdev.log", "ab"),  # noqa: SIM115
                                 start_new_session=True)
        names = [f"chaos-{i}" for i in range(1, boards + 1)]
        kinds = ["daemon", "relay", "wifi", "power", *(["disk"] if mounted else [])]
        watch = BoardWatch(flash_root, names)
        try:
            watch.__enter__()
            wait(lambda: edge_count(gw_data) > 0, 120, "no reading arrived")
            started, last_report = time.monotonic(), 0.0
            while (stored := edge_count(gw_data)) < readings:
                if vdevs.poll() is not None:
                    raise RuntimeError(f"the virtual boards exited ({vdevs.returncode}); see {workdir / 'vdev.log'}")
                if time.monotonic() - last_report > 15:
                    progress(f"  {stored} of {readings} readings stored at the edge, {len(faults)} faults so far")
                    last_report = time.monotonic()
                time.sleep(rng.uniform(1.0, 4.0))
                kind = first[len(faults)] if len(faults) < len(first) else rng.choice(kinds)
                outage = rng.uniform(1.0, 5.0)
                if kind == "daemon":
                    daemon.stop(signal.SIGKILL)
                    time.sleep(outage)
                    daemon.start()
                elif kind == "relay":
                    relay.stop(signal.SIGKILL)
                    time.sleep(outage)
                    relay.start()
                elif kind == "wifi":
                    board = rng.choice(names)
                    set_fault(gw_data, board, "wifi", "down")
                    time.sleep(outage)
                    set_fault(gw_data, board, "wifi", "up")
                    kind = f"wifi:{board}"
                elif kind == "power":
                    board = rng.choice(names)
                    set_fault(gw_data, board, "power", None)
                    kind = f"power:{board}"
                else:
                    filler = gw_data / "filler"
                    fill(filler)
                    time.sleep(outage)
                    filler.unlink()
                faults.append(kind)
                for name, part in (("daemon", daemon), ("relay", relay)):
                    if part.proc is not None and part.proc.poll() is not None:
                        raise RuntimeError(f"the {name} exited ({part.proc.returncode}) after fault {kind}: see its log "
                                           f"in {workdir}")
            progress(f"  {edge_count(gw_data)} readings stored in {time.monotonic() - started:.0f} s; stopping the boards")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(vdevs.pid, signal.SIGTERM)
            try:
                vdevs.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(vdevs.pid, signal.SIGKILL)
                vdevs.wait()
            watch.__exit__()
        # what the boards acknowledged is frozen in their ack files; the edge sends the rest of its outbox up
        wait(lambda: _outbox_rows(gw_data) == 0, 180, "the edge's outbox did not drain to the relay")
        daemon.stop()
        relay.stop()
        result = tally(seed, faults, gw_data, relay.data_dir, watch)
        if not result.ok:  # keep the edge's store for a look: the tmpfs goes with the run
            for db_file in gw_data.glob("edgetrio.db*"):
                shutil.copy2(db_file, workdir / db_file.name)
    return result


def _outbox_rows(data_dir: Path) -> int:
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(data_dir / "edgetrio.db")) as db:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boards", type=int, default=20)
    parser.add_argument("--readings", type=int, default=100_000, help="run until the edge has stored this many")
    parser.add_argument("--period", type=float, default=0.1, help="each board's sample period in seconds")
    parser.add_argument("--seed", type=int, default=None, help="fault schedule seed (default: drawn, and printed)")
    parser.add_argument("--disk-mb", type=int, default=512, help="size of the gateway's tmpfs (root only)")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"chaos: {args.boards} boards, {args.readings} readings, seed {seed}", flush=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.keep, seed, args.boards, args.readings, args.period, args.disk_mb)
    else:
        with tempfile.TemporaryDirectory(prefix="edgetrio-chaos-") as tmp:
            result = run(Path(tmp), seed, args.boards, args.readings, args.period, args.disk_mb)
    print(result.report(), flush=True)
    raise SystemExit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
