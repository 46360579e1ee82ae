"""The smallest MicroPython heap in which the firmware runs full publish cycles, as .mpy (what flashing writes) and,
as the baseline in the same invocation, as .py source; and the heap the simulated hardware alone takes (a main.py
that only reads the simulated sensors), which a real ESP32 keeps in ROM: the firmware's own share is the difference.

    python -m edgetrio.tools.bench.bench_heap [--cycles 3]

A trial runs the real firmware on the unix port (`-X heapsize=N`) against a real daemon and passes when the gateway
has acknowledged `--cycles` readings within the time limit with the process still alive (a MemoryError anywhere ends
the cycle). Bisection between 16 KiB and 256 KiB, to 1 KiB. 64-bit objects on the unix port overstate a real ESP32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgetrio.tools.boards import load_board
from edgetrio.tools.bundle import FIRMWARE, build_bundle, device_config
from edgetrio.tools.testkit import Daemon
from edgetrio.tools.vdev import build_sim, micropython

TRIALS = iter(range(1, 1 << 30))


SIM_ONLY = """import machine
bus = machine.I2C(0)
for _ in range(3):
    bus.readfrom_mem(0x76, 0xD0, 1)
    bus.writeto_mem(0x76, 0xF4, b"\\x25")
    bus.readfrom_mem(0x76, 0xF7, 8)
    machine.ADC(machine.Pin(34)).read_u16()
print("SIM OK")
"""


def trial_sim(flash: Path, sim: Path, heap_kib: int, limit: float) -> bool:
    proc = subprocess.run([micropython(), "-X", f"heapsize={heap_kib}K", str(sim / "board.py")], cwd=flash,
                          capture_output=True, text=True, timeout=limit,
                          env={"MICROPYPATH": f"{sim}:.frozen:lib:"})
    return "SIM OK" in proc.stdout


def trial(flash: Path, heap_kib: int, cycles: int, limit: float, sim: Path = FIRMWARE / "sim") -> bool:
    for name in ("state.json", "buffer.log", "buffer.log.ack", "state.json.tmp"):
        (flash / name).unlink(missing_ok=True)
    # A boot of its own for each trial: the daemon keeps each boot's ack watermark, so a repeated boot number
    # would be acknowledged at once up to where an earlier trial got, and a heap too small would pass.
    boot = next(TRIALS)
    (flash / "state.json").write_text(json.dumps({"boot": boot - 1, "failed_boots": 0}))
    proc = subprocess.Popen([micropython(), "-X", f"heapsize={heap_kib}K", str(sim / "board.py")],
                            cwd=flash, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={"MICROPYPATH": f"{sim}:.frozen:lib:"})
    deadline = time.monotonic() + limit
    ok = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ack = flash / "buffer.log.ack"
            if ack.exists():
                try:
                    acked = json.loads(ack.read_text())["acked"].get(str(boot), 0)
                except (ValueError, KeyError):
                    acked = 0
                if acked >= cycles:
                    ok = True
                    break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return ok


def smallest_heap(passes: Any) -> int:
    lo, hi = 8, 256
    if not passes(hi):
        raise RuntimeError(f"it does not run even with {hi} KiB")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
        print(f"  {mid} KiB: {'ok' if hi == mid else 'fails'}", flush=True)
    return hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--limit", type=float, default=15.0, help="seconds a trial may take")
    parser.add_argument("--board", type=Path, metavar="FILE",
                        help="also the .mpy bundle on a board described by FILE (its parts fitted to the simulation)")
    args = parser.parse_args()
    board = load_board(args.board) if args.board else None
    with tempfile.TemporaryDirectory(prefix="edgetrio-heap-") as tmp:
        root = Path(tmp)
        daemon = Daemon(root / "gw")
        password = daemon.add_device("heap-1")
        daemon.start()
        try:
            config = device_config("heap-1", password, 0.2)
            config.update({"broker_host": "127.0.0.1", "broker_port": daemon.port})
            sim = build_sim(root / "sim-mpy")
            results = {}
            bare = root / "sim-only"
            (bare / "sim").mkdir(parents=True)
            (bare / "config.json").write_text(json.dumps(config))
            (bare / "main.py").write_text(SIM_ONLY)
            print("the simulated hardware alone:", flush=True)
            results["sim"] = smallest_heap(lambda kib: trial_sim(bare, sim, kib, args.limit))
            for kind in ("py", "mpy", *(["board"] if board else [])):
                flash = root / kind
                if kind == "board" and board is not None:
                    build_bundle(flash)
                    (flash / "sim").mkdir(exist_ok=True)
                    (flash / "sim" / "board.json").write_text(json.dumps(board.components))
                    config = {**config, **device_config("heap-1", password, 0.2, board=board),
                              "broker_host": "127.0.0.1", "broker_port": daemon.port}
                elif kind == "mpy":
                    build_bundle(flash)
                else:
                    shutil.copytree(FIRMWARE / "lib", flash / "lib")
                    for name in ("boot.py", "main.py", "start.py"):
                        shutil.copy2(FIRMWARE / name, flash / name)
                (flash / "sim").mkdir(exist_ok=True)
                (flash / "config.json").write_text(json.dumps(config))
                print(f"firmware as .{kind}:", flush=True)
                results[kind] = smallest_heap(lambda kib, flash=flash: trial(flash, kib, args.cycles, args.limit, sim))
        finally:
            daemon.stop(signal.SIGTERM)
    print(f"\nsmallest heap for {args.cycles} full publish cycles (connect, subscribe, meta, read sensors, buffer "
          f"on flash, QoS 1 publish, ack, trim):")
    print(f"  .py source (baseline): {results['py']} KiB")
    print(f"  .mpy bundle:           {results['mpy']} KiB")
    print(f"  the simulated hardware alone (in ROM on an ESP32): {results['sim']} KiB")
    print(f"ratio .mpy/.py: {results['mpy'] / results['py']:.2f}x; the firmware's own share as .mpy: about "
          f"{results['mpy'] - results['sim']} KiB (aim for an ESP32 without PSRAM: 64 KiB or less)")
    if "board" in results:
        print(f"  .mpy on the board of {args.board}: {results['board']} KiB (ratio to the reference board "
              f"{results['board'] / results['mpy']:.2f}x; its simulated parts count here, in ROM on an ESP32)")
    sys.exit(0)


if __name__ == "__main__":
    main()
