# The ESP32's own die temperature (esp32.mcu_temperature, where the port has it): tells of a board in the sun.


class Device:
    def __init__(self, spec):
        import esp32

        read = getattr(esp32, "mcu_temperature", None)  # not in every port nor in the stubs
        if read is None:
            raise OSError("this MicroPython cannot read the chip's temperature")
        self.read_chip = read

    def read(self):
        return {"": round(float(self.read_chip()), 1)}
