# The world around a virtual board: each board has its own room, seeded from its device id, with a daily cycle,
# slow weather, and sensor noise at the BME280's resolution, so a fleet looks like a fleet. sim/env.json pins values
# (`edgetrio fault ID env temperature=30`). Times are the real world's (host) UTC, not the board's clock.
import json
import math
import time

DAY = 86400.0


def _unit(seed, n):
    """The n-th number in 0..1 of a board's own sequence (a small integer hash: the same on every run)."""
    h = (seed * 2654435761 + n * 40503 + 12345) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 2246822519) & 0xFFFFFFFF
    h ^= h >> 13
    return h / 4294967296.0


def device_id():
    try:
        with open("config.json") as f:
            return json.load(f).get("device_id", "vdev")
    except (OSError, ValueError):
        return "vdev"


class Room:
    def __init__(self, name):
        seed = 5381
        for ch in name:
            seed = (seed * 33 + ord(ch)) & 0xFFFFFFFF
        u = [_unit(seed, i) for i in range(12)]
        self.temperature = 17.0 + 8.0 * u[0]  # degC, the room's mean
        self.day_swing = 1.0 + 3.0 * u[1]  # degC, half the daily range
        self.warmest = 13.0 + 4.0 * u[2]  # hour of day (UTC) of the daily peak
        self.pressure = 1003.0 + 20.0 * u[3]  # hPa, the local mean
        self.weather_period = DAY * (2.0 + 3.0 * u[4])  # fronts pass every few days
        self.weather_phase = u[5] * 2 * math.pi
        self.humidity = 35.0 + 25.0 * u[6]  # %RH
        self.drift_period = 3600.0 * (3.0 + 6.0 * u[7])
        self.drift_phase = u[8] * 2 * math.pi
        self.analog = 0.8 + 1.6 * u[9]  # V at the ADC pin
        self.chip = 38.0 + 8.0 * u[10]  # degC, the ESP32 die
        self.daylight = 5000.0 + 25000.0 * u[11]  # lx at noon through its window
        self._noise = seed

    def noise(self, step):
        """Roughly normal noise of about `step` (the sum of three uniforms, centred)."""
        self._noise = (self._noise * 1103515245 + 12345) & 0x7FFFFFFF
        a = self._noise / 2147483648.0
        self._noise = (self._noise * 1103515245 + 12345) & 0x7FFFFFFF
        b = self._noise / 2147483648.0
        self._noise = (self._noise * 1103515245 + 12345) & 0x7FFFFFFF
        c = self._noise / 2147483648.0
        return (a + b + c - 1.5) * 2 * step

    def at(self, t):
        """The true values at host time t (seconds since 1970 UTC)."""
        hour = (t % DAY) / 3600.0
        daily = math.cos((hour - self.warmest) / 24.0 * 2 * math.pi)  # 1 at the warmest hour
        drift = math.sin(t / self.drift_period * 2 * math.pi + self.drift_phase)
        weather = math.sin(t / self.weather_period * 2 * math.pi + self.weather_phase)
        temperature = self.temperature + self.day_swing * daily + 0.8 * drift
        return {
            "temperature": temperature,
            "pressure": self.pressure + 8.0 * weather + 0.4 * drift,
            # warmer air at the same moisture is drier
            "humidity": max(5.0, min(95.0, self.humidity - 2.5 * self.day_swing * daily - 6.0 * weather)),
            "analog": max(0.0, min(3.3, self.analog + 0.05 * drift)),
            "chip_temperature": self.chip + 0.5 * (temperature - 20.0),
            "illuminance": max(0.0, math.sin((hour - 6.0) / 12.0 * math.pi)) * self.daylight * (0.8 + 0.2 * weather),
        }


_room = None
# noise at the BME280's output resolution (datasheet: 0.01 degC, 0.18 Pa, 0.008 %RH; RMS noise at x1
# oversampling about 0.005 degC and 3.3 Pa), and what an ADC and the die sensor show
_NOISE = {"temperature": 0.01, "pressure": 0.033, "humidity": 0.02, "analog": 0.004, "chip_temperature": 0.3,
          "illuminance": 2.0}


def pinned():
    try:
        with open("sim/env.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def value(key, default=None):
    """What the board's sensor `key` sees now: a pinned value, or its room's, with noise (`default` for what the
    room does not model: an input pin's level, a meter's pulses)."""
    global _room
    fixed = pinned()
    if key in fixed:
        return fixed[key]
    if key not in _NOISE:
        return default
    if _room is None:
        _room = Room(device_id())
    return _room.at(time.host_time())[key] + _room.noise(_NOISE[key])
