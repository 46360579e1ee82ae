"""The relay and the edge's cloud link, with real processes on loopback and virtual boards running the real firmware
(their flash buffer, their twin, their commands): what the boards sent and the edge stored reaches the relay exactly
once, whatever stops or is killed on the way."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgetrio.tools.testkit import Daemon, Probe, Relay, stored, virtual_boards, wait_until, whole


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Relay, Daemon, str]]:
    """A relay with node gw1 and a gateway daemon (not started) linked to it by a token file."""
    relay = Relay(tmp_path / "relay").start()
    token = relay.add_node("gw1")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    daemon = Daemon(tmp_path / "gw", extra=("--cloud", relay.url, "--node-id", "gw1", "--token-file", str(token_file)))
    yield relay, daemon, token
    for proc in (daemon, relay):
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


def edge(daemon: Daemon, device: str) -> list[tuple[int, int]]:
    return stored(daemon.data_dir / "edgetrio.db", device)


def cloud(relay: Relay, device: str) -> list[tuple[int, int]]:
    return relay.stored(device)


def online_at_relay(relay: Relay, device: str) -> bool:
    return any(d["id"] == device and d["online"] for d in relay.json("devices", "gw1"))


def test_readings_reach_the_relay_and_twin_flows_both_ways(fleet: tuple[Relay, Daemon, str]) -> None:
    relay, daemon, token = fleet
    daemon.start()
    assert daemon.proc is not None  # the token came from a file: not in the command line for `ps` to show
    assert token not in Path(f"/proc/{daemon.proc.pid}/cmdline").read_text()
    with virtual_boards(daemon, "s", period=0.2) as [board]:
        wait_until(lambda: len(edge(daemon, board)) >= 5, timeout=90)
        wait_until(lambda: cloud(relay, board)[:5] == edge(daemon, board)[:5])
        newest = relay.json("readings", "gw1", board, "--limit", "1")[0]
        at_edge = {(r["boot"], r["seq"]): r["values"] for r in json.loads(daemon.cli("readings", board, "--json").stdout)}
        assert newest["values"] == at_edge[(newest["boot"], newest["seq"])]  # the same values, not just the seqs
        assert set(newest["values"]) >= {"temperature", "pressure", "humidity"}
        nodes = relay.json("nodes")
        assert nodes[0]["name"] == "gw1" and nodes[0]["online"] is True
        assert [(d["id"], d["online"]) for d in relay.json("devices", "gw1")] == [(board, True)]
        # desired from the cloud reaches the board, which applies it; its report comes back up
        relay.json("twin", "set", "gw1", board, "period=15")
        twin = wait_until(lambda: (t := relay.json("twin", "get", "gw1", board))["reported"]["state"].get("period")
                          == 15 and t, timeout=60)
        assert twin["delta"] == {}
        assert json.loads(daemon.cli("twin", "get", board, "--json").stdout)["desired"]["state"] == {"period": 15}
        # a stale version is a conflict at the cloud too
        stale = relay.cli("twin", "set", "gw1", board, "period=1", "--version", "0", check=False)
        assert stale.returncode == 1 and "conflict" in stale.stderr and "409" in stale.stderr
        # what the board says it cannot take is refused at the relay too, as at the gateway (else the two disagree)
        for bad, why in (("period=-1", "below minimum"), ("nosuch=1", "not a setting"), ("led=maybe", "expected bool")):
            refused = relay.cli("twin", "set", "gw1", board, bad, check=False)
            assert refused.returncode == 1 and why in refused.stderr and "400" in refused.stderr, refused.stderr
        assert relay.json("twin", "get", "gw1", board)["desired"]["state"] == {"period": 15}
        done = relay.json("twin", "set-all", "nosuch=1")
        assert done["devices"] == 0 and "not a setting" in done["skipped"][f"gw1/{board}"]


def test_relay_down_then_back_ends_with_every_reading_exactly_once(fleet: tuple[Relay, Daemon, str]) -> None:
    relay, daemon, _ = fleet
    daemon.start()
    with virtual_boards(daemon, "s", period=0.1) as [board]:
        wait_until(lambda: len(cloud(relay, board)) >= 5, timeout=90)
        relay.stop()
        at_stop = len(edge(daemon, board))
        wait_until(lambda: len(edge(daemon, board)) >= at_stop + 30, timeout=60)  # the edge goes on alone
        status = daemon.status()
        assert status["daemon"]["cloud"]["connected"] is False and status["outbox"]["rows"] > 0
        relay.start()  # same port and data
        wait_until(lambda: len(cloud(relay, board)) >= at_stop + 30, timeout=60)
    final = edge(daemon, board)  # the board stopped: what the edge holds is final
    whole(final)
    wait_until(lambda: cloud(relay, board) == final, timeout=60)
    wait_until(lambda: daemon.status()["outbox"]["rows"] == 0)


def test_kill_9_of_the_relay_and_of_the_daemon_mid_stream_loses_nothing(fleet: tuple[Relay, Daemon, str]) -> None:
    """The boards keep what was not acknowledged on their flash and send it again: after a kill -9 of the relay and
    then of the gateway, mid-stream, every board's readings are whole at the edge and the same at the relay."""
    relay, daemon, _ = fleet
    daemon.start()
    with virtual_boards(daemon, "k", count=2, period=0.1) as boards:

        def grown(by: int) -> None:
            marks = {b: len(edge(daemon, b)) for b in boards}
            wait_until(lambda: all(len(edge(daemon, b)) >= marks[b] + by for b in boards), timeout=90)
        grown(10)
        relay.stop(signal.SIGKILL)
        relay.start()
        grown(20)
        daemon.stop(signal.SIGKILL)
        daemon.start()  # same port: the boards reconnect and send what was never acknowledged
        grown(20)
    for board in boards:
        final = edge(daemon, board)
        whole(final)
        wait_until(lambda: cloud(relay, board) == final, timeout=90)  # noqa: B023 (waited for here)


