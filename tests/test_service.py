"""Run like a service: systemd's notify protocol (readiness, watchdog), and Prometheus metrics and health over HTTP,
each checked with the real thing on the other side (a unix datagram socket, an HTTP client)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path

from edgetrio.cli import main as cli_main
from edgetrio.daemon import store
from edgetrio.daemon.config import DaemonConfig, build_config, load_config_file, parse_sinks
from edgetrio.tools.demo import wait_for_daemon
from edgetrio.tools.testkit import ROOT, Daemon, Probe, Relay, needs, wait_until


def metrics_at(address: str) -> dict[str, float]:
    """Every sample of a Prometheus /metrics page (the daemon's or the relay's), by its name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def scrape(daemon: Daemon) -> dict[str, float]:
    return metrics_at(daemon.metrics)


def test_metrics_and_health_move_with_the_readings(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "gw").start()
    assert re.fullmatch(r"127\.0\.0\.1:\d+", daemon.metrics)
    log = open(tmp_path / "vdev.log", "ab")  # noqa: SIM115
    boards = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--count", "2", "--period", "0.2",
                               "--data-dir", str(daemon.data_dir)], cwd=ROOT, stdout=log, stderr=log)
    try:
        first = wait_until(lambda: (m := scrape(daemon)).get("edgetrio_readings_ingested_total", 0) > 5 and m,
                           timeout=60)
        later = wait_until(lambda: (m := scrape(daemon))["edgetrio_readings_ingested_total"]
                           > first["edgetrio_readings_ingested_total"] + 5 and m, timeout=60)
        assert later["edgetrio_devices_online"] == 2 and later["edgetrio_devices_registered"] == 2
        assert later["edgetrio_store_ok"] == 1 and later["edgetrio_readings_held"] >= 0
        assert later["edgetrio_commit_seconds_count"] > first["edgetrio_commit_seconds_count"]
        latency = "edgetrio_publish_to_commit_seconds"
        assert later[f"{latency}_count"] > first[f"{latency}_count"] and later[f"{latency}_sum"] > 0
        assert later["process_resident_memory_bytes"] > 10e6
        with urllib.request.urlopen(f"http://{daemon.metrics}/healthz", timeout=10) as reply:
            assert reply.status == 200
            assert json.loads(reply.read()) == {"ok": True, "store": "ok", "broker": "ok"}
        try:
            urllib.request.urlopen(f"http://{daemon.metrics}/nothing", timeout=10)
            raise AssertionError("an unknown path answered")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    finally:
        boards.send_signal(signal.SIGTERM)
        boards.wait(timeout=30)
        daemon.stop()


