"""Exhaustion by logged-in users and valid edges: one account, one address or one node cannot starve everyone else.

Each test attacks a real relay or gateway on loopback as a viewer, a login flood, an admin's rule or a valid edge
would, and checks the bound holds with a clear error, and that the service goes on serving.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from edgetrio.rules import MAX_CONDITIONS_TOTAL, MAX_WINDOWS_TOTAL
from edgetrio.tools.testkit import Daemon, Probe, Relay, cli, wait_until
from edgetrio.web import BODIES_HELD, LOGIN_FAILURES, READINGS_LIMIT, STREAMS_PER_ACCOUNT


def http(base: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def open_stream(address: str, token: str, receive_buffer: int = 0) -> tuple[socket.socket, bytes]:
    """An event stream as a page opens it, left unread; returns the socket and the answer's head (and body, when
    the answer is a refusal)."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    if receive_buffer:  # before connecting: the window the client offers follows it (a reader that takes little)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /api/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n".encode())
    head = sock.recv(4096)
    while not head.startswith(b"HTTP/1.1 200") and not head.rstrip().endswith(b"}"):
        head += sock.recv(4096)
    return sock, head


@pytest.fixture
def relay(tmp_path: Path) -> Any:
    r = Relay(tmp_path / "relay")
    r.extra = ("--max-devices-per-node", "5")
    r.start()
    yield r
    r.stop()


def test_event_streams_are_bounded_per_account_with_a_clear_error(relay: Relay) -> None:
    relay.cli("user", "add", "vic", "--role", "viewer")
    viewer = relay.json("user", "token", "vic")["token"]
    streams = [open_stream(relay.api_url, viewer) for _ in range(STREAMS_PER_ACCOUNT)]
    assert all(first.startswith(b"HTTP/1.1 200") for _, first in streams)
    sock, refused = open_stream(relay.api_url, viewer)
    assert refused.startswith(b"HTTP/1.1 429") and b"too many open event streams (8 per account)" in refused
    sock.close()
    # another account is not starved by this one, and the relay answers meanwhile
    operator = json.loads((relay.data_dir / "operator.json").read_text())["token"]
    other, first = open_stream(relay.api_url, operator)
    assert first.startswith(b"HTTP/1.1 200")
    assert http(relay.api_url, "GET", "/api/nodes", headers={"authorization": f"Bearer {viewer}"})[0] == 200
    # a stream closed gives its place back
    streams[0][0].close()
    def reopened() -> bool:
        sock, head = open_stream(relay.api_url, viewer)
        sock.close()
        return head.startswith(b"HTTP/1.1 200")
    wait_until(reopened)
    for s, _ in streams[1:]:
        s.close()
    other.close()


def test_a_login_flood_is_slowed_per_address_and_name_and_logged_once(relay: Relay) -> None:
    answers = []
    for _ in range(LOGIN_FAILURES + 5):
        status, headers, body = http(relay.api_url, "POST", "/api/login", json.dumps(
            {"name": "alice", "password": "guess"}).encode(), {"content-type": "application/json"})
        answers.append((status, headers.get("retry-after"), json.loads(body)["error"]))
    assert [a[0] for a in answers] == [401] * LOGIN_FAILURES + [429] * 5, answers
    assert int(answers[-1][1] or 0) > 0 and "too many failed logins" in answers[-1][2]
    log = (relay.data_dir.parent / "relay-relay.log").read_text()
    assert log.count("logins refused") <= 2 and "login refused user=" not in log  # counted, not a line per try


def test_login_takes_json_only_and_answers_say_what_is_allowed(relay: Relay) -> None:
    status, _, body = http(relay.api_url, "POST", "/api/login", b'{"name": "a", "password": "b"}',
                           {"content-type": "text/plain"})  # what a foreign page can post without asking
    assert status == 415 and b"JSON" in body
    status, headers, _ = http(relay.api_url, "TRACE", "/api/login")
    assert status == 405 and headers["allow"] == "POST"
    operator = {"authorization": "Bearer " + json.loads((relay.data_dir / "operator.json").read_text())["token"]}
    status, headers, _ = http(relay.api_url, "DELETE", "/api/devices", headers=operator)
    assert status == 405 and headers["allow"] == "GET"
    status, headers, _ = http(relay.api_url, "GET", "/")
    assert status == 200 and "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"


def test_admin_input_that_once_was_a_500_is_a_400(relay: Relay) -> None:
    relay.add_node("gw1")
    operator = {"authorization": "Bearer " + json.loads((relay.data_dir / "operator.json").read_text())["token"],
                "content-type": "application/json"}
    status, _, body = http(relay.api_url, "POST", "/api/nodes/gw1/alerts/99999999999999999999999/ack", b"{}",
                           operator)
    assert status == 400 and b"alert id" in body
    status, _, body = http(relay.api_url, "POST", "/api/nodes/gw1/devices",
                           json.dumps({"id": "ok-1", "model": {"a": 1}}).encode(), operator)
    assert status == 400 and b"'model'" in body


