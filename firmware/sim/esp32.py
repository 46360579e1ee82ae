# Simulated esp32 module: the chip's temperature comes from sim/env.json.
import machine


def mcu_temperature():
    return machine.env("chip_temperature")
