# The sensor node: Wi-Fi and MQTT with reconnects, telemetry through the flash buffer, twin and commands.
# Every failure path leads back to the reconnect loop; readings leave the buffer only on the gateway's ack.
import asyncio
import gc
import json
import time

import machine
import network

from buffer import Buffer
from mqtt import MQTTClient

VERSION = "0.1.0"
STATE_FILE = "state.json"
RESEND_MS = 30000  # no ack progress this long with readings outstanding: send them again
TWIN_KEYS = ("period", "led", "threshold")
# what the twin keys and commands are, told in meta so a gateway can offer them (switches, numbers, buttons)
CONTROLS = [{"name": "led", "type": "bool"}, {"name": "period", "type": "float", "unit": "s", "min": 0.1, "max": 86400},
            {"name": "threshold", "type": "float", "min": 0}]
COMMANDS = ["ping", "blink", "read_now", "reboot"]
RESET_CAUSES = {1: "power-on", 2: "hard", 3: "watchdog", 4: "deep sleep", 5: "soft"}
# Unix seconds at the port's epoch: an ESP32 counts from 2000-01-01, the unix port from 1970.
EPOCH_OFFSET = 946684800 if time.gmtime(0)[0] == 2000 else 0
CLOCK_SET_AFTER = 1704067200  # unix seconds of 2024-01-01: a clock before that was never set
CLOCK_WAIT_MS = 2000  # after connecting, how long readings wait for the gateway's time


WIFI_FAILURES = {network.STAT_WRONG_PASSWORD: "wrong password", network.STAT_NO_AP_FOUND: "no access point",
                 network.STAT_ASSOC_FAIL: "association failed", network.STAT_HANDSHAKE_TIMEOUT: "handshake timeout"}


def now_ms():
    """The board's clock in milliseconds since its epoch (ints: an ESP32's floats are single precision)."""
    return time.time_ns() // 1000000


def clock_is_set():
    return time.time() + EPOCH_OFFSET >= CLOCK_SET_AFTER


def load_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def save_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    import os

    os.rename(path + ".tmp", path)


def check_twin(key, value):
    """None if a desired value can be applied, else why not."""
    if key == "period":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.1 <= value <= 86400
        return None if ok else "period must be 0.1..86400 s"
    if key == "led":
        return None if isinstance(value, bool) else "led must be true or false"
    if key == "threshold":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        return None if ok else "threshold must be a number >= 0"
    return "unknown key"


