# Simulated Wi-Fi: up unless sim/wifi says "down" (the supervisor also cuts the device's TCP connections then).
# Like an ESP32's driver, once asked to connect it keeps trying (status STAT_CONNECTING) until the access point is
# there, and a second connect() while it is still trying fails with "Wifi Internal Error".
import time

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_BEACON_TIMEOUT = 200
STAT_ASSOC_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204
ASSOCIATE_S = 0.2  # from connect() to an address when the access point is there


def _up():
    try:
        with open("sim/wifi") as f:
            return f.read().strip() != "down"
    except OSError:
        return True


class WLAN:
    def __init__(self, interface=STA_IF):
        self._active = False
        self._ssid = None
        self._asked = 0.0

    def active(self, on=None):
        if on is None:
            return self._active
        self._active = bool(on)
        if not on:
            self._ssid = None
        return None

    def connect(self, ssid=None, key=None):
        if not self._active:
            raise OSError("Wifi Not Started")
        if self._ssid is not None and self._state() == STAT_CONNECTING:
            raise OSError("Wifi Internal Error")
        self._ssid = ssid
        self._asked = time.host_time()

    def disconnect(self):
        self._ssid = None

    def _state(self):
        if not self._active or self._ssid is None:
            return STAT_IDLE
        if _up() and time.host_time() - self._asked >= ASSOCIATE_S:
            return STAT_GOT_IP
        return STAT_CONNECTING  # the driver keeps trying until the access point answers

    def isconnected(self):
        return self._state() == STAT_GOT_IP

    def status(self, param=None):
        if param == "rssi":
            return -55 if _up() else -100
        return self._state()

    def ifconfig(self, config=None):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def config(self, key=None, **kwargs):
        if key == "mac":
            return b"\x24\x0a\xc4\x00\x00\x01"
        return None
