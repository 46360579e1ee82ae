"""Real processes for tests and the hardware-in-the-loop suite: the daemon, the relay, the CLI, polling."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgetrio.cloud.database import database_url, open_database
from edgetrio.daemon.config import admin_credential
from edgetrio.tools.bundle import FIRMWARE, compile_mpy, device_tool
from edgetrio.tools.demo import wait_for_daemon

ROOT = Path(__file__).resolve().parents[3]  # the checkout


def needs(available: bool, what: str) -> None:
    """Skip a test whose tool is missing here; in CI (`CI` set, as .ci/run sets it) fail instead: .ci/run installs
    every tool the suite uses, and a skip there would hide the real check."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: .ci/run installs it")
    pytest.skip(f"needs {what}")


def cli(data_dir: Path, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `edgetrio` command line."""
    proc = subprocess.run([sys.executable, "-m", "edgetrio", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgetrio {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


class Daemon:
    def __init__(self, data_dir: Path, extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def start(self) -> Daemon:
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}-daemon.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(self.data_dir), "--mqtt-host", self.host,
             "--mqtt-port", str(self.port), "--metrics-port", "0", "--http-port", "0", *self.extra],
            cwd=ROOT, stdout=self.log, stderr=self.log,
        )
        info = wait_for_daemon(self.data_dir, self.proc)
        self.port = int(str(info["mqtt_port"]))
        self.metrics = str(info.get("metrics") or "")  # host:port of /metrics and /healthz
        self.http = str(info.get("http") or "")  # host:port of the dashboard
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(self.data_dir, *args, check=check)

    def add_device(self, device_id: str, *extra: str) -> str:
        out = self.cli("device", "add", device_id, "--json", *extra)
        password: str = json.loads(out.stdout)["password"]
        return password

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cli("status", "--json").stdout)
        return result

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.status()["daemon"]["counters"]
        return counters

    def admin(self) -> tuple[str, str]:
        return admin_credential(self.data_dir)

    def readings(self, device: str, *extra: str, missing_ok: bool = False) -> list[dict[str, Any]]:
        """`edgetrio readings DEVICE --json`; a device not registered yet has none when `missing_ok` (any other error
        fails the test)."""
        out = self.cli("readings", device, "--json", *extra, check=False)
        if out.returncode != 0:
            if missing_ok and "unknown device" in out.stderr:
                return []
            raise AssertionError(f"edgetrio readings {device} failed ({out.returncode}): {out.stderr}")
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    def alerts(self, *extra: str) -> list[dict[str, Any]]:
        """`edgetrio alerts --json`."""
        found: list[dict[str, Any]] = json.loads(self.cli("alerts", "--json", *extra).stdout)
        return found

    def log_text(self) -> str:
        return (self.data_dir.parent / f"{self.data_dir.name}-daemon.log").read_text(errors="replace")


TEST_POSTGRES = "EDGETRIO_TEST_POSTGRES"  # a server's URL: every Relay here gets a new database on it


def fresh_database() -> dict[str, str]:
    """Under `make test-postgres` (tests/conftest.py sets $EDGETRIO_TEST_POSTGRES), a new PostgreSQL database for a
    relay, as the environment of its process and commands; else nothing (the SQLite file in its data dir)."""
    server = os.environ.get(TEST_POSTGRES)
    if not server:
        return {}
    from edgetrio.tools.testkit.postgres import create_database
    return {"EDGETRIO_DATABASE": create_database(server)}


class Relay:
    """A real relay process on loopback."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.extra: tuple[str, ...] = ()
        self.env: dict[str, str] = fresh_database()  # for this relay and its commands (EDGETRIO_DATABASE, say)

    def start(self) -> Relay:
        log = open(self.data_dir.parent / f"{self.data_dir.name}-relay.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgetrio", "cloud", "serve", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
             "--port", str(self.port), "--metrics-port", "0", *self.extra], cwd=ROOT, stdout=log, stderr=log,
            env={**os.environ, **self.env})
        run_file = self.data_dir / "relay.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}")
            if run_file.exists():
                info = json.loads(run_file.read_text())
                if info["pid"] == self.proc.pid:
                    self.port = info["port"]
                    self.url = info["edge_url"]
                    self.api_url = info["api_url"]
                    self.metrics = str(info.get("metrics") or "")
                    return self
            time.sleep(0.05)
        raise TimeoutError("relay did not start")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "edgetrio", "cloud", *args, "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, timeout=90, cwd=ROOT, env={**os.environ, **self.env})
        if check and proc.returncode != 0:
            raise AssertionError(f"edgetrio cloud {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def add_user(self, name: str, role: str, password: str) -> None:
        """`edgetrio cloud user add`, the password on stdin as an operator types it."""
        proc = subprocess.run([sys.executable, "-m", "edgetrio", "cloud", "user", "add", name, "--role", role,
                               "--password-stdin", "--data-dir", str(self.data_dir)], input=password + "\n",
                              capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ, **self.env})
        assert proc.returncode == 0, proc.stderr

    def add_node(self, name: str) -> str:
        token: str = self.json("node", "add", name)["token"]
        return token

    def sql(self, statement: str, params: Any = (), many: bool = False) -> list[tuple[Any, ...]]:
        """Run SQL (with ? placeholders) on the relay's own database, SQLite file or PostgreSQL ($EDGETRIO_DATABASE),
        and commit: what a test reads or changes behind the relay's back."""
        db = open_database(self.data_dir, database_url(self.data_dir, self.env.get("EDGETRIO_DATABASE")))
        try:
            with db.atomic():
                if many:
                    db.conn.executemany(statement, params)
                    return []
                cursor = db.execute(statement, params)
                return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
        finally:
            db.conn.close()

    def stored(self, device: str) -> list[tuple[int, int]]:
        """(boot, seq) of every reading of a device the relay holds, in order."""
        return [(int(b), int(s)) for b, s in
                self.sql("SELECT boot, seq FROM readings WHERE device = ? ORDER BY boot, seq", [device])]



