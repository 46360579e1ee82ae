"""What metrics cost durable ingest: the daemon saturated with metrics off (the baseline) and then on, scraped every
second (fifteen times Prometheus's default rate), in the same invocation.

    python -m edgetrio.tools.bench.bench_metrics [--duration 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

from edgetrio.daemon import store
from edgetrio.tools.bench.bench_ingest import measure
from edgetrio.tools.demo import wait_for_daemon
from edgetrio.tools.testkit import ROOT


def run_daemon(devices: int, duration: float, metrics: bool) -> tuple[float, int]:
    """Saturated msg/s, and how many scrapes answered."""
    with tempfile.TemporaryDirectory(prefix="edgetrio-bench-metrics-") as tmp:
        data = Path(tmp) / "data"
        db = store.open_db(data)
        creds = [(f"dev-{i:03d}", store.add_device(db, f"dev-{i:03d}")) for i in range(devices)]
        db.conn.commit()
        db.close()
        daemon = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data),
                                   "--mqtt-host", "127.0.0.1", "--mqtt-port", "0", "--log-level", "error",
                                   "--metrics-port", "0" if metrics else "-1"], cwd=ROOT)
        info = wait_for_daemon(data, daemon)
        scrapes, stop = [0], threading.Event()

        def scrape() -> None:
            while not stop.wait(1.0):
                with urllib.request.urlopen(f"http://{info['metrics']}/metrics", timeout=10) as reply:
                    reply.read()
                scrapes[0] += 1

        scraper = threading.Thread(target=scrape, daemon=True)
        if metrics:
            scraper.start()
        try:
            row = measure("127.0.0.1", int(str(info["mqtt_port"])), creds, "daemon", "saturated", 0.0, duration,
                          None, 1)
        finally:
            stop.set()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        return float(row["throughput"]), scrapes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs, alternated (the machine drifts)")
    args = parser.parse_args()
    off, on = [], []
    for i in range(args.rounds):
        off.append(run_daemon(args.devices, args.duration, False)[0])
        rate, scrapes = run_daemon(args.devices, args.duration, True)
        on.append(rate)
        print(f"round {i + 1}: metrics off {off[-1]:.0f} msg/s, on {rate:.0f} msg/s ({scrapes} scrapes)", flush=True)
    ratio = sum(on) / sum(off)
    print(f"durable ingest with metrics scraped every second / without: {ratio:.3f}x (aim: at least 0.95x)")


if __name__ == "__main__":
    main()
