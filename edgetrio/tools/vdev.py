"""Virtual ESP32s: the real firmware running unchanged on the MicroPython unix port, one process per device.

Each device has a directory that plays its flash (config.json, the .mpy bundle flashing would write, its state and
reading buffer). firmware/sim supplies the hardware. A reset or crash ends the process and the supervisor starts it
again in the same directory, as a board reboots. Each device reaches the broker through its own TCP proxy, which is
its Wi-Fi: `edgetrio vdev fault ID wifi down` cuts its connections and refuses new ones until `wifi up`.
Fault files live in FLASH/sim/: wifi, env.json (sensor values), power (a power cycle request).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import termios
import time
import tty
from pathlib import Path
from typing import Any

import trio

from edgetrio.daemon import store
from edgetrio.daemon.config import ConfigError, read_run_file
from edgetrio.daemon.control import ControlClient, ControlError
from edgetrio.tools.boards import GPIOS, Board
from edgetrio.tools.bundle import FIRMWARE, build_bundle, compile_mpy, device_config, device_tool, firmware_record
from edgetrio.tools.flash import FlashError, register_model

RESET_EXIT = 75
DEEPSLEEP_EXIT = 76
PWRON_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = 1, 3, 4, 5  # machine.reset_cause() values, as on an ESP32
log = logging.getLogger("edgetrio.vdev")


def micropython() -> str:
    return device_tool("micropython")


def build_sim(out: Path) -> Path:
    """The simulated hardware (firmware/sim) compiled to .mpy, with board.py beside it as source. A real ESP32 has
    machine, network and time in ROM; compiled, the simulation takes less of the board's heap."""
    compile_mpy(sorted(p for p in (FIRMWARE / "sim").glob("*.py") if p.name != "board.py"), out)
    shutil.copy2(FIRMWARE / "sim" / "board.py", out / "board.py")
    return out


def flash_dir(data_dir: Path, device_id: str) -> Path:
    return data_dir / "vdevs" / device_id


def hold_board(data_dir: Path, device_id: str) -> int:
    """Take a virtual board for this process: a lock beside its flash folder, released when the process ends.

    Two processes playing one board knock each other off MQTT and write one flash; the second is refused."""
    path = data_dir / "vdevs" / f".{device_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"virtual board {device_id} is already running (another `edgetrio vdev` on "
                           f"{data_dir})") from None
    return fd


def new_board_id(data_dir: Path, prefix: str) -> str:
    """The first PREFIX-N that is neither registered nor has a flash folder: a blank board is a new board."""
    known: set[str] = set()
    if (data_dir / store.DB_FILE).exists():
        db = store.open_db(data_dir)
        known = {d["id"] for d in store.list_devices(db)}
        db.close()
    n = 1
    while f"{prefix}-{n}" in known or flash_dir(data_dir, f"{prefix}-{n}").exists():
        n += 1
    return f"{prefix}-{n}"


ENV_KEYS = ("temperature", "pressure", "humidity", "analog", "chip_temperature", "illuminance")  # sim/environment.py
# what each can be in a room a board is in (the sensors' own ranges: BME280 -40..85 C, 300..1100 hPa; the ESP32's
# ADC 0..3.3 V and its die -40..125 C; BH1750 up to 65535 lx); a pulse rate a GPIO's counter still follows
ENV_RANGES = {"temperature": (-40, 85, "°C"), "pressure": (300, 1100, "hPa"), "humidity": (0, 100, "%"),
              "analog": (0, 3.3, "V"), "chip_temperature": (-40, 125, "°C"), "illuminance": (0, 65535, "lx")}
MAX_PULSE_HZ = 40_000  # past what the firmware's pulse counter and the simulation follow