@contextlib.contextmanager
def virtual_boards(daemon: Daemon, prefix: str, count: int = 1, period: float = 0.5,
                   extra: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """`edgetrio vdev` running `count` virtual boards (the real firmware on the MicroPython unix port), PREFIX-1..N,
    registered with the daemon if they are not yet; stopped after. Yields their ids."""
    with open(daemon.data_dir.parent / f"vdev-{prefix}.log", "ab") as log:
        boards = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--count", str(count), "--prefix", prefix,
                                   "--period", str(period), "--data-dir", str(daemon.data_dir), *extra], cwd=ROOT,
                                  stdout=log, stderr=log)
        try:
            yield [f"{prefix}-{i}" for i in range(1, count + 1)]
        finally:
            boards.send_signal(signal.SIGTERM)
            boards.wait(timeout=30)


@contextlib.contextmanager
def blank_board(data_dir: Path, tty: Path, prefix: str = "board", extra: tuple[str, ...] = ()) -> Iterator[Path]:
    """`edgetrio vdev --blank --repl-pty TTY`: a new virtual board with an empty flash on a serial port at `tty`, as
    a board fresh from the box on USB; stopped (killed if it will not stop) after."""
    with open(data_dir.parent / f"vdev-{tty.name}.log", "ab") as log:
        board = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--blank", "--repl-pty", str(tty),
                                  "--prefix", prefix, "--data-dir", str(data_dir), *extra], cwd=ROOT, stdout=log,
                                  stderr=log)
        try:
            wait_until(lambda: tty.exists() or board.poll() is not None, timeout=60)
            assert board.poll() is None, f"the blank board did not start: {log.name}"
            yield tty
        finally:
            board.send_signal(signal.SIGTERM)
            try:
                board.wait(timeout=20)
            except subprocess.TimeoutExpired:
                board.kill()
                board.wait()


