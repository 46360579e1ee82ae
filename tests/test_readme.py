"""The README's and the docs' command blocks, run as written: in a fresh directory, with their relative and default
data dirs, by the `edgetrio` a user has on PATH. What they print is checked against what they promise.

Planted defects these catch: the README's model lacking a resource the firmware sends (every reading refused), a
virtual board for a registered device registering it again without its model, a relative data dir handed to a child
as it was, a blank virtual board taking an existing board's id and flash.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgetrio.tools.testkit import ROOT, wait_until

BIN = Path(sys.executable).parent  # edgetrio and mpremote, as the user's PATH has them


def block_after(text: str, heading: str) -> str:
    """The first ``` block after a heading."""
    found = re.search(re.escape(heading) + r".*?```[a-z]*\n(.*?)```", text, re.S)
    assert found is not None, f"no command block after {heading!r}"
    return found.group(1)


def commands(block: str) -> list[str]:
    """The command lines of a block (lines that start with a command), without their trailing comments."""
    out = []
    for line in block.splitlines():
        if re.match(r"^(edgetrio|mpremote) ", line):
            out.append(re.sub(r"\s+#\s.*$", "", line).strip())
    return out


class Shell:
    """Runs lines as a user's shell would, in one directory; `cmd &` stays in the background until `close`."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
        self.env.pop("EDGETRIO_DATA_DIR", None)
        self.background: list[subprocess.Popen[bytes]] = []

    def run(self, line: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if line.endswith("&"):
            log = open(self.cwd / f"background-{len(self.background)}.log", "ab")  # noqa: SIM115
            self.background.append(subprocess.Popen(["bash", "-c", line[:-1]], cwd=self.cwd, env=self.env,
                                                    stdout=log, stderr=log, start_new_session=True))
            return subprocess.CompletedProcess(line, 0, "", "")
        done = subprocess.run(["bash", "-c", line], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"`{line}` exited with {done.returncode}: {done.stderr}{done.stdout}"
        return done

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.cwd.glob("background-*.log")))

    def close(self) -> None:
        for proc in reversed(self.background):  # the boards first, then the daemon: as a user stops them
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    sh = Shell(tmp_path)
    try:
        yield sh
    finally:
        sh.close()


def ports_free(*ports: int) -> None:
    """The documented defaults must be free for a test of the defaults: wait a while for another test's process to
    let go of one, then say plainly which is taken."""
    def free(port: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
            return True
    for port in ports:
        try:
            wait_until(lambda port=port: free(port), timeout=120, interval=1)
        except AssertionError:
            pytest.fail(f"port {port} is taken by another program on this machine: the documented defaults "
                        "cannot be tested as a user runs them")


def test_the_readme_use_it_block_as_written(shell: Shell) -> None:
    ports_free(1883, 8080, 9883)
    readme = (ROOT / "README.md").read_text()
    model = re.search(r"```toml\n# climate.toml\n(.*?)```", readme, re.S)
    assert model is not None, "the README's model is not a ```toml block headed # climate.toml"
    (shell.cwd / "climate.toml").write_text(model.group(1))
    lines = commands(block_after(readme, "### Use it"))
    assert lines[0].startswith("edgetrio model add climate.toml") and any(x.endswith("&") for x in lines)
    data = shell.cwd / "edgetrio-data"  # the documented default
    out: dict[str, str] = {}
    for line in lines:
        if line.startswith("edgetrio readings"):  # readings only come once the board has sent some
            wait_until(lambda: json.loads(shell.run("edgetrio device list --json").stdout)[0]["readings"] >= 2,
                       timeout=120)
        if line.startswith("edgetrio cmd"):  # a command needs the board to be listening
            wait_until(lambda: json.loads(shell.run("edgetrio device list --json").stdout)[0]["online"], timeout=60)
        out[line.split()[1] + (" " + line.split()[2] if line.split()[1] in ("device", "model", "twin") else "")] = \
            shell.run(line).stdout
        if line.startswith("edgetrio daemon"):
            wait_until(lambda: (data / "daemon.json").exists(), timeout=60)
    devices = json.loads(shell.run("edgetrio device list --json").stdout)
    assert [(d["id"], d["model"]) for d in devices] == [("kitchen-1", "climate")], shell.logs()
    assert devices[0]["refused"] is None, f"the README's model refuses what the board sends: {devices[0]['refused']}"
    first = out["readings"].splitlines()[0]
    assert re.search(r"boot 1 +seq 1 +analog=[\d.]+ V  chip_temperature=[\d.]+ °C  humidity=[\d.]+ %  "
                     r"pressure=[\d.]+ hPa  temperature=[\d.]+ °C$", first), \
        f"not every value with its unit, or not in a steady order: {first}"
    twin = json.loads(out["twin get"])
    assert twin["desired"]["state"] == {"period": 30, "led": True}
    wait_until(lambda: json.loads(shell.run("edgetrio twin get kitchen-1 --json").stdout)["reported"]["state"]
               .get("period") == 30, timeout=60)
    assert out["cmd"].strip() == '"blinked"', out["cmd"]  # the board's own answer
    assert "refusing:" not in out["status"] and "daemon:    running" in out["status"], out["status"]
    assert "stopped with exit code" not in shell.logs()


def test_the_hil_doc_virtual_board_by_hand_as_written(shell: Shell) -> None:
    ports_free(1883)
    lines = commands(block_after((ROOT / "docs" / "hil.md").read_text(), "## The virtual board by hand"))
    tty = next(Path(w) for line in lines for w in line.split() if w.startswith("/tmp/tty"))
    tty.unlink(missing_ok=True)
    for line in lines:
        if line.startswith("mpremote"):
            wait_until(tty.exists, timeout=60)
        if line.startswith("edgetrio fault"):
            wait_until(lambda: any(d["id"] == "board-1" and d["online"] for d in json.loads(
                shell.run("edgetrio device list --json --data-dir gw").stdout)), timeout=120)
        done = shell.run(line, timeout=300)
        if line.startswith("mpremote"):
            assert "hello" in done.stdout
        if line.startswith("edgetrio daemon"):
            wait_until(lambda: (shell.cwd / "gw" / "daemon.json").exists(), timeout=60)
    assert (shell.cwd / "gw" / "vdevs" / "board-1" / "config.json").exists()
    # Wi-Fi is down: the board goes offline, and readings stored are its own
    wait_until(lambda: not any(d["online"] for d in json.loads(
        shell.run("edgetrio device list --json --data-dir gw").stdout)), timeout=120)
    assert "stopped with exit code" not in shell.logs()
