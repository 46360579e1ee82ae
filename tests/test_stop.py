"""Ctrl-C or SIGTERM on the demo and the virtual boards leaves no process and no pty link behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from edgetrio.tools.testkit import ROOT, cli, wait_until


def leftovers(marker: Path) -> list[str]:
    """Processes whose command line or working directory names `marker` (boards run in their flash directory)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(marker) in cmdline or str(marker) in (proc.info["cwd"] or ""):
            found.append(f"{proc.info['pid']} {cmdline}")
    return found


def test_ctrl_c_on_the_demo_stops_every_part(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    with open(out, "wb") as log:
        # a new session, like a terminal's foreground job: the Ctrl-C below goes to its whole process group
        demo = subprocess.Popen([sys.executable, "-m", "edgetrio", "demo", "--devices", "2", "--data-dir",
                                 str(tmp_path / "demo")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: "edge/cloud readings:" in out.read_text(), timeout=90)
        assert len(leftovers(tmp_path)) >= 5  # the demo, a relay, a daemon, the boards' supervisor, two boards
        # the demo's rule set came down from the relay
        wait_until(lambda: "demo-hot" in cli(tmp_path / "demo" / "gateway", "rule", "list").stdout, timeout=30)
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    text = out.read_text()
    assert "demo stopped" in text and "Traceback" not in text and "RuntimeError" not in text, text[-2000:]
    wait_until(lambda: not leftovers(tmp_path), timeout=15)


def test_a_stopped_board_supervisor_leaves_no_board_and_no_link(tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        link = tmp_path / f"ttyV-{sig.name}"
        data = tmp_path / f"data-{sig.name}"
        vdev = subprocess.Popen([sys.executable, "-m", "edgetrio", "vdev", "--blank", "--repl-pty", str(link),
                                 "--data-dir", str(data)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda link=link: link.is_symlink(), timeout=30)
            wait_until(lambda data=data: len(leftovers(data)) >= 2, timeout=30)  # the supervisor and the board
            vdev.send_signal(sig)
            vdev.wait(timeout=30)
        finally:
            if vdev.poll() is None:
                vdev.kill()
        wait_until(lambda data=data: not leftovers(data), timeout=15)
        assert not link.is_symlink()
