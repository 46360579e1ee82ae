# Simulated MicroPython onewire module: the bus on a pin, with the DS18B20s the virtual board has (sim/parts.py).
import parts


class OneWireError(Exception):
    pass


class OneWire:
    SEARCH_ROM = 0xF0
    MATCH_ROM = 0x55
    SKIP_ROM = 0xCC

    def __init__(self, pin):
        self.bus = parts.OneWireBus(pin.n)
        self.out = b""

    def reset(self, required=False):
        if required and not self.bus.roms:
            raise OneWireError("no device answers")
        return bool(self.bus.roms)

    def writebyte(self, value):
        self.bus.command(value)
        if value == 0xBE:
            self.out = self.bus.scratch

    def write(self, buf):
        for b in buf:
            self.writebyte(b)

    def readinto(self, buf):
        for i in range(len(buf)):
            buf[i] = self.out[i] if i < len(self.out) else 0xFF

    def select_rom(self, rom):
        self.bus.selected = bytes(rom)

    def scan(self):
        return [bytearray(r) for r in self.bus.roms]

    def crc8(self, data):
        return parts.maxim_crc(data)
