"""The gateway under a crowd, against mosquitto and a standalone amqtt, in one invocation.

    python -m edgetrio.tools.bench.bench_crowd [--rounds 3] [--before PATH] [--scenarios crowd,saturated,idle]

Scenarios (each server fresh for each, servers taken in turn, the order reversed every other round):
- crowd: 500 devices (--devices) at 2,000 msg/s in all (--rate), QoS 1, bench_ingest's ~100-byte readings.
  Latency: publish -> delivery to a subscriber (mosquitto, amqtt: no durability), publish -> the daemon's `ack`
  (committed with synchronous=FULL, then acknowledged). Peak RSS: the server's VmHWM after the phase.
- saturated: 100 devices (--saturated-devices), each keeping 10 readings unconfirmed; msg/s confirmed.
  --load-processes N splits the devices over N load processes (the generator is Python too).
- idle: 2,000 devices (--idle-devices) connected, nothing sent: the server's RSS with them all connected.
Servers: mosquitto (2.0, anonymous, no persistence), amqtt 0.12.1 standalone (username required), `daemon` (this
checkout) and `before` (the daemon of another checkout, --before PATH: a git worktree of the code before a change,
run with the same interpreter). For the daemons the per-stage histograms of /metrics (`edgetrio_stage_seconds`, when
the daemon has them) are printed: where a reading's time went.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgetrio.tools.bench.bench_ingest import ROOT, free_port, measure, peak_rss_mb
from edgetrio.tools.bench.bench_relay import raise_fd_limit, rss_mb
from edgetrio.tools.demo import wait_for_daemon


class Server:
    """One server under test, started fresh: its MQTT port, the credentials of `devices` devices, its process."""

    def __init__(self, kind: str, devices: int, before: Path | None, tmp: Path) -> None:
        self.kind, self.tmp = kind, tmp
        self.port = free_port()
        self.metrics_port = 0
        self.creds = [(f"dev-{i:04d}", "x") for i in range(devices)]
        self.subscriber: tuple[str, str] | None = ("bench-subscriber", "x")
        if kind == "mosquitto":
            conf = tmp / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                            "max_queued_messages 100000\nlog_type none\n")
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            self._wait_port()
        elif kind == "amqtt":
            self.proc = subprocess.Popen([sys.executable, "-m", "edgetrio.tools.bench.bench_ingest", "--serve-baseline",
                                          str(self.port)], cwd=ROOT, stdout=subprocess.PIPE)
            assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == b"ready"
        else:
            from edgetrio.daemon import store

            data = tmp / "data"
            db = store.open_db(data)
            self.creds = [(d, store.add_device(db, d)) for d, _ in self.creds]
            db.conn.commit()
            db.close()
            self.subscriber = None
            self.metrics_port = free_port()
            tree = before if kind == "before" and before is not None else ROOT
            self.proc = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data),
                                          "--mqtt-host", "127.0.0.1", "--mqtt-port", str(self.port), "--log-level",
                                          "error", "--metrics-port", str(self.metrics_port), "--http-port", "-1"],
                                         cwd=tree)
            wait_for_daemon(data, self.proc)

    def _wait_port(self) -> None:
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not listen")

    @property
    def mode(self) -> str:
        return "daemon" if self.subscriber is None else "baseline"

    def stages(self) -> dict[str, dict[str, float]]:
        """The daemon's per-stage histograms (edgetrio_stage_seconds): {stage: {le: cumulative count}}."""
        if not self.metrics_port:
            return {}
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        except OSError:
            return {}
        out: dict[str, dict[str, float]] = {}
        for line in text.splitlines():
            if line.startswith("edgetrio_stage_seconds_bucket{"):
                labels, value = line[len("edgetrio_stage_seconds_bucket{"):].split("} ")
                parts = dict(p.split("=") for p in labels.split(","))
                out.setdefault(parts["stage"].strip('"'), {})[parts["le"].strip('"')] = float(value)
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def server(kind: str, devices: int, before: Path | None) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="edgetrio-crowd-") as tmp:
        s = Server(kind, devices, before, Path(tmp))
        try:
            yield s
        finally:
            s.stop()


def quantile(counts: dict[str, float], q: float) -> str:
    """The bucket bound below which a fraction q of a histogram's observations fell."""
    total = counts.get("+Inf", 0.0)
    if not total:
        return "-"
    for bound, count in sorted(((float(b), c) for b, c in counts.items()), key=lambda x: x[0]):
        if count >= q * total:
            return f"<={bound * 1000:g}" if bound != float("inf") else ">max"
    return "-"


