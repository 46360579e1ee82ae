"""What rules cost durable ingest, and how fast a rule acts, in one invocation.

    python -m edgetrio.tools.bench.bench_rules [--devices 100] [--duration 8] [--rounds 2]

1. Throughput: the daemon saturated (as bench_ingest, the values moving like a sensor's) with no rules (the
   baseline) and with 100 rules, alternated (the machine drifts): a) 100 rules each watching its own device, half
   of them with a 30 s window and aggregates; b) 100 rules watching every device, the same mix (every reading is
   judged by all 100).
2. Rule-to-action latency: 1,000 readings/s from the load devices while one more device alternates hot and cool
   readings; a rule (for 0, cooldown 0) sets led=true when hot and false when cool. Latency = the hot reading's
   publish -> the device receiving its desired state. p50 and p99.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgetrio.daemon import rulestore, store
from edgetrio.tools.bench.bench_ingest import measure
from edgetrio.tools.demo import wait_for_daemon
from edgetrio.tools.testkit import ROOT


def rule_set(devices: list[str], every_device: bool) -> dict[str, Any]:
    rules = []
    for i in range(100):
        rule: dict[str, Any] = {"name": f"r{i:03d}", "devices": ["dev-*"] if every_device else [devices[i % len(devices)]],
                                "when": f"temperature > {60 + i} and humidity < 90", "severity": "warning",
                                "actions": [{"set": {"led": True}}]}
        if i % 2:
            rule.update(window="30s", when=f"avg_temperature > {60 + i} or delta_humidity > 50")
        rules.append(rule)
    return {"rule": rules, "schedule": []}


def start_daemon(data: Path, devices: int, doc: dict[str, Any] | None) -> tuple[subprocess.Popen[bytes], dict[str, Any],
                                                                                  list[tuple[str, str]]]:
    db = store.open_db(data)
    creds = [(f"dev-{i:03d}", store.add_device(db, f"dev-{i:03d}")) for i in range(devices)]
    if doc is not None:
        rulestore.add_automations(db, doc, store.device_models(db))
    db.conn.commit()
    db.close()
    daemon = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data), "--mqtt-host",
                               "127.0.0.1", "--mqtt-port", "0", "--log-level", "error", "--metrics-port", "-1",
                               "--http-port", "-1"], cwd=ROOT)
    return daemon, wait_for_daemon(data, daemon), creds


def saturated(devices: int, duration: float, doc: dict[str, Any] | None) -> float:
    with tempfile.TemporaryDirectory(prefix="edgetrio-bench-rules-") as tmp:
        daemon, info, creds = start_daemon(Path(tmp) / "data", devices, doc)
        try:
            row = measure("127.0.0.1", int(info["mqtt_port"]), creds, "daemon", "saturated", 0.0, duration, None, 1,
                          vary=True)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        return float(row["throughput"])


def latency(devices: int, duration: float) -> tuple[float, float, int]:
    """p50 and p99 ms from a hot reading to the desired state that the rule sets, under 1,000 readings/s."""
    doc = {"rule": [{"name": "hot", "devices": ["probe"], "when": "temperature > 30", "cooldown": 0,
                     "actions": [{"set": {"led": True}}], "on_clear": [{"set": {"led": False}}]}], "schedule": []}
    with tempfile.TemporaryDirectory(prefix="edgetrio-bench-rules-") as tmp:
        data = Path(tmp) / "data"
        db = store.open_db(data)
        secret = store.add_device(db, "probe")
        db.conn.commit()
        db.close()
        daemon, info, creds = start_daemon(data, devices, doc)
        port = int(info["mqtt_port"])
        desired: queue.Queue[tuple[float, bool]] = queue.Queue()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe")
        client.username_pw_set("probe", secret)
        client.on_message = lambda _c, _u, m: desired.put((time.monotonic(), json.loads(m.payload)["state"].get("led")))
        client.connect("127.0.0.1", port)
        client.loop_start()
        client.subscribe("edgetrio/probe/twin/desired", qos=1)
        time.sleep(0.5)
        ctx = mp.get_context("fork")
        load = ctx.Process(target=measure, args=("127.0.0.1", port, creds, "daemon", "rate", 1000.0, duration + 2,
                                                 None, 1, True))
        load.start()
        samples: list[float] = []
        try:
            time.sleep(1.0)
            end, seq = time.monotonic() + duration, 0
            while time.monotonic() < end:
                for hot in (True, False):
                    seq += 1
                    sent = time.monotonic()
                    client.publish("edgetrio/probe/telemetry", json.dumps({
                        "boot": 1, "seq": seq, "ts": time.time(), "values": {"temperature": 35.0 if hot else 20.0}}),
                        qos=1)
                    while True:
                        got, led = desired.get(timeout=10)
                        if led is hot:
                            break
                    if hot:
                        samples.append(got - sent)
                    time.sleep(0.05)
        finally:
            load.join(timeout=duration + 60)
            client.loop_stop()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    samples.sort()
    return samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99) - 1] * 1000, len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2, help="baseline/rules triples, alternated")
    args = parser.parse_args()
    names = [f"dev-{i:03d}" for i in range(args.devices)]
    none, own, every = [], [], []
    for i in range(args.rounds):
        none.append(saturated(args.devices, args.duration, None))
        own.append(saturated(args.devices, args.duration, rule_set(names, every_device=False)))
        every.append(saturated(args.devices, args.duration, rule_set(names, every_device=True)))
        print(f"round {i + 1}: no rules {none[-1]:.0f} msg/s; 100 rules, one device each {own[-1]:.0f}; "
              f"100 rules on every device {every[-1]:.0f}", flush=True)
    for label, runs in (("100 rules, one device each", own), ("100 rules on every device", every)):
        ratios = sorted(r / n for r, n in zip(runs, none, strict=True))
        print(f"durable ingest with {label} / without: {sum(runs) / sum(none):.3f}x overall, per round "
              f"{ratios[0]:.2f}-{ratios[-1]:.2f}x, median {statistics.median(ratios):.2f}x"
              + (" (aim: at least 0.9x)" if runs is own else ""))
    p50, p99, n = latency(args.devices, args.duration)
    print(f"rule-to-action latency at 1,000 readings/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({n} firings)")


if __name__ == "__main__":
    main()
