# A relay or any on/off output: true drives the pin high (low when inverted). Starts off, or as it was when `restore`
# is set (the twin's desired state then comes from the gateway as usual).


class Device:
    def __init__(self, spec):
        import machine

        self.inverted = spec.get("inverted", False)
        self.pin = machine.Pin(spec["pin"], machine.Pin.OUT, value=1 if self.inverted else 0)
        self.state = False

    def write(self, on):
        self.state = bool(on)
        self.pin.value(1 if self.state != self.inverted else 0)

    def read(self):
        return {"": self.state}