def idle_rss(host: str, port: int, creds: list[tuple[str, str]], pid: int, out: Any) -> None:
    """Connect every device (in waves: servers bound logins in progress), wait, report the server's RSS."""
    connected: set[str] = set()
    clients = []
    selector = selectors.DefaultSelector()
    for start in range(0, len(creds), 50):
        wave = []
        for device, password in creds[start:start + 50]:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device)
            client.username_pw_set(device, password)
            client.on_connect = lambda c, u, f, r, p, d=device: connected.add(d) if not r.is_failure else None
            client.connect(host, port, keepalive=600)
            sock = client.socket()
            assert sock is not None
            selector.register(sock, selectors.EVENT_READ, client)
            wave.append(client)
        clients += wave
        deadline = time.monotonic() + 30
        while len(connected) < len(clients) and time.monotonic() < deadline:
            for client in wave:
                if client.want_write():
                    client.loop_write()
            for key, _ in selector.select(0.01):
                key.data.loop_read()
    settle = time.monotonic() + 3
    while time.monotonic() < settle:
        for key, _ in selector.select(0.05):
            key.data.loop_read()
    out.put({"connected": len(connected), "rss_mb": rss_mb(pid), "peak_mb": peak_rss_mb(pid)})
    for client in clients:
        client.disconnect()


def run(kind: str, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    devices = {"crowd": args.devices, "saturated": args.saturated_devices, "idle": args.idle_devices}[scenario]
    with server(kind, devices, args.before) as s:
        if scenario == "idle":
            ctx = mp.get_context("fork")
            out = ctx.Queue()
            proc = ctx.Process(target=idle_rss, args=("127.0.0.1", s.port, s.creds, s.proc.pid, out))
            proc.start()
            row = out.get(timeout=600)
            proc.join()
            return row
        rate = args.rate if scenario == "crowd" else 0.0
        processes = args.load_processes if scenario == "saturated" else 1
        row = measure("127.0.0.1", s.port, s.creds, s.mode, scenario, rate, args.duration, s.subscriber, processes)
        row["peak_mb"] = peak_rss_mb(s.proc.pid)
        row["stages"] = s.stages()
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", default="crowd,saturated,idle")
    parser.add_argument("--servers", default="mosquitto,amqtt,daemon", help="of: mosquitto, amqtt, daemon, before")
    parser.add_argument("--before", type=Path, help="a checkout of the code before (its daemon is server 'before')")
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--saturated-devices", type=int, default=100)
    parser.add_argument("--load-processes", type=int, default=1)
    parser.add_argument("--idle-devices", type=int, default=2000)
    args = parser.parse_args()
    servers = args.servers.split(",")
    if "before" in servers and args.before is None:
        parser.error("server 'before' needs --before PATH")
    raise_fd_limit()  # 2,000 devices and the servers' ends of them
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):
        for scenario in args.scenarios.split(","):
            for kind in servers if round_ % 2 == 0 else servers[::-1]:
                print(f"round {round_ + 1}: {scenario} on {kind} ...", flush=True)
                row = run(kind, scenario, args)
                results.setdefault((scenario, kind), []).append(row)
                print("   ", json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                                         for k, v in row.items() if k != "stages"}), flush=True)
                for stage, counts in row.get("stages", {}).items():
                    print(f"    stage {stage:<16} p50 {quantile(counts, 0.5):>8} ms  p99 {quantile(counts, 0.99):>8} ms  "
                          f"n={counts.get('+Inf', 0):.0f}")

    print(f"\n{os.cpu_count()} cores; {args.rounds} round(s); each figure per round, then the median\n")
    for scenario in args.scenarios.split(","):
        for kind in servers:
            rows = results[(scenario, kind)]
            if scenario == "crowd":
                text = "  ".join(f"p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms {r['throughput']:.0f}/s "
                                 f"RSS {r['peak_mb']:.1f}" for r in rows)
                summary = f"median p99 {statistics.median(r['p99_ms'] for r in rows):.1f} ms, " \
                          f"peak RSS {statistics.median(r['peak_mb'] for r in rows):.1f} MB"
            elif scenario == "saturated":
                text = "  ".join(f"{r['throughput']:.0f}/s" for r in rows)
                summary = f"median {statistics.median(r['throughput'] for r in rows):.0f} msg/s"
            else:
                text = "  ".join(f"{r['connected']} conn RSS {r['rss_mb']:.1f} MB" for r in rows)
                summary = f"median RSS {statistics.median(r['rss_mb'] for r in rows):.1f} MB"
            print(f"{scenario:<10} {kind:<10} {text}  | {summary}")
    if "saturated" in args.scenarios and "mosquitto" in servers:
        base = [r["throughput"] for r in results[("saturated", "mosquitto")]]
        for kind in servers:
            if kind != "mosquitto":
                ratios = [r["throughput"] / b for r, b in zip(results[("saturated", kind)], base, strict=True)]
                print(f"saturated {kind}/mosquitto per round: " + ", ".join(f"{x:.2f}x" for x in ratios))


if __name__ == "__main__":
    main()
