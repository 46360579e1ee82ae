"""The relay on PostgreSQL: its migrations on both back ends, and a fleet of real gateways behind haproxy (a load
balancer nobody here wrote) to two relay replicas on one real PostgreSQL, through an operator's calls on the replica
that does not hold the edge, a replica killed with -9 mid-stream, a frozen replica that comes back believing it holds
its edges (fenced), and the database crashed under load."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgetrio.cloud import database, store
from edgetrio.tools.testkit import Daemon, Probe, Relay, free_port, needs, stored, telemetry, wait_until, whole

NODES = 20
HAPROXY_BIN = shutil.which("haproxy") or "/usr/sbin/haproxy"


def columns(db: Any) -> dict[str, set[str]]:
    """Each table's columns (PostgreSQL's partitions and the down queue's order column aside)."""
    if database.is_postgres(db):
        rows = db.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
                          "AND table_name NOT LIKE 'readings\\_%'").fetchall()
    else:
        rows = [(t, c) for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
                for (c,) in [(r[1],) for r in db.execute(f"PRAGMA table_info({t})").fetchall()]]
    found: dict[str, set[str]] = {}
    for table, column in rows:
        found.setdefault(table, set()).add(column)
    found["downqueue"].discard("seq")
    return found


def test_migrations_from_empty_and_from_the_previous_version_on_both_back_ends(postgres: Any, tmp_path: Path) -> None:
    schemas = []
    for url in (None, postgres.database()):
        db = database.open_database(tmp_path / ("sqlite" if url is None else "pg"), url)
        assert database.schema_version(db) == 0
        assert database.migrate(db, upto=1) == [1]  # the previous version, with what it held
        with db.atomic():
            token = store.add_node(db, "gw1")
            store.apply_up(db, "gw1", [{"offset": 1, "resource": "readings", "body": {"readings": [
                {"device": "d1", "boot": 1, "seq": 1, "ts": time.time(), "values": {"t": 20.5}}]}}], time.time())
        assert database.migrate(db) == list(range(2, database.LATEST + 1))
        assert database.migrate(db) == []  # idempotent: every start runs it
        assert database.schema_version(db) == database.LATEST
        with db.atomic():
            assert store.check_node(db, "gw1", token)
            assert [r["values"] for r in store.query_readings(db, "gw1", "d1", None, None)] == [{"t": 20.5}]
            assert store.claim_session(db, "gw1", "r1", "test", time.time()) == 1  # version 2's table is there
        schemas.append(columns(db))
        # a database a newer relay migrated is refused, not half-used
        with db.atomic():
            db.execute("INSERT INTO schema_migrations (version, applied, what) VALUES (?, ?, ?)", [99, 0.0, "future"])
        with pytest.raises(database.DatabaseError, match="newer than this relay"):
            database.migrate(db)
        db.conn.close()
    assert schemas[0] == schemas[1]  # the same tables and columns: no feature exists on one back end only

    # a relay.db from before versioned migrations (the schema the relay made at each start) is taken as it is
    old = database.open_database(tmp_path / "old")
    with old.atomic():
        database.MIGRATIONS[1][1](old)
        store.add_node(old, "gw-old")
    assert database.migrate(old) == list(range(1, database.LATEST + 1))
    with old.atomic():
        assert store.get_node(old, "gw-old") is not None