def set_fault(data_dir: Path, device_id: str, kind: str, value: Any) -> None:
    """Write a fault file the virtual device (and its supervisor) obey."""
    sim = flash_dir(data_dir, device_id) / "sim"
    if not sim.parent.exists():
        raise ValueError(f"no virtual device {device_id!r} in {data_dir}")
    sim.mkdir(exist_ok=True)
    if kind == "wifi":
        (sim / "wifi").write_text(str(value))
    elif kind == "env":
        for key, pinned in value.items():
            pin = re.fullmatch(r"gpio(\d+)(_hz)?", key)
            if not (key in ENV_KEYS or (pin and int(pin[1]) in GPIOS)):
                raise ValueError(f"env {key!r}: use one of {', '.join(ENV_KEYS)}, gpioN (an input pin's level, 0 or 1) "
                                 "or gpioN_hz (a pulse rate)")
            if not isinstance(pinned, int | float) or isinstance(pinned, bool) or pinned != pinned:
                raise ValueError(f"env {key}={pinned!r}: a number")
            low, high, unit = ENV_RANGES.get(key) or ((0, MAX_PULSE_HZ, "Hz") if key.endswith("_hz") else (0, 1, ""))
            if not low <= pinned <= high or (not unit and pinned not in (0, 1)):
                raise ValueError(f"env {key}={pinned!r}: " + (f"{low} to {high} {unit}".rstrip() if unit else
                                                              "0 or 1 (the pin's level)"))
        path = sim / "env.json"
        env = json.loads(path.read_text()) if path.exists() else {}
        env.update(value)
        path.write_text(json.dumps(env))
    elif kind == "power":
        (sim / "power").write_text("cycle")
    elif kind == "hang":  # the sensor bus locks up; only the watchdog's reset frees it
        (sim / "hang").write_text("i2c")
    else:
        raise ValueError(f"unknown fault {kind!r}")


def _repl_child() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is the interpreter's terminal: Ctrl-C from mpremote interrupts it


def last_line(path: Path) -> str:
    """The last line a board printed (its console's tail): why it stopped, as often as not."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class ReplPort:
    """The virtual device's USB serial port: a pty linked at `path`, the way /dev/ttyUSB0 looks for a board.

    mpremote (through pyserial) talks to it as to a board. Behind it the interpreter runs on a pty of its own; when
    it exits after a soft reset (Ctrl-D in the REPL) the supervisor starts it again and prints the soft-reboot banner,
    re-entering the raw REPL if mpremote was in it, as a board does.
    """

    def __init__(self, path: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # bytes pass unchanged; the slave stays open so the master never reads EIO
        path.unlink(missing_ok=True)
        path.symlink_to(os.ttyname(self.slave))
        self.path = path
        self.stream = trio.lowlevel.FdStream(os.dup(self.master))  # makes the shared master non-blocking
        self.device: trio.lowlevel.FdStream | None = None  # the running interpreter's pty master
        self.raw = False  # mpremote is in the raw REPL
        self.in_repl = False  # the interpreter shows a REPL (the firmware is not running)
        # machine.reset() announces itself: under `micropython -i` its SystemExit would only drop into the REPL
        self.reset_requested = False

    async def from_host(self) -> None:
        """Forward what mpremote sends to the interpreter running now (dropped while it restarts)."""
        while data := await self.stream.receive_some(4096):
            if b"\x01" in data:
                self.raw = True
            if b"\x02" in data:
                self.raw = False
            if self.device is not None:
                with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.device.send_all(data)

    def close(self) -> None:
        """Remove the link (if it is still ours) and close the pty: no dangling /dev/ttyUSB0 look-alike is left."""
        with contextlib.suppress(OSError):
            if self.path.is_symlink() and os.readlink(self.path) == os.ttyname(self.slave):
                self.path.unlink()
        for fd in (self.slave, self.master):
            with contextlib.suppress(OSError):
                os.close(fd)

    def to_port(self, data: bytes) -> None:
        """Write to the port without ever blocking: with no one reading it, output is lost, as on a UART."""
        try:
            while data:
                data = data[os.write(self.master, data):]
        except BlockingIOError:
            pass

    async def to_host(self, device: trio.lowlevel.FdStream, console: Any) -> None:
        """Forward the interpreter's output to mpremote and the console log until the interpreter exits."""
        while True:
            try:
                data = await device.receive_some(4096)
            except trio.BrokenResourceError:  # EIO: the interpreter closed its end, it exited
                return
            if not data:
                return
            if b">>> " in data or b"raw REPL; CTRL-B to exit" in data:
                self.in_repl = True
            console.write(data)
            console.flush()
            self.to_port(data)
            if b"[sim] reset" in data:
                self.reset_requested = True
                return


