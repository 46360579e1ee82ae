"""The relay refuses wrong tokens, impersonation, malformed and oversize frames, without disturbing other nodes."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from edgetrio.tools.testkit import Relay, wait_until
from edgetrio.wire import envelope


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    r = Relay(tmp_path_factory.mktemp("relay") / "data").start()
    yield r
    r.stop()


def headers(node: str, token: str) -> list[tuple[bytes, bytes]]:
    auth = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return [*auth, (b"x-edgetrio-node", node.encode())]


def up(offset: int, device: str, seq: int) -> str:
    item = {"offset": offset, "ts": 1.0, "resource": "readings",
            "body": {"readings": [{"device": device, "boot": 1, "seq": seq, "ts": 1.0, "values": {"t": 1}}]}}
    return envelope("up", "batch", {"items": [item]})


async def test_wrong_token_and_impersonation_are_refused(relay: Relay) -> None:
    token_a = relay.add_node("node-a")
    relay.add_node("node-b")
    for node, token in (("node-a", "wrong"), ("node-b", token_a), ("nobody", token_a), ("node-a", "")):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(relay.url + "/edge", extra_headers=headers(node, token)):
                pass
        assert info.value.status_code == 401
    async with open_websocket_url(relay.url + "/edge", extra_headers=headers("node-a", token_a)) as ws:
        await ws.send_message(up(1, "d1", 1))
        ack = json.loads(await ws.get_message())
        assert ack["op"] == "ack" and ack["body"] == {"offset": 1}
    # what node-a sent is node-a's, and node-b has nothing
    assert [d["id"] for d in relay.json("devices", "node-a")] == ["d1"]
    assert relay.json("devices", "node-b") == []


async def test_malformed_and_oversize_frames_do_not_disturb_other_nodes(relay: Relay) -> None:
    token_c, token_d = relay.add_node("node-c"), relay.add_node("node-d")
    async with open_websocket_url(relay.url + "/edge", extra_headers=headers("node-d", token_d)) as good:
        async with open_websocket_url(relay.url + "/edge", extra_headers=headers("node-c", token_c),
                                      max_message_size=16 * 1024 * 1024) as bad:
            for frame in (json.dumps({"op": "teleport"}), json.dumps({"op": "up", "body": {"items": [{"junk": 1}]}})):
                await bad.send_message(frame)
                reply = json.loads(await bad.get_message())
                assert reply["op"] in ("error", "ack"), reply
            # an item the relay cannot use is skipped but acknowledged, so it cannot block the items behind it;
            # one failing halfway (a seq SQLite cannot hold after a good reading) leaves none of its rows
            half = json.loads(up(4, "d9", 7))
            half["body"]["items"][0]["body"]["readings"].append({"device": "d9", "boot": 1, "seq": 10**23, "ts": 1.0,
                                                                  "values": {"t": 1}})
            await bad.send_message(json.dumps(half))
            assert json.loads(await bad.get_message())["body"] == {"offset": 4}
            await bad.send_message(up(5, "d9", 1))
            assert json.loads(await bad.get_message())["body"] == {"offset": 5}
            assert [r["seq"] for r in relay.json("readings", "node-c", "d9")] == [1]
            odd = {"offset": 6, "ts": 1.0, "resource": "readings", "body": {"readings": 7}}  # not a list
            await bad.send_message(envelope("up", "batch", {"items": [odd]}))
            assert json.loads(await bad.get_message())["body"] == {"offset": 6}  # skipped, acknowledged, link up
            with pytest.raises(ConnectionClosed) as closed:
                with trio.fail_after(10):
                    await bad.send_message("x" * (9 * 1024 * 1024))  # over the relay's frame limit
                    await bad.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == 1009  # message too big
        await good.send_message(up(1, "d2", 1))
        assert json.loads(await good.get_message())["body"] == {"offset": 1}
    assert [r["seq"] for r in relay.json("readings", "node-d", "d2")] == [1]


def http(relay: Relay, path: str, token: str | None, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{relay.port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_operator_api_needs_the_token_and_serves_openapi(relay: Relay) -> None:
    token = json.loads((relay.data_dir / "operator.json").read_text())["token"]
    status, doc = http(relay, "/openapi.json", None)
    assert status == 200 and doc["openapi"].startswith("3.") and "/api/nodes/{node}/devices/{device}/twin" in doc["paths"]
    assert http(relay, "/api/nodes", None)[0] == 401
    assert http(relay, "/api/nodes", "not-the-token")[0] == 401
    status, nodes = http(relay, "/api/nodes", token)
    assert status == 200 and isinstance(nodes, list)
    assert http(relay, "/api/nodes/ghost/devices", token)[0] == 404
    assert http(relay, "/api/nowhere", token)[0] == 404
    assert http(relay, "/api/nodes", token, method="DELETE")[0] == 405
    relay.add_node("node-e")
    assert http(relay, "/api/nodes/node-e/devices", token, "POST", {"id": "bad/id"})[0] == 400
    status, added = http(relay, "/api/nodes/node-e/devices", token, "POST", {"id": "dev-1"})
    assert status == 201 and added["username"] == "dev-1" and added["password"]
    status, twin = http(relay, "/api/nodes/node-e/devices/dev-1/twin", token, "PATCH", {"desired": {"a": 1}})
    assert status == 200 and twin["desired"] == {"state": {"a": 1}, "version": 1}
    status, error = http(relay, "/api/nodes/node-e/devices/dev-1/twin", token, "PATCH", {"desired": {"a": 2}, "version": 0})
    assert status == 409 and "conflict" in error["error"]
    request = urllib.request.Request(f"http://127.0.0.1:{relay.port}/api/nodes/node-e/devices/dev-1/twin",
                                     method="PATCH", data=b"{oops", headers={"authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    status, _ = http(relay, "/api/nodes/node-e/devices", token, "POST", {"id": "x" * 10, "pad": "y" * (2 * 1024 * 1024)})
    assert status == 413
    # the node is offline: commands are refused at once rather than run whenever it returns
    status, error = http(relay, "/api/nodes/node-e/devices/dev-1/commands", token, "POST", {"name": "ping"})
    assert status == 409 and "offline" in error["error"]


def test_node_add_refuses_duplicates_and_bad_names(relay: Relay, tmp_path: Path) -> None:
    relay.add_node("node-f")
    again = relay.cli("node", "add", "node-f", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = relay.cli("node", "add", "no/slash", check=False)
    assert bad.returncode == 2 and "invalid node name 'no/slash'" in bad.stderr


def test_bad_serve_options_are_one_line_errors(relay: Relay) -> None:
    negative = relay.cli("serve", "--retention-days", "-1", "--port", "0", check=False)
    assert negative.returncode == 2 and "--retention-days must be 0 (keep everything) or more" in negative.stderr
    half = relay.cli("serve", "--cert", "c.pem", "--port", "0", check=False)
    assert half.returncode == 2 and "--cert and --key go together" in half.stderr and "Traceback" not in half.stderr


def test_one_desired_change_for_the_whole_fleet(relay: Relay) -> None:
    token = json.loads((relay.data_dir / "operator.json").read_text())["token"]
    for node in ("fleet-a", "fleet-b"):
        relay.add_node(node)
        for device in ("t1", "t2"):
            assert http(relay, f"/api/nodes/{node}/devices", token, "POST", {"id": device})[0] == 201
    done = relay.json("twin", "set-all", "period=60", "--node", "fleet-a")
    assert done == {"nodes": 1, "devices": 2, "skipped": {}}
    done = relay.json("twin", "set-all", "led=true", "--device", "t2")
    assert done["devices"] >= 2  # t2 on both fleet nodes (and any other node with a t2)
    assert relay.json("twin", "get", "fleet-a", "t2")["desired"]["state"] == {"period": 60, "led": True}
    assert relay.json("twin", "get", "fleet-b", "t1")["desired"]["state"] == {}
    queued = {n["name"]: n["queued"] for n in relay.json("nodes")}
    assert queued["fleet-a"] == 2 + 2 + 1 and queued["fleet-b"] == 2 + 1  # registrations plus the changes
    assert http(relay, "/api/fleet/twin", token, "PATCH", {"desired": {}})[0] == 400


NESTED = "[" * 1100 + "]" * 1100


async def test_attacker_inputs_get_answers_and_cost_nothing_else(relay: Relay) -> None:
    token = json.loads((relay.data_dir / "operator.json").read_text())["token"]
    relay.add_node("node-g")
    assert http(relay, "/api/nodes/node-g/devices", token, "POST", {"id": "g1"})[0] == 201
    status, error = http(relay, "/api/fleet/twin", token, "PATCH", {"desired": {"x": 1}, "node": ["node-g"]})
    assert status == 400 and "node" in error["error"]
    request = urllib.request.Request(f"http://127.0.0.1:{relay.port}/api/nodes/node-g/devices/g1/twin", method="PATCH",
                                     data=f'{{"desired": {NESTED}}}'.encode(), headers={"authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400 and "deep" in json.loads(info.value.read())["error"]
    token_h = relay.add_node("node-h")
    async with open_websocket_url(relay.url + "/edge", extra_headers=headers("node-h", token_h)) as ws:
        await ws.send_message(json.dumps({"op": "up", "body": {"items": NESTED}}))
        assert json.loads(await ws.get_message())["op"] == "error"
    async with open_websocket_url(relay.url + "/edge", extra_headers=headers("node-h", token_h)) as ws:
        # an offset SQLite cannot hold is skipped like any unusable item; the batch's good items are stored
        batch = json.loads(up(1, "h1", 1))
        batch["body"]["items"].insert(0, {**batch["body"]["items"][0], "offset": 2**64})
        await ws.send_message(json.dumps(batch))
        assert json.loads(await ws.get_message())["body"] == {"offset": 1}
    assert [r["seq"] for r in relay.json("readings", "node-h", "h1")] == [1]
    assert "Replay object" not in (relay.data_dir.parent / f"{relay.data_dir.name}-relay.log").read_text()


@pytest.fixture(scope="module")
def impatient_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    r = Relay(tmp_path_factory.mktemp("impatient") / "data")
    r.extra = ("--http-timeout", "2")
    r.start()
    yield r
    r.stop()


def test_trickled_bodies_and_idle_keep_alive_connections_are_closed(impatient_relay: Relay) -> None:
    def opened() -> socket.socket:
        return socket.create_connection(("127.0.0.1", impatient_relay.port), timeout=15)

    trickle = opened()
    trickle.sendall(b"POST /api/fleet/twin HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")

    def drip() -> None:  # one byte every half second until the relay closes it: each read is quick, the body never
        with contextlib.suppress(OSError):  # completes, so only a bound on the whole request can end it
            for _ in range(600):
                time.sleep(0.5)
                trickle.sendall(b" ")

    dripping = threading.Thread(target=drip, daemon=True)
    dripping.start()
    idle = opened()
    idle.sendall(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n")
    silent = opened()
    for sock in (trickle, idle, silent):
        # the idle one first gets its answer, then nothing more; all end with a close by the relay (a reset when it
        # closes the trickling one while it is still sending). A relay that held one would leave recv waiting until
        # its socket timeout, which raises: the test waits for the close, not for a time.
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass
        sock.close()
    dripping.join(timeout=10)
    assert not dripping.is_alive(), "the trickling connection is still open"


async def test_an_unusable_up_frame_ends_the_link_so_nothing_behind_it_is_acknowledged(relay: Relay) -> None:
    """Batches are pipelined: had the relay answered a bad frame and acknowledged the next, the edge would delete the
    bad frame's rows from its outbox unsent (the chaos run lost 9,855 readings so)."""
    token = relay.add_node("node-i")
    for frame in ("{not json", "[1, 2]", json.dumps({"op": "up", "body": {"items": "x"}}), "[" * 100 + "]" * 100):
        async with open_websocket_url(relay.url + "/edge", extra_headers=headers("node-i", token)) as ws:
            await ws.send_message(frame)
            await ws.send_message(up(7, "i1", 7))  # already in flight behind it
            assert json.loads(await ws.get_message())["op"] == "error"
            with pytest.raises(ConnectionClosed), trio.fail_after(10):
                await ws.get_message()
    assert "unknown device 'i1'" in relay.cli("readings", "node-i", "i1", check=False).stderr
    # a batch as large as an edge sends (200 rows of many readings) is taken whole
    rows = [{"offset": n, "ts": 1.0, "resource": "readings", "body": {"readings": [
        {"device": "i2", "boot": 1, "seq": n * 100 + k, "ts": 1.0, "values": {"a": 1, "b": 2, "c": 3}}
        for k in range(100)]}} for n in range(1, 201)]
    async with open_websocket_url(relay.url + "/edge", extra_headers=headers("node-i", token),
                                  max_message_size=16 * 1024 * 1024) as ws:
        await ws.send_message(envelope("up", "batch", {"items": rows}))
        assert json.loads(await ws.get_message())["body"] == {"offset": 200}
    assert len(relay.stored("i2")) == 20_000