def test_a_rule_that_would_backtrack_is_refused_at_once(relay: Relay, tmp_path: Path) -> None:
    relay.add_node("gw1")
    rules = tmp_path / "evil.toml"
    rules.write_text('[[rule]]\nname = "evil"\ndevices = ["*"]\n'
                     'when = \'"' + "a" * 40 + '!" =~ "(a|aa)+$" or temperature > 100\'\n')
    refused = relay.cli("rules", "apply", "gw1", str(rules), check=False)
    assert refused.returncode == 2 and "regular expressions" in refused.stderr, refused.stderr
    assert http(relay.api_url, "GET", "/openapi.json")[0] == 200  # and the relay answers


def test_readings_are_answered_a_bounded_page_at_a_time(relay: Relay) -> None:
    """A request for a device's readings was built whole in memory (22 MB for one board's history): the newest
    READINGS_LIMIT come, and a bigger limit is refused with what to do instead."""
    relay.add_node("gw1")
    relay.json("device", "add", "gw1", "r-1")
    count = READINGS_LIMIT + 50
    relay.sql("INSERT INTO readings (node, device, boot, seq, ts, received, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
              [("gw1", "r-1", 1, seq, 1.7e9 + seq, 1.7e9 + seq, '{"t": 1}') for seq in range(1, count + 1)],
              many=True)  # a long history, written at once
    operator = {"authorization": "Bearer " + json.loads((relay.data_dir / "operator.json").read_text())["token"]}
    status, _, body = http(relay.api_url, "GET", "/api/nodes/gw1/devices/r-1/readings", headers=operator)
    page = json.loads(body)
    assert status == 200 and [r["seq"] for r in page] == list(range(51, count + 1))  # the newest, oldest first
    # the page before: until the oldest time of this one
    status, _, body = http(relay.api_url, "GET", f"/api/nodes/gw1/devices/r-1/readings?until={page[0]['ts']}",
                           headers=operator)
    assert status == 200 and [r["seq"] for r in json.loads(body)] == list(range(1, 51))
    status, _, body = http(relay.api_url, "GET", f"/api/nodes/gw1/devices/r-1/readings?limit={READINGS_LIMIT + 1}",
                           headers=operator)
    assert status == 400 and f"from 1 to {READINGS_LIMIT}".encode() in body and b"until=" in body


async def test_an_edge_cannot_create_devices_without_bound(relay: Relay) -> None:
    token = await trio.to_thread.run_sync(relay.add_node, "gw1")
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"x-edgetrio-node", b"gw1")]
    readings = [{"device": f"flood-{i}", "boot": 1, "seq": 1, "ts": time.time(), "values": {"t": 1.0}}
                for i in range(8)]
    frame = json.dumps({"id": "f1", "op": "up", "resource": "batch", "ts": time.time(),
                        "body": {"items": [{"offset": 1, "ts": time.time(), "resource": "readings",
                                            "body": {"readings": readings}}]}})
    async with open_websocket_url(relay.url.rstrip("/") + "/edge", extra_headers=headers) as ws:
        await ws.send_message(frame)
        with trio.fail_after(30):
            while json.loads(await ws.get_message())["op"] != "ack":
                pass  # the relay acknowledges the item: resending would not make room
    devices = await trio.to_thread.run_sync(relay.json, "devices")
    assert sorted(d["id"] for d in devices) == [f"flood-{i}" for i in range(5)]  # the cap, no more
    log = (relay.data_dir.parent / "relay-relay.log").read_text()
    assert "3 devices refused, over its cap of 5 devices" in log


