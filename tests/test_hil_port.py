"""The hardware-in-the-loop suite's real-board path (--port), run against a virtual board behind a pty.

Nothing here pretends to be a radio: the board is the real firmware on the MicroPython unix port, reached only through
its serial port (flashed with mpremote) and joining the test's gateway over loopback, as a real board would over Wi-Fi.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgetrio.tools.testkit import ROOT, blank_board


def test_the_real_board_path_of_the_hil_suite_passes_against_a_board_on_a_serial_port(tmp_path: Path) -> None:
    # the same board is flashed for each scenario and keeps its flash between them, as a real one does
    with blank_board(tmp_path / "bench", tmp_path / "ttyUSB0") as tty:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "hil-tests", "--port", str(tty),
             "--broker-host", "127.0.0.1", "--basetemp", str(tmp_path / "inner"), "-rs",
             "-k", "telemetry or command or reflash or wifi or soft_resets"],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert summary.startswith("5 passed, 1 skipped"), summary  # Wi-Fi loss needs a network the test controls
    assert "needs a Wi-Fi the test controls" in run.stdout
