"""`edgetrio demo`: a daemon with simulated sensor nodes, showing readings arriving and stored."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from edgetrio.cloud import store as cloud_store
from edgetrio.daemon import store
from edgetrio.daemon.config import RUN_FILE, admin_credential


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


# The demo's rule set, applied from the cloud: a board above 30 C for 5 s raises an alert and turns its LED on
DEMO_RULES: dict[str, Any] = {"rule": [{
    "name": "demo-hot", "devices": ["vdev-*"], "when": "temperature > 30", "clear": "temperature < 28", "for": "5s",
    "cooldown": "10s", "severity": "warning", "actions": [{"set": {"led": True}}],
    "on_clear": [{"set": {"led": False}}]}], "schedule": []}


def edgetrio(*args: str) -> Any:
    """Run an `edgetrio ... --json` command as a user would, and return what it printed (its error, if it failed)."""
    done = subprocess.run([sys.executable, "-m", "edgetrio", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        try:
            message = json.loads(done.stderr)["error"]
        except (ValueError, KeyError):
            message = done.stderr.strip() or f"exit code {done.returncode}"
        raise RuntimeError(f"`edgetrio {' '.join(args)}` failed: {message}")
    return json.loads(done.stdout)


def start_relay(relay_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start the cloud relay, and set it up through its CLI as an operator would: a node for the demo gateway, an
    admin account for the dashboard, and the demo's rule set (the token and password are kept for reruns)."""
    relay_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (relay_dir / "relay.json").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "edgetrio", "cloud", "serve", "--data-dir", str(relay_dir),
                             "--host", "127.0.0.1", "--port", "0", "--log-level", "warning",
                             "--metrics-port", "0"], **CHILD)  # free ports: the demo takes no default a service needs
    deadline = time.monotonic() + 30
    while not (relay_dir / "relay.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the relay did not start")
        time.sleep(0.05)
    try:
        return proc, {**json.loads((relay_dir / "relay.json").read_text()), **set_up_relay(relay_dir)}
    except BaseException:
        proc.terminate()
        proc.wait()
        raise


