# Simulated esp32 module: the chip's temperature and the pulse counter units (a meter's pulses at the rate
# sim/env.json gives as gpioN_hz, 0.5 Hz by default).
import time

import machine


def mcu_temperature():
    return machine.env("chip_temperature")


class PCNT:
    INCREMENT = 1
    DECREMENT = 2
    IGNORE = 0

    def __init__(self, unit=0, pin=None, rising=0, **kwargs):
        self.pin = pin
        self.count = 0.0
        self.at = time.host_time()

    def value(self, reset=None):
        now = time.host_time()
        self.count += (now - self.at) * float(machine.env("gpio%d_hz" % self.pin.n, 0.5))
        self.at = now
        whole = int(self.count)
        if reset == 0:
            self.count -= whole
        return whole
