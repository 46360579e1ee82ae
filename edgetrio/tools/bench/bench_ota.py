"""Firmware over the air on virtual boards (the real firmware): time from `edgetrio ota` to the board's confirmation
for one board (the baseline) and for several at once, and the smallest heap in which an update goes through.

    python -m edgetrio.tools.bench.bench_ota [--boards 5] [--heap]

An update here: this firmware with another version string, sent to boards running this firmware; each confirms at
its first acknowledged reading on the new bundle. Timed from the request to the confirmation (the restart into update
mode, the transfer, the restart into the new bundle and the first acknowledged reading), on loopback. With --heap, the
smallest heap (bisection, 1 KiB) in which a board takes the update and confirms within 90 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgetrio.bundles import bundle_files
from edgetrio.tools.testkit import ROOT, Daemon, make_bundle, virtual_boards, wait_until


def bundle_of(daemon: Daemon, device: str) -> str:
    listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
    return str((listed.get(device, {}).get("meta") or {}).get("bundle") or "")


def update_all(daemon: Daemon, devices: list[str], bundle: Path, limit: float) -> list[float]:
    """Seconds from asking to each board's confirmation, updates started together."""
    started = time.monotonic()
    runs = [subprocess.Popen([sys.executable, "-m", "edgetrio", "ota", device, "--bundle", str(bundle), "--json",
                              "--timeout", str(limit), "--data-dir", str(daemon.data_dir)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for device in devices]
    took = []
    for device, run in zip(devices, runs, strict=True):
        _, err = run.communicate(timeout=limit + 60)
        if run.returncode != 0:
            raise RuntimeError(f"{device}: update failed: {err.decode()[-500:]}")
        took.append(time.monotonic() - started)
    return took


def fits(root: Path, heap_kib: int, bundle: Path, limit: float) -> bool:
    daemon = Daemon(root / f"heap-{heap_kib}").start()
    try:
        with virtual_boards(daemon, "h", 1, period=0.5, extra=("--heap", f"{heap_kib}K")) as (device,):
            try:
                wait_until(lambda: bundle_of(daemon, device), timeout=60)
            except AssertionError:
                return False  # it does not even run in this heap
            try:
                update_all(daemon, [device], bundle, limit)
            except (RuntimeError, subprocess.TimeoutExpired):
                return False
            return True
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boards", type=int, default=5)
    parser.add_argument("--heap", action="store_true", help="also find the smallest heap an update goes through in")
    parser.add_argument("--limit", type=float, default=90.0, help="seconds an update may take")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgetrio-ota-bench-") as tmp:
        root = Path(tmp)
        bundle = make_bundle(root, "9.9.9-bench")
        size = sum(s for _, s, _ in bundle_files(bundle / "lib"))
        count = len(bundle_files(bundle / "lib"))
        daemon = Daemon(root / "gw").start()
        try:
            with virtual_boards(daemon, "ota", args.boards, period=1.0) as devices:
                wait_until(lambda: all(bundle_of(daemon, d) for d in devices), timeout=120)
                print("one board ...", flush=True)
                one = update_all(daemon, devices[:1], bundle, args.limit)[0]
                print(f"{args.boards - 1} boards at once ...", flush=True)
                many = update_all(daemon, devices[1:], bundle, args.limit)
        finally:
            daemon.stop()
        smallest = None
        if args.heap:
            lo, hi = 64, 192
            if not fits(root, hi, bundle, args.limit):
                raise RuntimeError(f"no update went through even with {hi} KiB")
            while hi - lo > 1:
                mid = (lo + hi) // 2
                ok = fits(root, mid, bundle, args.limit)
                print(f"  {mid} KiB: {'ok' if ok else 'fails'}", flush=True)
                lo, hi = (lo, mid) if ok else (mid, hi)
            smallest = hi
    print(f"\nan update of {size:,} bytes ({count} files) over loopback, request to "
          "confirmation:\n")
    print(f"{'boards at once':<16} {'seconds (slowest)':>18} {'per board':>10} {'ratio':>7}")
    print(f"{1:<16} {one:>18.1f} {one:>10.1f} {1:>6.2f}x")
    per = max(many) / len(many)
    print(f"{len(many):<16} {max(many):>18.1f} {per:>10.1f} {per / one:>6.2f}x")
    if smallest is not None:
        print(f"\nsmallest heap in which a board takes the update and confirms: {smallest} KiB "
              "(vdev's default is 128 KiB; bench_heap gives what plain running takes)")


if __name__ == "__main__":
    main()
