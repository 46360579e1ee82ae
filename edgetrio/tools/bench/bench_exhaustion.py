"""What the exhaustion guards cost ingest, and what an attack costs it, in one invocation.

    python -m edgetrio.tools.bench.bench_exhaustion [--devices 100] [--duration 8]

The gateway daemon saturated by bench_ingest's load (QoS 1, ~100-byte readings, every device keeping a window of
readings unacknowledged): alone (the baseline), then while an attacker with the gateway's admin credential opens
1,000 dashboard event streams and never reads them, while 64 clients flood /api/login with wrong passwords, and while
an admin adds a rule whose condition would backtrack for minutes (once a second, by the control channel). Prints
readings/s of each and the ratio to alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgetrio.daemon import store
from edgetrio.daemon.config import admin_credential
from edgetrio.daemon.control import ControlClient, ControlError
from edgetrio.tools.bench.bench_ingest import measure
from edgetrio.tools.demo import wait_for_daemon
from edgetrio.tools.testkit import ROOT


def streams(http: str, secret: str, stop: threading.Event) -> None:
    """1,000 event streams opened and never read (most are refused: 8 per account)."""
    host, port = http.rsplit(":", 1)
    opened = []
    for _ in range(1000):
        if stop.is_set():
            break
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(f"GET /api/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\n\r\n".encode())
            opened.append(sock)
        except OSError:
            pass
    stop.wait()
    for sock in opened:
        sock.close()


def login_flood(http: str, stop: threading.Event) -> None:
    """64 clients posting wrong passwords as fast as they are answered."""
    host, port = http.rsplit(":", 1)
    body = json.dumps({"name": "edgetrio-admin", "password": "guess"}).encode()

    def client() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=5) as sock:
                    sock.sendall(b"POST /api/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
                    while sock.recv(65536):
                        pass
            except OSError:
                pass
    threads = [threading.Thread(target=client, daemon=True) for _ in range(64)]
    for t in threads:
        t.start()
    stop.wait()


def backtracking_rule(data: Path, stop: threading.Event) -> None:
    """An admin adds a rule whose condition would take minutes in a backtracking regex engine, once a second, through
    the daemon's control channel as `edgetrio rule add` does (one connection: the attack is the rule, not the cost of
    starting a CLI process each second on the same two cores)."""
    doc = {"rule": [{"name": "evil", "devices": ["*"], "when": '"' + "a" * 40 + '!" =~ "(a|aa)+$"'}], "schedule": []}
    with ControlClient(data) as control:
        while not stop.is_set():
            with contextlib.suppress(ControlError):  # refused: what the guard does
                control.request("rule.add", {"doc": doc})
            stop.wait(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgetrio-bench-exhaustion-") as tmp:
        data = Path(tmp) / "gw"
        db = store.open_db(data)
        creds = [(f"dev-{i:03d}", store.add_device(db, f"dev-{i:03d}")) for i in range(args.devices)]
        db.conn.commit()
        db.close()
        daemon = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data), "--mqtt-host",
                                   "127.0.0.1", "--mqtt-port", "0", "--log-level", "error", "--metrics-port", "-1",
                                   "--http-port", "0"], cwd=ROOT)
        try:
            info = wait_for_daemon(data, daemon)
            port, http = int(str(info["mqtt_port"])), str(info["http"])
            secret = admin_credential(data)[1]
            attacks: list[tuple[str, Callable[[threading.Event], None] | None]] = [
                ("alone", None), ("1,000 unread streams", lambda s: streams(http, secret, s)),
                ("64-client login flood", lambda s: login_flood(http, s)),
                ("a backtracking rule added", lambda s: backtracking_rule(data, s)), ("alone again", None)]
            rates = {}
            for name, attack in attacks:
                print(f"{name} ...", flush=True)
                stop = threading.Event()
                thread = threading.Thread(target=attack, args=(stop,), daemon=True) if attack else None
                if thread:
                    thread.start()
                    time.sleep(1)  # the attack under way before the load starts
                rates[name] = measure("127.0.0.1", port, creds, "daemon", "saturated", 0.0, args.duration, None,
                                      1)["throughput"]
                stop.set()
                if thread:
                    thread.join(timeout=30)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    base = (rates["alone"] + rates["alone again"]) / 2
    print(f"\n{args.devices} devices, QoS 1, saturated, {args.duration:g} s each; baseline = the mean of the two runs alone")
    for name, rate in rates.items():
        print(f"{name:<28} {rate:>8,.0f} readings/s  {rate / base:.2f}x")


if __name__ == "__main__":
    main()
