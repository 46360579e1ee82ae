"""Battery mode on a virtual board (the real firmware, deep sleep simulated by the vdev supervisor): awake time per
wake and messages per connecting wake, for a board that connects at every reading (the baseline) and every N.

    python -m edgetrio.tools.bench.bench_battery [--every 1,3,10] [--wakes 30] [--period 1]

Awake time is what the firmware measures from its start to its deep sleep (`[battery] awake N ms`); the interpreter's
own start before it is not in it. Messages are what the board published, counted by an admin client subscribed to
its topics on the gateway's broker. Prints per connecting wake and per reading, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edgetrio.tools.testkit import ROOT, Daemon

AWAKE = re.compile(r"^\[battery\] awake (\d+) ms(, sent)?")


def run(daemon: Daemon, every: int, wakes: int, period: float) -> dict[str, float]:
    prefix = f"bat{every}"
    device = f"{prefix}-1"
    published: list[str] = []
    user, password = daemon.admin()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{device}")
    watcher.username_pw_set(user, password)
    subscribed = threading.Event()
    watcher.on_connect = lambda c, *_a: c.subscribe(f"edgetrio/{device}/#", qos=1)
    watcher.on_subscribe = lambda *_a: subscribed.set()
    board_publishes = ("telemetry", "status", "meta", "log", "twin/reported", "cmd/result", "ota/status")
    watcher.on_message = lambda _c, _u, m: published.append(m.topic) if m.topic.split("/", 2)[2] in board_publishes \
        and not m.retain else None
    watcher.connect(daemon.host, daemon.port)
    watcher.loop_start()
    subscribed.wait(10)
    console = daemon.data_dir / "vdevs" / device / "console.log"
    with open(daemon.data_dir.parent / f"vdev-{device}.log", "ab") as log:
        boards = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--prefix", prefix, "--period",
                                   str(period), "--battery", str(every), "--data-dir", str(daemon.data_dir)],
                                  cwd=ROOT, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + wakes * (period + 2) + 60
            while time.monotonic() < deadline:
                lines = console.read_text().splitlines() if console.exists() else []
                if sum(bool(AWAKE.match(line)) for line in lines) >= wakes:
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"{device} did not wake {wakes} times")
        finally:
            boards.terminate()
            boards.wait(timeout=30)
            watcher.loop_stop()
    found = [AWAKE.match(line) for line in console.read_text().splitlines()]
    cycles = [m for m in found if m][1:wakes]  # the first wake is a power-on: it also says what the board is (meta)
    sent = [int(m.group(1)) for m in cycles if m.group(2)]
    quiet = [int(m.group(1)) for m in cycles if not m.group(2)]
    first_meta = published.index(f"edgetrio/{device}/meta") if f"edgetrio/{device}/meta" in published else -1
    after_first = [t for i, t in enumerate(published) if i > first_meta + 2]  # past the power-on's own messages
    return {"awake_sent_ms": statistics.median(sent), "awake_quiet_ms": statistics.median(quiet) if quiet else 0.0,
            "connects": len(sent), "wakes": len(cycles),
            "messages_per_connect": len(after_first) / max(1, len(sent)),
            "awake_ms_per_reading": (sum(sent) + sum(quiet)) / max(1, len(cycles))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", default="1,3,10", help="readings per connection; the first is the baseline")
    parser.add_argument("--wakes", type=int, default=31)
    parser.add_argument("--period", type=float, default=1.0)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgetrio-battery-") as tmp:
        daemon = Daemon(Path(tmp) / "gw").start()
        try:
            for every in (int(e) for e in args.every.split(",")):
                print(f"connecting every {every} readings ...", flush=True)
                rows[every] = run(daemon, every, args.wakes, args.period)
        finally:
            daemon.stop()
    print(f"\nvirtual board, battery mode, a reading every {args.period:g} s, {args.wakes - 1} wakes after the "
          "power-on (medians):\n")
    print(f"{'every':>5} {'awake ms, connecting':>21} {'awake ms, not':>14} {'messages/connect':>17} "
          f"{'awake ms/reading':>17} {'ratio':>6}")
    base = rows[next(iter(rows))]["awake_ms_per_reading"]
    for every, r in rows.items():
        print(f"{every:>5} {r['awake_sent_ms']:>21.0f} {r['awake_quiet_ms']:>14.0f} {r['messages_per_connect']:>17.1f} "
              f"{r['awake_ms_per_reading']:>17.0f} {r['awake_ms_per_reading'] / base:>5.2f}x")


if __name__ == "__main__":
    main()
