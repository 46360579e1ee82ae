# An Aosong DHT11: the DHT22's frame in whole degrees and percent.
from drv_dht22 import Device as DHT22


class Device(DHT22):
    dht11 = True
