# A Bosch BME280 (or BMP280: no humidity) over I2C, register-level, with the datasheet's integer compensation
# formulas (an ESP32's floats are single precision), in normal or forced mode.
import struct
import time
from micropython import const

BME280_ADDR = const(0x76)
BME280_CHIP_ID = const(0x60)
BMP280_CHIP_ID = const(0x58)  # the same T and P, no humidity; often sold as a BME280


def _div(a, b):
    """C's integer division (truncates towards zero), as the datasheet's code does."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def compensate_t(adc_t, c):
    """(temperature in 0.01 degC, t_fine) from the raw value: the BME280 datasheet's 32-bit integer formula (4.2.3).
    Integers, not floats: an ESP32's floats are single precision."""
    v1 = (((adc_t >> 3) - (c["T1"] << 1)) * c["T2"]) >> 11
    v2 = (((((adc_t >> 4) - c["T1"]) * ((adc_t >> 4) - c["T1"])) >> 12) * c["T3"]) >> 14
    t_fine = v1 + v2
    return (t_fine * 5 + 128) >> 8, t_fine


def compensate_p(adc_p, t_fine, c):
    """Pressure in Pa as Q24.8 (divide by 256): the datasheet's 64-bit integer formula."""
    v1 = t_fine - 128000
    v2 = v1 * v1 * c["P6"]
    v2 = v2 + ((v1 * c["P5"]) << 17)
    v2 = v2 + (c["P4"] << 35)
    v1 = ((v1 * v1 * c["P3"]) >> 8) + ((v1 * c["P2"]) << 12)
    v1 = (((1 << 47) + v1) * c["P1"]) >> 33
    if v1 == 0:
        return 0  # avoid a division by zero, as the datasheet does
    p = 1048576 - adc_p
    p = _div(((p << 31) - v2) * 3125, v1)
    v1 = (c["P9"] * (p >> 13) * (p >> 13)) >> 25
    v2 = (c["P8"] * p) >> 19
    return ((p + v1 + v2) >> 8) + (c["P7"] << 4)


def compensate_h(adc_h, t_fine, c):
    """Relative humidity in %RH as Q22.10 (divide by 1024): the datasheet's 32-bit integer formula."""
    v = t_fine - 76800
    v = (((((adc_h << 14) - (c["H4"] << 20) - (c["H5"] * v)) + 16384) >> 15)
         * (((((((v * c["H6"]) >> 10) * (((v * c["H3"]) >> 11) + 32768)) >> 10) + 2097152) * c["H2"] + 8192) >> 14))
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * c["H1"]) >> 4)
    v = max(0, min(v, 419430400))
    return v >> 12


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
    """A BME280, or a BMP280 (no humidity). Normal mode measures continuously; forced mode (for battery boards: the
    sensor sleeps between readings) asks for one measurement per read and waits for it."""

    def __init__(self, i2c, addr=BME280_ADDR, mode="normal"):
        self.i2c = i2c
        self.addr = addr
        chip = i2c.readfrom_mem(addr, 0xD0, 1)[0]
        if chip not in (BME280_CHIP_ID, BMP280_CHIP_ID):
            raise OSError("no BME280 or BMP280 at 0x%02x (chip id 0x%02x)" % (addr, chip))
        self.humidity = chip == BME280_CHIP_ID
        self.forced = mode == "forced"
        self.last_adc_t = 0
        self.cal = parse_calibration(i2c.readfrom_mem(addr, 0x88, 26),
                                     i2c.readfrom_mem(addr, 0xE1, 7) if self.humidity else bytes(7))
        if self.humidity:
            i2c.writeto_mem(addr, 0xF2, b"\x01")  # humidity oversampling x1 (takes effect with the next 0xF4 write)
        # temperature and pressure oversampling x1; normal mode, or sleep until a forced measurement is asked for
        i2c.writeto_mem(addr, 0xF4, b"\x24" if self.forced else b"\x27")

    def names(self):
        return ["temperature", "pressure", "humidity"] if self.humidity else ["temperature", "pressure"]

    def read(self):
        if self.forced:
            self.i2c.writeto_mem(self.addr, 0xF4, b"\x25")
            for _ in range(50):  # about 10 ms at x1 oversampling; "measuring" is bit 3 of status
                if not self.i2c.readfrom_mem(self.addr, 0xF3, 1)[0] & 0x08:
                    break
                time.sleep_ms(1)
        d = self.i2c.readfrom_mem(self.addr, 0xF7, 8)
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        self.last_adc_t = adc_t
        t, t_fine = compensate_t(adc_t, self.cal)
        values = {"temperature": t / 100, "pressure": round(compensate_p(adc_p, t_fine, self.cal) / 25600, 2)}
        if self.humidity:
            adc_h = (d[6] << 8) | d[7]
            values["humidity"] = round(compensate_h(adc_h, t_fine, self.cal) / 1024, 2)
        return values


class Device:
    """The board's component (see components.py): values by the driver's keys."""

    def __init__(self, spec):
        from components import i2c

        self.chip = BME280(i2c(spec.get("sda", 21), spec.get("scl", 22)), spec.get("address", BME280_ADDR),
                           spec.get("mode", "normal"))

    def keys(self):
        return self.chip.names()

    def read(self):
        return self.chip.read()
