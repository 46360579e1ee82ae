"""Batched telemetry: the daemon's durable readings/s with one reading per message against batches, one invocation.

    python -m edgetrio.tools.bench.bench_batch [--devices 100] [--duration 8] [--batches 1,10,50]

The load of bench_ingest (QoS 1, ~100-byte readings, each device keeping WINDOW messages unacknowledged), with each
message carrying 1 (the baseline), 10 or 50 readings of one boot (`{"batch": [...]}`). A reading counts when the
daemon's ack (after the fsync'd commit) covers it. Prints readings/s and the ratio to one reading per message.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from edgetrio.tools.bench.bench_ingest import ROOT, measure, peak_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--batches", default="1,10,50", help="readings per message, the first is the baseline")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    from edgetrio.daemon import store
    from edgetrio.tools.demo import wait_for_daemon

    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgetrio-bench-") as tmp:
        data = Path(tmp) / "data"
        db = store.open_db(data)
        creds = [(f"dev-{i:03d}", store.add_device(db, f"dev-{i:03d}")) for i in range(args.devices)]
        db.conn.commit()
        db.close()
        daemon = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data), "--mqtt-host",
                                   "127.0.0.1", "--mqtt-port", "0", "--http-port", "0", "--metrics-port", "0",
                                   "--log-level", "error"], cwd=ROOT)
        try:
            info = wait_for_daemon(data, daemon)
            port = int(str(info["mqtt_port"]))
            for batch in batches:
                print(f"batches of {batch} ...", flush=True)
                rows[batch] = measure("127.0.0.1", port, creds, "daemon", "saturated", 0.0, args.duration, None,
                                      args.processes, batch=batch)
            rss = peak_rss_mb(daemon.pid)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    print(f"\n{args.devices} devices, QoS 1, 100-byte readings, saturated, {args.duration:g} s per run, "
          f"{os.cpu_count()} cores, load from {args.processes} processes; daemon peak RSS {rss:.1f} MB\n")
    print(f"{'readings per message':<22} {'readings/s':>11} {'p50 ms':>9} {'p99 ms':>9} {'ratio':>7}")
    base = rows[batches[0]]["throughput"]
    for batch, row in rows.items():
        print(f"{batch:<22} {row['throughput']:>11.0f} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} "
              f"{row['throughput'] / base:>6.2f}x")


if __name__ == "__main__":
    main()
