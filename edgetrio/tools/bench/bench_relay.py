"""Relay benchmark: N simulated edges on one relay process, against a bare trio-websocket server, one invocation.

    python -m edgetrio.tools.bench.bench_relay [--edges 5000] [--seconds 10]

For each server (baseline: a trio-websocket server that authenticates nobody, stores nothing and acks every batch;
then the real relay with its SQLite store) it measures:
- memory per connection: the server's RSS after all edges connected, minus before, divided by the edges;
- (relay only) time to push one desired change to every node: one fleet-wide operator API call, until the last edge
  has received its `apply`;
- edge -> cloud readings per second: every edge sends batches of 10 readings and waits for the ack, for --seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketRequest, open_websocket_url, serve_websocket

from edgetrio.wire import MAX_FRAME, envelope

ROOT = Path(__file__).resolve().parents[3]  # the checkout


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the baseline server -----------------------------------------------------------------------------------------------

async def baseline_server(port: int) -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message["op"] == "up":
                    offset = message["body"]["items"][-1]["offset"]
                    await ws.send_message(envelope("ack", body={"offset": offset}, parent=message["id"]))
        except ConnectionClosed:
            pass

    print("ready", flush=True)
    await serve_websocket(handler, "127.0.0.1", port, None, max_message_size=MAX_FRAME)


# -- the edges ----------------------------------------------------------------------------------------------------------

def run_edges(url: str | list[str], nodes: list[tuple[str, str]], seconds: float, commands: Any, results: Any) -> None:
    raise_fd_limit()
    trio.run(edges_main, url, nodes, seconds, commands, results)


async def edges_main(url: str | list[str], nodes: list[tuple[str, str]], seconds: float, commands: Any,
                     results: Any) -> None:
    urls = [url] if isinstance(url, str) else url  # several: the edges spread over them in turn (relay replicas)
    received: dict[str, float] = {}
    sent_readings = [0]
    phase = {"send": False}
    connected = [0]
    all_connected = trio.Event()
    go = trio.Event()
    stop = trio.Event()

    limiter = trio.CapacityLimiter(24)  # connect in waves, under the relay's 32 first requests pending per address

    async def edge(node: str, token: str, url: str) -> None:
        headers = [(b"authorization", f"Bearer {token}".encode()), (b"x-edgetrio-node", node.encode())]
        for _attempt in range(5):
            await limiter.acquire_on_behalf_of(node)
            holding = True
            try:
                async with open_websocket_url(url + "/edge", extra_headers=headers, connect_timeout=60,
                                              max_message_size=MAX_FRAME) as ws:
                    offset = 1
                    # announce a device as a real edge's snapshot would
                    await ws.send_message(envelope("up", "batch", {"items": [
                        {"offset": offset, "ts": time.time(), "resource": "device",
                         "body": {"device": "d1", "registered": True}}]}))
                    await ws.get_message()
                    limiter.release_on_behalf_of(node)
                    holding = False
                    connected[0] += 1
                    if connected[0] == len(nodes):
                        all_connected.set()
                    async with trio.open_nursery() as nursery:
                        acked = [trio.Event()]

                        async def receive(acked: list[trio.Event], ws: Any = ws) -> None:
                            while True:
                                message = json.loads(await ws.get_message())
                                if message["op"] == "apply":
                                    received.setdefault(node, time.monotonic())
                                    await ws.send_message(envelope("applied", message["resource"], {"ok": True},
                                                                   parent=message["id"]))
                                elif message["op"] == "ack":
                                    acked[0].set()

                        nursery.start_soon(receive, acked)
                        await go.wait()
                        seq = 0
                        while phase["send"]:
                            offset += 1
                            readings = [{"device": "d1", "boot": 1, "seq": seq + i + 1, "ts": time.time(),
                                         "values": {"t": 21.5}} for i in range(10)]
                            seq += 10
                            acked[0] = trio.Event()
                            await ws.send_message(envelope("up", "batch", {"items": [
                                {"offset": offset, "ts": time.time(), "resource": "readings",
                                 "body": {"readings": readings}}]}))
                            await acked[0].wait()
                            if phase["send"]:
                                sent_readings[0] += 10
                        await stop.wait()
                        nursery.cancel_scope.cancel()
                return
            except (HandshakeError, OSError, ConnectionClosed):
                if holding:
                    limiter.release_on_behalf_of(node)
                await trio.sleep(1)

    async def control() -> None:
        while True:
            command = await trio.to_thread.run_sync(commands.get)
            if command == "wait-connected":
                started = time.monotonic()
                await all_connected.wait()
                results.put(("connected", time.monotonic() - started))
            elif command == "wait-desired":
                while len(received) < len(nodes):
                    await trio.sleep(0.05)
                results.put(("desired", max(received.values())))
            elif command == "send":
                phase["send"] = True
                go.set()
                await trio.sleep(seconds)
                phase["send"] = False
                results.put(("readings", sent_readings[0] / seconds))
            elif command == "stop":
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(control)
        for i, (node, token) in enumerate(nodes):
            nursery.start_soon(edge, node, token, urls[i % len(urls)])
        await stop.wait()


def measure(url: str | list[str], pid: int | list[int], nodes: list[tuple[str, str]], seconds: float,
            push: Any = None) -> dict[str, float]:
    """Figures of one server (or of several replicas: `url` and `pid` lists, memory summed over them)."""
    ctx = mp.get_context("fork")
    commands, results = ctx.Queue(), ctx.Queue()
    pids = [pid] if isinstance(pid, int) else pid
    before = sum(rss_mb(p) for p in pids)
    proc = ctx.Process(target=run_edges, args=(url, nodes, seconds, commands, results))
    proc.start()
    commands.put("wait-connected")
    _kind, connect_time = results.get(timeout=600)
    time.sleep(1)
    after = sum(rss_mb(p) for p in pids)
    out = {"connect_s": connect_time, "kib_per_conn": (after - before) * 1024 / len(nodes), "rss_mb": after}
    if push is not None:
        started = time.monotonic()
        push()
        commands.put("wait-desired")
        _, last = results.get(timeout=600)
        out["push_all_s"] = last - started
    commands.put("send")
    _, rate = results.get(timeout=seconds + 600)
    out["readings_per_s"] = rate
    commands.put("stop")
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--serve-baseline", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_fd_limit()
    if args.serve_baseline:
        trio.run(baseline_server, args.serve_baseline)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [(f"edge-{i:05d}", "x") for i in range(args.edges)]
    print(f"baseline: bare trio-websocket server, {args.edges} edges ...", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "edgetrio.tools.bench.bench_relay", "--serve-baseline", str(port)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    base = measure(f"ws://127.0.0.1:{port}", server.pid, nodes, args.seconds)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)

    from edgetrio.cloud import store
    from edgetrio.cloud.relay import operator_token

    with tempfile.TemporaryDirectory(prefix="edgetrio-relay-bench-") as tmp:
        data = Path(tmp) / "relay"
        db = store.open_db(data)
        with db.atomic():
            nodes = [(f"edge-{i:05d}", store.add_node(db, f"edge-{i:05d}")) for i in range(args.edges)]
        db.close()
        token = operator_token(data)
        relay = subprocess.Popen([sys.executable, "-m", "edgetrio", "cloud", "serve", "--data-dir", str(data), "--host",
                                  "127.0.0.1", "--port", "0", "--log-level", "warning"], cwd=ROOT)
        while not (data / "relay.json").exists():
            time.sleep(0.05)
        info = json.loads((data / "relay.json").read_text())

        def push() -> None:
            """One fleet-wide desired change through the operator API."""
            request = urllib.request.Request(
                f"{info['api_url']}/api/fleet/twin", method="PATCH", data=json.dumps({"desired": {"period": 30}}).encode(),
                headers={"authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=300) as response:
                response.read()

        print(f"edgetrio relay, {args.edges} edges ...", flush=True)
        ours = measure(info["edge_url"], relay.pid, nodes, args.seconds, push)
        stored_db = store.open_db(data)
        stored = stored_db.execute("SELECT count(*) FROM readings").fetchone()[0]
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=60)

    print(f"\n{args.edges} edges on one server process, {os.cpu_count()} cores, edges simulated in one trio process\n")
    print(f"{'server':<12} {'connect s':>10} {'KiB/conn':>9} {'RSS MB':>8} {'push all s':>11} {'readings/s':>11}")
    for name, row in (("baseline", base), ("relay", ours)):
        push_s = f"{row['push_all_s']:.2f}" if "push_all_s" in row else "-"
        print(f"{name:<12} {row['connect_s']:>10.1f} {row['kib_per_conn']:>9.1f} {row['rss_mb']:>8.1f} "
              f"{push_s:>11} {row['readings_per_s']:>11.0f}")
    print(f"ratio relay/baseline: memory per connection {ours['kib_per_conn'] / base['kib_per_conn']:.2f}x, "
          f"readings/s {ours['readings_per_s'] / base['readings_per_s']:.2f}x")
    print(f"relay stored {stored} readings")


if __name__ == "__main__":
    main()