def test_desired_set_while_the_edge_is_offline_is_applied_on_reconnect(fleet: tuple[Relay, Daemon, str]) -> None:
    relay, daemon, _ = fleet
    daemon.start()
    with virtual_boards(daemon, "s") as [board]:
        wait_until(lambda: online_at_relay(relay, board), timeout=90)
        daemon.stop()  # the gateway is away; the board goes on buffering
        twin = relay.json("twin", "set", "gw1", board, "led=true", "threshold=3")
        assert twin["desired"]["state"] == {"led": True, "threshold": 3}
        assert relay.json("nodes")[0]["queued"] == 1
        daemon.start()
        wait_until(lambda: relay.json("nodes")[0]["queued"] == 0)
        edge_twin = json.loads(daemon.cli("twin", "get", board, "--json").stdout)
        assert edge_twin["desired"]["state"] == {"led": True, "threshold": 3}
        # the board gets it when it is back, applies it, and its report reaches the cloud
        wait_until(lambda: {k: relay.json("twin", "get", "gw1", board)["reported"]["state"].get(k)
                            for k in ("led", "threshold")} == {"led": True, "threshold": 3}, timeout=60)


def test_command_from_the_cloud_and_device_added_from_the_cloud(fleet: tuple[Relay, Daemon, str]) -> None:
    relay, daemon, _ = fleet
    daemon.start()
    with virtual_boards(daemon, "s") as [board]:
        wait_until(lambda: online_at_relay(relay, board), timeout=90)
        result = relay.json("cmd", "gw1", board, "ping")
        assert result == {"id": result["id"], "ok": True, "value": "pong"}  # the firmware's answer
        failed = relay.cli("cmd", "gw1", board, "selfdestruct", check=False)
        assert failed.returncode == 1 and "unknown command selfdestruct" in failed.stdout, failed.stdout

        # a device added from the cloud: its credential works at the edge; connected, it takes commands and (this
        # one) never answers, which the cloud's caller is told
        added = relay.json("device", "add", "gw1", "s6")
        assert set(added) == {"id", "username", "password", "state"} and added["state"] == "registered"
        assert "s6" in [d["id"] for d in json.loads(daemon.cli("device", "list", "--json").stdout)]  # at once
        # a model the gateway does not have: the node refuses, and the operator is told, not shown success
        refused = relay.cli("device", "add", "gw1", "s7", "--model", "nosuch", check=False)
        assert refused.returncode == 1 and "the node refused this registration: unknown model 'nosuch'" in (
            refused.stderr), refused.stderr
        assert "s7" not in [d["id"] for d in relay.json("devices", "gw1")]
        silent = Probe(daemon, added["username"], added["password"], "s6")
        assert silent.accepted() and silent.subscribe("edgetrio/s6/cmd")
        silent.publish("edgetrio/s6/status", "online")
        wait_until(lambda: online_at_relay(relay, "s6"), timeout=30)
        slow = relay.cli("cmd", "gw1", "s6", "ping", "--timeout", "1", check=False)
        assert slow.returncode == 1 and "did not answer" in slow.stderr
        assert json.loads(silent.next("edgetrio/s6/cmd")[1])["name"] == "ping"  # it was delivered
        silent.close()
        daemon.stop()
        offline = relay.cli("cmd", "gw1", board, "ping", check=False)
        assert offline.returncode == 1 and "offline" in offline.stderr
        assert relay.json("device", "add", "gw1", "s8")["state"] == "queued"  # the node is offline: it waits