def set_up_relay(relay_dir: Path) -> dict[str, Any]:
    """The demo's node, dashboard account and rule set, made through the CLI once and kept for reruns."""
    data = ("--data-dir", str(relay_dir))
    node_file = relay_dir / "demo-node.json"
    if not node_file.exists():
        try:
            token = edgetrio("cloud", "node", "add", "demo-gw", *data)["token"]
        except RuntimeError:  # the node is there, its token file is not: a new token
            token = edgetrio("cloud", "node", "rotate", "demo-gw", *data)["token"]
        node_file.write_text(json.dumps({"node": "demo-gw", "token": token}))
        node_file.chmod(0o600)
    login_file = relay_dir / "demo-login.json"
    if not login_file.exists():
        if any(u["name"] == "demo" for u in edgetrio("cloud", "user", "list", *data)):
            edgetrio("cloud", "user", "remove", "demo", *data)
        made = edgetrio("cloud", "user", "add", "demo", "--role", "admin", *data)
        login_file.write_text(json.dumps({"name": "demo", "password": made["password"]}))
        login_file.chmod(0o600)
    if edgetrio("cloud", "rules", "show", "demo-gw", *data)["doc"] != DEMO_RULES:  # sent when the gateway connects
        rules_file = relay_dir / "demo-rules.json"
        rules_file.write_text(json.dumps(DEMO_RULES, indent=2))
        edgetrio("cloud", "rules", "apply", "demo-gw", str(rules_file), *data)
    return {**json.loads(node_file.read_text()), "login": json.loads(login_file.read_text())}


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(sig: int) -> None:
    """In a child, before exec: the kernel sends `sig` when the thread that started it ends, however it ends.

    Only for children started from the main thread (subprocess.Popen here). trio starts processes from worker threads,
    which end when idle, so a board started that way got SIGKILL about ten seconds after it booted.
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


# The demo's parts run in sessions of their own, so a terminal's Ctrl-C reaches the demo alone, which then stops them
# in order (boards, daemon, relay); and they get SIGTERM from the kernel if the demo itself is killed.
CHILD: dict[str, Any] = {"start_new_session": True, "preexec_fn": partial(die_with_parent, signal.SIGTERM)}


def run_demo(data_dir: Path, count: int, duration: float) -> None:
    """Run a relay, a gateway linked to it and virtual boards, printing what arrives where, until Ctrl-C."""
    # Ctrl-C stops the demo even when whatever started it ignored SIGINT (a script's background job inherits that)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    relay_dir = data_dir / "relay"
    data_dir = data_dir / "gateway"
    print(f"edgetrio demo: cloud relay in {relay_dir}/, gateway in {data_dir}/, {count} virtual ESP32s running the "
          "firmware on the MicroPython unix port; Ctrl-C stops", flush=True)
    relay, cloud = start_relay(relay_dir)
    login = cloud["login"]
    print(f"\n  Dashboard: {cloud['api_url']}/   log in as {login['name']}, password {login['password']}\n", flush=True)
    print(f"relay pid {relay.pid}: edges dial {cloud['edge_url']}, operators use {cloud['api_url']}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data_dir),
                             "--mqtt-host", "127.0.0.1", "--mqtt-port", "0", "--log-level", "warning", "--metrics-port", "0",
                             "--http-port", "0",
                             "--cloud", cloud["edge_url"], "--node-id", cloud["node"]],
                            env={**os.environ, "EDGETRIO_CLOUD_TOKEN": cloud["token"]},  # not in argv, not in `ps`
                            **CHILD)
    children = [proc, relay]
    try:
        info = wait_for_daemon(data_dir, proc)
        print(f"daemon pid {proc.pid} listening for MQTT on {info['mqtt_host']}:{info['mqtt_port']}", flush=True)
        if info.get("http"):
            user, password = admin_credential(data_dir)
            print(f"\n  The gateway's own dashboard (works with the relay gone): http://{info['http']}/   log in as "
                  f"{user}, password {password}\n", flush=True)
        print(f"  Automation: the relay sent the rule demo-hot (above 30 C for 5 s: an alert, the LED on). Try\n"
              f"    edgetrio fault vdev-1 env temperature=35 --data-dir {data_dir}\n"
              f"  then `edgetrio alerts --data-dir {data_dir}` or either dashboard; temperature=20 resolves it.\n",
              flush=True)
        vdevs = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--count", str(count), "--period", "2",
                                  "--data-dir", str(data_dir)], **CHILD)
        children.insert(0, vdevs)
        db = store.open_db(data_dir)

        cloud_db = cloud_store.open_db(relay_dir)
        names = [f"vdev-{i}" for i in range(1, count + 1)]

        started = time.monotonic()
        while not duration or time.monotonic() - started < duration:
            time.sleep(3)
            if vdevs.poll() is not None:
                raise RuntimeError("the virtual devices stopped; see their console.log files")
            line = []  # one line a tick: readings stored at the edge / in the cloud, and the last temperature
            for name in names:
                last = store.query_readings(db, name, limit=1)
                temperature = last[0]["values"].get("temperature") if last else None
                in_cloud = cloud_db.execute("SELECT count(*) FROM readings WHERE node = ? AND device = ?",
                                            ["demo-gw", name]).fetchone()[0]
                line.append(f"{name} {store.reading_count(db, name)}/{in_cloud}"
                            + (f" {temperature:.1f}C" if isinstance(temperature, int | float) else ""))
            print(f"  {time.monotonic() - started:5.0f}s  edge/cloud readings: " + "  ".join(line), flush=True)
        print(f"try: edgetrio readings vdev-1 --data-dir {data_dir} --limit 5\n"
              f"     edgetrio cloud readings demo-gw vdev-1 --data-dir {relay_dir} --limit 5\n"
              f"     edgetrio fault vdev-1 wifi down --data-dir {data_dir}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        print("demo stopped", flush=True)