def test_a_transaction_whose_connection_dies_inside_it_raises_and_keeps_nothing(postgres: Any, tmp_path: Path) -> None:
    """The writer catches each operation's error inside the batch's transaction; psycopg then ends a transaction on a
    dead connection without a word, and the operations before the failure were acknowledged though never committed
    (a reading lost in the crash test)."""
    url = postgres.database()
    db = store.open_db(tmp_path, url)
    other = database.PgDatabase(url)
    with pytest.raises(database.DatabaseError, match="not committed"), db.atomic():
        store.add_node(db, "gw-lost")
        pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
        other.execute("SELECT pg_terminate_backend(?)", [pid]).fetchone()
        try:  # the next operation fails, as the writer sees it, and is caught as the writer catches it
            with db.atomic():
                db.execute("SELECT 1").fetchone()
        except Exception as exc:
            assert isinstance(exc, (database.DatabaseError, *database.UNAVAILABLE)), exc
    with db.atomic():  # a new connection, and nothing of the dead one's transaction
        assert store.get_node(db, "gw-lost") is None
    db.conn.close()
    other.conn.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_replica_that_lost_an_edge_is_fenced_and_cannot_mark_it_offline(backend: str, postgres: Any,
                                                                        tmp_path: Path) -> None:
    url = postgres.database() if backend == "postgresql" else None
    db = store.open_db(tmp_path, url)
    now = time.time()
    with db.atomic():
        store.add_node(db, "gw1")
        store.start_replica(db, "a", "a:1", now)
        store.start_replica(db, "b", "b:1", now) if url else None
        first = store.claim_session(db, "gw1", "a", "edge", now)
        second = store.claim_session(db, "gw1", "b", "edge", now)  # the edge moved to b
    assert second == first + 1
    with pytest.raises(store.Fenced, match="held by replica b"), db.atomic():
        store.hold_session(db, "gw1", "a", first)  # whatever a would store for it now is refused
    with db.atomic():
        store.hold_session(db, "gw1", "b", second)
        assert store.release_session(db, "gw1", "a", first, now) is False  # a's link ending changes nothing
        assert store.is_online(db, "gw1")
        # a replica silent past the limit: its links end (b is silent here; a beats)
        offline, held, _ = store.replica_seen(db, "a", "a:1", now + 60)
        assert offline == ["gw1"] and held == {}
        assert not store.is_online(db, "gw1")
        assert store.claim_session(db, "gw1", "a", "edge", now + 61) == second + 1  # epochs never go back
    db.conn.close()


# -- a fleet behind haproxy, two replicas, one PostgreSQL ------------------------------------------------------------

HAPROXY = """global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
frontend edges
    bind 127.0.0.1:{port}
    default_backend relays
backend relays
    balance roundrobin
    option redispatch
    retries 2
    option httpchk GET /healthz
    http-check expect status 200
    default-server check inter 500ms fall 2 rise 1
    server a 127.0.0.1:{a}
    server b 127.0.0.1:{b}
"""