class WifiProxy:
    """A virtual board's Wi-Fi: a TCP proxy between the board and the broker, cut while its `sim/wifi` file says
    down (the links it carries closed at once, as a radio losing its access point)."""

    def __init__(self, device_id: str, sim_dir: Path, broker: tuple[str, int]) -> None:
        self.id = device_id
        self.sim_dir = sim_dir
        self.broker = broker
        self.wifi_up = True
        self.links: set[trio.abc.Stream] = set()

    async def serve(self, nursery: trio.Nursery) -> int:
        """Listen on a free loopback port (written to `sim/proxy_port` for the board) and serve; the port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port: int = listeners[0].socket.getsockname()[1]
        self.sim_dir.mkdir(parents=True, exist_ok=True)
        (self.sim_dir / "proxy_port").write_text(str(port))
        nursery.start_soon(trio.serve_listeners, self._proxy, listeners)
        nursery.start_soon(self._watch_wifi)
        return port

    async def _watch_wifi(self) -> None:
        wifi = self.sim_dir / "wifi"
        while True:
            up = not (wifi.exists() and wifi.read_text().strip() == "down")
            if self.wifi_up and not up:
                log.info("vdev %s wifi down", self.id)
                for link in list(self.links):
                    await trio.aclose_forcefully(link)
            elif up and not self.wifi_up:
                log.info("vdev %s wifi up", self.id)
            self.wifi_up = up
            await trio.sleep(0.1)

    async def _proxy(self, device_side: trio.SocketStream) -> None:
        if not self.wifi_up or not self.broker[1]:
            await trio.aclose_forcefully(device_side)
            return
        try:
            broker_side = await trio.open_tcp_stream(*self.broker)
        except OSError:
            await trio.aclose_forcefully(device_side)
            return
        self.links.update((device_side, broker_side))

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while data := await src.receive_some(65536):
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(src)
                await trio.aclose_forcefully(dst)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, device_side, broker_side)
                nursery.start_soon(pump, broker_side, device_side)
        finally:
            self.links.discard(device_side)
            self.links.discard(broker_side)


class VirtualDevice:
    """One virtual ESP32: the real firmware on the MicroPython unix port in its own process, a folder as its flash, a
    TCP proxy as its Wi-Fi, and a supervisor that starts it again after a reset, a crash or a power cut."""

    def __init__(self, device_id: str, flash: Path, broker: tuple[str, int], heap: str = "256K",
                 repl: ReplPort | None = None, sim: Path = FIRMWARE / "sim") -> None:
        self.id = device_id
        self.sim = sim  # the simulated hardware: firmware/sim, or its compiled copy (build_sim)
        self.flash = flash
        self.broker = broker
        self.heap = heap
        self.repl = repl
        self.wifi = WifiProxy(device_id, flash / "sim", broker)
        self.proxy_port = 0
        self.boots = 0
        self.process: trio.Process | None = None

    def install(self, bundle: Path, config: dict[str, Any]) -> None:
        """'Flash' the bundle and config.json; state, buffer and fault files in the directory are kept."""
        (self.flash / "sim").mkdir(parents=True, exist_ok=True)
        if (self.flash / "lib").exists():
            shutil.rmtree(self.flash / "lib")
        shutil.copytree(bundle / "lib", self.flash / "lib")
        for name in ("boot.py", "main.py", "start.mpy"):
            shutil.copy2(bundle / name, self.flash / name)
        (self.flash / "config.json").write_text(json.dumps(config))
        (self.flash / "firmware.json").write_text(firmware_record(bundle))  # lib/ runs, not an earlier update

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the board (its Wi-Fi proxy and its supervisor) until cancelled; its REPL link goes with it."""
        try:
            async with trio.open_nursery() as nursery:
                self.proxy_port = await self.wifi.serve(nursery)
                if self.repl is not None:
                    nursery.start_soon(self.repl.from_host)
                config_path = self.flash / "config.json"
                if self.broker[1] and config_path.exists():  # a blank board gets its config from `edgetrio flash`
                    config = json.loads(config_path.read_text())
                    config.update({"broker_host": "127.0.0.1", "broker_port": self.proxy_port})
                    config_path.write_text(json.dumps(config))
                task_status.started()
                await self._supervise()
        finally:
            if self.repl is not None:
                self.repl.close()

    async def _supervise(self) -> None:
        """Run the board's interpreter, restarting it as a board resets; a crash is reported with its last line."""
        self.flash.mkdir(parents=True, exist_ok=True)
        (self.flash / "sim").mkdir(exist_ok=True)
        console = open(self.flash / "console.log", "ab")  # noqa: SIM115 - open for the device's whole life
        firmware = True
        cause = PWRON_RESET
        crashes = 0  # in a row: the wait before the next start doubles with each, up to a minute
        try:
            while True:
                self.boots += 1
                started = trio.current_time()
                power = self.flash / "sim" / "power"
                power.unlink(missing_ok=True)
                if cause == PWRON_RESET:  # the RTC's time and memory do not survive a power cut
                    for kept_by_rtc in ("rtc", "rtcmem"):
                        (self.flash / "sim" / kept_by_rtc).unlink(missing_ok=True)
                (self.flash / "sim" / "wdt").unlink(missing_ok=True)  # the watchdog starts disarmed after any reset
                (self.flash / "sim" / "reset_cause").write_text(str(cause))
                async with trio.open_nursery() as nursery:
                    self.process = await nursery.start(self._start_process, console, firmware)
                    code = await self._wait_for_reset(power)
                    nursery.cancel_scope.cancel()
                if self.repl is not None and self.repl.reset_requested:
                    code = RESET_EXIT
                soft = self.repl is not None and self.repl.in_repl and code == 0
                firmware = not soft
                cause = {"power": PWRON_RESET, "watchdog": WDT_RESET, DEEPSLEEP_EXIT: DEEPSLEEP_RESET}.get(code, SOFT_RESET)
                if soft:
                    assert self.repl is not None
                    self.repl.to_port(b"MPY: soft reboot\r\n")
                elif code == RESET_EXIT:
                    log.info("vdev %s reset", self.id)
                elif code == DEEPSLEEP_EXIT:
                    sleep_file = self.flash / "sim" / "sleep_ms"
                    ms = int(sleep_file.read_text() or 0) if sleep_file.exists() else 0
                    with trio.move_on_after(ms / 1000):
                        while not power.exists():  # the power cut while it sleeps: it comes back from power-on
                            await trio.sleep(0.1)
                        cause = PWRON_RESET
                        log.info("vdev %s power cycled while asleep", self.id)
                elif code == "watchdog":
                    (self.flash / "sim" / "hang").unlink(missing_ok=True)  # the reset frees the stuck bus
                    log.warning("vdev %s: watchdog reset (the firmware stopped feeding it)", self.id)
                    console.write(b"[sim] watchdog reset\n")
                    console.flush()
                elif code == "power":
                    log.info("vdev %s power cycled", self.id)
                    await trio.sleep(0.5)
                else:
                    crashes = 1 if trio.current_time() - started > 60 else crashes + 1
                    delay = min(60.0, 2.0 ** (crashes - 1))
                    console.flush()
                    log.warning("vdev %s stopped with exit code %s: %s; restarting in %.0f s", self.id, code,
                                last_line(self.flash / "console.log") or "(nothing printed)", delay)
                    await trio.sleep(delay)
        finally:
            console.close()

    async def _start_process(self, console: Any, firmware: bool, *,
                             task_status: trio.TaskStatus[trio.Process]) -> None:
        """Start the interpreter: the firmware (boot.py, main.py) after a reset, a bare REPL after a soft reset."""
        command = [micropython(), "-X", f"heapsize={self.heap}"]
        if self.repl is None:
            process = await trio.lowlevel.open_process(
                [*command, str(self.sim / "board.py")], env=dict(os.environ, MICROPYPATH=f"{self.sim}:.frozen:lib:"),
                cwd=str(self.flash), stdout=console, stderr=console, stdin=subprocess.DEVNULL,
                start_new_session=True)  # a Ctrl-C at the terminal is for the supervisor, which then stops it
            task_status.started(process)
            device = None
        else:
            master, slave = os.openpty()
            attrs = termios.tcgetattr(slave)
            attrs[1] &= ~termios.OPOST  # no \n -> \r\n rewriting: mpremote matches exact bytes
            attrs[3] &= ~termios.ECHO  # ISIG stays: Ctrl-C interrupts the running firmware, as on a board
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            env = dict(os.environ, MICROPYPATH=f"{self.sim}:.frozen:lib:")
            # after a soft reset the board runs boot.py again, and main.py too unless mpremote's raw REPL asked
            start = [*command, "-i", str(self.sim / "board.py")]
            if not firmware:
                start += ["soft", "raw"] if self.repl.raw else ["soft"]
            process = await trio.lowlevel.open_process(
                start,
                cwd=str(self.flash), stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                preexec_fn=_repl_child)
            os.close(slave)
            device = trio.lowlevel.FdStream(master)
            assert self.repl is not None
            self.repl.in_repl = False
            self.repl.reset_requested = False
            self.repl.device = device
            if not firmware and self.repl.raw:
                await device.send_all(b"\x01")  # back into the raw REPL mpremote was using
            task_status.started(process)
        try:
            if device is not None:
                assert self.repl is not None
                await self.repl.to_host(device, console)
                if self.repl.reset_requested and process.returncode is None:
                    process.kill()
            await process.wait()
        finally:
            if device is not None:
                assert self.repl is not None
                self.repl.device = None
                await device.aclose()
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    async def _wait_for_reset(self, power: Path) -> int | str:
        """The process's exit code, or "power" / "watchdog" once the supervisor pulled the plug or the watchdog bit."""
        process = self.process
        assert process is not None
        wdt = power.with_name("wdt")
        while process.returncode is None:
            if power.exists():
                process.kill()  # pull the plug: nothing gets to flush
                await process.wait()
                return "power"
            if self._watchdog_expired(wdt):
                process.kill()  # the hardware watchdog resets the chip: nothing gets to flush either
                await process.wait()
                return "watchdog"
            with trio.move_on_after(0.1):
                await process.wait()
        return process.returncode

    @staticmethod
    def _watchdog_expired(wdt: Path) -> bool:
        try:
            return time.time() > float(wdt.read_text())  # the sim writes host time (sim/time.py host_time)
        except (OSError, ValueError):  # not armed yet, or caught mid-write
            return False


