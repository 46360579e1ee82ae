# Maxim DS18B20 temperature sensors on one 1-Wire pin, found by their ROM ids (MicroPython's onewire module): each
# conversion started at once (and read at the next reading), each scratchpad checked by its CRC and turned into degC as the datasheet's table 1 says.
import time


def temperature(scratchpad):
    """degC from the first two scratchpad bytes (LSB, MSB): two's complement sixteenths of a degree at 12 bits."""
    raw = scratchpad[0] | (scratchpad[1] << 8)
    if raw & 0x8000:
        raw -= 0x10000
    return raw / 16


class Device:
    def __init__(self, spec):
        import machine
        import onewire

        self.wire = onewire.OneWire(machine.Pin(spec["pin"]))
        found = sorted(bytes(rom).hex() for rom in self.wire.scan())
        named = spec.get("roms")
        if named:  # by ROM id, as the config names them
            missing = [rom for rom in named.values() if rom not in found]
            if missing:
                raise OSError("no DS18B20 %s on GPIO%d (found %s)" % (", ".join(missing), spec["pin"],
                                                                    ", ".join(found) or "none"))
            self.roms = [(rom, bytes.fromhex(rom)) for rom in named.values()]
        else:  # in ROM order: the first `count` found
            if len(found) < spec.get("count", 1):
                raise OSError("%d DS18B20 on GPIO%d, %d expected" % (len(found), spec["pin"], spec.get("count", 1)))
            self.roms = [(str(i), bytes.fromhex(rom)) for i, rom in enumerate(found[:spec.get("count", 1)])]
        self.convert()
        time.sleep_ms(750)  # the first conversion, once at start

    def convert(self):
        """Start a conversion on every sensor at once (12 bits take 750 ms): read() reads the one started before, so
        nothing waits for the sensors."""
        self.wire.reset(True)
        self.wire.writebyte(0xCC)  # skip ROM: all of them
        self.wire.writebyte(0x44)

    def read(self):
        wire = self.wire
        out = {}
        buf = bytearray(9)
        for key, rom in self.roms:
            wire.reset(True)
            wire.select_rom(rom)
            wire.writebyte(0xBE)  # read scratchpad
            wire.readinto(buf)
            if wire.crc8(buf):  # the CRC over all nine bytes is 0 when they arrived whole
                continue  # this sensor's value is left out of the reading, the others' go
            out[key] = temperature(buf)
        self.convert()
        return out