class Fleet:
    def __init__(self, base: Path, url: str) -> None:
        self.base = base
        self.url = url
        self.relays = {name: Relay(base / f"relay-{name}") for name in ("a", "b")}
        for relay in self.relays.values():
            relay.env = {"EDGETRIO_DATABASE": url}
            relay.port = free_port()
        self.daemons: dict[str, Daemon] = {}
        self.probes: dict[str, Probe] = {}
        self.passwords: dict[str, str] = {}
        self.published: dict[str, int] = {}
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.port = free_port()

    def start(self) -> None:
        self.relays["a"].start()
        # as the docs say: the other replicas' data dirs get the first one's operator token
        self.relays["b"].data_dir.mkdir(parents=True)
        shutil.copy(self.relays["a"].data_dir / "operator.json", self.relays["b"].data_dir / "operator.json")
        self.relays["b"].start()
        (self.base / "haproxy.cfg").write_text(HAPROXY.format(port=self.port, a=self.relays["a"].port,
                                                              b=self.relays["b"].port))
        self.haproxy = subprocess.Popen([HAPROXY_BIN, "-db", "-f", str(self.base / "haproxy.cfg")],
                                        stdout=subprocess.DEVNULL, stderr=open(self.base / "haproxy.log", "ab"))  # noqa: SIM115
        tokens = {f"gw-{i:02d}": self.relays["a"].add_node(f"gw-{i:02d}") for i in range(1, NODES + 1)}
        for node, token in tokens.items():
            (self.base / f"{node}.token").write_text(token)
            self.daemons[node] = Daemon(self.base / node, extra=(
                "--cloud", f"ws://127.0.0.1:{self.port}", "--node-id", node, "--token-file", str(self.base / f"{node}.token")))
        threads = [threading.Thread(target=d.start) for d in self.daemons.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for node, daemon in self.daemons.items():
            device = f"d{node[2:]}"
            self.passwords[node] = daemon.add_device(device)
            probe = Probe(daemon, device, self.passwords[node], device)
            assert probe.accepted()
            assert probe.subscribe(f"edgetrio/{device}/#")
            self.probes[node] = probe
            self.published[node] = 0

    def publish(self, node: str, count: int = 1) -> None:
        """The node's device sends its next `count` readings (boot 1, from seq 1), acknowledged by its gateway."""
        for _ in range(count):
            self.published[node] += 1
            seq = self.published[node]
            self.probes[node].publish(f"edgetrio/d{node[2:]}/telemetry", telemetry(seq, boot=1, ts=time.time(), t=seq))

    def holders(self) -> dict[str, str]:
        """node -> the replica (by its relay's name) holding its link now."""
        replicas = dict(self.relays["a"].sql("SELECT id, address FROM replicas"))
        ports = {str(r.port): name for name, r in self.relays.items()}
        return {node: ports.get(replicas.get(replica, ":").rsplit(":", 1)[1], "?")
                for node, replica in self.relays["a"].sql("SELECT node, replica FROM edge_sessions WHERE replica != ''")}

    def online(self) -> set[str]:
        return {n for (n,) in self.relays["a"].sql("SELECT name FROM nodes WHERE online = 1")}

    def mismatch(self) -> str:
        """What differs between the readings each gateway stored and the relay's ('' when every one is there once)."""
        for node, daemon in self.daemons.items():
            device = f"d{node[2:]}"
            at_edge = stored(daemon.data_dir / "edgetrio.db", device)
            if len(at_edge) != self.published[node]:
                return f"{node}: {self.published[node]} published, {len(at_edge)} stored at the gateway"
            at_relay = self.relays["a"].stored(device)
            if at_relay != at_edge:
                return (f"{node}: gateway {len(at_edge)} readings, relay {len(at_relay)}; missing "
                        f"{sorted(set(at_edge) - set(at_relay))[:5]}, extra {sorted(set(at_relay) - set(at_edge))[:5]}")
        return ""

    def all_stored_once(self, timeout: float = 60) -> None:
        """Wait until every reading each gateway stored is at the relay, once, and nothing else."""
        try:
            wait_until(lambda: not self.mismatch(), timeout=timeout)
        except AssertionError:
            raise AssertionError(self.mismatch()) from None

    def stop(self) -> None:
        for probe in self.probes.values():
            probe.close()
        stoppers = [threading.Thread(target=d.stop) for d in self.daemons.values() if d.proc and d.proc.poll() is None]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for relay in self.relays.values():
            if relay.proc is not None and relay.proc.poll() is None:
                relay.stop()
        if self.haproxy is not None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=10)


