# Simulated ESP32 hardware for the MicroPython unix port. Fault files in the flash directory's sim/ folder
# (written by `edgetrio vdev`) set sensor values; a reset or deep sleep ends the process with a distinct exit code
# and the supervisor starts it again in the same directory, which plays the flash.
import json
import sys
import time

import bme280
import environment

RESET_EXIT = 75
DEEPSLEEP_EXIT = 76


def exists(path):
    try:
        open(path).close()
        return True
    except OSError:
        return False


def env(key, default=None):
    """What the board's sensors see now (sim/environment.py; sim/env.json pins values)."""
    return environment.value(key, default)


def reset():
    print("[sim] reset")
    sys.exit(RESET_EXIT)


def soft_reset():
    reset()


def deepsleep(ms=0):
    with open("sim/sleep_ms", "w") as f:
        f.write(str(ms))
    sys.exit(DEEPSLEEP_EXIT)


def unique_id():
    with open("config.json") as f:
        name = json.load(f).get("device_id", "vdev")
    return bytes((sum(name.encode()) * (i + 7)) & 0xFF for i in range(6))


def freq(hz=None):
    return 240000000


PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5


def reset_cause():
    # the supervisor (tools/vdev.py) writes why it restarted the board, as the ESP32's reset reason register would
    try:
        with open("sim/reset_cause") as f:
            return int(f.read())
    except (OSError, ValueError):
        return PWRON_RESET


class Pin:
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2
    _levels = {}

    def __init__(self, n, mode=-1, pull=-1, value=None):
        self.n = n
        self.mode = mode
        self.pull = pull
        if value is not None:
            Pin._levels[n] = value

    def value(self, v=None):
        if v is None:
            if self.mode == Pin.IN:  # what is wired to it: `edgetrio fault ID env gpio13=0` closes a contact
                return int(env("gpio%d" % self.n, 1 if self.pull == Pin.PULL_UP else 0))
            return Pin._levels.get(self.n, 0)
        Pin._levels[self.n] = 1 if v else 0
        return None

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def irq(self, handler=None, trigger=None):
        return None  # the simulated board counts pulses with its PCNT unit (esp32.PCNT)


class PWM:
    def __init__(self, pin, freq=1000, duty_u16=0):
        self.pin = pin
        self.freq = freq
        self.duty = duty_u16

    def duty_u16(self, value=None):
        if value is None:
            return self.duty
        self.duty = value
        Pin._levels[self.pin.n] = value
        return None


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3

    def __init__(self, pin, atten=None):
        self.pin = pin

    def read_u16(self):
        return max(0, min(65535, int(env("analog") / 3.3 * 65535)))

    def read_uv(self):
        return int(max(0.0, min(3.3, env("analog"))) * 1000000)


def fitted_parts():
    """sim/parts.py when the board has a board file's parts (it was imported before the flash was mounted), else
    None: the reference board needs none of it, and its heap stays as it was."""
    if not exists("sim/board.json"):
        return None
    import parts

    return parts


def dht_readinto(pin, buf):
    parts = fitted_parts()
    part = parts.part_on(pin.n, ("dht22", "dht11")) if parts else None
    if part is None:
        raise OSError(110)  # ETIMEDOUT: nothing answered on the pin
    buf[:] = parts.dht_frame(part["driver"])


def _sensor_kind():
    try:
        with open("sim/sensor") as f:
            return f.read().strip() or "bme280"
    except OSError:
        return "bme280"


class I2C:
    """The board's I2C buses with the chips its sim/board.json wires to them (the reference board: one BME280, or a
    BMP280 when sim/sensor says so, at 0x76)."""

    _chips = None  # (sda, scl, address) -> chip; each chip is reached through whichever bus object has its pins

    def __init__(self, bus=0, scl=None, sda=None, freq=400000):
        self.pins = (getattr(sda, "n", 21), getattr(scl, "n", 22))
        if I2C._chips is None:
            I2C._chips = {}
            parts = fitted_parts()
            board = parts.fitted() if parts else None
            models = {"bme280": bme280.Chip, "bmp280": bme280.Chip}
            if parts:
                models.update({"sht3x": parts.SHT3x, "bh1750": parts.BH1750})
            for part in board if board is not None else [{"driver": _sensor_kind(), "address": 0x76}]:
                kind = part.get("driver")
                chip = models.get(kind)
                if chip is not None:
                    key = (part.get("sda", 21), part.get("scl", 22), part.get("address"))
                    I2C._chips[key] = chip(kind)

    def _chip(self, addr):
        chip = I2C._chips.get(self.pins + (addr,))
        if chip is None:
            raise OSError(19)  # ENODEV, as a board reports a missing device
        while exists("sim/hang"):  # a sensor holding the bus: the read blocks the whole board until a reset
            time.sleep(0.1)
        return chip

    def scan(self):
        return sorted(a for (sda, scl, a) in I2C._chips if (sda, scl) == self.pins)

    def readfrom_mem(self, addr, reg, n):
        return self._chip(addr).read(reg, n)

    def writeto_mem(self, addr, reg, data):
        self._chip(addr).write(reg, bytes(data))

    def writeto(self, addr, data):
        self._chip(addr).command(bytes(data))
        return len(data)

    def readfrom(self, addr, n):
        return self._chip(addr).read(n)


SoftI2C = I2C


def _open_uart():
    try:
        with open("sim/uart") as f:
            path = f.read().strip()
    except OSError:
        return None
    return open(path, "r+b")


# The board's UART: the pty (one end of a socat pair) named in sim/uart, as a stream asyncio can poll. Opened when
# the board starts, before the flash is mounted at "/" (the pty is a host path), and one object per board, as on an
# ESP32.
_UART = _open_uart()


def UART(id=1, baudrate=115200, tx=None, rx=None, **kwargs):
    if _UART is None:
        raise OSError(19)  # nothing wired to this UART
    return _UART


class WDT:
    """The task watchdog: each feed writes the deadline to sim/wdt; the supervisor resets the board once it passes."""

    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.feed()

    def feed(self):
        with open("sim/wdt", "w") as f:
            f.write(str(time.host_time() + self.timeout / 1000))


class RTC:
    """The ESP32's RTC: datetime() is (year, month, day, weekday, hours, minutes, seconds, microseconds)."""

    def datetime(self, dt=None):
        if dt is None:
            t = time.gmtime()
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], time.time_ns() // 1000 % 1000000)
        seconds = time.mktime((dt[0], dt[1], dt[2], dt[4], dt[5], dt[6], 0, 0))
        time._set_ns(seconds * 1000000000 + dt[7] * 1000)
        return None

    def memory(self, data=None):
        if data is None:
            try:
                with open("sim/rtcmem", "rb") as f:
                    return f.read()
            except OSError:
                return b""
        with open("sim/rtcmem", "wb") as f:
            f.write(data)
        return None
