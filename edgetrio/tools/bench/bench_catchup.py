"""A board catching up after an outage: readings/s of a 5,000-reading backlog sent from its flash buffer, one reading
per message (the baseline) against batches, one invocation.

    python -m edgetrio.tools.bench.bench_catchup [--readings 5000] [--batches 1,10,25] [--heap 128K]

The real firmware (.mpy, as flashed) on the MicroPython unix port, with READINGS readings of an earlier boot already
in its buffer.log (as a board that was cut off for a while leaves it), sends them to a real daemon over the loopback;
`batch` in its config.json sets the readings per message. The time runs from the first reading of the backlog stored
by the daemon to the last (the boot and the connect before it are the same for every run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from edgetrio.tools.bundle import build_bundle, device_config
from edgetrio.tools.testkit import Daemon
from edgetrio.tools.vdev import build_sim, micropython

BOOT = 7  # the boot the backlog was taken in; the board runs as the next one


def backlog(flash: Path, readings: int) -> None:
    """A buffer.log of `readings` unacknowledged readings of boot BOOT, as the firmware writes them."""
    start = int(time.time()) - readings
    with open(flash / "buffer.log", "w") as f:
        for seq in range(1, readings + 1):
            reading = {"boot": BOOT, "seq": seq, "ts": start + seq,
                       "values": {"temperature": 21.5 + seq % 10 / 10, "humidity": 48.25, "pressure": 1012.8,
                                  "light": 0.42, "chip_temp": 44.0}}
            f.write(f"{BOOT} {seq} {json.dumps(reading)}\n")
    for name in ("buffer.log.ack", "state.json.tmp"):
        (flash / name).unlink(missing_ok=True)
    (flash / "state.json").write_text(json.dumps({"boot": BOOT, "failed_boots": 0}))


def stored(db: Path, device: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return int(conn.execute("SELECT count(*) FROM readings WHERE device = ? AND boot = ?",
                                [device, BOOT]).fetchone()[0])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(daemon: Daemon, flash: Path, sim: Path, device: str, readings: int, heap: str,
        limit: float) -> tuple[float, float, str]:
    """Seconds from the first reading of the backlog stored to the last, the board's CPU seconds in that time, and
    what it said."""
    db = daemon.data_dir / "edgetrio.db"
    proc = subprocess.Popen([micropython(), "-X", f"heapsize={heap}", str(sim / "board.py")], cwd=flash,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={"MICROPYPATH": f"{sim}:.frozen:lib:"})
    first = None
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the board stopped: {proc.stdout.read().decode()[-2000:] if proc.stdout else ''}")
            n = stored(db, device)
            now = time.monotonic()
            if n and first is None:
                first, cpu = now, cpu_seconds(proc.pid)
            if n >= readings and first is not None:
                cpu = cpu_seconds(proc.pid) - cpu
                proc.kill()
                said = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                return now - first, cpu, said
            time.sleep(0.02)
        proc.kill()
        said = proc.stdout.read().decode(errors="replace")[-1500:] if proc.stdout else ""
        raise RuntimeError(f"the backlog was not stored within {limit:g} s ({stored(db, device)} of {readings}); "
                           f"the board said:\n{said}")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readings", type=int, default=5000)
    parser.add_argument("--batches", default="1,10,25", help="readings per message, the first is the baseline")
    parser.add_argument("--heap", default="128K", help="the virtual board's heap (vdev's default)")
    parser.add_argument("--limit", type=float, default=600.0, help="seconds a run may take")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgetrio-catchup-") as tmp:
        root = Path(tmp)
        sim = build_sim(root / "sim")
        daemon = Daemon(root / "gw")
        try:
            daemon.start()
            for batch in batches:
                device = f"catchup-{batch}"
                password = daemon.add_device(device)
                flash = root / device
                build_bundle(flash)
                (flash / "sim").mkdir(exist_ok=True)
                config = device_config(device, password, 3600, buffer=args.readings + 100)
                config.update({"broker_port": daemon.port, "batch": batch})
                (flash / "config.json").write_text(json.dumps(config))
                backlog(flash, args.readings)
                print(f"{args.readings} readings, {batch} per message ...", flush=True)
                results[batch] = run(daemon, flash, sim, device, args.readings, args.heap, args.limit)
                for line in results[batch][2].splitlines():
                    if "[warning]" in line or "[error]" in line:
                        print("  the board:", line, flush=True)
        finally:
            daemon.stop(signal.SIGTERM)
    print(f"\na {args.readings}-reading backlog from the flash buffer of a virtual board (real firmware as .mpy, "
          f"{args.heap} heap) to the daemon (QoS 1, fsync'd commit, then ack), loopback:\n")
    print(f"{'readings per message':<22} {'seconds':>8} {'readings/s':>11} {'ratio':>7} {'board CPU %':>12}")
    base = args.readings / results[batches[0]][0]
    for batch, (seconds, cpu, _) in results.items():
        rate = args.readings / seconds
        print(f"{batch:<22} {seconds:>8.2f} {rate:>11.0f} {rate / base:>6.2f}x {100 * cpu / seconds:>11.0f}%")


if __name__ == "__main__":
    main()
