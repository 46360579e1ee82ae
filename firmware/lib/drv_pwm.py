# A dimmable output (an LED strip's MOSFET, a fan): 0-100 % duty at the configured frequency (default 1 kHz).


class Device:
    def __init__(self, spec):
        import machine

        self.pwm = machine.PWM(machine.Pin(spec["pin"]), freq=spec.get("frequency", 1000), duty_u16=0)
        self.level = 0

    def write(self, percent):
        self.level = percent
        self.pwm.duty_u16(int(percent * 65535 / 100))

    def read(self):
        return {"": self.level}