class Node:
    def __init__(self, cfg, state, safe_mode=False):
        self.cfg = cfg
        self.state = state
        self.safe_mode = safe_mode
        self.id = cfg["device_id"]
        self.root = "edgetrio/%s/" % self.id
        self.boot = state["boot"]
        self.reset_cause = RESET_CAUSES.get(machine.reset_cause(), "unknown")  # a watchdog reset tells of a hang
        self.seq = 0
        self.twin = state.get("twin") or {"period": cfg.get("period", 10), "led": False, "threshold": 0}
        self.buffer = Buffer("buffer.log", cfg.get("buffer", 500))
        self.sensors = None
        if not safe_mode:
            import sensors

            self.sensors = sensors.Sensors(cfg.get("sensors", {"chip": True}))
        self.led = machine.Pin(cfg.get("led_pin", 2), machine.Pin.OUT)
        self.led.value(1 if self.twin.get("led") else 0)
        self.wlan = network.WLAN(network.STA_IF)
        self.client = None
        self.new_reading = asyncio.Event()
        self.acked_at = time.ticks_ms()
        self.last_values = {}
        self.last_broker = time.ticks_ms()
        self.clock = self.clock_epoch(state)
        self.clock_set = asyncio.Event()
        self.healthy = False
        self.serial = cfg.get("transport") == "serial"
        self.client_factory = self.make_client

    # -- the clock ------------------------------------------------------------------------------------------------------

    def clock_epoch(self, state):
        """Which run of the unset clock this boot is in: {"boot": the boot it started at, "offset": ms to add to it
        once known}. The RTC keeps counting across soft and watchdog resets and deep sleep, and starts again at the
        epoch on power-on; readings taken before the clock is set carry (epoch boot, board ms) and are corrected
        with the offset learnt when the gateway or NTP sets the clock."""
        clock = state.get("clock")
        if not isinstance(clock, dict):  # none yet (or not ours): a new run of the clock
            clock = {}
        raw = now_ms()
        restarted = (machine.reset_cause() in (machine.PWRON_RESET, machine.HARD_RESET)
                     or raw < clock.get("raw", 0))
        if clock_is_set():
            clock = {"boot": self.boot, "raw": raw, "offset": 0, "set": True}
        elif restarted or not clock or clock.get("set"):
            clock = {"boot": self.boot, "raw": raw, "offset": None}
        else:
            clock["raw"] = raw
        state["clock"] = clock
        save_json(STATE_FILE, state)
        return clock

    def set_clock(self, unix_ms):
        """Set the RTC to the gateway's (or NTP's) time; learn the offset for readings taken while it was unset."""
        if not isinstance(unix_ms, int) or unix_ms < CLOCK_SET_AFTER * 1000:
            return
        if not clock_is_set():
            self.clock["offset"] = unix_ms - EPOCH_OFFSET * 1000 - now_ms()
            self.clock["set"] = True
            self.state["clock"] = self.clock
            save_json(STATE_FILE, self.state)
        t = time.gmtime(unix_ms // 1000 - EPOCH_OFFSET)
        machine.RTC().datetime((t[0], t[1], t[2], t[6], t[3], t[4], t[5], unix_ms % 1000 * 1000))
        self.clock_set.set()

    def sync_ntp(self):
        host = self.cfg.get("ntp_host")
        if not host or self.serial:
            return
        try:
            import ntptime

            ntptime.host = host
            ntptime.settime()  # sets the RTC in UTC
            self.clock_set.set()
        except Exception as e:  # no NTP today: the gateway's time does
            print("ntp failed:", repr(e))

    def stamp(self, body):
        """Put the reading's time in true UTC milliseconds (`ts_ms`), or leave none when it cannot be known."""
        clk = body.pop("clk", None)
        if clk and "ts_ms" not in body and clk[0] == self.clock["boot"] and self.clock.get("offset") is not None:
            body["ts_ms"] = clk[1] + self.clock["offset"] + EPOCH_OFFSET * 1000
        return body

    # -- messages from the gateway --------------------------------------------------------------------------------

    def on_message(self, topic, payload):
        channel = topic[len(self.root):]
        try:
            body = json.loads(payload)
        except ValueError:
            self.log("warning", "ignored non-JSON message on " + channel)
            return
        if channel == "ack":
            if self.buffer.ack(body["boot"], body["seq"]):
                self.acked_at = time.ticks_ms()
            if not self.healthy and not self.safe_mode:
                self.healthy = True  # a committed reading: this boot works
                self.state["failed_boots"] = 0
                save_json(STATE_FILE, self.state)
        elif channel == "time":
            self.set_clock(body.get("unix_ms"))
        elif channel == "twin/desired":
            asyncio.create_task(self.apply_desired(body.get("state") or {}))
        elif channel == "cmd":
            asyncio.create_task(self.command(body))

    def on_oversize(self, topic, size, head):
        """A message too large to take: a command gets an error result (its id is near the start) instead of a
        timeout at the gateway."""
        if topic[len(self.root):] != "cmd":
            self.log("warning", "skipped a %d-byte message on %s" % (size, topic))
            return
        start = head.find(b'"id": "')
        end = head.find(b'"', start + 7) if start >= 0 else -1
        if end < 0:
            self.log("warning", "skipped a %d-byte command without a readable id" % size)
            return
        limit = self.client.max_in if self.client is not None else 0
        result = {"id": head[start + 7:end].decode(), "ok": False,
                  "error": "command too large (%d bytes; this board takes up to %d)" % (size, limit)}
        asyncio.create_task(self.publish("cmd/result", json.dumps(result)))

    async def apply_desired(self, desired):
        rejected = {}
        for key, value in desired.items():
            reason = check_twin(key, value)
            if reason:
                rejected[key] = reason
            else:
                self.twin[key] = value
        self.led.value(1 if self.twin.get("led") else 0)
        self.state["twin"] = self.twin
        save_json(STATE_FILE, self.state)
        reported = dict(self.twin)
        reported["rejected"] = rejected or None  # null clears an earlier rejection
        await self.publish("twin/reported", json.dumps({"state": reported}))
        self.new_reading.set()  # a new period takes effect now

    async def command(self, cmd):
        name, args = cmd.get("name"), cmd.get("args") or {}
        result = {"id": cmd.get("id"), "ok": True}
        try:
            if name == "ping":
                result["value"] = "pong"
            elif name == "blink":
                for _ in range(int(args.get("times", 3))):
                    self.led.value(1)
                    await asyncio.sleep(0.1)
                    self.led.value(0)
                    await asyncio.sleep(0.1)
                self.led.value(1 if self.twin.get("led") else 0)
                result["value"] = "blinked"
            elif name == "read_now":
                if self.sensors is None:
                    raise ValueError("safe mode: sensors are off")
                result["value"] = self.take_reading()
            elif name == "reboot":
                if args.get("normal"):  # leave safe mode: the next boot starts with a clean count
                    self.state["failed_boots"] = 0
                    save_json(STATE_FILE, self.state)
                result["value"] = "rebooting"
            else:
                raise ValueError("unknown command %s" % name)
        except Exception as e:
            result = {"id": cmd.get("id"), "ok": False, "error": str(e)}
        await self.publish("cmd/result", json.dumps(result))
        if name == "reboot" and result["ok"]:
            await asyncio.sleep(0.5)
            self.buffer.flush()
            machine.reset()

    # -- telemetry ----------------------------------------------------------------------------------------------------

    def take_reading(self):
        values = self.sensors.read() if self.sensors else {}
        if not values:
            return values
        self.seq += 1
        reading = {"boot": self.boot, "seq": self.seq, "values": values}
        if clock_is_set():
            reading["ts_ms"] = now_ms() + EPOCH_OFFSET * 1000
        else:  # corrected when sent, once the clock is set
            reading["clk"] = [self.clock["boot"], now_ms()]
        self.buffer.add(self.boot, self.seq, json.dumps(reading))
        self.last_values = values
        self.new_reading.set()
        return values

    def changed(self, values):
        threshold = self.twin.get("threshold") or 0
        if not threshold or not self.last_values:
            return True
        for key, value in values.items():
            old = self.last_values.get(key)
            if old is None or not isinstance(value, (int, float)) or abs(value - old) >= threshold:
                return True
        return False

    async def sample(self):
        sensors = self.sensors
        if sensors is None:
            return
        while True:
            try:
                values = sensors.read()
                if values and self.changed(values):
                    self.take_reading()
            except Exception as e:
                self.log("error", "sensor read failed: %s" % e)
            await asyncio.sleep(self.twin.get("period", 10))

    async def send(self, client):
        """Publish what the buffer holds, oldest first; again after each new reading. Ends with the connection.

        The walk keeps a file position between readings, so a new reading costs reading one line, not the file."""
        buffer = self.buffer
        pos, generation = 0, buffer.generation
        sent = {}  # type: dict[int, int]  # boot -> highest seq published on this connection
        while client.connected:
            self.new_reading.clear()
            while True:
                if generation != buffer.generation:  # compacted: the position is stale, `sent` skips what went
                    pos, generation = 0, buffer.generation
                records, next_pos = buffer.read(pos)
                if not records:
                    pos = next_pos
                    break
                for boot, seq, payload in records:
                    if seq <= sent.get(boot, 0) or buffer.is_acked(boot, seq):
                        continue
                    first = buffer.first(boot) if buffer.dropped else None
                    if (first and first > 1) or '"clk"' in payload:
                        body = self.stamp(json.loads(payload))
                        if first and first > 1:
                            body["first"] = first
                        payload = json.dumps(body)
                    await client.publish(self.root + "telemetry", payload, qos=1)
                    sent[boot] = seq
                pos = next_pos
            try:
                await asyncio.wait_for(self.new_reading.wait(), 30)
            except asyncio.TimeoutError:
                sent, pos = {}, 0  # nothing new for a while: offer the unacknowledged ones again
            if not buffer.unacked():
                self.acked_at = time.ticks_ms()
            elif time.ticks_diff(time.ticks_ms(), self.acked_at) > RESEND_MS:
                # Acks stopped moving while readings keep coming: one was lost on the way (a broker that refused it
                # under load, a gateway that could not commit it). Offer the unacknowledged ones again.
                sent, pos = {}, 0
                self.acked_at = time.ticks_ms()

    # -- connection -------------------------------------------------------------------------------------------------

    async def publish(self, channel, payload, qos=1):
        client = self.client
        if client is None or not client.connected:
            return False
        try:
            await client.publish(self.root + channel, payload, qos=qos)
            return True
        except Exception:
            return False

    def log(self, level, message):
        print("[%s] %s" % (level, message))
        client = self.client
        if client is not None and client.connected:
            asyncio.create_task(self.publish("log", json.dumps({"level": level, "message": message}), qos=0))

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

    def meta(self):
        try:
            rssi = self.wlan.status("rssi")
        except Exception:
            rssi = None
        return {"firmware": VERSION, "model": self.cfg.get("model", "esp32-sensor"), "boot": self.boot,
                "resources": self.sensors.resources() if self.sensors else [], "rssi": rssi,
                "free_heap": gc.mem_free(), "buffered": self.buffer.unacked(), "dropped": self.buffer.dropped,
                "safe_mode": self.safe_mode, "reset_cause": self.reset_cause,
                "transport": "serial" if self.serial else "mqtt", "controls": CONTROLS, "commands": COMMANDS}

    def make_client(self):
        cfg = self.cfg
        if cfg.get("transport") == "serial":
            from seriallink import SerialLink

            u = cfg.get("uart", {})
            uart = machine.UART(u.get("id", 1), baudrate=u.get("baud", 115200), tx=u.get("tx", 17), rx=u.get("rx", 16))
            return SerialLink(uart, self.id, cfg["password"], self.root, timeout=cfg.get("timeout", 10))
        return MQTTClient(self.id, cfg["broker_host"], cfg.get("broker_port", 1883), self.id, cfg["password"],
                          keepalive=cfg.get("keepalive", 15), will=(self.root + "status", "offline"),
                          timeout=cfg.get("timeout", 10))

    async def session(self):
        client = self.client_factory()
        client.on_message = self.on_message
        client.on_oversize = self.on_oversize
        await client.connect()
        self.client = client
        self.last_broker = time.ticks_ms()
        reader = asyncio.create_task(client.run())
        sender = None
        try:
            self.clock_set.clear()
            await client.subscribe([self.root + "ack", self.root + "twin/desired", self.root + "cmd",
                                    self.root + "time"])
            self.sync_ntp()
            # retained like the will, so a broker that keeps retained messages never shows a stale `offline`
            await client.publish(self.root + "status", "online", qos=1, retain=True)
            await client.publish(self.root + "meta", json.dumps(self.meta()), qos=1)
            self.log("info", "online, boot %d after a %s reset%s"
                     % (self.boot, self.reset_cause, " (safe mode)" if self.safe_mode else ""))
            try:  # readings taken before the clock was set go out once it is, with their true time
                await asyncio.wait_for(self.clock_set.wait(), CLOCK_WAIT_MS / 1000)
            except asyncio.TimeoutError:
                pass
            sender = asyncio.create_task(self.send_until_closed(client))
            await reader  # returns or raises when the connection ends
        finally:
            # the gateway was there until now: `reboot_after` counts from the end of a session, not its start
            self.last_broker = time.ticks_ms()
            reader.cancel()
            if sender is not None:
                sender.cancel()
            await client.close()
            self.client = None

    async def send_until_closed(self, client):
        try:
            await self.send(client)
        except Exception as e:
            print("send failed:", repr(e))
            await client.close()  # the reader then ends the session

    async def connection(self):
        delay = 1
        while True:
            wifi = False
            try:
                wifi = await self.wifi()
                if wifi:
                    await self.session()
                    delay = 1
            except Exception as e:
                print("connection lost:", repr(e))
            if time.ticks_diff(time.ticks_ms(), self.last_broker) > self.cfg.get("reboot_after", 600) * 1000:
                self.buffer.flush()
                machine.reset()  # a long time without the gateway: start afresh
            if not wifi:
                delay = 1  # back off from the broker, not from the Wi-Fi: keep looking for it
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30)

    async def watchdog(self):
        timeout = self.cfg.get("watchdog_ms", 60000)
        wdt = machine.WDT(timeout=timeout)
        while True:
            wdt.feed()
            await asyncio.sleep(min(5, timeout / 4000))  # fed from the event loop: a blocked loop resets the board

    async def main(self):
        tasks = [asyncio.create_task(self.connection()), asyncio.create_task(self.watchdog())]
        if self.sensors is not None:
            tasks.append(asyncio.create_task(self.sample()))
        await asyncio.gather(*tasks)


def run():
    cfg = load_json("config.json", None)
    if cfg is None:
        print("no config.json: flash the device with `edgetrio flash`")
        return
    state = load_json(STATE_FILE, {"boot": 0, "failed_boots": 0})
    safe = state.get("failed_boots", 0) > cfg.get("safe_after", 5)
    node = Node(cfg, state, safe)
    asyncio.run(node.main())