@pytest.fixture(scope="module")
def fleet(postgres: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    needs(os.path.exists(HAPROXY_BIN), "haproxy (Debian's haproxy package)")
    fleet = Fleet(tmp_path_factory.mktemp("replicas"), postgres.database())
    try:
        fleet.start()
        wait_until(lambda: len(fleet.online()) == NODES, timeout=120)
        yield fleet
    finally:
        fleet.stop()


def test_an_operator_reaches_every_edge_through_the_replica_that_does_not_hold_it(fleet: Fleet) -> None:
    holders = wait_until(lambda: len(h := fleet.holders()) == NODES and h, timeout=60)
    assert set(holders.values()) == {"a", "b"}, holders  # the balancer spread the edges over both
    # every replica answers to the first one's operator token, which the database keeps only as a digest
    token = json.loads((fleet.relays["a"].data_dir / "operator.json").read_text())["token"]
    assert fleet.relays["a"].sql("SELECT count(*) FROM settings WHERE value = ?", [token]) == [(0,)]
    b_url = fleet.relays["b"].api_url
    assert json.loads(fleet.relays["b"].cli("nodes", "--json", "--url", b_url, "--token", token).stdout)
    refused = fleet.relays["b"].cli("nodes", "--url", b_url, "--token", "not-the-token", check=False)
    assert refused.returncode == 1 and "401" in refused.stderr
    for node in fleet.daemons:
        fleet.publish(node, 3)
    fleet.all_stored_once(timeout=60)
    for node, holder in holders.items():  # a desired change through the other replica reaches the gateway
        other = fleet.relays["b" if holder == "a" else "a"]
        device = f"d{node[2:]}"
        wait_until(lambda d=device, r=other, n=node: any(x["id"] == d for x in r.json("devices", n)), timeout=30)
        other.json("twin", "set", node, device, f"period={int(node[3:]) + 10}")
    for node, daemon in fleet.daemons.items():
        wait_until(lambda d=daemon, n=node: json.loads(d.cli("twin", "get", f"d{n[2:]}", "--json").stdout)
                   ["desired"]["state"] == {"period": int(n[3:]) + 10}, timeout=60)
    # a command through the replica that does not hold the edge, answered by the device
    node = next(iter(holders))
    other = fleet.relays["b" if holders[node] == "a" else "a"]
    device, probe = f"d{node[2:]}", fleet.probes[node]

    def answer() -> None:
        command = probe.next_json(f"edgetrio/{device}/cmd", timeout=60)
        probe.publish(f"edgetrio/{device}/cmd/result", json.dumps({"id": command["id"], "ok": True, "value": 42}))

    responder = threading.Thread(target=answer)
    responder.start()
    result = other.json("cmd", node, device, "ping")
    responder.join()
    assert result["ok"] is True and result["value"] == 42, result
    assert fleet.relays["a"].sql("SELECT count(*) FROM downqueue") == [(0,)]  # each confirmed, none left behind


def test_a_replica_killed_mid_stream_loses_and_repeats_nothing(fleet: Fleet) -> None:
    holders = fleet.holders()
    victim = max(("a", "b"), key=lambda r: sum(1 for h in holders.values() if h == r))
    moved = [n for n, h in holders.items() if h == victim]
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            for node in fleet.daemons:
                fleet.publish(node)
            time.sleep(0.05)

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        wait_until(lambda: len(fleet.relays["a" if victim == "b" else "b"].stored(f"d{moved[0][2:]}")) > 0, timeout=30)
        fleet.relays[victim].stop(signal.SIGKILL)
        # a twin change for an edge of the dead replica, queued through the live one while the edge moves
        survivor = fleet.relays["b" if victim == "a" else "a"]
        target = moved[0]
        survivor.json("twin", "set", target, f"d{target[2:]}", "period=99")
        wait_until(lambda: set(fleet.holders().values()) == {"b" if victim == "a" else "a"}
                   and len(fleet.holders()) == NODES, timeout=120)
    finally:
        stop.set()
        streamer.join()
    fleet.all_stored_once(timeout=120)
    for node in fleet.daemons:
        whole(fleet.relays["a"].stored(f"d{node[2:]}"))  # every reading from the first, none twice
    daemon = fleet.daemons[target]
    wait_until(lambda: json.loads(daemon.cli("twin", "get", f"d{target[2:]}", "--json").stdout)
               ["desired"]["state"].get("period") == 99, timeout=60)
    wait_until(lambda: fleet.relays["a"].sql("SELECT count(*) FROM downqueue") == [(0,)], timeout=60)
    assert fleet.online() == set(fleet.daemons)
    fleet.relays[victim].start()  # back, a replica of its own again (a new id): the balancer spreads new links to it


def test_a_frozen_replica_that_wakes_is_fenced_and_marks_no_live_edge_offline(fleet: Fleet) -> None:
    holders = fleet.holders()  # after the kill above, one replica holds every edge: it is the one frozen
    frozen = max(("a", "b"), key=lambda r: sum(1 for h in holders.values() if h == r))
    other = "b" if frozen == "a" else "a"
    held = [n for n, h in holders.items() if h == frozen]
    relay = fleet.relays[frozen]
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGSTOP)  # it still believes it holds its edges
    try:  # its edges find it silent (their pings), and the balancer sends them to the other replica
        wait_until(lambda: all(fleet.holders().get(n) == other for n in held), timeout=120)
        for node in held:
            fleet.publish(node, 2)
        fleet.all_stored_once(timeout=60)
    finally:
        os.kill(relay.proc.pid, signal.SIGCONT)
    # awake, it lets its stale links go (they broke, or its sweep finds them held elsewhere, or a write is fenced)
    wait_until(lambda: edges_connected(relay) == 0, timeout=30)
    for node in held:  # the woken replica let its stale links go; none of its edges went offline by it
        fleet.publish(node)
    fleet.all_stored_once(timeout=60)
    assert fleet.online() == set(fleet.daemons)
    assert all(h == other for n, h in fleet.holders().items() if n in held)


