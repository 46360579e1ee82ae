"""Ingest benchmark: the gateway daemon against a standalone amqtt broker, same load, one invocation.

    python -m edgetrio.tools.bench.bench_ingest [--devices 100] [--duration 8] [--rate 1000]

Load: N device connections (paho, driven from one selector loop per load process), QoS 1, ~100-byte JSON readings.
Every device keeps at most WINDOW readings unconfirmed: confirmed means delivered to the subscriber (baseline) or
acknowledged by the daemon after the commit, so both systems are driven at what they can finish, not what they
can queue.
- baseline: a standalone amqtt 0.12.1 broker with only an auth plugin; one subscriber receives everything.
  Latency = publish -> delivery to the subscriber.
- daemon: `edgetrio daemon` with its own credentials, ACL, ingest and SQLite (WAL, synchronous=FULL).
  Latency = publish -> the daemon's `ack` for that reading (committed to SQLite and reported back).
Two phases each: saturated (every device keeps a window of unconfirmed readings full) and a fixed total rate.
Peak RSS is the server process's VmHWM. Prints a table and the ratios daemon/baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[3]  # the checkout
WINDOW = 10  # unconfirmed readings per device in the saturated phase
WAVE = 50  # connections opened at once
# The baseline's subscriber takes delivery at QoS 0 (amqtt delivers at the subscription's QoS): the cheapest
# delivery amqtt offers, so the baseline is as fast as it gets and the ratio is conservative.
SUBSCRIBER_QOS = 0


# -- servers ----------------------------------------------------------------------------------------------------------

def serve_baseline(port: int) -> None:
    """A standalone amqtt broker with only an auth plugin (username required), as a user would run it."""
    from amqtt.broker import Broker

    async def main() -> None:
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}}}
        broker = Broker(config)
        await broker.start()
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await broker.shutdown()

    import logging

    logging.disable(logging.CRITICAL)
    asyncio.run(main())


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- load ------------------------------------------------------------------------------------------------------------

class Device:
    def __init__(self, device_id: str, password: str, mode: str, vary: bool = False, batch: int = 1) -> None:
        self.id = device_id
        self.batch = batch  # readings per message (a board catching up sends batches)
        self.vary = vary  # values that move like a sensor's (a random walk at the BME280's resolution)
        self.values = {"temperature": 21.5, "humidity": 40.2}
        self.mode = mode
        self.seq = 0
        self.sent_at: dict[int, float] = {}
        self.confirmed = 0  # acked (daemon) or PUBACKed (baseline)
        self.latencies: list[float] = []
        self.results: list[tuple[float, float]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.username_pw_set(device_id, password)
        self.client.max_inflight_messages_set(WINDOW * 2)
        self.client.on_message = self.on_message
        self.client.on_publish = self.on_publish
        self.pubacked = 0
        self.boot = int(time.time() * 1000) % 1_000_000_000  # a fresh boot per phase: no seq seen before

    def on_publish(self, *_args: Any) -> None:
        self.pubacked += 1

    def on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        seq = json.loads(message.payload)["seq"]
        now = time.monotonic()
        for s in range(self.confirmed + 1, seq + 1):
            sent = self.sent_at.pop(s, None)
            if sent is not None:
                self.results.append((now, now - sent))
        self.confirmed = max(self.confirmed, seq)

    def outstanding(self) -> int:
        return self.seq - self.confirmed

    def publish(self) -> None:
        readings = []
        for _ in range(self.batch):
            self.seq += 1
            if self.vary:
                self.values = {"temperature": round(self.values["temperature"] + random.choice((-0.01, 0, 0.01)), 2),
                               "humidity": round(self.values["humidity"] + random.choice((-0.02, 0, 0.02)), 2)}
            readings.append(json.dumps({"boot": self.boot, "seq": self.seq, "ts": round(time.time(), 3),
                                        "values": self.values, "t0": time.monotonic()}).ljust(100))
            self.sent_at[self.seq] = time.monotonic()
        payload = readings[0] if self.batch == 1 else '{"batch": [' + ", ".join(readings) + "]}"
        self.client.publish(f"edgetrio/{self.id}/telemetry", payload, qos=1)


def run_load(host: str, port: int, creds: list[tuple[str, str]], mode: str, phase: str, rate: float,
             duration: float, subscriber: tuple[str, str] | None, out: Any, vary: bool = False,
             batch: int = 1) -> None:
    """One load process: connect its devices, drive them for `duration`, report latencies in the window."""
    devices = [Device(d, pw, mode, vary, batch) for d, pw in creds]
    clients = [d.client for d in devices]
    deliveries: list[tuple[float, float]] = []
    if subscriber:
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=subscriber[0])
        sub.username_pw_set(*subscriber)

        by_id = {d.id: d for d in devices}

        def delivered(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
            now = time.monotonic()
            deliveries.append((now, now - json.loads(message.payload)["t0"]))
            by_id[message.topic.split("/")[1]].confirmed += 1
        sub.on_message = delivered
        sub.on_connect = lambda c, *_a: c.subscribe([(f"edgetrio/{d.id}/telemetry", SUBSCRIBER_QOS) for d in devices])
        clients.append(sub)
    for device in devices:
        if mode == "daemon":
            device.client.on_connect = lambda c, u, f, r, p, d=device: c.subscribe(f"edgetrio/{d.id}/ack", qos=1)
    selector = selectors.DefaultSelector()

    def pump(timeout: float) -> None:
        for client in clients:
            if client.want_write():
                client.loop_write()
        for key, _ in selector.select(timeout):
            key.data.loop_read()

    # connect in waves, each logged in before the next: the daemon lets at most 64 connections from one address wait
    # for their login (a flood guard), and a device refused there would send nothing in the measurement
    for first in range(0, len(clients), WAVE):
        for client in clients[first:first + WAVE]:
            client.connect(host, port, keepalive=60)
            sock = client.socket()
            assert sock is not None
            selector.register(sock, selectors.EVENT_READ, client)
        deadline = time.monotonic() + 30
        while not all(c.is_connected() for c in clients[first:first + WAVE]) and time.monotonic() < deadline:
            pump(0.01)
    connected = [c for c in clients if c.is_connected()]
    if len(connected) < len(clients):
        print(f"warning: {len(clients) - len(connected)} of {len(clients)} clients did not connect", flush=True)
    settle = time.monotonic() + 2
    while time.monotonic() < settle:
        pump(0.01)
    start = time.monotonic()
    end = start + duration
    interval = len(devices) / rate if rate and devices else 0.0
    next_at = [start + i * interval / max(len(devices), 1) for i in range(len(devices))]
    while (now := time.monotonic()) < end:
        for i, device in enumerate(devices):
            if rate:
                if now >= next_at[i]:
                    device.publish()
                    next_at[i] += interval
            else:
                while device.outstanding() < WINDOW * device.batch:  # the same messages in flight
                    device.publish()
        # block in select until a socket is readable or the next reading is due: a spinning load generator
        # would take the CPU the server under test needs
        wait = max(0.0, min(next_at) - time.monotonic()) if rate and devices else 0.005
        pump(min(wait, 0.005))
    drain = time.monotonic() + 3
    while time.monotonic() < drain:
        pump(0.01)
    for client in clients:
        client.loop_misc()
    samples = deliveries if mode == "baseline" else [r for d in devices for r in d.results]
    in_window = [lat for at, lat in samples if start <= at <= end]
    out.put({"published": sum(d.seq for d in devices), "confirmed": len(in_window), "latencies": in_window,
             "duration": duration})
    for client in clients:
        client.disconnect()


def measure(host: str, port: int, creds: list[tuple[str, str]], mode: str, phase: str, rate: float,
            duration: float, subscriber: tuple[str, str] | None, processes: int, vary: bool = False,
            batch: int = 1) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    per = [creds[i::processes] for i in range(processes)]
    # each load process has its own subscriber (baseline) for its own devices, so windows close on delivery
    procs = [ctx.Process(target=run_load, args=(host, port, chunk, mode, phase, rate / processes, duration,
                                                 (f"{subscriber[0]}-{i}", subscriber[1]) if subscriber else None, out,
                                                 vary, batch))
             for i, chunk in enumerate(per)]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration + 60) for _ in procs]
    for p in procs:
        p.join()
    latencies = sorted(lat for r in results for lat in r["latencies"])
    done = len(latencies)
    return {
        "throughput": done / duration,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan"),
        "published": sum(r["published"] for r in results),
    }


# -- main --------------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="total msg/s of the fixed-rate phase")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--serve-baseline", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return

    rows: dict[str, dict[str, Any]] = {}
    # baseline: standalone amqtt
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "edgetrio.tools.bench.bench_ingest", "--serve-baseline", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    creds = [(f"dev-{i:03d}", "x") for i in range(args.devices)]
    for phase, rate in (("saturated", 0.0), ("fixed", args.rate)):
        print(f"baseline amqtt, {phase} ...", flush=True)
        rows[f"baseline {phase}"] = measure("127.0.0.1", port, creds, "baseline", phase, rate, args.duration,
                                           ("bench-subscriber", "x"), args.processes)
    rows["baseline saturated"]["rss_mb"] = rows["baseline fixed"]["rss_mb"] = peak_rss_mb(server.pid)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)

    # the daemon
    from edgetrio.daemon import store

    with tempfile.TemporaryDirectory(prefix="edgetrio-bench-") as tmp:
        data = Path(tmp) / "data"
        db = store.open_db(data)
        creds = [(f"dev-{i:03d}", store.add_device(db, f"dev-{i:03d}")) for i in range(args.devices)]
        db.conn.commit()
        db.close()
        daemon = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data), "--mqtt-host",
                                   "127.0.0.1", "--mqtt-port", "0", "--log-level", "error"], cwd=ROOT)
        from edgetrio.tools.demo import wait_for_daemon

        info = wait_for_daemon(data, daemon)
        dport = int(str(info["mqtt_port"]))
        for phase, rate in (("saturated", 0.0), ("fixed", args.rate)):
            print(f"edgetrio daemon, {phase} ...", flush=True)
            rows[f"daemon {phase}"] = measure("127.0.0.1", dport, creds, "daemon", phase, rate, args.duration,
                                             None, args.processes)
        rows["daemon saturated"]["rss_mb"] = rows["daemon fixed"]["rss_mb"] = peak_rss_mb(daemon.pid)
        db = store.open_db(data)
        stored = store.reading_count(db)
        db.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)

    print(f"\n{args.devices} devices, QoS 1, 100-byte readings, {args.duration:g} s per phase, "
          f"{os.cpu_count()} cores, load from {args.processes} processes\n")
    print(f"{'run':<22} {'msg/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'peak RSS MB':>12}")
    for name, row in rows.items():
        print(f"{name:<22} {row['throughput']:>9.0f} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} {row['rss_mb']:>12.1f}")
    for phase in ("saturated", "fixed"):
        base, ours = rows[f"baseline {phase}"], rows[f"daemon {phase}"]
        print(f"ratio daemon/baseline {phase}: throughput {ours['throughput'] / base['throughput']:.2f}x, "
              f"p50 {ours['p50_ms'] / base['p50_ms']:.2f}x, p99 {ours['p99_ms'] / base['p99_ms']:.2f}x, "
              f"peak RSS {ours['rss_mb'] / base['rss_mb']:.2f}x")
    print(f"daemon stored {stored} readings in SQLite")


if __name__ == "__main__":
    main()
