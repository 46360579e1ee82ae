# An Aosong DHT22 (AM2302) or DHT11 on one pin: the 40-bit frame from machine.dht_readinto, checked and decoded here
# (AM2302 datasheet: 02 8C 01 5F EE is 65.2 %RH and 35.1 degC, the last byte the sum of the four before it).
import time


def decode(frame, dht11=False):
    """(temperature degC, humidity %RH) from the 5-byte frame; ValueError when the checksum does not match."""
    if (frame[0] + frame[1] + frame[2] + frame[3]) & 0xFF != frame[4]:
        raise ValueError("checksum mismatch")
    if dht11:
        return frame[2] + frame[3] / 10, frame[0] + frame[1] / 10
    t = ((frame[2] & 0x7F) << 8 | frame[3]) / 10
    return (-t if frame[2] & 0x80 else t), ((frame[0] << 8) | frame[1]) / 10


class Device:
    dht11 = False

    def __init__(self, spec):
        import machine

        self.pin = machine.Pin(spec["pin"], machine.Pin.OPEN_DRAIN, value=1)
        self.read_frame = machine.dht_readinto
        self.last = time.ticks_add(time.ticks_ms(), -2000)
        self.values = {}

    def read(self):
        if time.ticks_diff(time.ticks_ms(), self.last) >= 2000:  # it measures at most every 2 s: the last one till then
            frame = bytearray(5)
            self.read_frame(self.pin, frame)
            self.last = time.ticks_ms()
            t, rh = decode(frame, self.dht11)
            self.values = {"temperature": t, "humidity": rh}
        return self.values