def test_the_relay_deletes_readings_older_than_its_retention(fleet: tuple[Relay, Daemon, str]) -> None:
    relay, daemon, _ = fleet
    daemon.start()
    with virtual_boards(daemon, "s", period=0.1) as [board]:
        wait_until(lambda: len(cloud(relay, board)) >= 10, timeout=90)
        relay.stop()
    kept = edge(daemon, board)  # the board stopped: final
    oldest = kept[:4]
    # the first four arrived 40 days ago
    relay.sql("UPDATE readings SET received = received - 40 * 86400, ts = ts - 40 * 86400 "
              "WHERE device = ? AND boot = ? AND seq = ?", [(board, b, s) for b, s in oldest], many=True)
    relay.extra = ("--retention-days", "30")
    relay.start()
    wait_until(lambda: cloud(relay, board) == kept[4:], timeout=60)
    assert "retention: deleted 4 rows older than 30 days" in (relay.data_dir.parent / "relay-relay.log").read_text()
    with virtual_boards(daemon, "s", period=0.1):  # the link goes on as before: the board's next boot arrives
        wait_until(lambda: len({b for b, _ in cloud(relay, board)}) == 2, timeout=90)


def test_a_gateway_installed_anew_for_its_node_loses_none_of_its_first_readings(fleet: tuple[Relay, Daemon, str],
                                                                                  tmp_path: Path) -> None:
    """A new data dir counts its outbox from 1 again: the relay took those offsets for ones it had, acknowledged
    them and dropped them. The edge sends its outbox's identity; a new one sets the relay's count back."""
    relay, daemon, _ = fleet
    daemon.start()
    with virtual_boards(daemon, "old", period=0.2) as [board]:
        wait_until(lambda: len(cloud(relay, board)) >= 10, timeout=90)
    daemon.stop()
    again = Daemon(tmp_path / "gw-new", extra=daemon.extra).start()  # same node and token, nothing of the old
    try:
        with virtual_boards(again, "new", period=0.2) as [fresh]:
            wait_until(lambda: len(edge(again, fresh)) >= 3, timeout=90)
        final = edge(again, fresh)
        wait_until(lambda: cloud(relay, fresh) == final, timeout=60)
        assert "sends from a new outbox" in (relay.data_dir.parent / "relay-relay.log").read_text()
    finally:
        again.stop()
