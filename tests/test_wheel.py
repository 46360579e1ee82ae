"""The package as a user gets it: a wheel installed into a fresh venv outside the checkout flashes and runs boards."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgetrio.tools.testkit import ROOT, wait_until


def run(*args: str | Path, cwd: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # a venv on PATH (this checkout's, or any activated one) would lend the bare install its device tools
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(sys.prefix, "bin").resolve()
                                  and not (Path(p).parent / "pyvenv.cfg").exists())
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def test_the_wheel_installs_and_works_outside_the_checkout(tmp_path: Path) -> None:
    # built from a copy of the sources, so the checkout gets no build/ folder
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "typings", "build", "*.egg-info", "__pycache__", ".*_cache", ".demo", "edgetrio-data"))
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist", source, cwd=tmp_path)
    assert "is absent from the" not in built.stdout + built.stderr  # the build warned so 100 times
    wheel = next((tmp_path / "dist").glob("edgetrio-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("edgetrio/firmware/boot.py", "edgetrio/firmware/lib/node.py", "edgetrio/firmware/sim/board.py",
                    "edgetrio/daemon/gateway.py", "edgetrio/cloud/relay.py", "edgetrio/tools/flash.py",
                    "edgetrio/webui/index.html", "edgetrio/webui/app.js", "edgetrio/webui/vendor/uPlot.iife.min.js",
                    "edgetrio/webui/vendor/uPlot.LICENSE"):  # the dashboards' files, with the vendored licence
        assert shipped in names, shipped
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata  # what a package index shows, and license checkers read
    assert {n.split("/licenses/")[-1] for n in names if "/licenses/" in n} >= {
        "LICENSE", "edgetrio/webui/vendor/uPlot.LICENSE"}
    tops = {n.split("/")[0] for n in names if not n.startswith("edgetrio-")}
    assert tops == {"edgetrio"}, tops  # no `daemon`, `cloud` or `tools` at the top of site-packages
    assert not [n for n in names if "/bench/" in n or "/testkit/" in n]  # benchmarks and the test kit stay home

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    edgetrio = venv / "bin" / "edgetrio"
    run(venv / "bin" / "pip", "install", "--quiet", wheel, cwd=tmp_path)
    assert run(edgetrio, "--version", cwd=tmp_path).stdout.strip() == "edgetrio 0.1.0"
    data = tmp_path / "data"
    # without the devices extra: one line naming it, and nothing registered
    bare = run(edgetrio, "flash", "--out", tmp_path / "bundle", "--device-id", "w1", "--broker", "127.0.0.1",
               "--data-dir", data, cwd=tmp_path, check=False)
    assert bare.returncode == 2 and "pip install 'edgetrio[devices]'" in bare.stderr and "Traceback" not in bare.stderr
    assert not (data / "edgetrio.db").exists()

    run(venv / "bin" / "pip", "install", "--quiet", f"{wheel}[devices]", cwd=tmp_path)
    run(edgetrio, "flash", "--out", tmp_path / "bundle", "--device-id", "w1", "--broker", "127.0.0.1",
        "--data-dir", data, cwd=tmp_path)
    assert (tmp_path / "bundle" / "lib" / "node.mpy").exists() and (tmp_path / "bundle" / "config.json").exists()
    if platform.machine() != "x86_64":
        pytest.skip("virtual boards need the MicroPython unix port, whose wheels are x86_64 only")
    daemon = subprocess.Popen([edgetrio, "daemon", "--data-dir", data, "--mqtt-host", "127.0.0.1", "--mqtt-port", "0"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vdev: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: (data / "daemon.json").exists(), timeout=30)
        vdev = subprocess.Popen([edgetrio, "vdev", "--count", "1", "--period", "0.5", "--data-dir", data],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: len(json.loads(run(edgetrio, "readings", "vdev-1", "--json", "--data-dir", data,
                                              cwd=tmp_path, check=False).stdout or "[]")) >= 3, timeout=90)
    finally:
        for proc in (vdev, daemon):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
