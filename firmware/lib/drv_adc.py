# An analog input on ADC1 (GPIO32-39), calibrated by the chip (read_uv), at the configured attenuation, through a
# voltage divider when the config names one (divider = 2 for two equal resistors: the pin sees half).
ATTENUATION = {"0dB": 0, "2.5dB": 1, "6dB": 2, "11dB": 3}


class Device:
    def __init__(self, spec):
        import machine

        atten = ATTENUATION[spec.get("attenuation", "11dB")]
        self.adc = machine.ADC(machine.Pin(spec["pin"]), atten=atten)
        self.divider = spec.get("divider", 1)

    def read(self):
        return {"": round(self.adc.read_uv() * self.divider / 1000000, 3)}
