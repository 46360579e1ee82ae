"""Idle means idle: a gateway linked to its relay, with nothing to do, uses (almost) no CPU, and neither does the relay.

CPU time of each process (from /proc, user + system) over a few seconds of wall time: on a loaded machine a process
gets less wall time, not more CPU, so the bound holds however busy the machine is. Planted defect this catches: the
outbox sender reading through the writer (each read a commit that woke the sender again) pinned a core.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from edgetrio.tools.testkit import Daemon, Probe, Receiver, Relay, wait_until

IDLE_SHARE = 0.05  # of one core
WINDOW = 6.0  # seconds of wall time the CPU time is taken over


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_shares(*pids: int) -> list[float]:
    """Each process's CPU time over WINDOW seconds of wall time, as a share of one core."""
    before = [cpu_seconds(pid) for pid in pids]
    started = time.monotonic()
    time.sleep(WINDOW)
    elapsed = time.monotonic() - started
    return [(cpu_seconds(pid) - b) / elapsed for pid, b in zip(pids, before, strict=True)]


def open_stream(gw: Daemon) -> socket.socket:
    """Log in to the gateway's dashboard as its admin and open a live event stream, left open and unread."""
    name, password = gw.admin()
    host, port = gw.http.rsplit(":", 1)
    body = json.dumps({"name": name, "password": password}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /api/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    cookie = next(line.split(b":", 1)[1].split(b";")[0].strip() for line in reply.split(b"\r\n")
                  if line.lower().startswith(b"set-cookie:") and b"session" in line.lower())
    stream = socket.create_connection((host, int(port)), timeout=10)
    stream.sendall(b"GET /api/stream HTTP/1.1\r\nhost: x\r\ncookie: " + cookie + b"\r\n\r\n")
    assert b"200" in stream.recv(4096).split(b"\r\n", 1)[0], "the stream did not open"
    return stream


@pytest.mark.parametrize("everything", [False, True], ids=["linked", "linked-ha-rules-schedule-export-stream"])
def test_a_linked_gateway_and_its_relay_idle(tmp_path: Path, everything: bool) -> None:
    relay = Relay(tmp_path / "relay").start()
    token = relay.add_node("gw1")
    receiver = Receiver()
    extra: tuple[str, ...] = ("--cloud", relay.url, "--node-id", "gw1", "--token", token)
    if everything:
        config = tmp_path / "gateway.toml"
        config.write_text(f'[[export]]\nname = "archive"\ntype = "webhook"\n'
                          f'url = "http://127.0.0.1:{receiver.port}/ingest"\n')
        extra += ("--ha", "--config", str(config))
    (tmp_path / "gw").mkdir()
    gw = Daemon(tmp_path / "gw", extra=extra).start()
    probes: list[Probe] = []
    stream = None
    try:
        password = gw.add_device("idle-1")
        board = Probe(gw, "idle-1", password, "idle-1")
        probes.append(board)
        assert board.accepted()
        if everything:
            rules = tmp_path / "rules.toml"
            rules.write_text('[[rule]]\nname = "hot"\ndevices = ["idle-*"]\nwhen = "temperature > 30"\n\n'
                             '[[schedule]]\nname = "hourly"\ndevices = ["idle-*"]\nevery = "1h"\n'
                             'actions = [{ set = { led = true } }]\n')
            gw.cli("rule", "add", str(rules))
            ha_secret = json.loads(gw.cli("integration", "add", "homeassistant", "--json").stdout)["password"]
            ha = Probe(gw, "integration:homeassistant", ha_secret, "ha")
            probes.append(ha)
            assert ha.accepted() and ha.subscribe("homeassistant/#")
            ha.publish("homeassistant/status", "online")
            stream = open_stream(gw)
        # one reading all the way to the cloud (and the export sink), so every path has run once
        board.publish("edgetrio/idle-1/telemetry", json.dumps({"boot": 1, "seq": 1, "values": {"temperature": 21.5}}))
        wait_until(lambda: relay.json("readings", "gw1", "idle-1"), timeout=30)
        if everything:
            wait_until(lambda: receiver.posts, timeout=30)
        wait_until(lambda: gw.status()["outbox"]["rows"] == 0, timeout=30)

        gateway, relay_share = idle_shares(gw.proc.pid, relay.proc.pid)  # type: ignore[union-attr]
        assert gateway < IDLE_SHARE, f"the idle linked gateway used {gateway:.0%} of a core"
        assert relay_share < IDLE_SHARE, f"the relay with an idle edge linked used {relay_share:.0%} of a core"
        assert gw.status()["daemon"]["cloud"]["connected"], "the link went down: idle proves nothing"
    finally:
        if stream is not None:
            stream.close()
        for probe in probes:
            probe.close()
        gw.stop()
        relay.stop()
        receiver.close()
