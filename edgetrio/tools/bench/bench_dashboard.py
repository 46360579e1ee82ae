"""What the device page's data request costs: 7 days of 10 s readings (60,480 per device, five resources) asked of a
running relay as the page asks for them (downsampled series), against the raw readings of the same range, in the same
invocation; and what open dashboard streams cost the relay's ingest.

    python -m edgetrio.tools.bench.bench_dashboard [--repeat 5] [--streams 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import trio
from trio_websocket import open_websocket_url

from edgetrio.cloud import store
from edgetrio.tools.testkit import ROOT
from edgetrio.wire import envelope

WEEK = 7 * 86400
PERIOD = 10.0


def seed(data: Path, node: str, device: str) -> tuple[int, str]:
    """A node (its token returned) with a device holding a week of readings."""
    db = store.open_db(data)
    token = store.add_node(db, node)
    db.table("devices").insert({"node": node, "id": device, "registered": 1, "model": None, "online": 0,
                                "last_seen": None, "meta": None, "twin": None})
    now, rng = time.time(), random.Random(1)
    rows = [{"node": node, "device": device, "boot": 1, "seq": i + 1, "ts": now - WEEK + i * PERIOD, "received": now,
             "data": json.dumps({"temperature": round(20 + rng.random(), 2), "humidity": round(50 + rng.random(), 2),
                                 "pressure": round(1000 + rng.random(), 2), "analog": round(rng.random(), 3),
                                 "chip_temperature": round(40 + rng.random(), 2)})}
            for i in range(int(WEEK / PERIOD))]
    db.table("readings").insert_all(rows, batch_size=5000)
    db.conn.commit()
    db.close()
    return len(rows), token


def timed(url: str, token: str) -> tuple[float, int]:
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as reply:
        size = len(reply.read())
    return time.perf_counter() - started, size


async def ingest_rate(edge_url: str, node: str, token: str, seconds: float) -> float:
    """Readings/s one edge gets stored, sending batches of 100 and waiting for each ack."""
    sent, offset = 0, 0
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"x-edgetrio-node", node.encode())]
    async with open_websocket_url(edge_url + "/edge", extra_headers=headers) as ws:
        deadline = time.monotonic() + seconds
        started = time.monotonic()
        while time.monotonic() < deadline:
            offset += 1
            readings = [{"device": "bench-dev", "boot": 2, "seq": sent + i + 1, "ts": time.time(),
                         "values": {"temperature": 21.5}} for i in range(100)]
            await ws.send_message(envelope("up", "batch", {"items": [
                {"offset": offset, "ts": time.time(), "resource": "readings", "body": {"readings": readings}}]}))
            while json.loads(await ws.get_message())["op"] != "ack":
                pass
            sent += 100
        return sent / (time.monotonic() - started)


async def open_streams(api_url: str, token: str, query: str, count: int, opened: list[trio.SocketStream]) -> None:
    host, port = api_url.removeprefix("http://").split(":")
    for _ in range(count):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(f"GET /api/stream?{query} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}"
                              "\r\n\r\n".encode())
        opened.append(stream)
    for stream in opened:  # each has its response headers: the relay holds it open
        head = await stream.receive_some(4096)
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"a dashboard stream was refused: {head[:80]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgetrio-bench-dash-") as tmp:
        data = Path(tmp) / "relay"
        rows, token = seed(data, "bench", "week")
        relay = subprocess.Popen([sys.executable, "-m", "edgetrio", "cloud", "serve", "--data-dir", str(data),
                                  "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--log-level",
                                  "warning"], cwd=ROOT)
        try:
            while not (data / "relay.json").exists():
                time.sleep(0.05)
            info = json.loads((data / "relay.json").read_text())
            operator = json.loads((data / "operator.json").read_text())["token"]
            base = f"{info['api_url']}/api/nodes/bench/devices/week"
            raw, page = [], []
            for _ in range(args.repeat):  # alternately, so drift hits both
                raw.append(timed(f"{base}/readings?since=7d", operator))
                page.append(timed(f"{base}/series?range=7d&points=600", operator))
            raw_s, page_s = statistics.median(t for t, _ in raw), statistics.median(t for t, _ in page)
            print(f"7 days of 10 s readings ({rows} rows, 5 resources), median of {args.repeat}:")
            print(f"  raw readings  GET .../readings?since=7d      {raw_s * 1000:8.1f} ms  {raw[0][1] / 1e6:6.2f} MB")
            print(f"  device page   GET .../series?range=7d&points=600 {page_s * 1000:5.1f} ms  "
                  f"{page[0][1] / 1e6:6.3f} MB   ratio {page_s / raw_s:.2f}x the time, "
                  f"{page[0][1] / raw[0][1]:.3f}x the bytes")

            proc = psutil.Process(relay.pid)
            base_rate = trio.run(ingest_rate, info["edge_url"], "bench", token, args.seconds)
            print(f"relay ingest, one edge sending batches of 100: {base_rate:,.0f} readings/s with no dashboard open")
            # fleet pages (presence only) and device pages of the very device being written (every batch)
            for label, query in (("fleet pages", "kinds=node,device"), ("device pages", "node=bench&device=bench-dev")):
                opened: list[trio.SocketStream] = []

                async def with_streams(query: str = query, opened: list[trio.SocketStream] = opened
                                       ) -> tuple[float, int]:
                    before = proc.memory_info().rss
                    await open_streams(info["api_url"], operator, query, args.streams, opened)
                    await trio.sleep(0.5)
                    grown = proc.memory_info().rss - before
                    rate = await ingest_rate(info["edge_url"], "bench", token, args.seconds)
                    for stream in opened:
                        await stream.aclose()
                    return rate, grown

                rate, grown = trio.run(with_streams)
                print(f"  with {args.streams} {label} open: {rate:,.0f} readings/s ({rate / base_rate:.2f}x); relay "
                      f"memory +{grown / 1e6:.1f} MB, {grown / args.streams / 1024:.1f} KiB per stream")
        finally:
            relay.terminate()
            relay.wait(timeout=30)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