async def run_vdevs(data_dir: Path, count: int, prefix: str, period: float, heap: str, repl_pty: Path | None = None,
                    blank: bool = False, uart: Path | None = None, buffer: int = 500, sensor: str = "bme280",
                    forced: bool = False, board: Board | None = None, battery: int | None = None,
                    *, task_status: trio.TaskStatus[list[VirtualDevice]] = trio.TASK_STATUS_IGNORED) -> None:
    """Register (if needed), flash and run `count` virtual devices against the daemon in data_dir, until cancelled.

    With `blank`, one device starts with an empty flash (a new board): `edgetrio flash` installs it through repl_pty.
    `sensor` is the chip on the boards' I2C bus (bme280 or bmp280); `forced` puts it in forced mode (battery boards).
    """
    if (repl_pty is not None or uart is not None) and count != 1:
        raise RuntimeError("--repl-pty and --uart are for one device: use --count 1")
    if repl_pty is not None and repl_pty.is_symlink() and repl_pty.exists():  # its pty is open: a board answers there
        raise RuntimeError(f"{repl_pty} is the port of a virtual board that is running; give another path")
    sim = build_sim(data_dir / "vdevs" / ".sim")
    if blank:
        try:  # its Wi-Fi (the proxy) leads to the daemon if one runs; `edgetrio flash --broker` can point at it
            run = read_run_file(data_dir)
            broker = (str(run["mqtt_host"]), int(run["mqtt_port"]))
        except ConfigError:
            broker = ("127.0.0.1", 0)
        device_id = new_board_id(data_dir, prefix)
        hold_board(data_dir, device_id)
        device = VirtualDevice(device_id, flash_dir(data_dir, device_id), broker, heap,
                               ReplPort(repl_pty) if repl_pty else None, sim)
        fit_parts(device.flash, board)
        async with trio.open_nursery() as nursery:
            await nursery.start(device.run)
            task_status.started([device])
        return

    info = read_run_file(data_dir)
    bundle = build_bundle(data_dir / "vdevs" / ".bundle")
    devices = []
    with ControlClient(data_dir) as control:
        for i in range(1, count + 1):
            device_id = f"{prefix}-{i}"
            hold_board(data_dir, device_id)
            flash = flash_dir(data_dir, device_id)
            config_path = flash / "config.json"
            password = json.loads(config_path.read_text())["password"] if config_path.exists() else None
            db = store.open_db(data_dir)
            known = {d["id"] for d in store.list_devices(db)}
            db.close()
            if password is None or device_id not in known:
                # a device registered already (`device add ID --model M`) keeps its registration, model and twin:
                # only its credential is made anew, for this virtual board's config
                try:
                    op = "device.rotate" if device_id in known else "device.add"
                    password = control.request(op, {"id": device_id})["password"]
                except ControlError as exc:
                    raise RuntimeError(f"cannot register {device_id}: {exc}") from exc
            device = VirtualDevice(device_id, flash, (str(info["mqtt_host"]), int(info["mqtt_port"])), heap,
                                   ReplPort(repl_pty) if repl_pty else None, sim)
            config = device_config(device_id, str(password), period, buffer, forced, board, battery)
            if board is not None:
                try:
                    print(register_model(data_dir, device_id, board), flush=True)
                except FlashError as exc:  # said in one line by the CLI
                    raise RuntimeError(str(exc)) from None
            fit_parts(flash, board)
            if uart is not None:  # no Wi-Fi: JSON lines on the UART, wired to one end of a pty pair
                config["transport"] = "serial"
            device.install(bundle, config)
            (flash / "sim" / "sensor").write_text(sensor)
            if uart is not None:
                (flash / "sim" / "uart").write_text(str(uart))
            devices.append(device)
    async with trio.open_nursery() as nursery:
        for device in devices:
            await nursery.start(device.run)
        task_status.started(devices)