class Mosquitto:
    """Debian's mosquitto on a loopback port with the config lines given (a broker nobody here wrote)."""

    PATH = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

    def __init__(self, folder: Path, *lines: str, port: int = 0) -> None:
        self.port = port or free_port()
        self.conf = folder / f"mosquitto-{self.port}.conf"
        self.conf.write_text("\n".join([f"listener {self.port} 127.0.0.1", *lines]) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return Path(Mosquitto.PATH).exists()

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([self.PATH, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def listening() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"mosquitto exited; config {self.conf}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
            return False
        wait_until(listening, timeout=10, interval=0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def telemetry(seq: int, boot: int = 1, ts: float | None = None, **values: Any) -> str:
    """A telemetry message as the device contract has it (docs/firmware.md); `ts` left out when None, as a board
    whose clock is not set sends it."""
    message: dict[str, Any] = {"boot": boot, "seq": seq, "values": values}
    if ts is not None:
        message["ts"] = ts
    return json.dumps(message)


def greenhouse_board(daemon: Daemon, period: float = 0.5) -> contextlib.AbstractContextManager[list[str]]:
    """One virtual board, greenhouse-1, for the daemon."""
    return virtual_boards(daemon, "greenhouse", 1, period)


def stored(db_file: Path, device: str) -> list[tuple[int, int]]:
    """(boot, seq) of every reading of a device a store holds (the gateway's edgetrio.db or the relay's relay.db),
    read from the file, in order."""
    with contextlib.closing(sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=30)) as db:
        return [(int(b), int(s)) for b, s in
                db.execute("SELECT boot, seq FROM readings WHERE device = ? ORDER BY boot, seq", [device])]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now on `host` (loopback unless a real board must reach it), for a server the test
    starts later, or starts again."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 30, interval: float = 0.2) -> Any:
    """Poll until predicate() is truthy; return its value (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


class Probe:
    """A raw MQTT client for tests: connect with any credential, subscribe, publish, collect what arrives."""

    def __init__(self, daemon: Daemon, username: str | None, password: str | None, client_id: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.closed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if username is not None:
            client.username_pw_set(username, password)
        def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self.connack.put(reason)
            if reason.is_failure:  # refused: try once, as the test means; paho would retry every second until closed
                c.disconnect()
        client.on_connect = on_connect
        client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.put(list(codes))
        client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        client.on_disconnect = lambda *_a: self.closed.set()
        self.client = client
        client.connect(daemon.host, daemon.port, keepalive=15)
        client.loop_start()

    def accepted(self, timeout: float = 10) -> bool:
        reason = self.connack.get(timeout=timeout)
        return not reason.is_failure

    def subscribe(self, topic: str, timeout: float = 10) -> bool:
        self.client.subscribe(topic, qos=1)
        codes = self.subacks.get(timeout=timeout)
        return not codes[0].is_failure

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def next(self, topic: str | None = None, timeout: float = 10) -> tuple[str, bytes]:
        """The next message (on `topic`, skipping others)."""
        while True:
            got = self.messages.get(timeout=timeout)
            if topic is None or got[0] == topic:
                return got

    def next_json(self, topic: str, timeout: float = 10) -> Any:
        return json.loads(self.next(topic, timeout)[1])

    def nothing(self, wait: float = 1.0, topic: str | None = None) -> bool:
        """True if no message (on `topic`, if given) arrives within `wait` seconds."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self.messages.get(timeout=left)
            except queue.Empty:
                return True
            if topic is None or got[0] == topic:
                return False
        return True

    def until(self, topic: str, timeout: float = 10) -> list[tuple[str, bytes]]:
        """Every message that arrives up to and including the first on `topic` (what came before it, in order)."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            got.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            if got[-1][0] == topic:
                return got

    def gather(self, done: Any, timeout: float = 20) -> list[tuple[str, bytes]]:
        """Every message until `done(latest)` holds, `latest` being the newest payload of each topic so far (what a
        subscriber that waits for a state, not for a time, has seen)."""
        got: list[tuple[str, bytes]] = []
        latest: dict[str, bytes] = {}
        deadline = time.monotonic() + timeout
        while not done(latest):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not all arrived in {timeout} s; got topics {sorted(latest)}")
            with contextlib.suppress(queue.Empty):
                topic, payload = self.messages.get(timeout=min(left, 0.5))
                got.append((topic, payload))
                latest[topic] = payload
        return got

    def drain(self, wait: float = 1.0) -> list[tuple[str, bytes]]:
        """Everything that arrives within `wait` seconds."""
        deadline = time.monotonic() + wait
        got = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Board:
    def __init__(self, daemon: Daemon, port: Path | str, virtual: bool, config: pytest.Config) -> None:
        self.daemon = daemon
        self.port = str(port)
        self.virtual = virtual
        self.config = config
        self.id = "board-1"
        self.flash_dir = daemon.data_dir / "vdevs" / self.id
        self.wired: tuple[str, ...] = ()  # --board FILE when the board is flashed from a board file

    # -- actions --
    def flash(self, period: float = 0.3, watchdog: float = 60, erase: bool = False) -> subprocess.CompletedProcess[str]:
        if self.virtual:  # through the virtual board's Wi-Fi (a proxy the test can cut)
            proxy = self.flash_dir / "sim" / "proxy_port"
            broker = f"127.0.0.1:{wait_until(lambda: proxy.exists() and proxy.read_text())}"
        else:
            broker = f"{self.config.getoption('--broker-host')}:{self.daemon.port}"
        return self.daemon.cli("flash", "--port", self.port, "--device-id", self.id, "--broker", broker,
                               "--period", str(period), "--wifi-ssid", self.config.getoption("--wifi-ssid"),
                               "--wifi-password", self.config.getoption("--wifi-password"), "--wait", "90",
                               "--watchdog", str(watchdog), *(["--erase"] if erase else []), *self.wired)

    def wifi(self, up: bool) -> None:
        if not self.virtual:
            pytest.skip("needs a Wi-Fi the test controls (virtual board only)")
        self.daemon.cli("fault", self.id, "wifi", "up" if up else "down")

    def power_cycle(self) -> None:
        if not self.virtual:
            pytest.skip("needs a power switch the test controls (virtual board only)")
        self.daemon.cli("fault", self.id, "power")

    def env(self, **values: float) -> None:
        if not self.virtual:
            pytest.skip("needs an environment the test controls (virtual board only)")
        self.daemon.cli("fault", self.id, "env", *(f"{k}={v}" for k, v in values.items()))

    def hang(self) -> None:
        if not self.virtual:
            pytest.skip("needs a sensor bus the test can lock up (virtual board only)")
        self.daemon.cli("fault", self.id, "hang")

    def mpremote(self, *args: str) -> str:
        """Run mpremote against the board's serial port, as a user would."""
        proc = subprocess.run([device_tool("mpremote"), "connect", self.port, *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def cmd(self, name: str, *args: str, check: bool = True) -> Any:
        out = self.daemon.cli("cmd", self.id, name, *args, "--json", check=check)
        return json.loads(out.stdout) if out.stdout.strip() else {"ok": False, "error": out.stderr}

    # -- observations through the gateway --
    def readings(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.daemon.cli("readings", self.id, "--json").stdout)
        return rows

    def device(self) -> dict[str, Any]:
        devices = {d["id"]: d for d in json.loads(self.daemon.cli("device", "list", "--json").stdout)}
        return devices.get(self.id, {})

    def online(self) -> bool:
        return bool(self.device().get("online"))

    def twin(self) -> dict[str, Any]:
        twin: dict[str, Any] = json.loads(self.daemon.cli("twin", "get", self.id, "--json").stdout)
        return twin

    def boots(self) -> set[int]:
        return {r["boot"] for r in self.readings()}

    # -- observations of the virtual board's flash --
    def buffered_values(self) -> list[tuple[int, int, dict[str, Any]]]:
        """(boot, seq, values) of the readings on the board's flash not acknowledged yet (virtual board)."""
        held = set(self.buffered())
        path = self.flash_dir / "buffer.log"
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            boot, seq, payload = line.split(" ", 2)
            if (int(boot), int(seq)) in held:
                out.append((int(boot), int(seq), json.loads(payload).get("values", {})))
        return out

    def buffered(self) -> list[tuple[int, int]]:
        """(boot, seq) of readings on the board's flash not acknowledged yet (virtual board)."""
        path = self.flash_dir / "buffer.log"
        ack = self.flash_dir / "buffer.log.ack"
        acked = {int(k): v for k, v in json.loads(ack.read_text())["acked"].items()} if ack.exists() else {}
        if not path.exists():
            return []
        lines = [line.split(" ", 2)[:2] for line in path.read_text().splitlines()]
        return [(int(b), int(s)) for b, s in lines if int(s) > acked.get(int(b), 0)]

    def state(self) -> dict[str, Any]:
        """The board's state.json (boot count, failed boots, clock): read from the virtual board's flash folder."""
        state: dict[str, Any] = json.loads((self.flash_dir / "state.json").read_text())
        return state

    def boot(self) -> int:
        """The board's boot count: from its flash (virtual), or as the board told the gateway in its meta (a real
        board, whose flash the test cannot read without stopping its firmware)."""
        if self.virtual:
            return int(self.state()["boot"])
        return int((self.device().get("meta") or {}).get("boot") or 0)


def contiguous_per_boot(rows: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Readings grouped by boot; fails if a seq is missing or stored twice."""
    boots: dict[int, list[int]] = {}
    for r in rows:
        boots.setdefault(r["boot"], []).append(r["seq"])
    for boot, seqs in boots.items():
        assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), f"boot {boot}: a reading is missing"
        assert len(seqs) == len(set(seqs)), f"boot {boot}: a reading is stored twice"
    return boots


def whole(rows: list[tuple[int, int]]) -> dict[int, list[int]]:
    """(boot, seq) rows of one device: every boot's readings from its first on, none missing, none twice."""
    boots = contiguous_per_boot([{"boot": b, "seq": s} for b, s in rows])
    assert boots and all(min(seqs) == 1 for seqs in boots.values()), boots
    return boots


def _mqtt_str(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _mqtt_packet(header: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([header]) + bytes(encoded) + body


class RawMQTT:
    """A bare MQTT 3.1.1 client on a socket, for what a well-behaved library will not send: forged wills, abrupt
    closes, wildcard publishes, sockets that never speak."""

    def __init__(self, host: str, port: int, source: str | None = None) -> None:
        """`source`: the local address to connect from (another loopback address is another host to the server)."""
        self.sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0) if source else None)

    def connect(self, client_id: str, username: str | None = None, password: str | None = None,
                will: tuple[str, bytes, int, bool] | None = None, keepalive: int = 30, clean: bool = True) -> int | None:
        """Send CONNECT; the CONNACK return code (0 accepted), or None if the broker closed the socket instead."""
        flags, payload = 0x02 if clean else 0x00, _mqtt_str(client_id)
        if will is not None:
            topic, message, qos, retain = will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
            payload += _mqtt_str(topic) + _mqtt_str(message)
        if username is not None:
            flags |= 0x80
            payload += _mqtt_str(username)
        if password is not None:
            flags |= 0x40
            payload += _mqtt_str(password)
        self.sock.sendall(_mqtt_packet(0x10, _mqtt_str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
                                       + payload))
        reply = self.read(4)
        return reply[3] if len(reply) == 4 and reply[0] == 0x20 else None

    def subscribe(self, topic_filter: str, qos: int = 0, packet_id: int = 1) -> None:
        self.sock.sendall(_mqtt_packet(0x82, struct.pack("!H", packet_id) + _mqtt_str(topic_filter) + bytes([qos])))

    def publish(self, topic: str | bytes, payload: bytes, qos: int = 0, packet_id: int = 1) -> None:
        body = _mqtt_str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
        self.sock.sendall(_mqtt_packet(0x30 | (qos << 1), body))

    def ping(self) -> None:
        self.sock.sendall(b"\xc0\x00")

    def read(self, size: int, timeout: float = 10) -> bytes:
        """Up to `size` bytes; fewer (b"" at once) if the broker closes the connection."""
        self.sock.settimeout(timeout)
        data = b""
        with contextlib.suppress(ConnectionError):
            while len(data) < size:
                chunk = self.sock.recv(size - len(data))
                if not chunk:
                    break
                data += chunk
        return data

    def closed_by_peer(self, timeout: float) -> bool:
        """True if the broker closes the connection within `timeout` seconds (anything it sends first is skipped)."""
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(4096):
                    return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return False

    def drop(self) -> None:
        """Vanish without DISCONNECT (a reset, as a device losing power), so the broker sends the will."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int) -> Iterator[bool]:
    """A tmpfs at `path` (True), or a plain directory when it cannot be mounted (False: no disk faults)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write until the disk refuses another byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


class Receiver:
    """A local HTTP endpoint that keeps what is posted to it (apprise's json:// target)."""

    def __init__(self, port: int = 0) -> None:
        self.posts: list[dict[str, Any]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_bundle(where: Path, version: str, first_line: str = "", padding: int = 0) -> Path:
    """This firmware with another version (and a first line for node.py, a padding file), compiled as flash does."""
    src = where / f"src-{version}"
    shutil.copytree(FIRMWARE / "lib", src)
    node = (src / "node.py").read_text().replace('VERSION = "0.1.0"', f'VERSION = "{version}"')
    (src / "node.py").write_text(first_line + "\n" + node if first_line else node)
    bundle = where / f"bundle-{version}"
    compile_mpy(sorted(src.glob("*.py")), bundle / "lib")
    if padding:  # a larger bundle, so a transfer takes long enough to be cut in the middle
        (bundle / "lib" / "padding.mpy").write_bytes(os.urandom(padding))
    return bundle
