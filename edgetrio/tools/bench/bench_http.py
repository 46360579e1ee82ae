"""Should an ASGI stack carry the relay's API and pages? The relay's own h11 server against Hypercorn's trio worker
running a Starlette app with the same endpoint (bearer token checked, a JSON answer), under the same keep-alive load,
in the same invocation.

    python -m edgetrio.tools.bench.bench_http [--clients 50] [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import hmac
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h11
import psutil
import trio

from edgetrio.tools.testkit import ROOT

TOKEN = "bench-operator-token"


def starlette_app() -> object:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def me(request: Request) -> JSONResponse:
        auth = request.headers.get("authorization", "")
        if not (auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].encode(), TOKEN.encode())):
            return JSONResponse({"error": "log in, or send a bearer token"}, status_code=401)
        return JSONResponse({"name": "operator", "role": "admin", "via": "token", "csrf": None})

    return Starlette(routes=[Route("/api/me", me)])


def serve_asgi(port_file: str) -> None:
    """Child process: Hypercorn's trio worker on a free port, written to port_file."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, starlette_app(), config)
            Path(port_file).write_text(binds[0].rsplit(":", 1)[1])

    trio.run(main)


async def load(port: int, clients: int, seconds: float, token: str) -> int:
    """Keep-alive clients asking GET /api/me in a loop; returns the 200 answers."""
    done = [0]

    async def client() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/api/me", headers=[
            ("host", "127.0.0.1"), ("authorization", f"Bearer {token}")])
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
            if status == 200:
                done[0] += 1
            conn.start_next_cycle()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    return done[0]


def measure(proc: subprocess.Popen[bytes], port: int, token: str, clients: int, seconds: float) -> tuple[float, float]:
    process = psutil.Process(proc.pid)
    process.cpu_percent()
    answered = trio.run(load, port, clients, seconds, token)
    return answered / seconds, process.memory_info().rss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgetrio-bench-http-") as tmp:
        data = Path(tmp) / "relay"
        relay = subprocess.Popen([sys.executable, "-m", "edgetrio", "cloud", "serve", "--data-dir", str(data),
                                  "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--log-level",
                                  "warning"], cwd=ROOT)
        port_file = Path(tmp) / "asgi.port"
        asgi = subprocess.Popen([sys.executable, "-c", f"from edgetrio.tools.bench.bench_http import serve_asgi; "
                                 f"serve_asgi({str(port_file)!r})"], cwd=ROOT)
        try:
            while not (data / "relay.json").exists() or not port_file.exists() or not port_file.read_text():
                if relay.poll() is not None or asgi.poll() is not None:
                    raise RuntimeError("a server did not start (is hypercorn installed? pip install 'edgetrio[dev]')")
                time.sleep(0.05)
            relay_port = json.loads((data / "relay.json").read_text())["port"]
            relay_token = json.loads((data / "operator.json").read_text())["token"]
            asgi_port = int(port_file.read_text())
            print(f"GET /api/me with a bearer token, {args.clients} keep-alive clients, {args.seconds:g} s per round")
            for round_ in range(1, args.rounds + 1):  # alternately, so drift hits both
                h11_rate, h11_rss = measure(relay, relay_port, relay_token, args.clients, args.seconds)
                asgi_rate, asgi_rss = measure(asgi, asgi_port, TOKEN, args.clients, args.seconds)
                print(f"  round {round_}: relay (h11) {h11_rate:8,.0f} req/s  RSS {h11_rss:5.1f} MB | "
                      f"Hypercorn trio + Starlette {asgi_rate:8,.0f} req/s  RSS {asgi_rss:5.1f} MB | "
                      f"ratio ASGI/h11 {asgi_rate / h11_rate:.2f}x")
        finally:
            for proc in (relay, asgi):
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