async def test_the_api_takes_since_as_the_cli_does_and_refuses_nonsense_in_one_line(relay: Relay) -> None:
    token = relay.add_node("node-s")
    now = time.time()
    item = {"offset": 1, "ts": now, "resource": "readings", "body": {"readings": [
        {"device": "s1", "boot": 1, "seq": seq, "ts": ts, "values": {"t": seq}}
        for seq, ts in ((1, now - 7200), (2, now - 60), (3, now - 5))]}}
    async with open_websocket_url(relay.url + "/edge", extra_headers=headers("node-s", token)) as ws:
        await ws.send_message(envelope("up", "batch", {"items": [item]}))
        assert json.loads(await ws.get_message())["body"] == {"offset": 1}
    operator = json.loads((relay.data_dir / "operator.json").read_text())["token"]
    path = "/api/nodes/node-s/devices/s1/readings"
    status, rows = http(relay, f"{path}?since=10m", operator)
    assert status == 200 and [r["seq"] for r in rows] == [2, 3]
    status, rows = http(relay, f"{path}?since=1h&limit=1", operator)
    assert status == 200 and [r["seq"] for r in rows] == [3]
    for bad in ("since=yesterday-ish", "limit=-3", "limit=many"):
        status, body = http(relay, f"{path}?{bad}", operator)
        assert status == 400 and "Traceback" not in body["error"] and len(body["error"].splitlines()) == 1, body


