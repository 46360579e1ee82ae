# Simulated Wi-Fi: up unless sim/wifi says "down" (the supervisor also cuts the device's TCP connections then).
STA_IF = 0
AP_IF = 1
STAT_GOT_IP = 1010


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

    def active(self, on=None):
        if on is None:
            return self._active
        self._active = bool(on)
        return None

    def connect(self, ssid=None, key=None):
        self._ssid = ssid

    def disconnect(self):
        self._ssid = None

    def isconnected(self):
        return self._active and _up()

    def status(self, param=None):
        if param == "rssi":
            return -55 if _up() else -100
        return STAT_GOT_IP if self.isconnected() else 0

    def ifconfig(self, config=None):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def config(self, key=None, **kwargs):
        if key == "mac":
            return b"\x24\x0a\xc4\x00\x00\x01"
        return None