def ended_by_server(sock: socket.socket, within: float = 90) -> bool:
    """Read what the server sent until it closes the connection; False if it is still open after `within` s."""
    deadline = time.monotonic() + within
    sock.settimeout(5)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_a_gateway_stream_that_falls_behind_is_ended_and_ingest_goes_on(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "gw")
    daemon.data_dir.mkdir()
    daemon.start()
    sockets = []
    try:
        _, secret = daemon.admin()
        for _ in range(STREAMS_PER_ACCOUNT):  # the most one account may open, none of them read
            sock, first = open_stream("http://" + daemon.http, secret, receive_buffer=4096)
            assert first.startswith(b"HTTP/1.1 200")
            sockets.append(sock)
        probes = []
        note = "x" * 3000  # big readings: about 10 MB in all, more than the sockets' buffers and a stream's bound
        for n in range(4):
            password = daemon.add_device(f"busy-{n}")
            probe = Probe(daemon, f"busy-{n}", password, f"busy-{n}")
            assert probe.accepted() and probe.subscribe(f"edgetrio/busy-{n}/ack")
            probes.append(probe)
        for seq in range(1, 801):
            for n, probe in enumerate(probes):
                probe.publish(f"edgetrio/busy-{n}/telemetry",
                              json.dumps({"boot": 1, "seq": seq, "values": {"note": note}}))
        # every reading stored: ingest went on (acks are cumulative at QoS 0: the store is what to wait for)
        wait_until(lambda: [d["readings"] for d in json.loads(daemon.cli("device", "list", "--json").stdout)]
                   == [800] * 4, timeout=120)
        for probe in probes:
            probe.close()
        # each unread stream fell more than a queue behind: the gateway ended it (the page would reconnect and
        # reload) instead of keeping the backlog and the socket
        assert all(ended_by_server(sock) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
        daemon.stop()


def test_tries_sent_at_once_cannot_pass_the_login_limit_together(relay: Relay) -> None:
    """Counted before the password is checked: 30 wrong tries at once got 300 checks past a limit counted after."""
    from concurrent.futures import ThreadPoolExecutor

    def guess(_: int) -> int:
        return http(relay.api_url, "POST", "/api/login", json.dumps({"name": "bob", "password": "guess"}).encode(),
                    {"content-type": "application/json"})[0]
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(guess, range(30)))
    assert answers.count(401) <= LOGIN_FAILURES and answers.count(401) + answers.count(429) == 30, answers
    status, _, body = http(relay.api_url, "POST", "/api/login", json.dumps(
        {"name": "carol", "password": "x" * 100_000}).encode(), {"content-type": "application/json"})
    assert status == 400 and b"too long" in body  # a huge password never reaches the KDF


@pytest.mark.parametrize("condition, what", [
    ("temperature > $sum($range(1000000))", "built-in functions ($sum)"),
    ("[y for y in tags] == []", "comprehensions"),
    ('"a" * 40 =~ "(a|aa)+$"', "regular expressions"),
    ("(temperature + 1e999999).ceiling > 0", "numbers beyond a float's range"),  # 40 s a reading
    ("(1e300).ceiling > 0", "rounding to an integer (.ceiling)"),
    ("(temperature + 10) ** 100000 > 0", "powers (**)"),
    ("(1 << temperature * 100000) > 0", "bit shifts")])
def test_conditions_that_could_run_without_bound_are_refused(relay: Relay, tmp_path: Path, condition: str,
                                                             what: str) -> None:
    relay.add_node("gw1")
    rules = tmp_path / "slow.toml"
    rules.write_text('[[rule]]\nname = "slow"\ndevices = ["*"]\nwhen = ' + json.dumps(condition) + "\n")
    refused = relay.cli("rules", "apply", "gw1", str(rules), check=False)
    assert refused.returncode == 2 and what in refused.stderr, refused.stderr