def test_the_daemon_speaks_systemds_notify_protocol(tmp_path: Path) -> None:
    notify = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.1)
    data = tmp_path / "gw"
    env = dict(os.environ, NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="400000")  # pings every 0.2 s
    log = open(tmp_path / "daemon.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data), "--mqtt-host",
                             "127.0.0.1", "--mqtt-port", "0", "--metrics-port", "-1"], cwd=ROOT, env=env,
                            stdout=log, stderr=log)

    def received(seconds: float) -> list[str]:
        out, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                out.append(sock.recv(4096).decode())
        return out

    def until(pings: int, timeout: float = 60) -> list[str]:
        """What the daemon sent until it had fed the watchdog `pings` times (a wait for the state, not a time)."""
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while out.count("WATCHDOG=1") < pings and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                out.append(sock.recv(4096).decode())
        return out

    try:
        wait_for_daemon(data, proc)
        first = until(3)
        assert first and first[0].startswith("READY=1\nSTATUS=serving 0 devices"), first
        assert first.count("WATCHDOG=1") >= 3, first
        proc.send_signal(signal.SIGSTOP)  # a daemon that cannot run (as a wedged loop) stops feeding the watchdog
        received(0.1)
        assert received(1.0) == []
        proc.send_signal(signal.SIGCONT)
        assert "WATCHDOG=1" in until(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "STOPPING=1" in received(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_service_install_writes_a_unit_systemd_accepts_and_a_config_the_daemon_loads(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(tmp_path)
    run = [sys.executable, "-m", "edgetrio", "service", "install", "--user"]
    dry = subprocess.run([*run, "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "Type=notify" in dry.stdout and "WatchdogSec=" in dry.stdout
    assert not (tmp_path / ".config").exists()  # a dry run writes nothing
    subprocess.run(run, env=env, check=True, capture_output=True, timeout=60)
    unit = tmp_path / ".config" / "systemd" / "user" / "edgetrio-daemon.service"
    config = tmp_path / ".config" / "edgetrio" / "daemon.toml"
    assert f"--config {config}" in unit.read_text()
    # the unit's own command line starts a daemon from that file alone (ports moved off the defaults by flags, which
    # win, so the suite's other daemons do not clash); it serves from the data dir the file names
    exec_start = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    command = [*shlex.split(exec_start.removeprefix("ExecStart=")), "--mqtt-host", "127.0.0.1", "--mqtt-port", "0",
               "--metrics-port", "0", "--http-port", "0"]
    data = tmp_path / ".local" / "share" / "edgetrio" / "gateway"
    with open(tmp_path / "service-daemon.log", "ab") as log:
        daemon = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=log)
        try:
            info = wait_for_daemon(data, daemon)
            assert info["pid"] == daemon.pid
            shown = json.loads(subprocess.run([sys.executable, "-m", "edgetrio", "config", "show", "--config",
                                               str(config), "--json"], env=env, capture_output=True, text=True,
                                              check=True, timeout=60).stdout)
            assert shown["data_dir"] == {"value": str(data), "from": f"file {config}"}
            assert shown["metrics_port"]["value"] == 9883 and shown["log_level"]["value"] == "info"
        finally:
            daemon.terminate()
            assert daemon.wait(timeout=30) == 0
    config.write_text(config.read_text() + "# mine\n")
    again = subprocess.run([*run, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert [f["written"] for f in json.loads(again.stdout)["files"]] == [True, False]  # the user's settings stay
    assert config.read_text().endswith("# mine\n")
    verify = shutil.which("systemd-analyze")
    needs(verify is not None, "systemd-analyze (Debian's systemd), to check the unit")
    assert verify is not None
    checked = subprocess.run([verify, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "ignoring" not in checked.stderr, checked.stderr


def test_a_system_install_runs_as_its_own_user_and_root_acts_as_the_data_dirs_owner(tmp_path: Path) -> None:
    """The system units run as `edgetrio`, not root; the relay's install warns of plain HTTP; and root working on a
    data dir another user owns (the service's) works as that user, so the service can still open every file."""
    run = [sys.executable, "-m", "edgetrio", "service", "install"]
    for what in ("daemon", "relay"):
        dry = json.loads(subprocess.run([*run, what, "--dry-run", "--json"], capture_output=True, text=True,
                                        check=True, timeout=60).stdout)
        unit = dry["files"][0]["text"]
        assert "User=edgetrio\nGroup=edgetrio\n" in unit and "StateDirectory=edgetrio" in unit
        assert any("system user edgetrio" in note for note in dry["notes"])
        assert ("plain HTTP" in " ".join(dry["notes"])) == (what == "relay")
        verify = shutil.which("systemd-analyze")
        needs(verify is not None, "systemd-analyze (Debian's systemd), to check the unit")
        assert verify is not None
        path = tmp_path / f"edgetrio-{what}.service"
        path.write_text(unit)
        checked = subprocess.run([verify, "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and "ignoring" not in checked.stderr, checked.stderr
    # a Python under /tmp (a venv made there to try it out): the unit leaves PrivateTmp out, which would hide it
    temporary = Path(tempfile.mkdtemp(prefix="edgetrio-python-", dir="/tmp"))
    try:
        (temporary / "python3").symlink_to(sys.executable)
        site = next(p for p in sys.path if p.endswith("site-packages"))
        there = json.loads(subprocess.run([str(temporary / "python3"), "-m", "edgetrio", "service", "install",
                                           "--dry-run", "--json"], capture_output=True, text=True, check=True,
                                          timeout=60, env={**os.environ, "PYTHONPATH": f"{ROOT}:{site}"}).stdout)
        assert "PrivateTmp" not in there["files"][0]["text"] and "ExecStart=" + str(temporary) in there["files"][0]["text"]
        assert any("leaves out PrivateTmp" in note for note in there["notes"]), there["notes"]
        assert "PrivateTmp=yes" in dry["files"][0]["text"] or str(ROOT).startswith(("/tmp/", "/var/tmp/"))
    finally:
        shutil.rmtree(temporary)
    needs(os.geteuid() == 0, "root, to act on a data dir another user owns")
    nobody = pwd.getpwnam("nobody")
    data = Path(tempfile.mkdtemp(prefix="edgetrio-owned-"))  # in /tmp: reachable by that user, unlike tmp_path
    try:
        os.chown(data, nobody.pw_uid, nobody.pw_gid)
        # the command line's own main(), in a child forked from here: as nobody the child could not read a checkout
        # under /root, so what `device add` imports is imported first, by the same command on a dir root owns
        cli_main(["device", "add", "warm-1", "--data-dir", str(tmp_path / "root-owned")])
        assert (tmp_path / "root-owned" / "edgetrio.db").stat().st_uid == 0
        child = os.fork()
        if child == 0:
            code = 1
            try:
                cli_main(["device", "add", "porch-1", "--data-dir", str(data)])
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
        made = list(data.iterdir())
        assert made and all(f.stat().st_uid == nobody.pw_uid for f in made), [(f.name, f.stat().st_uid) for f in made]
    finally:
        shutil.rmtree(data)


def test_logs_under_journald_carry_no_timestamp_of_their_own(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    for journald, stamped in ((False, True), (True, False)):
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journald:
            env["JOURNAL_STREAM"] = "8:12345"
        proc = subprocess.Popen([sys.executable, "-m", "edgetrio", "daemon", "--data-dir", str(data), "--mqtt-host",
                                 "127.0.0.1", "--mqtt-port", "0", "--metrics-port", "-1"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_daemon(data, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        ready = next(line for line in err.decode().splitlines() if "daemon ready" in line)
        assert bool(re.match(r"\d{4}-\d\d-\d\d ", ready)) is stamped, ready


def test_a_backup_taken_while_the_daemon_writes_restores(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "gw").start()
    try:
        password = daemon.add_device("b1")
        probe = Probe(daemon, "b1", password, "b1")
        assert probe.accepted() and probe.subscribe("edgetrio/b1/ack")
        for seq in range(1, 201):
            probe.publish("edgetrio/b1/telemetry", json.dumps({"boot": 1, "seq": seq, "values": {"t": seq}}))
        while probe.next_json("edgetrio/b1/ack")["seq"] < 100:
            pass
        out = daemon.cli("backup", str(tmp_path / "copy"), "--json")  # readings still arriving meanwhile
        assert json.loads(out.stdout)["files"] == ["edgetrio.db", "admin.json"]
        probe.close()
    finally:
        daemon.stop()
    restored = Daemon(tmp_path / "copy").start()
    try:
        rows = json.loads(restored.cli("readings", "b1", "--json").stdout)
        assert len(rows) >= 100 and [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
        again = Probe(restored, "b1", password, "b1")  # the device's credential came along
        assert again.accepted()
        again.close()
    finally:
        restored.stop()
    refused = subprocess.run([sys.executable, "-m", "edgetrio", "backup", str(tmp_path / "copy"), "--data-dir",
                              str(tmp_path / "gw")], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not empty" in refused.stderr


def test_the_operations_guide_documents_every_setting_and_its_example_loads(tmp_path: Path) -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    example = re.search(r"```toml\n(.*?)```", guide, re.S)
    assert example is not None
    path = tmp_path / "daemon.toml"
    path.write_text(example.group(1))
    settings = load_config_file(path)
    (tmp_path / "token").write_text("t0ken\n")
    cfg = build_config({**settings, "cloud_token_file": tmp_path / "token"}, {})
    assert cfg.node_id == "greenhouse-gw" and cfg.serial == ["/dev/ttyUSB0"] and cfg.cloud_token == "t0ken"
    assert [s.kind for s in parse_sinks(cfg.export)] == ["mqtt", "webhook"]
    table = {m for row in re.findall(r"^\| (`.*?`) \|", guide, re.M) for m in re.findall(r"`(\w+)`", row)}
    assert {f.name for f in fields(DaemonConfig)} <= table, {f.name for f in fields(DaemonConfig)} - table


def test_config_show_says_where_each_setting_came_from(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text('mqtt_port = 1884\nlog_level = "debug"\n')
    env = dict(os.environ, EDGETRIO_CLOUD_TOKEN="s3cret")
    out = subprocess.run([sys.executable, "-m", "edgetrio", "config", "show", "--config", str(config), "--log-level",
                          "warning", "--cloud", "ws://127.0.0.1:9", "--node-id", "gw", "--json"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    shown = json.loads(out.stdout)
    assert shown["mqtt_port"] == {"value": 1884, "from": f"file {config}"}
    assert shown["log_level"] == {"value": "warning", "from": "flag"}  # a flag wins over the file
    assert shown["retention_days"] == {"value": 90.0, "from": "default"}
    assert shown["cloud_token"] == {"value": "(set, not shown)", "from": "environment"}
    assert "s3cret" not in out.stdout
    config.write_text("mqtt_port = 'x'\n")
    bad = subprocess.run([sys.executable, "-m", "edgetrio", "config", "show", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "mqtt_port must be a int" in bad.stderr


def test_the_relays_metrics_follow_edges_batches_and_api_requests(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay").start()
    daemon = None
    try:
        token_file = tmp_path / "token"
        token_file.write_text(relay.add_node("gw1"))
        daemon = Daemon(tmp_path / "gw", extra=("--cloud", relay.url, "--node-id", "gw1", "--token-file",
                                                 str(token_file))).start()
        password = daemon.add_device("r1")
        probe = Probe(daemon, "r1", password, "r1")
        assert probe.accepted() and probe.subscribe("edgetrio/r1/ack")
        for seq in range(1, 31):
            probe.publish("edgetrio/r1/telemetry", json.dumps({"boot": 1, "seq": seq, "values": {"t": seq}}))

        seen = wait_until(lambda: (m := metrics_at(relay.metrics)).get("edgetrio_relay_readings_received_total", 0) >= 30
                          and m, timeout=60)
        assert seen["edgetrio_relay_edges_connected"] == 1 and seen["edgetrio_relay_batches_stored_total"] >= 1
        assert seen["edgetrio_relay_commits_total"] >= 1 and seen["process_resident_memory_bytes"] > 10e6
        operator = json.loads((tmp_path / "relay" / "operator.json").read_text())["token"]
        for token in (operator, "wrong"):
            request = urllib.request.Request(f"{relay.api_url}/api/nodes", headers={"Authorization": f"Bearer {token}"})
            try:
                urllib.request.urlopen(request, timeout=10).close()
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
        after = metrics_at(relay.metrics)
        assert after['edgetrio_relay_api_requests_total{status="200"}'] >= 1
        assert after['edgetrio_relay_api_requests_total{status="401"}'] >= 1
        with urllib.request.urlopen(f"http://{relay.metrics}/healthz", timeout=10) as reply:
            assert json.loads(reply.read()) == {"ok": True, "store": "ok"}
        probe.close()
    finally:
        if daemon is not None:
            daemon.stop()
        relay.stop()


def test_status_shows_each_component_with_its_state(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "gw", extra=("--serial", str(tmp_path / "ttyNothing"))).start()
    try:
        components = {c["name"]: c for c in daemon.status()["daemon"]["components"]}
        assert {"broker", "store", "ingest", "control", "metrics", f"serial {tmp_path / 'ttyNothing'}"} <= set(
            components)
        assert components["broker"]["vital"] and components["store"]["vital"] and components["ingest"]["vital"]
        assert all(c["state"] == "running" for c in components.values()), components
        human = daemon.cli("status").stdout
        assert "ingest" in human and "running" in human
    finally:
        daemon.stop()


def test_a_metrics_port_in_use_is_logged_and_the_daemon_serves_on(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(tmp_path / "gw", extra=("--metrics-port", str(port))).start()
        try:
            assert daemon.metrics == ""  # not served, and said so
            components = {c["name"]: c for c in daemon.status()["daemon"]["components"]}
            assert components["metrics"]["state"] == "off" and components["ingest"]["state"] == "running"
            assert "metrics and health not served" in daemon.log_text()
        finally:
            daemon.stop()


def test_the_outbox_state_read_from_the_key_ends_matches_a_count(tmp_path: Path) -> None:
    db = store.open_db(tmp_path / "gw")
    for i in range(50):
        store.outbox_add(db, "readings", {"i": i}, 1000.0 + i)
    store.outbox_acknowledged(db, 10)
    store.outbox_bound(db, max_rows=30, max_age=1e9, now=2000.0)
    counted = db.execute("SELECT count(*), min(ts) FROM outbox").fetchone()
    assert store.outbox_state(db) == {"rows": counted[0], "oldest": counted[1]} == {"rows": 30, "oldest": 1020.0}
    store.outbox_acknowledged(db, 100)
    assert store.outbox_state(db) == {"rows": 0, "oldest": None}