def edges_connected(relay: Relay) -> float:
    """The relay's own count of its live edge links (/metrics)."""
    with urllib.request.urlopen(f"http://{relay.metrics}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return float(re.search(r"^edgetrio_relay_edges_connected (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def healthz(relay: Relay) -> int:
    try:
        with urllib.request.urlopen(relay.api_url + "/healthz", timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_the_database_crashed_under_load_loses_nothing(fleet: Fleet, postgres: Any) -> None:
    for node in fleet.daemons:  # load in flight when it crashes
        fleet.publish(node, 5)
    postgres.crash()
    # both relays see it away (their health check, which the balancer also reads, fails) ...
    wait_until(lambda: all(healthz(r) == 503 for r in fleet.relays.values()), timeout=30)
    for node in fleet.daemons:  # ... while the gateways keep taking readings
        fleet.publish(node, 5)
    # `make test-postgres` holds the database down for a minute (the "loss of the database for a minute"),
    # the gateways taking a reading a second each meanwhile; `make test` only as long as the steps above take
    until = time.monotonic() + float(os.environ.get("EDGETRIO_TEST_DATABASE_OUTAGE", "0"))
    while time.monotonic() < until:
        for node in fleet.daemons:
            fleet.publish(node)
        time.sleep(1)
    gone = "gw-01"  # and one gateway stops meanwhile: its link ends while no replica can write that down
    fleet.probes[gone].close()
    fleet.daemons[gone].stop()
    postgres.start()
    for relay in fleet.relays.values():  # the relays waited and resumed: neither exited
        assert relay.proc is not None and relay.proc.poll() is None
    # the gone gateway is shown offline (its replica's sweep ends the link row it could not end then), the rest online
    wait_until(lambda: fleet.online() == set(fleet.daemons) - {gone}, timeout=120)
    fleet.daemons[gone].start()
    probe = Probe(fleet.daemons[gone], f"d{gone[2:]}", fleet.passwords[gone], f"d{gone[2:]}")
    assert probe.accepted()
    fleet.probes[gone] = probe
    fleet.all_stored_once(timeout=180)
    wait_until(lambda: fleet.online() == set(fleet.daemons), timeout=120)


def test_the_docs_haproxy_example_is_a_valid_haproxy_config(tmp_path: Path) -> None:
    needs(os.path.exists(HAPROXY_BIN), "haproxy (Debian's haproxy package)")
    text = (Path(__file__).parents[1] / "docs" / "cloud.md").read_text()
    found = re.search(r"Put any TCP load balancer in front.*?```\n(.*?)```", text, re.S)
    assert found is not None
    (tmp_path / "haproxy.cfg").write_text(found.group(1))
    check = subprocess.run([HAPROXY_BIN, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
