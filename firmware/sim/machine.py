# Simulated ESP32 hardware for the MicroPython unix port. Fault files in the flash directory's sim/ folder
# (written by `edgetrio vdev`) set sensor values; a reset or deep sleep ends the process with a distinct exit code
# and the supervisor starts it again in the same directory, which plays the flash.
import json
import struct
import sys
import time

import sensors
from buffer import exists

RESET_EXIT = 75
DEEPSLEEP_EXIT = 76
_ENV = {"temperature": 21.5, "pressure": 1013.25, "humidity": 45.0, "analog": 1.65, "chip_temperature": 42.0}


def env(key):
    try:
        with open("sim/env.json") as f:
            values = json.load(f)
    except (OSError, ValueError):
        values = {}
    value = values.get(key, _ENV[key])
    if values.get("drift") and key not in values:
        # a room that warms and cools a little over a few minutes, so a demo shows changing readings
        import math

        value += _ENV[key] * 0.02 * math.sin(time.host_time() / 60 + len(key))
    return value


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
    PULL_UP = 2
    _levels = {}

    def __init__(self, n, mode=-1, pull=-1, value=None):
        self.n = n
        if value is not None:
            Pin._levels[n] = value

    def value(self, v=None):
        if v is None:
            return Pin._levels.get(self.n, 0)
        Pin._levels[self.n] = 1 if v else 0
        return None

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)


class ADC:
    ATTN_11DB = 3

    def __init__(self, pin, atten=None):
        self.pin = pin

    def read_u16(self):
        return max(0, min(65535, int(env("analog") / 3.3 * 65535)))


# A BME280 register map: fixed calibration words, raw values found by bisection on the driver's compensation
# formulas so the driver reads back what sim/env.json says.
_CAL = {"T1": 27504, "T2": 26435, "T3": -1000, "P1": 36477, "P2": -10685, "P3": 3024, "P4": 2855, "P5": 140,
        "P6": -7, "P7": 15500, "P8": -14600, "P9": 6000, "H1": 75, "H2": 362, "H3": 0, "H4": 324, "H5": 0, "H6": 30}


def _bisect(f, target, lo, hi, increasing=True):
    for _ in range(24):
        mid = (lo + hi) // 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return lo


class I2C:
    def __init__(self, bus=0, scl=None, sda=None, freq=400000):
        self.regs = {}

    def scan(self):
        return [0x76]

    def _registers(self):
        c = _CAL
        a = struct.pack("<HhhHhhhhhhhh", c["T1"], c["T2"], c["T3"], c["P1"], c["P2"], c["P3"], c["P4"], c["P5"],
                        c["P6"], c["P7"], c["P8"], c["P9"]) + bytes([0, c["H1"]])
        h4, h5 = c["H4"] & 0xFFF, c["H5"] & 0xFFF
        b = struct.pack("<h", c["H2"]) + bytes([c["H3"], h4 >> 4, (h4 & 0x0F) | ((h5 & 0x0F) << 4), h5 >> 4,
                                                c["H6"] & 0xFF])
        adc_t = _bisect(lambda r: sensors.compensate_t(r, c)[0], env("temperature"), 0, 1 << 20)
        t_fine = sensors.compensate_t(adc_t, c)[1]
        adc_p = _bisect(lambda r: sensors.compensate_p(r, t_fine, c), env("pressure"), 0, 1 << 20, False)
        adc_h = _bisect(lambda r: sensors.compensate_h(r, t_fine, c), env("humidity"), 0, 1 << 16)
        data = bytes([adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4, adc_t >> 12, (adc_t >> 4) & 0xFF,
                      (adc_t & 0x0F) << 4, adc_h >> 8, adc_h & 0xFF])
        return {0xD0: bytes([0x60]), 0x88: a, 0xE1: b, 0xF7: data}

    def readfrom_mem(self, addr, reg, n):
        if addr != 0x76:
            raise OSError(19)  # ENODEV, as a board reports a missing device
        while exists("sim/hang"):  # a sensor holding the bus: the read blocks the whole board until a reset
            time.sleep(0.1)
        regs = self._registers() if reg == 0xF7 else (self.regs or self._registers())
        if reg != 0xF7:
            self.regs = regs
        return regs.get(reg, bytes(n))[:n]

    def writeto_mem(self, addr, reg, data):
        if addr != 0x76:
            raise OSError(19)


def UART(id=1, baudrate=115200, tx=None, rx=None, **kwargs):
    """The board's UART: the pty (one end of a socat pair) named in sim/uart, as a stream asyncio can poll."""
    with open("sim/uart") as f:
        path = f.read().strip()
    return open(path, "r+b")


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