def test_healthz_answers_without_a_token(relay: Relay) -> None:
    assert http(relay, "/healthz", None) == (200, {"ok": True, "store": "ok"})
    assert http(relay, "/api/nodes", None)[0] == 401  # the rest still needs the operator token


def test_an_edge_that_stops_answering_is_disconnected(tmp_path: Path) -> None:
    """An edge whose host went away without closing (no FIN: power, a cable) showed as linked for ever and held its
    socket: the relay pings each edge and ends a link whose pong does not come."""
    relay = Relay(tmp_path / "relay")
    relay.extra = ("--edge-keepalive", "1")
    relay.start()
    try:
        token = relay.add_node("gw1")
        with silent_link(relay, token, "gw1"):
            # it was linked (a count that stays: with a 1 s keepalive it is online for a moment only) ...
            wait_until(lambda: relay.json("nodes")[0]["connects"] == 1, timeout=60)
            # ... and is offline while its socket is still open, because it did not answer the pings
            wait_until(lambda: relay.json("nodes")[0]["online"] is False, timeout=60)
        assert "edge silent node=gw1" in (relay.data_dir.parent / "relay-relay.log").read_text()
    finally:
        relay.stop()


def silent_link(relay: Relay, token: str, node: str) -> socket.socket:
    """A websocket upgrade for `node` done by hand, then nothing read: an edge whose host froze or lost power."""
    host, port = relay.url.removeprefix("ws://").rstrip("/").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /edge HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                 f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n"
                 f"authorization: Bearer {token}\r\nx-edgetrio-node: {node}\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


