# The link to the gateway: Wi-Fi (unless the board talks over serial) and one session at a time with the gateway's
# broker (MQTT, or JSON lines over a UART), reconnected with backoff; a long time without the gateway resets the board.
import asyncio
import time

import machine
import network

WIFI_FAILURES = {network.STAT_WRONG_PASSWORD: "wrong password", network.STAT_NO_AP_FOUND: "no access point",
                 network.STAT_ASSOC_FAIL: "association failed", network.STAT_HANDSHAKE_TIMEOUT: "handshake timeout"}


class Link:
    def __init__(self, cfg, device_id, root, log):
        self.cfg = cfg
        self.id = device_id
        self.root = root
        self.serial = cfg.get("transport") == "serial"
        self.wlan = network.WLAN(network.STA_IF)
        self.client = None
        self.last_broker = time.ticks_ms()
        self.client_factory = self.make_client
        self.log = log  # (level, message): printed, and sent to the gateway when connected

    async def publish(self, channel, payload, qos=1):
        client = self.client
        if client is None or not client.connected:
            return False
        try:
            await client.publish(self.root + channel, payload, qos=qos)
            return True
        except Exception:
            return False

    def rssi(self):
        try:
            return self.wlan.status("rssi")
        except Exception:
            return None

    async def wifi(self):
        """Join the Wi-Fi, or keep waiting while the driver is joining: an ESP32 fails with "Wifi Internal Error"
        when connect() is called again while it is still connecting, so connect() only from a clean state."""
        if self.serial:
            return True  # the serial transport needs no Wi-Fi
        wlan = self.wlan
        if wlan.isconnected():
            return True
        wlan.active(True)
        status = wlan.status()
        if status != network.STAT_CONNECTING:
            if status in WIFI_FAILURES:
                self.log("warning", "Wi-Fi %s: %s" % (self.cfg.get("wifi_ssid", ""), WIFI_FAILURES[status]))
            wlan.disconnect()
            wlan.connect(self.cfg.get("wifi_ssid", ""), self.cfg.get("wifi_password", ""))
        for _ in range(100):
            if wlan.isconnected():
                return True
            if wlan.status() in WIFI_FAILURES:
                return False
            await asyncio.sleep(0.1)
        return False

    def make_client(self):
        cfg = self.cfg
        if self.serial:
            from seriallink import SerialLink

            u = cfg.get("uart", {})
            uart = machine.UART(u.get("id", 1), baudrate=u.get("baud", 115200), tx=u.get("tx", 17), rx=u.get("rx", 16))
            return SerialLink(uart, self.id, cfg["password"], self.root, timeout=cfg.get("timeout", 10))
        from mqtt import MQTTClient

        return MQTTClient(self.id, cfg["broker_host"], cfg.get("broker_port", 1883), self.id, cfg["password"],
                          keepalive=cfg.get("keepalive", 15), will=(self.root + "status", "offline"),
                          timeout=cfg.get("timeout", 10))

    async def session(self, node):
        """One connection: `node` takes its messages, greets the gateway (`greet`), then sends (`send`) beside the
        reader until the connection ends."""
        client = self.client_factory()
        client.on_message = node.on_message
        client.on_oversize = node.on_oversize
        await client.connect()
        self.client = client
        self.last_broker = time.ticks_ms()
        reader = asyncio.create_task(client.run())
        sender = None
        try:
            await node.greet(client)
            sender = asyncio.create_task(self.send_until_closed(node, client))
            await reader  # returns or raises when the connection ends
        finally:
            # the gateway was there until now: `reboot_after` counts from the end of a session, not its start
            self.last_broker = time.ticks_ms()
            reader.cancel()
            if sender is not None:
                sender.cancel()
            await client.close()
            self.client = None

    async def send_until_closed(self, node, client):
        try:
            await node.send(client)
        except Exception as e:
            print("send failed:", repr(e))
            await client.close()  # the reader then ends the session

    async def run(self, node, before_reset):
        delay = 1
        while True:
            wifi = False
            try:
                wifi = await self.wifi()
                if wifi:
                    await self.session(node)
                    delay = 1
            except Exception as e:
                print("connection lost:", repr(e))
            if time.ticks_diff(time.ticks_ms(), self.last_broker) > self.cfg.get("reboot_after", 600) * 1000:
                before_reset()
                machine.reset()  # a long time without the gateway: start afresh
            if not wifi:
                delay = 1  # back off from the broker, not from the Wi-Fi: keep looking for it
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30)