def test_connections_still_sending_their_first_request_are_bounded_per_address(relay: Relay) -> None:
    """Slowloris: partial headers a byte at a time on many sockets. Past 32 such connections from one address a new
    one is closed at once; another address is still served."""
    from edgetrio.web import WAITING_PER_ADDRESS

    host, port = relay.api_url.removeprefix("http://").rsplit(":", 1)
    slow = []
    for _ in range(WAITING_PER_ADDRESS):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"GET /api/nodes HTTP/1.1\r\nhost: x\r\n")  # and never the blank line
        slow.append(sock)
    try:
        def refused_at_once() -> bool:
            extra = socket.create_connection((host, int(port)), timeout=5)
            extra.sendall(b"GET /api/nodes HTTP/1.1\r\n")
            try:
                return extra.recv(100) == b""  # closed without an answer
            except TimeoutError:  # still waiting for the rest of the request: not refused
                return False
            except ConnectionResetError:
                return True
            finally:
                extra.close()
        wait_until(refused_at_once, timeout=10)
        other = socket.socket()
        other.bind(("127.0.0.2", 0))  # another address on this machine
        other.settimeout(10)
        other.connect((host, int(port)))
        other.sendall(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert other.recv(100).startswith(b"HTTP/1.1 200")
        other.close()
    finally:
        for sock in slow:
            sock.close()


def test_the_conditions_each_reading_is_judged_by_are_bounded_in_total(relay: Relay, tmp_path: Path) -> None:
    """1,000 rules of 2,000 characters each took 102 ms a reading on the loop that also takes readings in: a
    gateway's conditions together are held to MAX_CONDITIONS_TOTAL characters, at the gateway and at the relay."""
    condition = " or ".join(["temperature > 1000"] * 90)  # just under one condition's limit
    count = MAX_CONDITIONS_TOTAL // len(condition) + 1

    def rule_file(path: Path, names: range) -> Path:
        path.write_text("".join(f'[[rule]]\nname = "r{i}"\ndevices = ["*"]\nwhen = "{condition}"\n' for i in names))
        return path
    gateway = tmp_path / "gw"
    half = count // 2
    assert cli(gateway, "rule", "add", str(rule_file(tmp_path / "first.toml", range(half)))).returncode == 0
    refused = cli(gateway, "rule", "add", str(rule_file(tmp_path / "more.toml", range(half, count))), check=False)
    assert refused.returncode != 0 and f"at most {MAX_CONDITIONS_TOTAL:,}" in refused.stderr, refused.stderr
    assert cli(gateway, "rule", "list").stdout.count(" rule ") == half  # what was there stays, nothing half added
    # replacing rules by name counts once: the first file again fits
    assert cli(gateway, "rule", "add", str(tmp_path / "first.toml")).returncode == 0
    relay.add_node("gw1")
    too_big = relay.cli("rules", "apply", "gw1", str(rule_file(tmp_path / "all.toml", range(count))), check=False)
    assert too_big.returncode != 0 and f"at most {MAX_CONDITIONS_TOTAL:,}" in too_big.stderr, too_big.stderr
    # small rules with big windows: what they keep for each device is bounded too (2,000 such grew a gateway by 250 MB);
    # rules with the same window share it, so it counts once
    windows = tmp_path / "windows.toml"
    windows.write_text("".join(f'[[rule]]\nname = "w{i}"\ndevices = ["*"]\nwhen = "avg_t > 0"\nwindow = 1000\n'
                               for i in range(MAX_WINDOWS_TOTAL // 1000 + 1)))
    assert cli(tmp_path / "gw3", "rule", "add", str(windows)).returncode == 0
    windows.write_text("".join(f'[[rule]]\nname = "w{i}"\ndevices = ["*"]\nwhen = "avg_t > 0"\nwindow = {1000 - i}\n'
                               for i in range(MAX_WINDOWS_TOTAL // 1000 + 1)))
    refused = cli(tmp_path / "gw2", "rule", "add", str(windows), check=False)
    assert refused.returncode != 0 and f"at most {MAX_WINDOWS_TOTAL:,}" in refused.stderr, refused.stderr


def test_logins_waiting_for_a_password_check_are_bounded(relay: Relay) -> None:
    """Each address may try 10 times a minute, but from many addresses the tries waiting for the two password
    checkers queued without end (a right password waited 27 s behind them): past LOGIN_CHECKS_WAITING, 503 at once."""
    from concurrent.futures import ThreadPoolExecutor
    host, port = relay.api_url.removeprefix("http://").rsplit(":", 1)

    def guess(n: int) -> int:
        body = json.dumps({"name": f"nobody-{n}", "password": "guess"}).encode()
        with socket.create_connection((host, int(port)), timeout=120, source_address=(f"127.0.60.{n % 50 + 1}", 0)) as s:
            s.sendall(b"POST /api/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(body), body))
            return int(s.recv(64).split()[1])
    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(guess, range(100)))
    assert answers.count(503) > 0 and answers.count(401) + answers.count(503) == 100, answers
    relay.add_user("dora", "viewer", "dora-password-1")  # and a right password still gets in
    status, _, _ = http(relay.api_url, "POST", "/api/login", json.dumps(
        {"name": "dora", "password": "dora-password-1"}).encode(), {"content-type": "application/json"})
    assert status == 200


def test_request_bodies_held_at_once_are_bounded(relay: Relay) -> None:
    """The bound on connections covers a request's head: 150 bodies of 960 KiB sent slowly after it took the relay
    from 49 to 208 MB. Past BODIES_HELD bytes of bodies in hand, a body that arrives gets 503 and its connection ends."""
    host, port = relay.api_url.removeprefix("http://").rsplit(":", 1)
    chunk = b"x" * (960 * 1024)
    socks, answers = [], []
    for n in range(BODIES_HELD // len(chunk) + 8):
        s = socket.create_connection((host, int(port)), timeout=30, source_address=(f"127.0.70.{n % 100 + 1}", 0))
        s.sendall(b"POST /api/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(chunk) + 64, chunk))  # all but the last 64 bytes: the body stays in the server's hands
        socks.append(s)
    for s in socks[-8:]:  # the last ones came past the bound: their bodies are dropped as they come, then 503
        s.sendall(b" " * 64)
        s.settimeout(30)
        answers.append(s.recv(64).split(b" ")[1])
    assert answers == [b"503"] * 8, answers
    for s in socks:
        s.close()
