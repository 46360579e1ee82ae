"""The soak: a gateway linked to a relay for an hour under steady load and periodic reconnect storms.

200 simulated devices (paho clients) send 10 readings/s between them, 3 virtual boards run the real firmware, and
every 10 minutes all 200 simulated devices lose their connections at once and reconnect. Each minute the daemon's
and the relay's RSS, open fds and threads are sampled. Passes when, after the first storm, RSS stays within 1.2x of
its level right after that storm and fds and threads stay flat; prints the table for docs/reliability.md.

    python -m edgetrio.tools.bench.soak --minutes 60     (make soak)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from edgetrio.daemon.control import ControlClient
from edgetrio.tools.testkit import ROOT, Daemon, Relay
from edgetrio.tools.testkit.simdevice import SimDevice


@dataclass
class Sample:
    minute: int
    daemon_rss: int
    relay_rss: int
    daemon_fds: int
    relay_fds: int
    daemon_threads: int
    relay_threads: int
    stored: int


def sample(minute: int, daemon: psutil.Process, relay: psutil.Process, stored: int) -> Sample:
    return Sample(minute, daemon.memory_info().rss, relay.memory_info().rss, daemon.num_fds(), relay.num_fds(),
                  daemon.num_threads(), relay.num_threads(), stored)


def storm(devices: list[SimDevice]) -> None:
    """Every simulated device loses its connection at once (no DISCONNECT: its will fires) and reconnects."""
    for device in devices:
        sock = device.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def run(workdir: Path, minutes: float, devices: int, rate: float, storm_every: float) -> list[Sample]:
    relay = Relay(workdir / "relay")
    relay.data_dir.mkdir(parents=True, exist_ok=True)
    relay.start()
    token_file = workdir / "token"
    token_file.write_text(relay.add_node("soak-gw"))
    daemon = Daemon(workdir / "gw", extra=("--cloud", relay.url, "--node-id", "soak-gw", "--token-file",
                                           str(token_file), "--log-level", "warning")).start()
    assert daemon.proc is not None and relay.proc is not None
    sims: list[SimDevice] = []
    vdevs: subprocess.Popen[bytes] | None = None
    samples: list[Sample] = []
    try:
        with ControlClient(daemon.data_dir) as control:
            for i in range(devices):
                password = control.request("device.add", {"id": f"sim-{i}"})["password"]
                sims.append(SimDevice(f"sim-{i}", password, daemon.host, daemon.port).start(timeout=30))
        vdevs = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--count", "3", "--period", "2",
                                  "--data-dir", str(daemon.data_dir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        d, r = psutil.Process(daemon.proc.pid), psutil.Process(relay.proc.pid)
        started = time.monotonic()
        next_sample, next_storm, minute = started, started + storm_every * 60, 0
        rng = random.Random(1)
        print(" min | daemon RSS MB | relay RSS MB | daemon fds | relay fds | daemon thr | relay thr | stored", flush=True)
        while (now := time.monotonic()) < started + minutes * 60:
            if now >= next_sample:
                stored = int(daemon.status()["readings"])
                s = sample(minute, d, r, stored)
                samples.append(s)
                print(f"{s.minute:4d} | {s.daemon_rss / 2**20:13.1f} | {s.relay_rss / 2**20:12.1f} | {s.daemon_fds:10d} | "
                      f"{s.relay_fds:9d} | {s.daemon_threads:10d} | {s.relay_threads:9d} | {s.stored}", flush=True)
                minute += 1
                next_sample += 60
            if now >= next_storm:
                print(f"     reconnect storm: {len(sims)} devices drop at once", flush=True)
                storm(sims)
                next_storm += storm_every * 60
            rng.choice(sims).read()
            time.sleep(1 / rate)
    finally:
        if vdevs is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(vdevs.pid, signal.SIGTERM)
            vdevs.wait(timeout=30)
        for sim in sims:
            sim.stop()
        daemon.stop()
        relay.stop()
    return samples


def verdict(samples: list[Sample], storm_every: float) -> list[str]:
    """What is not flat after the first storm (empty when the soak passes)."""
    after = [s for s in samples if s.minute > storm_every]
    if len(after) < 2:
        return ["the soak was too short to pass a storm"]
    problems = []
    for name in ("daemon_rss", "relay_rss"):
        base, top = getattr(after[0], name), max(getattr(s, name) for s in after)
        if top > 1.2 * base:
            problems.append(f"{name} grew {top / base:.2f}x after the first storm")
    for name in ("daemon_fds", "relay_fds", "daemon_threads", "relay_threads"):
        base, top = getattr(after[0], name), max(getattr(s, name) for s in after)
        if top > base + 10:
            problems.append(f"{name} grew from {base} to {top}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10, help="readings per second, all simulated devices together")
    parser.add_argument("--storm-every", type=float, default=10, help="minutes between reconnect storms")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgetrio-soak-") as tmp:
        samples = run(Path(tmp), args.minutes, args.devices, args.rate, args.storm_every)
    problems = verdict(samples, args.storm_every)
    print("soak: " + ("flat after the first storm" if not problems else "; ".join(problems)), flush=True)
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