def fit_parts(flash: Path, board: Board | None) -> None:
    """What is wired to the virtual board: the board file's parts (sim/board.json), else the reference board's."""
    (flash / "sim").mkdir(parents=True, exist_ok=True)
    if board is None:
        (flash / "sim" / "board.json").unlink(missing_ok=True)
    else:
        (flash / "sim" / "board.json").write_text(json.dumps(board.components))


def main_vdev(data_dir: Path, count: int, prefix: str, period: float, heap: str, repl_pty: Path | None = None,
              blank: bool = False, uart: Path | None = None, buffer: int = 500, sensor: str = "bme280",
              forced: bool = False, board: Board | None = None, battery: int | None = None) -> None:
    """Run virtual boards (the real firmware on the unix port) against the daemon until Ctrl-C."""
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            devices = await nursery.start(run_vdevs, data_dir, count, prefix, period, heap, repl_pty, blank, uart,
                                          buffer, sensor, forced, board, battery)
            if repl_pty is not None:
                print(f"{devices[0].id}: REPL on {repl_pty} (mpremote connect {repl_pty} ...)", flush=True)
            if blank:
                print(f"a blank virtual ESP32, {devices[0].id}, with an empty flash: install it with `edgetrio flash "
                      f"--port {repl_pty or 'PORT'} --device-id {devices[0].id} ...`", flush=True)
            else:
                print(f"{len(devices)} virtual ESP32{'s' if len(devices) != 1 else ''} running the firmware: "
                      f"{', '.join(d.id for d in devices)}", flush=True)
            print(f"consoles: {data_dir / 'vdevs'}/<id>/console.log; Ctrl-C stops them", flush=True)
            with trio.open_signal_receiver(2, 15) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:  # a board that cannot start says why in one line, not as a group's traceback
        refused, rest = group.split(RuntimeError)
        if refused is None or rest is not None:
            raise
        first: BaseException = refused
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
