"""Relay replicas on PostgreSQL against the one-process SQLite relay, in one invocation.

    python -m edgetrio.tools.bench.bench_replicas [--edges 2000] [--seconds 10]

Three set-ups take the same simulated edges (bench_relay's: each sends batches of 10 readings and waits for the ack,
and answers every `apply`): the SQLite relay (the default), one relay on PostgreSQL, and two relay replicas on that
PostgreSQL with the edges spread over both. For each: durable readings/s (acknowledged only once committed), the
relays' memory per edge and in all (RSS, summed over the replicas), and the time for one fleet-wide desired change,
asked on one replica, to reach every edge (on two replicas half of them through the other one). PostgreSQL is a server
of the benchmark's own (Debian's package, tools/testkit/postgres.py), fsync on, on the same machine: the edges, the
relays and the database share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from edgetrio.tools.bench.bench_relay import ROOT, measure, raise_fd_limit


def start_relay(data: Path, url: str | None) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    env = {**os.environ, **({"EDGETRIO_DATABASE": url} if url else {})}
    relay = subprocess.Popen([sys.executable, "-m", "edgetrio", "cloud", "serve", "--data-dir", str(data), "--host",
                              "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--log-level", "warning"], cwd=ROOT,
                             env=env)
    while not (data / "relay.json").exists():
        if relay.poll() is not None:
            raise RuntimeError(f"the relay in {data} exited with {relay.returncode}")
        time.sleep(0.05)
    return relay, json.loads((data / "relay.json").read_text())


def run(base: Path, edges: int, seconds: float, url: str | None, replicas: int) -> tuple[dict[str, float], int]:
    from edgetrio.cloud import store
    from edgetrio.cloud.relay import operator_token

    datas = [base / f"relay-{i}" for i in range(replicas)]
    db = store.open_db(datas[0], url)
    with db.atomic():
        nodes = [(f"edge-{i:05d}", store.add_node(db, f"edge-{i:05d}")) for i in range(edges)]
    db.conn.close()
    procs = [start_relay(datas[0], url)]
    for data in datas[1:]:  # the others get the first one's operator token, as docs/cloud.md says
        data.mkdir(parents=True)
        shutil.copy(datas[0] / "operator.json", data / "operator.json")
        procs.append(start_relay(data, url))
    token = operator_token(datas[0])
    api = procs[0][1]["api_url"]

    def push() -> None:
        """One fleet-wide desired change through the first replica's operator API."""
        request = urllib.request.Request(f"{api}/api/fleet/twin", method="PATCH",
                                         data=json.dumps({"desired": {"period": 30}}).encode(),
                                         headers={"authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()

    try:
        figures = measure([info["edge_url"] for _, info in procs], [p.pid for p, _ in procs], nodes, seconds, push)
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            proc.wait(timeout=120)
    db = store.open_db(datas[0], url)
    stored = int(db.execute("SELECT count(*) FROM readings").fetchone()[0])
    db.conn.close()
    return figures, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    raise_fd_limit()
    from edgetrio.tools.testkit.postgres import Postgres

    rows = []
    server = Postgres().start()
    try:
        with tempfile.TemporaryDirectory(prefix="edgetrio-replicas-bench-") as tmp:
            for name, url, replicas in (("SQLite, 1 relay", None, 1), ("PostgreSQL, 1 relay", server.database(), 1),
                                        ("PostgreSQL, 2 replicas", server.database(), 2)):
                print(f"{name}: {args.edges} edges ...", flush=True)
                figures, stored = run(Path(tmp) / name.replace(" ", "_").replace(",", ""), args.edges, args.seconds,
                                      url, replicas)
                rows.append((name, figures, stored))
    finally:
        server.close()
    print(f"\n{args.edges} edges, {os.cpu_count()} cores shared by the edges (one trio process), the relays and "
          "PostgreSQL\n")
    print(f"{'set-up':<24} {'connect s':>10} {'KiB/edge':>9} {'RSS MB':>8} {'push all s':>11} {'readings/s':>11}"
          f" {'stored':>9}")
    for name, row, stored in rows:
        print(f"{name:<24} {row['connect_s']:>10.1f} {row['kib_per_conn']:>9.1f} {row['rss_mb']:>8.1f} "
              f"{row['push_all_s']:>11.2f} {row['readings_per_s']:>11.0f} {stored:>9}")
    base = rows[0][1]
    for name, row, _ in rows[1:]:
        print(f"ratio {name} / SQLite: readings/s {row['readings_per_s'] / base['readings_per_s']:.2f}x, "
              f"memory per edge {row['kib_per_conn'] / base['kib_per_conn']:.2f}x, "
              f"push {row['push_all_s'] / base['push_all_s']:.2f}x")


if __name__ == "__main__":
    main()
