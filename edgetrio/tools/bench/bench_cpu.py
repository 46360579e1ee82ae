"""What the gateway costs in CPU, idle and per reading, in each way it is deployed; and publish -> cloud latency.

    python -m edgetrio.tools.bench.bench_cpu [--devices 100] [--duration 8] [--cloud-rate 2000]

Modes, each a fresh gateway (and a fresh relay when linked) on loopback with --devices registered devices:
  unlinked            the daemon alone
  linked              the daemon linked to a relay (`--cloud`), as the README and `make demo` run it
  linked + HA         ... with `--ha` and a Home Assistant client subscribed to discovery
  linked + 10 rules   ... with 10 rules that judge every reading
  linked + dashboard  ... with a dashboard's live event stream open (read)
For each: idle CPU (devices connected, nothing sent) over --idle seconds, then 10 and 1,000 readings/s (bench_ingest's
load generator, QoS 1) for --duration seconds: CPU time inside the load's steady window, of the daemon (and of the
relay) from /proc, as a share of one core and per reading. The unlinked daemon is the baseline: every mode's CPU per
reading is also given as a ratio to it.
Last, publish -> committed in the cloud at --cloud-rate readings/s through a linked gateway: the relay's `received`
minus the reading's `ts` (one machine, one clock), p50 and p99.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgetrio.daemon import rulestore, store
from edgetrio.daemon.config import admin_credential
from edgetrio.tools.bench.bench_ingest import measure
from edgetrio.tools.demo import wait_for_daemon
from edgetrio.tools.testkit import ROOT

MODES = ("unlinked", "linked", "linked + HA", "linked + 10 rules", "linked + dashboard")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ten_rules() -> dict[str, Any]:
    return {"rule": [{"name": f"r{i}", "devices": ["dev-*"], "when": f"temperature > {60 + i}",
                      "severity": "warning", "actions": [{"set": {"led": True}}]} for i in range(10)], "schedule": []}


def start_relay(data: Path, stack: ExitStack) -> tuple[dict[str, Any], str, int]:
    token = json.loads(subprocess.run(
        [sys.executable, "-m", "edgetrio", "cloud", "node", "add", "bench-gw", "--json", "--data-dir", str(data)],
        check=True, capture_output=True, text=True, cwd=ROOT).stdout)["token"]
    relay = subprocess.Popen([sys.executable, "-m", "edgetrio", "cloud", "serve", "--data-dir", str(data), "--host",
                              "127.0.0.1", "--port", "0", "--log-level", "error", "--metrics-port", "-1"], cwd=ROOT)
    stack.callback(stop, relay)
    run_file = data / "relay.json"
    deadline = time.monotonic() + 30
    while not run_file.exists() or json.loads(run_file.read_text())["pid"] != relay.pid:
        if relay.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the relay did not start")
        time.sleep(0.05)
    return json.loads(run_file.read_text()), token, relay.pid


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def ha_client(port: int, secret: str, stack: ExitStack) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-ha")
    client.username_pw_set("integration:homeassistant", secret)
    def on_connect(c: mqtt.Client, *_a: Any) -> None:
        c.subscribe("homeassistant/#")
        c.publish("homeassistant/status", "online")
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    stack.callback(client.loop_stop)
    stack.callback(client.disconnect)


def dashboard_stream(http: str, credential: tuple[str, str], stack: ExitStack) -> None:
    """Log in as the gateway's admin and read its live event stream in a thread, as an open page does."""
    host, port = http.rsplit(":", 1)
    body = json.dumps({"name": credential[0], "password": credential[1]}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /api/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                  b"connection: close\r\n\r\n%s" % (len(body), body))
        reply = b"".join(iter(lambda: s.recv(65536), b""))
    cookie = next(line.split(b":", 1)[1].split(b";")[0].strip() for line in reply.split(b"\r\n")
                  if line.lower().startswith(b"set-cookie:"))
    stream = socket.create_connection((host, int(port)))
    stream.sendall(b"GET /api/stream HTTP/1.1\r\nhost: x\r\ncookie: " + cookie + b"\r\n\r\n")
    threading.Thread(target=lambda: [None for _ in iter(lambda: stream.recv(65536), b"")], daemon=True).start()
    stack.callback(stream.close)


def sample_cpu(pids: dict[str, int], duration: float, out: dict[str, Any]) -> None:
    """CPU time used inside the load's steady window: after its devices connected (the load settles 2 s), before it
    drains; connecting 100 devices (a password hash each) is not what a reading costs."""
    time.sleep(2.5)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    time.sleep(duration - 1.0)
    out["seconds"] = time.monotonic() - started
    out["used"] = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}


