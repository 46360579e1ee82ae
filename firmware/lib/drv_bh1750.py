# A ROHM BH1750 ambient light sensor over I2C, continuously in high-resolution mode: lux = count / 1.2 (datasheet:
# a count of 0x8390 is 28067 lx).
def lux(high, low):
    return ((high << 8) | low) / 1.2


class Device:
    def __init__(self, spec):
        from components import i2c

        self.bus = i2c(spec.get("sda", 21), spec.get("scl", 22))
        self.addr = spec.get("address", 0x23)
        self.bus.writeto(self.addr, b"\x01")  # power on
        self.bus.writeto(self.addr, b"\x10")  # continuously H-resolution mode (1 lx, 120 ms)

    def read(self):
        d = self.bus.readfrom(self.addr, 2)
        return {"": round(lux(d[0], d[1]), 1)}
