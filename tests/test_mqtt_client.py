"""The firmware's MQTT client (firmware/lib/mqtt.py on the real MicroPython interpreter) against Debian's mosquitto:
a broker nobody here wrote, with a password file and an ACL, restarted under the client."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgetrio.tools.bundle import FIRMWARE
from edgetrio.tools.testkit import Mosquitto, needs
from edgetrio.tools.vdev import micropython

DYNSEC = next(iter(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so")), Path("/nonexistent"))


@pytest.fixture(autouse=True)
def _mosquitto() -> None:
    needs(Mosquitto.available() and shutil.which("mosquitto_passwd") is not None, "mosquitto (Debian package)")

CLIENT = """
import asyncio, sys
from mqtt import MQTTClient, MQTTError

PORT = int(sys.argv[1])

def say(*words):
    print(*words)

async def connected(**kw):
    for _ in range(80):  # the broker may be restarting
        c = MQTTClient("dev", "127.0.0.1", PORT, "dev", "pw", timeout=3, **kw)
        try:
            await c.connect()
            return c
        except (OSError, MQTTError):
            await asyncio.sleep(0.25)
    raise SystemExit("no broker")

async def main():
    try:
        await MQTTClient("dev", "127.0.0.1", PORT, "dev", "wrong").connect()
    except MQTTError as e:
        say("wrong-password", e)
    try:
        MQTTClient("x", "127.0.0.1", PORT, None, "pw")
    except ValueError as e:
        say("password-without-user", e)
    got = []
    c = await connected(keepalive=2, will=("edgetrio/dev/status", "offline"))
    c.on_message = lambda t, p: got.append((t, p))
    reader = asyncio.create_task(c.run())
    await c.subscribe(["edgetrio/dev/in"], qos=1)
    try:
        await c.subscribe(["secret/#"])
    except MQTTError as e:
        say("refused", e)
    for qos in (2, 3):
        try:
            await c.publish("edgetrio/dev/in", "x", qos=qos)
        except ValueError:
            say("qos-refused", qos)
    await c.publish("edgetrio/dev/in", "zero", qos=0)
    await c.publish("edgetrio/dev/in", "one", qos=1)
    await c.publish("edgetrio/dev/status", "online", qos=1, retain=True)
    await asyncio.sleep(5)  # 2.5x the keepalive: the client's pings keep the link
    say("alive", c.connected, sorted(p.decode() for t, p in got))
    await c.publish("edgetrio/dev/in", "after-idle", qos=1)
    reader.cancel()
    c._w.s.close()  # the power goes: no DISCONNECT, so the broker publishes the retained will
    await asyncio.sleep(1)
    c = await connected(keepalive=2, will=("edgetrio/dev/status", "offline"))
    reader = asyncio.create_task(c.run())
    await c.publish("edgetrio/dev/status", "online", qos=1, retain=True)
    say("restart-now")
    try:
        await reader  # ends when the broker goes away
    except Exception:
        pass
    c = await connected(keepalive=2)
    c.on_message = lambda t, p: got.append((t, p))
    reader = asyncio.create_task(c.run())
    await c.subscribe(["edgetrio/dev/in"], qos=1)
    await c.publish("edgetrio/dev/in", "after-restart", qos=1)
    for _ in range(100):  # until it comes back (10 s at most): a state, not a time
        if "after-restart" in [p.decode() for t, p in got]:
            break
        await asyncio.sleep(0.1)
    say("reconnected", c.connected, "after-restart" in [p.decode() for t, p in got])

asyncio.run(main())
"""


def dynsec_client(user: str, password: str, role: str) -> dict[str, Any]:
    """A client of mosquitto's dynamic security plugin (PBKDF2-SHA512, as mosquitto_ctrl writes it)."""
    salt = os.urandom(12)
    hashed = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {"username": user, "password": base64.b64encode(hashed).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": 101, "roles": [{"rolename": role}]}


def mosquitto_with(tmp: Path, auth: str = "dynsec") -> Mosquitto:
    """mosquitto with `auth`: "dynsec" (the dynamic security plugin: per-client roles, which unlike an acl_file can
    refuse a subscription with SUBACK 0x80), "password_file", or "anonymous"."""
    lines = ["persistence false", "user root"]  # root: its files are in a 0700 dir
    if auth == "dynsec":
        needs(DYNSEC.exists(), "mosquitto's dynamic security plugin (Debian's mosquitto)")
        allow = [{"acltype": kind, "topic": "edgetrio/dev/#", "priority": 0, "allow": True}
                 for kind in ("publishClientSend", "subscribePattern")]
        watch = [{"acltype": "subscribePattern", "topic": "#", "priority": 0, "allow": True}]
        config = {"defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                                       "subscribe": False, "unsubscribe": True},
                  "clients": [dynsec_client("dev", "pw", "device"), dynsec_client("observer", "pw", "observer")],
                  "groups": [], "roles": [{"rolename": "device", "acls": allow},
                                          {"rolename": "observer", "acls": watch}]}
        (tmp / "dynsec.json").write_text(json.dumps(config))
        lines += ["allow_anonymous false", f"plugin {DYNSEC}", f"plugin_opt_config_file {tmp / 'dynsec.json'}"]
    elif auth == "password_file":
        passwords = tmp / "passwords"
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "dev", "pw"], check=True)
        lines += ["allow_anonymous false", f"password_file {passwords}"]
    else:
        lines += ["allow_anonymous true"]
    return Mosquitto(tmp, *lines)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = mosquitto_with(tmp_path)
    b.start()
    yield b
    b.stop()


