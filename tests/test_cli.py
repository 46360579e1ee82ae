"""The command line and start-up errors: one-line messages and exit code 2, nothing half-started."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetrio.tools.testkit import ROOT, Daemon, cli, wait_until


def run_daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgetrio", "daemon", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgetrio: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_config_file_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "edgetrio.toml"
    config.write_text("mqtt_port = [not toml")
    assert "not valid TOML" in one_line_error(run_daemon("--config", str(config), "--data-dir", str(tmp_path)))
    config.write_text('mqtt_port = 1883\nbroker_colour = "blue"\n')
    assert "unknown setting 'broker_colour'" in one_line_error(run_daemon("--config", str(config)))
    config.write_text('mqtt_port = "high"\n')
    assert "mqtt_port must be a int" in one_line_error(run_daemon("--config", str(config)))
    assert "cannot read config file" in one_line_error(run_daemon("--config", str(tmp_path / "missing.toml")))


def test_config_file_alone_sets_everything_with_paths_relative_to_it(tmp_path: Path) -> None:
    """`edgetrio daemon --config FILE` and nothing else, started from another directory (as systemd starts it from /):
    every setting comes from the file, and its relative data_dir is relative to the file. Planted defects this
    catches: --config ignored (the daemon would run on ./edgetrio-data, port 1883, log level info), a relative path
    read against the working directory."""
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "edgetrio.toml"
    config.write_text('data_dir = "gw"\nmqtt_host = "127.0.0.1"\nmqtt_port = 0\nmetrics_port = 0\nhttp_port = -1\n'
                      'log_level = "debug"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--config", "../etc/edgetrio.toml"],
                            cwd=elsewhere, stdout=log, stderr=log)
    try:
        info = wait_until(lambda: (etc / "gw" / "daemon.json").exists() and json.loads(
            (etc / "gw" / "daemon.json").read_text()), timeout=60)
        assert info["pid"] == proc.pid and info["mqtt_host"] == "127.0.0.1" and info["mqtt_port"] != 1883
        assert not (elsewhere / "gw").exists() and not (elsewhere / "edgetrio-data").exists()
        wait_until(lambda: " DEBUG " in (tmp_path / "daemon.log").read_text(errors="replace"))  # the file's log level
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        log.close()


def test_port_in_use_and_second_daemon_are_one_line_errors(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        error = one_line_error(run_daemon("--data-dir", str(tmp_path / "a"), "--mqtt-host", "127.0.0.1",
                                          "--mqtt-port", str(port)))
        assert f"cannot listen for MQTT on 127.0.0.1:{port}" in error
    daemon = Daemon(tmp_path / "b").start()
    try:
        error = one_line_error(run_daemon("--data-dir", str(tmp_path / "b"), "--mqtt-port", "0"))
        assert "another daemon is already running" in error
    finally:
        daemon.stop()


def test_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "edgetrio.db").write_bytes(b"this is not a database" * 100)
    proc = cli(tmp_path, "device", "list", check=False)
    assert proc.returncode == 2 and "not a usable SQLite database" in proc.stderr
    assert "not a usable SQLite database" in one_line_error(run_daemon("--data-dir", str(tmp_path), "--mqtt-port", "0"))


def test_registry_and_twin_work_without_a_daemon(tmp_path: Path) -> None:
    model = tmp_path / "m.json"
    model.write_text(json.dumps({"name": "m1", "resources": [{"name": "t", "type": "float", "unit": "C"}]}))
    cli(tmp_path, "model", "add", str(model))
    added = json.loads(cli(tmp_path, "device", "add", "node-1", "--model", "m1", "--json").stdout)
    assert set(added) == {"id", "username", "password"} and added["id"] == "node-1" and len(added["password"]) >= 20
    again = cli(tmp_path, "device", "add", "node-1", check=False)
    assert again.returncode == 1 and "already registered" in again.stderr
    bad = cli(tmp_path, "device", "add", "bad/id", check=False)
    assert bad.returncode == 2 and "invalid device id" in bad.stderr  # a bad argument, as the README says
    nomodel = cli(tmp_path, "device", "add", "node-2", "--model", "nope", check=False)
    assert nomodel.returncode == 1 and "unknown model 'nope'" in nomodel.stderr
    # the credential is stored hashed only
    assert added["password"].encode() not in (tmp_path / "edgetrio.db").read_bytes()

    twin = json.loads(cli(tmp_path, "twin", "set", "node-1", "period=5", 'cfg={"a": 1}', "name=hall", "--json").stdout)
    assert twin["desired"] == {"state": {"period": 5, "cfg": {"a": 1}, "name": "hall"}, "version": 1}
    stale = cli(tmp_path, "twin", "set", "node-1", "period=6", "--version", "0", check=False)
    assert stale.returncode == 1 and "conflict" in stale.stderr

    listed = json.loads(cli(tmp_path, "device", "list", "--json").stdout)
    assert [(d["id"], d["model"], d["online"]) for d in listed] == [("node-1", "m1", False)]
    assert json.loads(cli(tmp_path, "readings", "node-1", "--json").stdout) == []
    cmd = cli(tmp_path, "cmd", "node-1", "ping", check=False)
    assert cmd.returncode == 1 and "no daemon is running" in cmd.stderr
    cli(tmp_path, "device", "remove", "node-1")
    gone = cli(tmp_path, "twin", "get", "node-1", check=False)
    assert gone.returncode == 1 and "unknown device 'node-1'" in gone.stderr


def test_bad_model_files_are_refused(tmp_path: Path) -> None:
    cases = {
        "a.json": ("{", "not valid json"),
        "b.json": (json.dumps({"name": "x", "resources": []}), "non-empty list"),
        "c.json": (json.dumps({"name": "x", "resources": [{"name": "t", "type": "complex"}]}), "has type 'complex'"),
        "d.toml": ('name = "x"\n[[resources]]\nname = "t"\ntype = "int"\nmin = "low"\n', "non-numeric min"),
        "e.toml": ('name = "x"\n[[resources]]\nname = "t"\ntype = "float"\nmax = nan\n', "non-numeric max"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        proc = cli(tmp_path, "model", "add", str(tmp_path / name), check=False)
        assert proc.returncode == 2 and message in proc.stderr, (name, proc.stderr)


def test_readings_filters(daemon: Daemon, device: object) -> None:
    device_id, _, probe = device()  # type: ignore[operator]
    for seq in range(1, 6):
        probe.publish(f"edgetrio/{device_id}/telemetry",
                      json.dumps({"boot": 1, "seq": seq, "ts": 1_700_000_000 + seq, "values": {"v": seq}}))
    while probe.next_json(f"edgetrio/{device_id}/ack")["seq"] != 5:
        pass
    newest = json.loads(daemon.cli("readings", device_id, "--limit", "2", "--json").stdout)
    assert [r["seq"] for r in newest] == [4, 5]
    since = json.loads(daemon.cli("readings", device_id, "--since", "1700000004", "--json").stdout)
    assert [r["values"]["v"] for r in since] == [4, 5]
    human = daemon.cli("readings", device_id).stdout
    assert "seq 3" in human and "v=3" in human
    bad = daemon.cli("readings", device_id, "--since", "yesterday-ish", check=False)
    assert bad.returncode == 2 and "cannot read time" in bad.stderr


def test_old_readings_are_deleted_after_the_retention_period(tmp_path: Path) -> None:
    import time as clock

    from edgetrio.daemon import store
    from edgetrio.daemon.topics import Reading

    data = tmp_path / "gw"
    db = store.open_db(data)
    with db.atomic():
        store.add_device(db, "old-1")
        for seq in range(1, 6):
            store.commit_readings(db, [Reading("old-1", 1, seq, None, {"t": seq})], [], clock.time() - 40 * 86400)
        store.commit_readings(db, [Reading("old-1", 1, 6, None, {"t": 6})], [], clock.time())
    # in chunks, so that a first prune of months of rows does not hold the writer for long
    with db.atomic():
        assert [store.prune(db, clock.time() - 30 * 86400, limit=2) for _ in range(4)] == [2, 2, 1, 0]
    with db.atomic():
        store.commit_readings(db, [Reading("old-1", 1, 7, None, {"t": 7})], [], clock.time() - 40 * 86400)
    db.close()
    config = tmp_path / "gw.toml"
    config.write_text("retention_days = 30\n")
    daemon = Daemon(data, extra=("--config", str(config))).start()
    try:
        wait_until(lambda: "retention: deleted 1 rows" in daemon.log_text())
        assert [r["seq"] for r in json.loads(daemon.cli("readings", "old-1", "--json").stdout)] == [6]
    finally:
        daemon.stop()


def test_version_json_everywhere_and_nonsense_numbers(tmp_path: Path) -> None:
    version = subprocess.run([sys.executable, "-m", "edgetrio", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert version.returncode == 0 and version.stdout.startswith("edgetrio ")
    data = tmp_path / "data"
    cli(data, "device", "add", "d1")
    model = tmp_path / "m.json"
    model.write_text(json.dumps({"name": "m1", "resources": [{"name": "t", "type": "float"}]}))
    assert json.loads(cli(data, "model", "add", str(model), "--json").stdout)["name"] == "m1"
    assert json.loads(cli(data, "device", "remove", "d1", "--json").stdout) == {"id": "d1", "removed": True}
    # under --json an error is a JSON object on stderr, with the same exit code as without
    failed = cli(data, "device", "remove", "d1", "--json", check=False)
    assert failed.returncode == 1 and "unknown device" in json.loads(failed.stderr)["error"]
    assert json.loads(failed.stderr)["exit_code"] == 1
    for args in (("readings", "d1", "--limit", "-3"), ("readings", "d1", "--limit", "0"),
                 ("cmd", "d1", "ping", "--timeout", "-1"), ("vdev", "--count", "0"), ("vdev", "--period", "nan")):
        proc = cli(data, *args, check=False)
        assert proc.returncode == 2 and "must be more than 0" in one_line_error(proc), args
    proc = cli(data, "readings", "d1", "--limit", "-3", "--json", check=False)
    assert proc.returncode == 2 and "--limit" in json.loads(proc.stderr)["error"]


def test_logs_and_rejects_show_what_the_store_kept(daemon: Daemon, device: object) -> None:
    device_id, _, probe = device()  # type: ignore[operator]
    probe.publish(f"edgetrio/{device_id}/log", json.dumps({"level": "warning", "message": "sensor slow"}))
    probe.publish(f"edgetrio/{device_id}/telemetry", "not json at all")
    probe.publish(f"edgetrio/{device_id}/telemetry", json.dumps({"boot": 1, "seq": 1, "values": {"v": 1}}))
    while probe.next_json(f"edgetrio/{device_id}/ack")["seq"] != 1:
        pass
    logs = json.loads(daemon.cli("logs", device_id, "--json").stdout)
    assert {"level": "warning", "message": "sensor slow"} in [row["body"] for row in logs]
    assert "[warning] sensor slow" in daemon.cli("logs", device_id).stdout
    follow = subprocess.Popen([sys.executable, "-m", "edgetrio", "logs", device_id, "--follow", "--since", "1m",
                               "--data-dir", str(daemon.data_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        assert "sensor slow" in follow.stdout.readline()
        probe.publish(f"edgetrio/{device_id}/log", json.dumps({"level": "info", "message": "a new line"}))
        assert "a new line" in follow.stdout.readline()  # followed as it arrives
    finally:
        follow.kill()
        follow.wait()
    refused = json.loads(daemon.cli("rejects", "--device", device_id, "--json").stdout)
    assert [r["reason"] for r in refused] == ["malformed_json"] and refused[0]["payload"] == "not json at all"
    assert "malformed_json" in daemon.cli("rejects").stdout
    assert daemon.cli("logs", "nobody", check=False).returncode == 1


def test_device_list_shows_last_seen_from_readings_the_count_and_the_announced_model(daemon: Daemon,
                                                                                     device: object) -> None:
    device_id, _, probe = device()  # type: ignore[operator]
    probe.publish(f"edgetrio/{device_id}/meta", json.dumps({"model": "esp32-sensor", "firmware": "0.1.0"}))
    connected = wait_until(lambda: (d := {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
                                    [device_id])["last_seen"] and d)
    time.sleep(1.5)  # so that a reading's time is distinguishable from the connect's
    for seq in (1, 2, 3):
        probe.publish(f"edgetrio/{device_id}/telemetry", json.dumps({"boot": 1, "seq": seq, "values": {"v": seq}}))
    while probe.next_json(f"edgetrio/{device_id}/ack")["seq"] != 3:
        pass
    listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}[device_id]
    assert listed["readings"] == 3
    assert listed["last_seen"] >= connected["last_seen"] + 1  # the readings moved it on
    # ... in the store too, which the dashboard reads (it once said "5 min ago" for a board reporting every 10 s)
    with sqlite3.connect(f"file:{daemon.data_dir / 'edgetrio.db'}?mode=ro", uri=True) as db:
        stored = db.execute("SELECT last_seen FROM devices WHERE id = ?", [device_id]).fetchone()[0]
    assert stored >= connected["last_seen"] + 1
    # all time includes this run, also before the daemon writes its counters (it once said 32 against 37)
    status = daemon.status()
    assert status["counters"]["readings_received"] >= status["daemon"]["counters"]["readings_received"] >= 3
    assert listed["announced_model"] == "esp32-sensor" and listed["model"] is None
    assert "esp32-sensor*" in daemon.cli("device", "list").stdout


def test_readings_as_csv_and_json_lines_for_other_tools(daemon: Daemon, device: object) -> None:
    import csv
    import io

    device_id, _, probe = device()  # type: ignore[operator]
    sent = [{"boot": 1, "seq": 1, "ts": 1_700_000_001, "values": {"t": 21.5, "label": "a,b \"q\""}},
            {"boot": 1, "seq": 2, "values": {"t": 22.0, "on": True}}]  # no time: stored as its arrival, marked
    for body in sent:
        probe.publish(f"edgetrio/{device_id}/telemetry", json.dumps(body))
    while probe.next_json(f"edgetrio/{device_id}/ack")["seq"] != 2:
        pass
    stored = json.loads(daemon.cli("readings", device_id, "--json").stdout)
    lines = daemon.cli("readings", device_id, "--format", "jsonl").stdout.splitlines()
    assert [json.loads(line) for line in lines] == stored
    table = list(csv.DictReader(io.StringIO(daemon.cli("readings", device_id, "--format", "csv").stdout)))
    assert [(row["seq"], row["t"], row["label"], row["on"], row["ts_arrival"]) for row in table] == [
        ("1", "21.5", 'a,b "q"', "", ""), ("2", "22.0", "", "true", "true")]
    assert table[0]["time_utc"] == "2023-11-14T22:13:21.000+00:00" and float(table[1]["ts"]) == stored[1]["ts"]


def leaf_commands(parser: object, words: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of an argparse tree, as the words a user types."""
    import argparse

    found = []
    for action in getattr(parser, "_actions", []):
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += leaf_commands(sub, (*words, name)) or [(*words, name)]
    return found


