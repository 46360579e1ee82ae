"""What a new user types, exactly as the README and the Makefile write it: relative paths, a fresh directory.

Every other test passes absolute temporary paths; `make demo` passes `--data-dir .demo`, and a relative data dir once
left every virtual board unable to find its own files (no reading at all). Planted defect this catches: dropping the
resolution of paths in edgetrio/cli.py:main.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from edgetrio.tools.testkit import ROOT, wait_until

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
