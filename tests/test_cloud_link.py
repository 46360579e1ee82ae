"""The edge's side of the cloud link against a relay played by the test: idempotent apply, outbox bounds, wss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketRequest, serve_websocket

from edgetrio.daemon.edgehub import backoff_delays
from edgetrio.tools.testkit import Daemon, Relay, stored, virtual_boards, wait_until
from edgetrio.wire import envelope


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    delays = backoff_delays(base=0.5, cap=4)
    first = [next(delays) for _ in range(12)]
    assert all(0 <= d <= 4 for d in first)
    assert max(first[:2]) <= 1.0 and max(first[6:]) > 1.0  # grows (the chance this fails is about 1e-4)
    assert len({round(d, 6) for d in first}) > 6  # jittered, not in step


async def test_a_repeated_down_message_is_acknowledged_not_applied_again(tmp_path: Path) -> None:
    frames: list[dict[str, Any]] = []
    done = trio.Event()

    async def relay(request: WebSocketRequest) -> None:
        ws = await request.accept()

        async def next_applied() -> dict[str, Any]:
            while True:
                message = json.loads(await ws.get_message())
                if message["op"] == "up":  # the edge's snapshot and changes: acknowledge them
                    offset = message["body"]["items"][-1]["offset"]
                    await ws.send_message(envelope("ack", body={"offset": offset}))
                elif message["op"] == "applied":
                    return message

        await ws.send_message(json.dumps({"op": "apply", "resource": "twin", "body": [1]}))  # no id: ignored
        await ws.send_message(json.dumps({"op": "ack", "body": [1]}))  # not an object: ignored
        await ws.send_message(json.dumps({"op": "ack", "body": {"offset": "many"}}))  # ignored
        for _ in range(2):
            await ws.send_message(envelope("apply", "twin", {"device": "dx", "patch": {"a": 1}}, message_id="m1"))
            frames.append(await next_applied())
        await ws.send_message(envelope("apply", "teleport", {"device": "dx"}, message_id="m2"))
        frames.append(await next_applied())
        done.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, relay, "127.0.0.1", 0, None)
        daemon = Daemon(tmp_path / "gw", extra=("--cloud", f"ws://127.0.0.1:{server.port}", "--node-id", "n1",
                                                "--token", "t"))
        await trio.to_thread.run_sync(lambda: daemon.add_device("dx"))
        await trio.to_thread.run_sync(daemon.start)
        with trio.fail_after(30):
            await done.wait()
        twin = json.loads((await trio.to_thread.run_sync(lambda: daemon.cli("twin", "get", "dx", "--json"))).stdout)
        # every row the relay acknowledged is deleted (within a second, in one commit)
        outbox = await trio.to_thread.run_sync(lambda: wait_until(lambda: daemon.status()["outbox"]["rows"] == 0))
        await trio.to_thread.run_sync(daemon.stop)
        nursery.cancel_scope.cancel()
    assert [f["parent"] for f in frames] == ["m1", "m1", "m2"]
    assert frames[0]["body"] == frames[1]["body"] and frames[0]["body"]["ok"] is True
    assert twin["desired"] == {"state": {"a": 1}, "version": 1}  # applied once
    assert frames[2]["body"]["ok"] is False and "unknown resource" in frames[2]["body"]["error"]
    assert outbox


def test_the_outbox_is_bounded_and_what_it_drops_is_counted(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text('cloud_url = "ws://127.0.0.1:9"\nnode_id = "n1"\ncloud_token = "t"\noutbox_max_rows = 3\n')
    daemon = Daemon(tmp_path / "gw", extra=("--config", str(config))).start()
    try:
        with virtual_boards(daemon, "bounded", period=0.1) as [board]:
            wait_until(lambda: len(stored(daemon.data_dir / "edgetrio.db", board)) >= 15, timeout=90)
        # the bound runs after commits: once they have settled, at most 3 rows are left
        status = wait_until(lambda: (s := daemon.status())["daemon"]["counters"].get("outbox_dropped")
                            and s["outbox"]["rows"] <= 3 and s)
        assert status["daemon"]["cloud"]["connected"] is False and status["daemon"]["cloud"]["dropped"] > 0
        assert "outbox over its bounds" in daemon.log_text()
        # the edge itself lost nothing: every reading the board took, from its first
        rows = stored(daemon.data_dir / "edgetrio.db", board)
        assert [s for _, s in rows] == list(range(1, len(rows) + 1)) and len({b for b, _ in rows}) == 1
    finally:
        daemon.stop()


def test_wss_link_and_https_api_with_a_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    relay = Relay(tmp_path / "relay")
    relay.extra = ("--cert", str(cert), "--key", str(key))
    relay.start()
    token = relay.add_node("tls-gw")
    assert relay.url.startswith("wss://")
    config = tmp_path / "gw.toml"
    config.write_text(f'cloud_url = "{relay.url}"\nnode_id = "tls-gw"\ncloud_token = "{token}"\n'
                      f'cloud_cafile = "{cert}"\n')
    daemon = Daemon(tmp_path / "gw", extra=("--config", str(config))).start()
    try:
        info = json.loads((relay.data_dir / "relay.json").read_text())
        assert info["api_url"].startswith("https://")
        operator = json.loads((relay.data_dir / "operator.json").read_text())["token"]

        def cloud_readings() -> Any:
            out = subprocess.run(
                [sys.executable, "-m", "edgetrio", "cloud", "readings", "tls-gw", "secure-1", "--url", info["api_url"],
                 "--token", operator, "--cafile", str(cert), "--json"], capture_output=True, text=True, timeout=60)
            return out.returncode == 0 and json.loads(out.stdout)

        with virtual_boards(daemon, "secure", period=0.5):
            rows = wait_until(cloud_readings, timeout=90)
        at_edge = {(r["boot"], r["seq"]): r["values"] for r in
                   json.loads(daemon.cli("readings", "secure-1", "--json").stdout)}
        # what crossed wss is what the edge stored
        assert rows and all(at_edge[(r["boot"], r["seq"])] == r["values"] for r in rows)
    finally:
        daemon.stop()
        relay.stop()


def test_link_errors_say_why_in_words(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay").start()
    relay.add_node("gw1")
    daemon = Daemon(tmp_path / "gw", extra=("--cloud", relay.url, "--node-id", "gw1", "--token", "not-the-token"))
    daemon.data_dir.mkdir()
    daemon.start()
    try:
        refused = wait_until(lambda: daemon.status()["daemon"]["cloud"]["last_error"], timeout=30)
        assert "the relay refused this node (401" in refused and "check --node-id and the token" in refused, refused
        relay.stop()  # nobody listens now: the reason names what happened, not an empty string
        wait_until(lambda: daemon.status()["daemon"]["cloud"]["last_error"] != refused, timeout=60)
        gone = daemon.status()["daemon"]["cloud"]["last_error"]
        assert not gone.rstrip().endswith(":") and len(gone.split(": ", 1)[1]) > 3, gone
    finally:
        daemon.stop()
        if relay.proc is not None and relay.proc.poll() is None:
            relay.stop()


def test_a_relay_that_never_answers_the_upgrade_does_not_hold_the_link(tmp_path: Path) -> None:
    """trio-websocket's connect timeout covers the TCP connect only: a server that accepts and then says nothing
    held the gateway's link for good (found by an attack on the relay's port). The whole opening is bounded now."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])  # and never answer
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    daemon = Daemon(tmp_path / "gw", extra=("--cloud", f"ws://127.0.0.1:{server.getsockname()[1]}", "--node-id", "n1",
                                            "--token", "t"))
    daemon.data_dir.mkdir()
    daemon.start()
    try:
        reason = wait_until(lambda: daemon.status()["daemon"]["cloud"]["last_error"], timeout=90)
        assert "TooSlowError" in reason, reason
        wait_until(lambda: len(accepted) >= 2, timeout=90)  # and it tries again, as after any failure
    finally:
        daemon.stop()
        server.close()
        for conn in accepted:
            conn.close()
