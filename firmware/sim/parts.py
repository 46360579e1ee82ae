# The parts a board file can wire to a virtual board, modelled from their datasheets apart from the firmware's drivers
# (the conversions run the other way here: from what the room holds to what the chip sends). Which parts a board has
# is its sim/board.json (written by `edgetrio vdev --board`); without one, the reference board: a BME280 at 0x76.
import json

import environment


def fitted():
    try:
        with open("sim/board.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sensirion_crc(data):
    """CRC-8, polynomial x^8 + x^5 + x^4 + 1 (0x31), initial 0xFF (SHT3x datasheet 4.12)."""
    crc = 0xFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def maxim_crc(data):
    """Dallas/Maxim CRC-8 (x^8 + x^5 + x^4 + 1, least significant bit first), as a DS18B20 sends it."""
    crc = 0
    for b in data:
        for _ in range(8):
            mix = (crc ^ b) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            b >>= 1
    return crc


class SHT3x:
    def __init__(self, kind=None):
        self.answer = b""

    def command(self, data):
        if bytes(data[:2]) == b"\x24\x00":  # single shot, high repeatability
            t = min(max(environment.value("temperature"), -45), 130)
            rh = min(max(environment.value("humidity"), 0), 100)
            st = int(round((t + 45) * 65535 / 175))
            srh = int(round(rh * 65535 / 100))
            words = bytes([st >> 8, st & 0xFF]), bytes([srh >> 8, srh & 0xFF])
            self.answer = words[0] + bytes([sensirion_crc(words[0])]) + words[1] + bytes([sensirion_crc(words[1])])

    def read(self, n):
        return (self.answer + bytes(n))[:n]


class BH1750:
    def __init__(self, kind=None):
        self.on = False

    def command(self, data):
        if data[0] in (0x01, 0x10, 0x11, 0x20):
            self.on = True
        elif data[0] == 0x00:
            self.on = False

    def read(self, n):
        # the sensor noise can take a dark room's 0 lx below zero: a real BH1750 counts from 0 (negative counts failed
        # every read after sunset, so the greenhouse board sent no light at night)
        count = int(max(0.0, min(environment.value("illuminance", 0.0) * 1.2, 65535))) if self.on else 0
        return bytes([count >> 8, count & 0xFF])[:n]


def rom(pin, i):
    """A DS18B20's ROM id (family 0x28, a serial from the board, the pin and its place, its CRC)."""
    body = bytes([0x28, pin & 0xFF, i & 0xFF, 0x4B, 0x46, 0x7F])
    body += bytes([sum(environment.device_id().encode()) & 0xFF])
    return body + bytes([maxim_crc(body)])


class OneWireBus:
    """DS18B20s on one pin: a ROM per sensor, `convert` for all, the scratchpad of the one selected."""

    def __init__(self, pin):
        self.roms = []
        for part in fitted() or []:
            if part.get("driver") == "ds18b20" and part.get("pin") == pin:
                count = len(part.get("roms") or {}) or part.get("count", 1)
                named = sorted((part.get("roms") or {}).values())
                self.roms = [bytes.fromhex(r) for r in named] if named else [rom(pin, i) for i in range(count)]
        self.selected = None
        self.pending = None
        self.scratch = b""
        self.temps = {}

    def command(self, byte):
        if self.pending == "skip":
            self.pending = None
            if byte == 0x44:  # convert T, all sensors
                base = environment.value("temperature")
                for i, r in enumerate(self.roms):
                    self.temps[r] = base - 1.5 - 0.7 * i  # each sensor somewhere a little cooler
            return
        if byte == 0xCC:
            self.pending = "skip"
        elif byte == 0xBE and self.selected in self.temps:
            raw = int(round(self.temps[self.selected] * 16)) & 0xFFFF
            body = bytes([raw & 0xFF, raw >> 8, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10])
            self.scratch = body + bytes([maxim_crc(body)])


def dht_frame(kind):
    """The 5 bytes a DHT22 (or DHT11) sends for what the room holds, with its checksum."""
    t, rh = environment.value("temperature"), environment.value("humidity")
    if kind == "dht11":
        frame = [int(rh), int(rh * 10) % 10, int(t), int(t * 10) % 10]
    else:
        rh10, t10 = int(round(rh * 10)), int(round(abs(t) * 10))
        frame = [rh10 >> 8, rh10 & 0xFF, (t10 >> 8) | (0x80 if t < 0 else 0), t10 & 0xFF]
    return bytes(frame + [sum(frame) & 0xFF])


def part_on(pin, drivers):
    for part in fitted() or []:
        if part.get("pin") == pin and part.get("driver") in drivers:
            return part
    return None
