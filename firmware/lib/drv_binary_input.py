# A contact or switch on an input pin (pull-up by default: the contact pulls it to ground), inverted if asked,
# debounced: a new level counts once it held for debounce_ms. Reports each change at once (board.changes).
import time


class Device:
    def __init__(self, spec):
        import machine

        pull = {"up": machine.Pin.PULL_UP, "down": machine.Pin.PULL_DOWN, "none": -1}[spec.get("pull", "up")]
        self.pin = machine.Pin(spec["pin"], machine.Pin.IN, pull)
        self.inverted = spec.get("inverted", False)
        self.debounce = spec.get("debounce_ms", 50)
        self.state = self._level()
        self.candidate = None
        self.since = time.ticks_ms()

    def _level(self):
        return bool(self.pin.value()) != self.inverted

    def changed(self):
        """The new state once a change held for the debounce time, else None."""
        level = self._level()
        now = time.ticks_ms()
        if level == self.state:
            self.candidate = None
            return None
        if level != self.candidate:
            self.candidate, self.since = level, now
        if time.ticks_diff(now, self.since) < self.debounce:
            return None
        self.state, self.candidate = level, None
        return level

    def read(self):
        return {"": self.state}
