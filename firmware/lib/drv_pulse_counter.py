# Pulses on an input pin (a flow meter, an energy meter's S0 output): counted by the ESP32's pulse counter unit where
# MicroPython has one (esp32.PCNT), else by an interrupt; reported as a total (pulses times per_pulse) and a rate per
# minute. The total starts at 0 at each boot: rules and plots use the rate, or the total's increase.
import time


class Device:
    units = 0  # PCNT units taken on this board

    def __init__(self, spec):
        import machine

        pull = {"up": machine.Pin.PULL_UP, "down": machine.Pin.PULL_DOWN, "none": -1}[spec.get("pull", "up")]
        pin = machine.Pin(spec["pin"], machine.Pin.IN, pull)
        self.per_pulse = spec.get("per_pulse", 1)
        self.count = 0
        self.pcnt = None
        try:
            import esp32

            self.pcnt = esp32.PCNT(Device.units, pin=pin, rising=esp32.PCNT.INCREMENT)
            Device.units += 1
        except (ImportError, AttributeError):  # an older MicroPython: count in an interrupt
            pin.irq(self._pulse, machine.Pin.IRQ_RISING)
        self.last_count = 0
        self.last_at = time.ticks_ms()

    def _pulse(self, _pin):
        self.count += 1

    def read(self):
        if self.pcnt is not None:
            self.count += self.pcnt.value(0)  # read and reset at once: the 16-bit unit never overflows between reads
        now = time.ticks_ms()
        minutes = time.ticks_diff(now, self.last_at) / 60000
        rate = (self.count - self.last_count) / minutes if minutes > 0 else 0.0
        self.last_count, self.last_at = self.count, now
        return {"": round(self.count * self.per_pulse, 6), "rate": round(rate * self.per_pulse, 4)}