async def test_a_new_link_replaces_a_silent_one_at_once(tmp_path: Path) -> None:
    """The edge came back (a reboot, a new NAT mapping) while its old link was silent: the relay waited for the old
    link's close handshake, which never came, and never served the new one; the node stayed "online" for good."""
    relay = Relay(tmp_path / "relay").start()
    try:
        token = relay.add_node("gw1")
        old = silent_link(relay, token, "gw1")
        headers = [(b"authorization", f"Bearer {token}".encode()), (b"x-edgetrio-node", b"gw1")]
        reading = {"device": "d1", "boot": 1, "seq": 1, "ts": time.time(), "values": {"t": 1.0}}
        frame = envelope("up", "batch", {"items": [{"offset": 1, "ts": time.time(), "resource": "readings",
                                                    "body": {"readings": [reading]}}]})
        async with open_websocket_url(relay.url.rstrip("/") + "/edge", extra_headers=headers) as ws:
            await ws.send_message(frame)
            with trio.fail_after(15):  # the relay's keep-alive would end the old link only after 40 s
                while json.loads(await ws.get_message())["op"] != "ack":
                    pass
        old.close()
    finally:
        relay.stop()
    # and a relay that starts again shows no node linked until one dials in
    relay.start()
    try:
        assert relay.json("nodes")[0]["online"] is False
    finally:
        relay.stop()