def run_mode(mode: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    row: dict[Any, Any] = {"mode": mode}
    with ExitStack() as stack:
        data = tmp / mode.replace(" ", "").replace("+", "-") / "gateway"
        db = store.open_db(data)
        creds = [(f"dev-{i:03d}", store.add_device(db, f"dev-{i:03d}")) for i in range(args.devices)]
        if "rules" in mode:
            rulestore.add_automations(db, ten_rules(), store.device_models(db))
        db.conn.commit()
        db.close()
        extra: list[str] = []
        pids: dict[str, int] = {}
        relay_dir = data.parent / "relay"
        if mode != "unlinked":
            info, token, pids["relay"] = start_relay(relay_dir, stack)
            extra += ["--cloud", info["edge_url"], "--node-id", "bench-gw", "--token", token]
        if "HA" in mode:
            extra.append("--ha")
        daemon = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data), "--mqtt-host",
                                   "127.0.0.1", "--mqtt-port", "0", "--log-level", "error", "--metrics-port", "-1",
                                   "--http-port", "0" if "dashboard" in mode else "-1", *extra], cwd=ROOT)
        stack.callback(stop, daemon)
        ready = wait_for_daemon(data, daemon)
        port = int(str(ready["mqtt_port"]))
        pids["daemon"] = daemon.pid
        if "HA" in mode:
            secret = json.loads(subprocess.run(
                [sys.executable, "-m", "edgetrio", "integration", "add", "homeassistant", "--json", "--data-dir",
                 str(data)], check=True, capture_output=True, text=True, cwd=ROOT).stdout)["password"]
            ha_client(port, secret, stack)
        if "dashboard" in mode:
            dashboard_stream(str(ready["http"]), admin_credential(data), stack)
        time.sleep(3)  # the link up, the rule set and discovery sent: what is measured next is the steady state
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(args.idle)
        row["idle"] = {name: (cpu_seconds(pid) - before[name]) / args.idle for name, pid in pids.items()}
        for rate in (10.0, 1000.0):
            window: dict[str, Any] = {}
            sampler = threading.Thread(target=sample_cpu, args=(pids, args.duration, window))
            sampler.start()
            result = measure("127.0.0.1", port, creds, "daemon", "fixed", rate, args.duration, None, 1)
            sampler.join()
            readings = rate * window["seconds"]
            row[rate] = {"share": {n: u / window["seconds"] for n, u in window["used"].items()},
                         "us_per_reading": {n: u / readings * 1e6 for n, u in window["used"].items()},
                         "throughput": result["throughput"]}
        if mode == "linked":
            row["cloud"] = cloud_latency(creds, port, args, relay_dir)
    return row


def cloud_latency(creds: list[tuple[str, str]], port: int, args: argparse.Namespace, relay_dir: Path) -> dict[str, Any]:
    started = time.time()
    result = measure("127.0.0.1", port, creds, "daemon", "fixed", args.cloud_rate, args.duration, None, 1)
    deadline = time.monotonic() + 60
    db = sqlite3.connect(relay_dir / "relay.db")
    while time.monotonic() < deadline:  # until every reading of the phase is in the cloud
        count = db.execute("SELECT count(*) FROM readings WHERE ts >= ?", [started]).fetchone()[0]
        if count >= result["published"]:
            break
        time.sleep(0.5)
    delays = sorted(r - t for r, t in db.execute("SELECT received, ts FROM readings WHERE ts >= ?", [started]))
    db.close()
    return {"published": result["published"], "in_cloud": len(delays),
            "p50_ms": statistics.median(delays) * 1000 if delays else float("nan"),
            "p99_ms": delays[int(len(delays) * 0.99) - 1] * 1000 if delays else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per rate")
    parser.add_argument("--idle", type=float, default=6.0, help="seconds of idle measured")
    parser.add_argument("--cloud-rate", type=float, default=2000.0)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    args = parser.parse_args()
    rows: list[dict[Any, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgetrio-bench-cpu-") as tmp:
        for mode in args.modes.split(","):
            print(f"{mode} ...", flush=True)
            rows.append(run_mode(mode.strip(), args, Path(tmp)))
    print(f"\n{args.devices} devices connected, QoS 1, {args.duration:g} s per rate, {os.cpu_count()} cores; "
          "CPU as % of one core (daemon / relay), us of CPU per reading (daemon / relay)\n")
    print(f"{'mode':<20} {'idle %':>12} {'10/s %':>12} {'1000/s %':>12} {'us/reading @1000/s':>20} {'ratio':>7}")
    base = rows[0][1000.0]["us_per_reading"]["daemon"] if rows and rows[0]["mode"] == "unlinked" else None

    def both(values: dict[str, float], scale: float, fmt: str) -> str:
        return " / ".join(format(values[n] * scale, fmt) for n in ("daemon", "relay") if n in values)

    for row in rows:
        per = row[1000.0]["us_per_reading"]
        ratio = f"{per['daemon'] / base:.2f}x" if base else "-"
        print(f"{row['mode']:<20} {both(row['idle'], 100, '.1f'):>12} {both(row[10.0]['share'], 100, '.1f'):>12} "
              f"{both(row[1000.0]['share'], 100, '.1f'):>12} {both(per, 1, '.0f'):>20} {ratio:>7}")
    for row in rows:
        if "cloud" in row:
            c = row["cloud"]
            print(f"\npublish -> committed in the cloud at {args.cloud_rate:,.0f} readings/s: {c['in_cloud']} of "
                  f"{c['published']} arrived, p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms")


if __name__ == "__main__":
    main()
