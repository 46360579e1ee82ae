# What is wired to the board, as its config.json lists it ("components", written by `edgetrio flash --board`): each
# component's driver (drv_<driver>.py, imported only when the board has one) reads its values or drives its output;
# its filters shape what it reads; its resources name the values as the gateway's model does.
import time

I2C_BUSES = {}  # type: dict[tuple[int, int], object]  # (sda, scl) -> the bus, shared by the chips on those pins


def i2c(sda, scl):
    bus = I2C_BUSES.get((sda, scl))
    if bus is None:
        import machine

        n = len(I2C_BUSES)  # two hardware buses; more buses are bit-banged
        if n < 2:
            bus = machine.I2C(n, scl=machine.Pin(scl), sda=machine.Pin(sda))
        else:
            bus = machine.SoftI2C(scl=machine.Pin(scl), sda=machine.Pin(sda))
        I2C_BUSES[(sda, scl)] = bus
    return bus


class Filter:
    """Shapes one value: multiply, offset, a two-point calibration, then a median or average over the last N; holds
    it back (None) while it moved less than `delta` or `throttle` seconds have not passed since the last sent."""

    def __init__(self, spec):
        self.multiply = spec.get("multiply", 1)
        self.offset = spec.get("offset", 0)
        self.calibrate = spec.get("calibrate")
        self.window = spec.get("median") or spec.get("average") or 0
        self.median = "median" in spec
        self.delta = spec.get("delta")
        self.throttle = spec.get("throttle")
        self.recent = []
        self.sent = None
        self.sent_at = None

    def apply(self, value, now):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        value = value * self.multiply + self.offset
        if self.calibrate:
            (x1, y1), (x2, y2) = self.calibrate
            value = y1 + (value - x1) * (y2 - y1) / (x2 - x1)
        if self.window:
            self.recent.append(value)
            if len(self.recent) > self.window:
                self.recent.pop(0)
            ordered = sorted(self.recent)
            value = ordered[(len(ordered) - 1) // 2] if self.median else sum(ordered) / len(ordered)
        if self.sent is not None:
            if self.delta and abs(value - self.sent) < self.delta:
                return None
            if self.throttle and time.ticks_diff(now, self.sent_at) < self.throttle * 1000:
                return None
        self.sent, self.sent_at = value, now
        return round(value, 4) if isinstance(value, float) else value


def open_component(spec):
    """(the component, None), or (None, why it did not start): a chip that does not answer leaves the rest working."""
    try:
        driver = __import__("drv_" + spec["driver"])
        return Component(spec, driver.Device(spec)), None
    except Exception as e:
        return None, "%s: %s" % (spec["driver"], e)


class Component:
    def __init__(self, spec, device):
        self.spec = spec
        self.device = device
        self.resources = spec["resources"]
        self.interval = spec.get("interval")
        self.due = time.ticks_ms()
        filters = spec.get("filters") or {}
        self.filters = {}
        if filters:
            shared = {k: v for k, v in filters.items() if not isinstance(v, dict)}
            for r in self.resources:
                own = dict(shared)
                own.update(filters.get(r["key"]) or {})
                self.filters[r["key"]] = Filter(own)

    def read(self, now):
        """{resource name: value} of what the driver read, filtered (a value held back by a filter is left out)."""
        raw = self.device.read()
        out = {}
        for r in self.resources:
            value = raw.get(r["key"])
            if value is None:
                continue
            f = self.filters.get(r["key"])
            value = f.apply(value, now) if f else value
            if value is not None:
                out[r["name"]] = value
        return out


class Board:
    """The board's components; `read` takes the values of those due, `outputs` the writable ones by name."""

    def __init__(self, components):
        self.components = []
        self.errors = []  # components that did not start, and why
        self.failed = []  # reads that failed in the last round
        for spec in components:
            component, error = open_component(spec)
            if component is not None:
                self.components.append(component)
            else:
                self.errors.append(error)
        self.outputs = {}
        self.inputs = []  # components whose driver reports changes at once (binary inputs)
        for c in self.components:
            if getattr(c.device, "write", None):
                self.outputs[c.resources[0]["name"]] = c
            if getattr(c.device, "changed", None):
                self.inputs.append(c)

    def resources(self):
        """What the board announces in meta: the resources of the components that work (as the config has them,
        with each one's driver key: no copies on a small heap)."""
        out = []
        for c in self.components:
            keys = c.device.keys() if getattr(c.device, "keys", None) else None  # a BMP280 where a BME280 was named
            for r in c.resources:
                if keys is None or r["key"] in keys:
                    out.append(r)
        return out

    def read(self, period, force=False):
        """The values of the components due now (each at its own interval, or the board's period); what failed this
        time is in `failed` (a sensor that fails every period must not grow a list on a small heap)."""
        now = time.ticks_ms()
        values = {}
        self.failed = []
        for c in self.components:
            if c.resources[0].get("access") == "rw":
                continue
            if not force and time.ticks_diff(now, c.due) < 0:
                continue
            c.due = time.ticks_add(now, int((c.interval or period) * 1000))
            try:
                values.update(c.read(now))
            except Exception as e:
                self.failed.append("%s: %s" % (c.spec["driver"], e))
        return values

    def wait(self, period):
        """Seconds until the next component is due (at most the period)."""
        now = time.ticks_ms()
        due = [time.ticks_diff(c.due, now) for c in self.components]
        return max(0.05, min(due + [int(period * 1000)]) / 1000)

    def reschedule(self):
        """The period changed: read everything now, then at the new period."""
        for c in self.components:
            c.due = time.ticks_ms()

    def changes(self):
        """Values of inputs that changed since they were last looked at (debounced by their drivers)."""
        values = {}
        for c in self.inputs:
            value = c.device.changed()
            if value is not None:
                values[c.resources[0]["name"]] = value
        return values

    def check_output(self, name, value):
        """None if `value` can be written to output `name`, else why not."""
        r = self.outputs[name].resources[0]
        if r["type"] == "bool":
            return None if isinstance(value, bool) else "%s must be true or false" % name
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "%s must be a number" % name
        if not r.get("min", value) <= value <= r.get("max", value):
            return "%s must be %s..%s" % (name, r.get("min"), r.get("max"))
        return None

    def write(self, name, value):
        self.outputs[name].device.write(value)
