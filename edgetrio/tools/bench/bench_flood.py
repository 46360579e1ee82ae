"""Daemon memory under one device's flood: 8,000 x 30 KB QoS 0 logs, as in the attack that found the unbounded queue.

Prints the daemon's RSS idle (the baseline, same run), at the flood's peak and after the flooder left, with ratios.
Run: python -m edgetrio.tools.bench.bench_flood
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import psutil

from edgetrio.tools.testkit import Daemon, RawMQTT


def main(messages: int = 8000, size: int = 30_000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp) / "data").start()
        try:
            assert daemon.proc is not None
            proc = psutil.Process(daemon.proc.pid)
            password = daemon.add_device("flooder")
            time.sleep(2)
            idle = proc.memory_info().rss
            peak = [idle]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            flooder = RawMQTT(daemon.host, daemon.port)
            assert flooder.connect("flooder", "flooder", password) == 0
            note = json.dumps({"level": "info", "message": "x" * size}).encode()
            started = time.monotonic()
            for _ in range(messages):
                flooder.publish("edgetrio/flooder/log", note)
            sent_in = time.monotonic() - started
            time.sleep(5)
            flooder.close()
            time.sleep(10)
            stop.set()
            sampler.join()
            after = proc.memory_info().rss
            counters = daemon.counters()
            mb = 1 << 20
            print(f"flood: {messages} x {size} B QoS 0 logs from one device, sent in {sent_in:.1f} s")
            print(f"daemon RSS idle {idle / mb:.0f} MB (baseline), peak {peak[0] / mb:.0f} MB "
                  f"({peak[0] / idle:.2f}x), after {after / mb:.0f} MB ({after / idle:.2f}x)")
            print(f"refused as flood: {counters.get('dropped_flood', 0)}, overload: {counters.get('dropped_overload', 0)}")
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