def observer(port: int) -> tuple[mqtt.Client, queue.Queue[tuple[str, bytes, bool]]]:
    seen: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
    ready = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{time.monotonic_ns()}")
    client.username_pw_set("observer", "pw")
    client.on_connect = lambda c, *_a: c.subscribe("edgetrio/#", qos=1)
    client.on_subscribe = lambda *_a: ready.set()
    client.on_message = lambda _c, _u, m: seen.put((m.topic, bytes(m.payload), bool(m.retain)))
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert ready.wait(10)
    return client, seen


def test_the_firmware_client_against_mosquitto(broker: Mosquitto, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    watcher, seen = observer(broker.port)
    proc = subprocess.Popen([micropython(), str(script), str(broker.port)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={"MICROPYPATH": f"{FIRMWARE / 'lib'}:.frozen"})
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("restart-now"):
                # a retained `online` replaced the will's retained `offline`: a new subscriber sees the truth
                late, late_seen = observer(broker.port)
                status = late_seen.get(timeout=10)
                while status[0] != "edgetrio/dev/status":
                    status = late_seen.get(timeout=10)
                late.disconnect()
                assert status == ("edgetrio/dev/status", b"online", True), status  # retained, sent on subscribe
                broker.stop()
                time.sleep(1)
                broker.start()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.disconnect()
    out = "\n".join(lines)
    assert proc.returncode == 0, out
    said = {line.split()[0]: line for line in lines if line}
    assert said["wrong-password"] == "wrong-password connection refused: not authorized", out
    assert "needs a user name" in said["password-without-user"], out
    assert said["refused"] == "refused subscription refused: secret/#", out  # SUBACK 0x80 is read, not ignored
    assert "qos-refused 2" in out and "qos-refused 3" in out
    assert said["alive"] == "alive True ['one', 'zero']", out  # both QoS both ways, and pings across 2.5x keepalive
    assert said["reconnected"] == "reconnected True True", out
    published = [(t, p) for t, p, _ in list(seen.queue)]
    for payload in (b"zero", b"one", b"after-idle"):
        assert ("edgetrio/dev/in", payload) in published  # a third party got what the firmware sent
    assert ("edgetrio/dev/status", b"offline") in published  # the will, when the link died without DISCONNECT


SIMPLE = """
import asyncio, sys
from mqtt import MQTTClient, MQTTError
async def main():
    port, user = int(sys.argv[1]), sys.argv[2] or None
    c = MQTTClient("dev", "127.0.0.1", port, user, "pw" if user else None)
    await c.connect()
    got = []
    c.on_message = lambda t, p: got.append(p)
    reader = asyncio.create_task(c.run())
    await c.subscribe(["edgetrio/dev/in"])
    await c.publish("edgetrio/dev/in", "hello", qos=1)
    for _ in range(100):  # until it comes back (10 s at most)
        if got:
            break
        await asyncio.sleep(0.1)
    print(got == [b"hello"])
asyncio.run(main())
"""


@pytest.mark.parametrize("auth", ["password_file", "anonymous"])
def test_the_firmware_client_with_a_password_file_and_without(auth: str, tmp_path: Path) -> None:
    broker = mosquitto_with(tmp_path, auth)
    broker.start()
    try:
        script = tmp_path / "simple.py"
        script.write_text(SIMPLE)
        out = subprocess.run([micropython(), str(script), str(broker.port), "dev" if auth == "password_file" else ""],
                             cwd=tmp_path, capture_output=True, text=True, timeout=30,
                             env={"MICROPYPATH": f"{FIRMWARE / 'lib'}:.frozen"})
        assert out.stdout.strip() == "True", out.stdout + out.stderr
    finally:
        broker.stop()
