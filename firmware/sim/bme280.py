# A Bosch BME280 (or BMP280, chip id 0x58, no humidity) as its registers show it, modelled from the datasheet
# independently of the firmware's driver: the calibration words are the datasheet's worked example (BMP280 datasheet
# 3.12) plus typical humidity words, and raw ADC values are found by bisection on the datasheet's floating-point
# compensation (BME280 datasheet 8.1), while the firmware uses the integer formulas (4.2.3). A wrong formula on either
# side shows as a reading that does not match what the environment says.
import struct
import time

import environment

CAL = {"T1": 27504, "T2": 26435, "T3": -1000, "P1": 36477, "P2": -10685, "P3": 3024, "P4": 2855, "P5": 140,
       "P6": -7, "P7": 15500, "P8": -14600, "P9": 6000, "H1": 75, "H2": 362, "H3": 0, "H4": 324, "H5": 0, "H6": 30}
SKIPPED = 0x80000  # what a data register holds before any measurement (and when a channel is skipped)
MEASURE_S = 0.01  # a forced measurement at x1 oversampling takes about 8-10 ms


def t_fine(adc_t, c=CAL):
    v1 = (adc_t / 16384.0 - c["T1"] / 1024.0) * c["T2"]
    v2 = (adc_t / 131072.0 - c["T1"] / 8192.0) * (adc_t / 131072.0 - c["T1"] / 8192.0) * c["T3"]
    return v1 + v2


def temperature(adc_t, c=CAL):
    return t_fine(adc_t, c) / 5120.0


def pressure(adc_p, fine, c=CAL):
    """Pa."""
    v1 = fine / 2.0 - 64000.0
    v2 = v1 * v1 * c["P6"] / 32768.0 + v1 * c["P5"] * 2.0
    v2 = v2 / 4.0 + c["P4"] * 65536.0
    v1 = (c["P3"] * v1 * v1 / 524288.0 + c["P2"] * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * c["P1"]
    p = (1048576.0 - adc_p - v2 / 4096.0) * 6250.0 / v1
    return p + (c["P9"] * p * p / 2147483648.0 + p * c["P8"] / 32768.0 + c["P7"]) / 16.0


def humidity(adc_h, fine, c=CAL):
    h = fine - 76800.0
    h = (adc_h - (c["H4"] * 64.0 + c["H5"] / 16384.0 * h)) * (
        c["H2"] / 65536.0 * (1.0 + c["H6"] / 67108864.0 * h * (1.0 + c["H3"] / 67108864.0 * h)))
    return max(0.0, min(100.0, h * (1.0 - c["H1"] * h / 524288.0)))


def _find(f, target, lo, hi):
    """The raw value in lo..hi whose output is closest to target (f monotonic, either way)."""
    rising = f(hi) > f(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (f(mid) < target) == rising:
            lo = mid
        else:
            hi = mid
    return lo if abs(f(lo) - target) <= abs(f(hi) - target) else hi


def raw_for(temp_c, pressure_hpa, humidity_pct):
    adc_t = _find(temperature, temp_c, 0, (1 << 20) - 1)
    fine = t_fine(adc_t)
    adc_p = _find(lambda r: pressure(r, fine), pressure_hpa * 100.0, 0, (1 << 20) - 1)
    adc_h = _find(lambda r: humidity(r, fine), humidity_pct, 0, (1 << 16) - 1)
    return adc_t, adc_p, adc_h


def _calibration_registers(c=CAL):
    a = struct.pack("<HhhHhhhhhhhh", c["T1"], c["T2"], c["T3"], c["P1"], c["P2"], c["P3"], c["P4"], c["P5"],
                    c["P6"], c["P7"], c["P8"], c["P9"]) + bytes([0, c["H1"]])
    h4, h5 = c["H4"] & 0xFFF, c["H5"] & 0xFFF
    b = struct.pack("<h", c["H2"]) + bytes([c["H3"], h4 >> 4, (h4 & 0x0F) | ((h5 & 0x0F) << 4), h5 >> 4,
                                            c["H6"] & 0xFF])
    return a, b


class Chip:
    """One sensor on the bus. Normal mode measures continuously; forced mode measures once per request (and reads
    back as sleep); in sleep the data registers keep the last measurement."""

    def __init__(self, kind="bme280"):
        self.kind = kind
        self.chip_id = 0x58 if kind == "bmp280" else 0x60
        self.ctrl_meas = 0
        self.ctrl_hum = 0
        self.config = 0
        self.busy_until = 0.0
        self.data = self._data(SKIPPED, SKIPPED, 0x8000)
        self.cal_a, self.cal_b = _calibration_registers()

    @staticmethod
    def _data(adc_t, adc_p, adc_h):
        return bytes([adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4, adc_t >> 12, (adc_t >> 4) & 0xFF,
                      (adc_t & 0x0F) << 4, adc_h >> 8, adc_h & 0xFF])

    def _measure(self):
        adc_t, adc_p, adc_h = raw_for(environment.value("temperature"), environment.value("pressure"),
                                      environment.value("humidity"))
        if self.kind == "bmp280":
            adc_h = 0x8000
        self.data = self._data(adc_t, adc_p, adc_h)

    def read(self, reg, n):
        mode = self.ctrl_meas & 0x03
        if reg >= 0xF7 and mode == 0x03:
            self._measure()  # normal mode: always a fresh measurement
        regs = {0xD0: bytes([self.chip_id]), 0x88: self.cal_a, 0xF2: bytes([self.ctrl_hum]),
                0xF3: bytes([0x08 if time.host_time() < self.busy_until else 0]), 0xF4: bytes([self.ctrl_meas]),
                0xF5: bytes([self.config]), 0xF7: self.data if self.kind == "bme280" else self.data[:6] + b"\x80\x00"}
        if self.kind == "bme280":
            regs[0xE1] = self.cal_b
        for start, block in regs.items():
            if start <= reg < start + len(block):
                out = block[reg - start:reg - start + n]
                return out + bytes(n - len(out))
        return bytes(n)

    def write(self, reg, data):
        if reg == 0xF2:
            self.ctrl_hum = data[0] & 0x07
        elif reg == 0xF5:
            self.config = data[0]
        elif reg == 0xF4:
            self.ctrl_meas = data[0]
            if data[0] & 0x03 in (0x01, 0x02):  # forced: one measurement, then back to sleep
                self._measure()
                self.busy_until = time.host_time() + MEASURE_S
                self.ctrl_meas &= 0xFC
        elif reg == 0xE0 and data[0] == 0xB6:  # soft reset
            self.__init__(self.kind)
