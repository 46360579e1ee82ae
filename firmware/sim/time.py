# The board's clock as an ESP32 keeps it: seconds since the embedded epoch (2000-01-01), counting from 0 at power-on
# until machine.RTC().datetime() sets it. It keeps counting across resets and deep sleep (sim/rtc holds it) and is
# lost on a power cut (the supervisor removes sim/rtc). Everything else is the unix port's time module.
from utime import *  # noqa: F401,F403  (sleep, sleep_ms, ticks_ms, ticks_diff, ...)
import utime

EPOCH = 946684800  # 2000-01-01T00:00:00Z in unix seconds
_RTC = "sim/rtc"
_offset_ns = None  # host time_ns minus board time_ns


def _offset():
    global _offset_ns
    if _offset_ns is None:
        try:
            with open(_RTC) as f:
                _offset_ns = int(f.read())
        except (OSError, ValueError):
            _set_ns(0)  # power-on: the RTC starts at the epoch
    return _offset_ns


def _set_ns(board_ns):
    global _offset_ns
    _offset_ns = utime.time_ns() - board_ns
    try:
        with open(_RTC, "w") as f:
            f.write(str(_offset_ns))
    except OSError:
        pass  # no sim/ folder (a bare interpreter): the clock lives for this process only


def time_ns():
    offset = _offset()  # first: at power-on this sets the offset from the current host time
    return utime.time_ns() - offset


def time():
    return time_ns() // 1000000000  # an integer, as on the ESP32


def gmtime(secs=None):
    return utime.gmtime((time() if secs is None else int(secs)) + EPOCH)


localtime = gmtime  # an ESP32 has no time zone


def mktime(t):
    return utime.mktime(t) - EPOCH


def host_time():
    """The real world's time, for the simulated environment (not the board's clock)."""
    return utime.time_ns() / 1e9
