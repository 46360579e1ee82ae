# Sensors behind a thin hardware layer (machine.I2C, machine.ADC, esp32): a BME280 over I2C with the datasheet's
# compensation formulas, an analog input, and the chip's own temperature. Each reading carries its unit.
import struct
from micropython import const

BME280_ADDR = const(0x76)
BME280_CHIP_ID = const(0x60)


def compensate_t(adc_t, c):
    """Temperature in degC and t_fine from the raw value (BME280 datasheet 4.2.3, floating point)."""
    v1 = (adc_t / 16384.0 - c["T1"] / 1024.0) * c["T2"]
    v2 = (adc_t / 131072.0 - c["T1"] / 8192.0) ** 2 * c["T3"]
    t_fine = v1 + v2
    return t_fine / 5120.0, t_fine


def compensate_p(adc_p, t_fine, c):
    """Pressure in hPa."""
    v1 = t_fine / 2.0 - 64000.0
    v2 = v1 * v1 * c["P6"] / 32768.0
    v2 = v2 + v1 * c["P5"] * 2.0
    v2 = v2 / 4.0 + c["P4"] * 65536.0
    v1 = (c["P3"] * v1 * v1 / 524288.0 + c["P2"] * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * c["P1"]
    if v1 == 0:
        return 0.0
    p = 1048576.0 - adc_p
    p = (p - v2 / 4096.0) * 6250.0 / v1
    v1 = c["P9"] * p * p / 2147483648.0
    v2 = p * c["P8"] / 32768.0
    return (p + (v1 + v2 + c["P7"]) / 16.0) / 100.0


def compensate_h(adc_h, t_fine, c):
    """Relative humidity in %."""
    h = t_fine - 76800.0
    h = (adc_h - (c["H4"] * 64.0 + c["H5"] / 16384.0 * h)) * (
        c["H2"] / 65536.0 * (1.0 + c["H6"] / 67108864.0 * h * (1.0 + c["H3"] / 67108864.0 * h)))
    h = h * (1.0 - c["H1"] * h / 524288.0)
    return max(0.0, min(100.0, h))


def parse_calibration(a, b):
    """Calibration words from registers 0x88..0xA1 (a, 26 bytes) and 0xE1..0xE7 (b, 7 bytes)."""
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack("<HhhHhhhhhhhh", a[:24])
    e4, e5, e6 = b[3], b[4], b[5]
    return {
        "T1": t1, "T2": t2, "T3": t3, "P1": p1, "P2": p2, "P3": p3, "P4": p4, "P5": p5, "P6": p6,
        "P7": p7, "P8": p8, "P9": p9, "H1": a[25], "H2": struct.unpack("<h", b[0:2])[0], "H3": b[2],
        "H4": _signed12((e4 << 4) | (e5 & 0x0F)), "H5": _signed12((e6 << 4) | (e5 >> 4)),
        "H6": struct.unpack("<b", b[6:7])[0],
    }


def _signed12(v):
    return v - 4096 if v & 0x800 else v


class BME280:
    def __init__(self, i2c, addr=BME280_ADDR):
        self.i2c = i2c
        self.addr = addr
        chip = i2c.readfrom_mem(addr, 0xD0, 1)[0]
        if chip != BME280_CHIP_ID:
            raise OSError("no BME280 at 0x%02x (chip id 0x%02x)" % (addr, chip))
        self.cal = parse_calibration(i2c.readfrom_mem(addr, 0x88, 26), i2c.readfrom_mem(addr, 0xE1, 7))
        i2c.writeto_mem(addr, 0xF2, b"\x01")  # humidity oversampling x1
        i2c.writeto_mem(addr, 0xF4, b"\x27")  # temperature and pressure x1, normal mode

    def read(self):
        d = self.i2c.readfrom_mem(self.addr, 0xF7, 8)
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        t, t_fine = compensate_t(adc_t, self.cal)
        return {
            "temperature": round(t, 2),
            "pressure": round(compensate_p(adc_p, t_fine, self.cal), 2),
            "humidity": round(compensate_h(adc_h, t_fine, self.cal), 2),
        }


RESOURCES = {
    "temperature": {"name": "temperature", "type": "float", "unit": "C", "min": -40, "max": 85},
    "pressure": {"name": "pressure", "type": "float", "unit": "hPa", "min": 300, "max": 1100},
    "humidity": {"name": "humidity", "type": "float", "unit": "%", "min": 0, "max": 100},
    "analog": {"name": "analog", "type": "float", "unit": "V", "min": 0, "max": 3.3},
    "chip_temperature": {"name": "chip_temperature", "type": "float", "unit": "C", "min": -40, "max": 125},
}


class Sensors:
    """The sensors a config says are fitted: {"bme280": {"scl": 22, "sda": 21}, "adc": {"pin": 34}, "chip": true}."""

    def __init__(self, fitted):
        import machine

        self.bme = None
        self.adc = None
        self.chip = bool(fitted.get("chip"))
        self.errors = []
        if "bme280" in fitted:
            pins = fitted["bme280"]
            try:
                i2c = machine.I2C(0, scl=machine.Pin(pins.get("scl", 22)), sda=machine.Pin(pins.get("sda", 21)))
                self.bme = BME280(i2c, pins.get("addr", BME280_ADDR))
            except OSError as e:
                self.errors.append("bme280: %s" % e)
        if "adc" in fitted:
            self.adc = machine.ADC(machine.Pin(fitted["adc"].get("pin", 34)))

    def resources(self):
        names = []
        if self.bme:
            names += ["temperature", "pressure", "humidity"]
        if self.adc:
            names.append("analog")
        if self.chip:
            names.append("chip_temperature")
        return [RESOURCES[n] for n in names]

    def read(self):
        values = {}
        if self.bme:
            values.update(self.bme.read())
        if self.adc:
            values["analog"] = round(self.adc.read_u16() * 3.3 / 65535, 3)
        if self.chip:
            import esp32

            read_chip = getattr(esp32, "mcu_temperature", None)  # not in every port nor in the stubs
            if read_chip:
                values["chip_temperature"] = round(float(read_chip()), 1)
        return values
