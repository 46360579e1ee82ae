# A Bosch BMP280: the BME280's temperature and pressure, no humidity (the same driver tells them apart).
from drv_bme280 import Device  # noqa: F401
