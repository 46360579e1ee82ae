"""What a new user types, exactly as the README and the Makefile write it: relative paths, a fresh directory.

Every other test passes absolute temporary paths; `make demo` passes `--data-dir .demo`, and a relative data dir once
left every virtual board unable to find its own files (no reading at all). Planted defect this catches: dropping the
resolution of paths in edgetrio/cli.py:main.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from edgetrio.tools.testkit import ROOT, Daemon, greenhouse_board, wait_until

EDGETRIO = Path(sys.executable).parent / "edgetrio"  # the console script the Makefile runs


def test_make_demo_command_line_from_a_fresh_directory_shows_readings_at_the_edge_and_in_the_cloud(
        tmp_path: Path) -> None:
    command = re.search(r"^demo:.*\n\t\$\(BIN\)/edgetrio (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert command is not None, "the Makefile's demo target changed shape"
    args = command.group(1).split()
    assert "--data-dir" in args and not Path(args[args.index("--data-dir") + 1]).is_absolute()
    proc = subprocess.Popen([str(EDGETRIO), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")), daemon=True)
    reader.start()

    def every_board_at_edge_and_cloud() -> bool:
        ticks = [line for line in lines if "edge/cloud readings:" in line]
        if not ticks:
            assert proc.poll() is None, "the demo stopped:\n" + "".join(lines)
            return False
        counts = re.findall(r"(vdev-\d+) (\d+)/(\d+)", ticks[-1])
        return len(counts) == 3 and all(int(edge) > 0 and int(cloud) > 0 for _, edge, cloud in counts)

    try:
        wait_until(every_board_at_edge_and_cloud, timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # a Ctrl-C at the terminal
        proc.wait(timeout=60)
        reader.join(timeout=10)
    output = "".join(lines)
    assert "stopped with exit code" not in output, output
    assert "demo stopped" in output
    assert (tmp_path / ".demo" / "gateway" / "vdevs").is_dir()  # where the user asked, relative to where they were


def test_a_blank_virtual_board_is_new_and_a_running_board_is_not_started_twice(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "gw").start()
    with greenhouse_board(daemon):
        wait_until(lambda: any(d["id"] == "greenhouse-1" and d["online"]
                               for d in json.loads(daemon.cli("device", "list", "--json").stdout)), timeout=90)
        again = daemon.cli("vdev", "--count", "1", "--prefix", "greenhouse", check=False)
        assert again.returncode == 2 and "greenhouse-1 is already running" in again.stderr, again.stderr
        tty = tmp_path / "ttyUSB0"
        blank = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--blank", "--repl-pty", str(tty),
                                  "--prefix", "greenhouse", "--data-dir", str(daemon.data_dir)], cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(tty.exists, timeout=60)
            listing = subprocess.run([str(Path(sys.executable).parent / "mpremote"), "connect", str(tty), "ls"],
                                     capture_output=True, text=True, timeout=60)
            assert listing.returncode == 0, listing.stderr
            # a new board's flash is empty, and holds nothing of the simulator (its sim/ folder, its console log)
            assert not {"boot.py", "main.py", "state.json", "lib/", "sim/", "console.log"} & set(
                listing.stdout.split()), listing.stdout
            (daemon.data_dir / "vdevs" / "greenhouse-2" / "notes.txt").write_text("x" * 1234)
            listed = subprocess.run([str(Path(sys.executable).parent / "mpremote"), "connect", str(tty), "ls", "+",
                                     "df"], capture_output=True, text=True, timeout=60).stdout
            assert "1234 notes.txt" in listed and "<VfsLfs2>" in listed and "Flash object" not in listed, listed
        finally:
            blank.send_signal(signal.SIGTERM)
            out, _ = blank.communicate(timeout=30)
        assert "greenhouse-2" in out and "empty flash" in out, out
        assert (daemon.data_dir / "vdevs" / "greenhouse-2").is_dir()
        # the board that was running was left alone
        assert json.loads((daemon.data_dir / "vdevs" / "greenhouse-1" / "config.json").read_text())["device_id"] == \
            "greenhouse-1"
    daemon.stop()
