# A Sensirion SHT3x (SHT30/31/35) over I2C: single-shot measurements, high repeatability, each word checked with the
# datasheet's CRC-8 (polynomial 0x31, init 0xFF; the datasheet's example: CRC(0xBEEF) = 0x92).
import time


def crc8(data):
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def convert(frame):
    """(temperature in degC, relative humidity in %) from the 6-byte answer; ValueError when a CRC does not match."""
    if crc8(frame[0:2]) != frame[2] or crc8(frame[3:5]) != frame[5]:
        raise ValueError("CRC mismatch: a disturbed bus or a loose wire")
    t = (frame[0] << 8) | frame[1]
    rh = (frame[3] << 8) | frame[4]
    return -45 + 175 * t / 65535, 100 * rh / 65535


class Device:
    def __init__(self, spec):
        from components import i2c

        self.bus = i2c(spec.get("sda", 21), spec.get("scl", 22))
        self.addr = spec.get("address", 0x44)
        self.bus.writeto(self.addr, b"\x30\xa2")  # soft reset: answers, or raises OSError when nothing is there
        time.sleep_ms(2)

    def read(self):
        self.bus.writeto(self.addr, b"\x24\x00")  # single shot, high repeatability, no clock stretching
        time.sleep_ms(16)  # at most 15.5 ms (datasheet table 4)
        t, rh = convert(self.bus.readfrom(self.addr, 6))
        return {"temperature": round(t, 2), "humidity": round(max(0.0, min(100.0, rh)), 2)}