def test_every_command_has_help_and_data_commands_share_their_options(tmp_path: Path) -> None:
    from edgetrio.cli import build_parser

    commands = leaf_commands(build_parser())
    assert len(commands) > 40 and ("cloud", "user", "add") in commands and ("user", "add") in commands
    for words in commands:
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown), pytest.raises(SystemExit) as stopped:
            build_parser().parse_args([*words, "--help"])
        assert stopped.value.code == 0 and "usage: edgetrio " + " ".join(words) in shown.getvalue(), words
        if words[0] not in ("service", "cloud", "bundle"):  # bundle writes a folder, no data dir
            assert "--data-dir" in shown.getvalue(), words  # the gateway's data dir, declared once for all of them
    # the accounts commands are the same on both tiers: the same answers, each on its own store
    gateway, relay = tmp_path / "gateway", tmp_path / "relay"
    made = [json.loads(cli(where, *prefix, "user", "add", "ops", "--role", "admin", "--json").stdout)
            for prefix, where in (((), gateway), (("cloud",), relay))]
    assert [sorted(m) for m in made] == [["name", "password", "role"]] * 2 and made[0]["password"] != made[1]["password"]
    for prefix, where in (((), gateway), (("cloud",), relay)):
        listed = json.loads(cli(where, *prefix, "user", "list", "--json").stdout)
        assert [(u["name"], u["role"]) for u in listed] == [("ops", "admin")]
    short = subprocess.run([sys.executable, "-m", "edgetrio", "cloud", "user", "add", "x", "--password-stdin",
                            "--data-dir", str(relay)], input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "at least 8 characters" in short.stderr


def test_flags_out_of_range_and_a_url_that_is_none_are_one_line_errors(tmp_path: Path) -> None:
    for args in (["flash", "--out", str(tmp_path / "b"), "--device-id", "x", "--broker", "h", "--period", "0"],
                 ["flash", "--out", str(tmp_path / "b"), "--device-id", "x", "--broker", "h:99999"],
                 ["cloud", "nodes", "--url", "notaurl", "--token", "x"],
                 ["cloud", "node", "add", "bad/node", "--data-dir", str(tmp_path / "relay")]):
        proc = subprocess.run([sys.executable, "-m", "edgetrio", *args], capture_output=True, text=True, timeout=60,
                              cwd=ROOT)
        one_line_error(proc)
    proc = subprocess.run([sys.executable, "-m", "edgetrio", "cloud", "node", "add", "bad/node", "--data-dir",
                           str(tmp_path / "relay")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "invalid node name 'bad/node'" in proc.stderr
