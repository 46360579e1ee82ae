"""`edgetrio demo`: a daemon with simulated sensor nodes, showing readings arriving and stored."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon import store
from daemon.config import RUN_FILE
from tools.simdevice import SimDevice


def wait_for_daemon(data_dir: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> dict[str, object]:
    """Wait until the daemon in data_dir is ready and return its run file."""
    deadline = time.monotonic() + timeout
    run_file = data_dir / RUN_FILE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {proc.returncode}")
        if run_file.exists():
            info: dict[str, object] = json.loads(run_file.read_text())
            if info.get("pid") == proc.pid:
                return info
        time.sleep(0.05)
    raise TimeoutError("the daemon did not become ready")


def demo_credentials(data_dir: Path, count: int) -> dict[str, str]:
    """Register sim-1..sim-N once; their passwords are kept in the demo's data dir so a rerun reuses them."""
    path = data_dir / "demo-devices.json"
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    db = store.open_db(data_dir)
    for i in range(1, count + 1):
        device_id = f"sim-{i}"
        if device_id in known and store.get_device(db, device_id):
            continue
        with db.atomic():
            if store.get_device(db, device_id):
                store.remove_device(db, device_id)
            known[device_id] = store.add_device(db, device_id)
    path.write_text(json.dumps(known))
    db.close()
    return {k: v for k, v in known.items() if int(k.split("-")[1]) <= count}


def start_relay(relay_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """Start the cloud relay with a node for the demo gateway (its token kept for reruns)."""
    from cloud import store as cloud_store

    node_file = relay_dir / "demo-node.json"
    db = cloud_store.open_db(relay_dir)
    if not node_file.exists() or cloud_store.get_node(db, "demo-gw") is None:
        with db.atomic():
            if cloud_store.get_node(db, "demo-gw") is not None:
                db.execute("DELETE FROM nodes WHERE name = 'demo-gw'")
            node_file.write_text(json.dumps({"node": "demo-gw", "token": cloud_store.add_node(db, "demo-gw")}))
    db.close()
    (relay_dir / "relay.json").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "cloud", "serve", "--data-dir", str(relay_dir),
                             "--host", "127.0.0.1", "--port", "0", "--log-level", "warning"])
    deadline = time.monotonic() + 30
    while not (relay_dir / "relay.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the relay did not start")
        time.sleep(0.05)
    info = json.loads((relay_dir / "relay.json").read_text())
    return proc, {**info, **json.loads(node_file.read_text())}


def run_demo(data_dir: Path, count: int, duration: float) -> None:
    relay_dir = data_dir / "relay"
    data_dir = data_dir / "gateway"
    print(f"edgetrio demo: cloud relay in {relay_dir}/, gateway in {data_dir}/, {count} simulated devices; "
          "Ctrl-C stops", flush=True)
    credentials = demo_credentials(data_dir, count)
    relay, cloud = start_relay(relay_dir)
    print(f"relay pid {relay.pid}: edges dial {cloud['edge_url']}, operators use {cloud['api_url']}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "daemon", "--data-dir", str(data_dir),
                             "--mqtt-host", "127.0.0.1", "--mqtt-port", "0", "--log-level", "warning",
                             "--cloud", cloud["edge_url"], "--node-id", cloud["node"], "--token", cloud["token"]])
    devices: list[SimDevice] = []
    try:
        info = wait_for_daemon(data_dir, proc)
        host, port = str(info["mqtt_host"]), int(str(info["mqtt_port"]))
        print(f"daemon pid {proc.pid} listening for MQTT on {host}:{port}", flush=True)
        devices = [SimDevice(d, pw, host, port, boot=int(time.time()) % 100000).start()
                   for d, pw in credentials.items()]
        db = store.open_db(data_dir)
        from cloud import store as cloud_store

        cloud_db = cloud_store.open_db(relay_dir)
        started = time.monotonic()
        tick = 0
        while not duration or time.monotonic() - started < duration:
            for device in devices:
                device.read()
            tick += 1
            if tick % 3 == 0:
                for device in devices:
                    last = store.query_readings(db, device.device_id, limit=1)
                    values = last[0]["values"] if last else {}
                    in_cloud = cloud_db.execute("SELECT count(*) FROM readings WHERE node = ? AND device = ?",
                                                ["demo-gw", device.device_id]).fetchone()[0]
                    print(f"  {device.device_id}: stored at the edge {store.reading_count(db, device.device_id):>6}, "
                          f"in the cloud {in_cloud:>6}  acked seq {device.acked:>5}  last {values}", flush=True)
            time.sleep(1)
        print(f"try: edgetrio readings sim-1 --data-dir {data_dir} --limit 5\n"
              f"     edgetrio cloud readings demo-gw sim-1 --data-dir {relay_dir} --limit 5", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for device in devices:
            device.stop()
        for child in (proc, relay):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        print("demo stopped", flush=True)
