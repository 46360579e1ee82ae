# The board's clock: unset after a power-on, set by the gateway's time (or NTP), and how readings taken while it was
# unset get their true time once it is known.
import asyncio
import time

import machine

# Unix seconds at the port's epoch: an ESP32 counts from 2000-01-01, the unix port from 1970.
EPOCH_OFFSET = 946684800 if time.gmtime(0)[0] == 2000 else 0
CLOCK_SET_AFTER = 1704067200  # unix seconds of 2024-01-01: a clock before that was never set


def now_ms():
    """The board's clock in milliseconds since its epoch (ints: an ESP32's floats are single precision)."""
    return time.time_ns() // 1000000


def clock_is_set():
    return time.time() + EPOCH_OFFSET >= CLOCK_SET_AFTER


class Clock:
    def __init__(self, state, boot, save):
        self.state = state
        self.boot = boot
        self.save = save  # writes the state (the clock's run is kept in it across resets)
        self.epoch = self.start(state)
        self.known = asyncio.Event()

    def start(self, state):
        """Which run of the unset clock this boot is in: {"boot": the boot it started at, "offset": ms to add to it
        once known}. The RTC keeps counting across soft and watchdog resets and deep sleep, and starts again at the
        epoch on power-on; readings taken before the clock is set carry (epoch boot, board ms) and are corrected
        with the offset learnt when the gateway or NTP sets the clock."""
        clock = state.get("clock")
        if not isinstance(clock, dict):  # none yet (or not ours): a new run of the clock
            clock = {}
        raw = now_ms()
        restarted = (machine.reset_cause() in (machine.PWRON_RESET, machine.HARD_RESET)
                     or raw < clock.get("raw", 0))
        if clock_is_set():
            clock = {"boot": self.boot, "raw": raw, "offset": 0, "set": True}
        elif restarted or not clock or clock.get("set"):
            clock = {"boot": self.boot, "raw": raw, "offset": None}
        else:
            clock["raw"] = raw
        state["clock"] = clock
        self.save()
        return clock

    def set(self, unix_ms):
        """Set the RTC to the gateway's (or NTP's) time; learn the offset for readings taken while it was unset."""
        if not isinstance(unix_ms, int) or unix_ms < CLOCK_SET_AFTER * 1000:
            return
        if not clock_is_set():
            self.epoch["offset"] = unix_ms - EPOCH_OFFSET * 1000 - now_ms()
            self.epoch["set"] = True
            self.state["clock"] = self.epoch
            self.save()
        t = time.gmtime(unix_ms // 1000 - EPOCH_OFFSET)
        machine.RTC().datetime((t[0], t[1], t[2], t[6], t[3], t[4], t[5], unix_ms % 1000 * 1000))
        self.known.set()

    def sync_ntp(self, host):
        try:
            import ntptime

            ntptime.host = host
            ntptime.settime()  # sets the RTC in UTC
            self.known.set()
        except Exception as e:  # no NTP today: the gateway's time does
            print("ntp failed:", repr(e))

    def mark(self, reading):
        """Time a new reading: true UTC ms when the clock is set, else (epoch boot, board ms) to correct later."""
        if clock_is_set():
            reading["ts_ms"] = now_ms() + EPOCH_OFFSET * 1000
        else:
            reading["clk"] = [self.epoch["boot"], now_ms()]

    def stamp(self, body):
        """Put the reading's time in true UTC milliseconds (`ts_ms`), or leave none when it cannot be known."""
        clk = body.pop("clk", None)
        if clk and "ts_ms" not in body and clk[0] == self.epoch["boot"] and self.epoch.get("offset") is not None:
            body["ts_ms"] = clk[1] + self.epoch["offset"] + EPOCH_OFFSET * 1000
        return body
