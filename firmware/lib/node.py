# The sensor node's application: telemetry through the flash buffer, the twin and commands. The link to the gateway
# (Wi-Fi, the session, reconnects) is in link.py, the clock in clock.py. Every failure path leads back to the link's
# reconnect loop; readings leave the buffer only on the gateway's ack.
import asyncio
import gc
import json
import time

import machine

from buffer import Buffer
from clock import Clock
from link import Link

VERSION = "0.1.0"
STATE_FILE = "state.json"
RESEND_MS = 30000  # no ack progress this long with readings outstanding: send them again
TWIN_KEYS = ("period", "led", "threshold")
# what the twin keys and commands are, told in meta so a gateway can offer them (switches, numbers, buttons)
CONTROLS = [{"name": "led", "type": "bool"}, {"name": "period", "type": "float", "unit": "s", "min": 0.1, "max": 86400},
            {"name": "threshold", "type": "float", "min": 0}]
COMMANDS = ["ping", "blink", "read_now", "reboot", "rollback"]
RESET_CAUSES = {1: "power-on", 2: "hard", 3: "watchdog", 4: "deep sleep", 5: "soft"}
CLOCK_WAIT_MS = 2000  # after connecting, how long readings wait for the gateway's time

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


def changed(threshold, last, values):
    """Whether a reading differs enough from the last one sent to be sent (always, without a threshold)."""
    if not threshold or not last:
        return True
    for key, value in values.items():
        old = last.get(key)
        if old is None or not isinstance(value, (int, float)) or abs(value - old) >= threshold:
            return True
    return False


class Node:
    """One board: its sensors sampled into the flash buffer, sent until acknowledged, its twin and its commands."""

    def __init__(self, cfg, state, safe_mode=False):
        self.cfg = cfg
        self.state = state
        self.safe_mode = safe_mode
        self.id = cfg["device_id"]
        self.root = "edgetrio/%s/" % self.id
        self.boot = state["boot"]
        self.reset_cause = RESET_CAUSES.get(machine.reset_cause(), "unknown")  # a watchdog reset tells of a hang
        self.seq = 0
        self.misses = 0  # a battery board's sessions in a row that found no gateway (it then connects less often)
        if self.reset_cause == "deep sleep":  # a battery board's wake: the same boot goes on where it slept
            memory = machine.RTC().memory()
            try:
                kept = json.loads(memory) if memory else [0, 0]  # [boot, seq, misses]
                boot, seq = kept[0], kept[1]
            except (ValueError, IndexError, TypeError):
                boot, seq, kept = 0, 0, []
            if boot == self.boot:
                self.seq = seq
                self.misses = kept[2] if len(kept) > 2 else 0
            else:  # nothing kept (cannot be told where the boot was): a new boot, so no seq is used twice
                self.boot = state["boot"] = self.boot + 1
                save_json(STATE_FILE, state)
        self.twin = state.get("twin") or {"period": cfg.get("period", 10), "led": False, "threshold": 0}
        self.buffer = Buffer("buffer.log", cfg.get("buffer", 500))
        self.firmware = load_json("firmware.json", {})  # which bundle runs, and whether it is still a trial
        # receiving an update: the sensors stay off so the transfer has the heap (a few seconds to a minute)
        self.updating = bool(self.firmware.get("receive"))
        self.board = None  # what is wired to it (safe mode leaves it alone: a driver may be what crashed)
        if not safe_mode and not self.updating:
            from components import Board

            self.board = Board(cfg.get("components") or [])
            for name, component in self.board.outputs.items():
                if component.spec.get("restore") and name in self.twin:
                    self.board.write(name, self.twin[name])
                else:  # off at boot, and reported so: a switch shows off, not unknown, until it is set
                    self.twin[name] = component.device.read()[""]
            gc.collect()  # what importing the drivers left behind, before the session's buffers
        self.led = machine.Pin(cfg.get("led_pin", 2), machine.Pin.OUT)
        self.led.value(1 if self.twin.get("led") else 0)
        self.link = Link(cfg, self.id, self.root, self.log)
        self.new_reading = asyncio.Event()
        self.acked_at = time.ticks_ms()
        self.last_values = {}
        self.clock = Clock(state, self.boot, self.save_state)
        self.healthy = False
        self.version = VERSION
        self.ota = None  # the update being received, made at the first `ota` message
        self.batch = max(1, min(100, cfg.get("batch", 10)))  # readings per telemetry message when catching up
        self.woke = time.ticks_ms()
        self.heard = time.ticks_ms()  # the last message from the gateway
        self.running = 0  # commands and desired changes being applied

    def save_state(self):
        save_json(STATE_FILE, self.state)

    # -- messages from the gateway --------------------------------------------------------------------------------

    def run_task(self, coro):
        """Run a message's work beside the session, counted while it runs (a battery board sleeps only after)."""
        self.running += 1

        async def counted():
            try:
                await coro
            finally:
                self.running -= 1

        asyncio.create_task(counted())

    def on_message(self, topic, payload):
        self.heard = time.ticks_ms()
        channel = topic[len(self.root):]
        if channel == "ota":  # a JSON header line, then raw bytes; ota.py is imported only for an update
            fw = self.firmware
            if self.ota is None and payload.startswith(b'{"op": "begin"'):  # asked what runs: at every reconnect
                bundle = json.loads(payload).get("bundle")
                if bundle and bundle == fw.get("trial_bundle" if fw.get("trial") else "bundle"):
                    asyncio.create_task(self.link.publish("ota/status", json.dumps(
                        {"bundle": bundle, "state": "trial" if fw.get("trial") else "confirmed", "version": VERSION})))
                    return
            from ota import receive

            receive(self, payload)
            return
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
                self.save_state()
                if self.firmware.get("trial"):  # and so does the firmware it tried
                    from trial import confirm

                    asyncio.create_task(confirm(self))
        elif channel == "time":
            self.clock.set(body.get("unix_ms"))
        elif channel == "twin/desired":
            self.run_task(self.apply_desired(body.get("state") or {}))
        elif channel == "cmd":
            from commands import command  # imported at the first command: a board that gets none saves the heap

            self.run_task(command(self, body))

    def on_oversize(self, topic, size, head):
        if topic[len(self.root):] != "cmd":
            self.log("warning", "skipped a %d-byte message on %s" % (size, topic))
            return
        from commands import too_large

        too_large(self, size, head)

    async def apply_desired(self, desired):
        rejected = {}
        board = self.board
        for key, value in desired.items():
            if board is not None and key in board.outputs:
                reason = board.check_output(key, value)
                if reason is None:
                    board.write(key, value)
            else:
                reason = check_twin(key, value)
                if reason is None and key == "period" and board is not None:
                    board.reschedule()
            if reason:
                rejected[key] = reason
            else:
                self.twin[key] = value
        self.led.value(1 if self.twin.get("led") else 0)
        self.state["twin"] = self.twin
        self.save_state()
        reported = dict(self.twin)
        reported["rejected"] = rejected or None  # null clears an earlier rejection
        await self.link.publish("twin/reported", json.dumps({"state": reported}))
        self.new_reading.set()  # a new period takes effect now

    # -- telemetry ----------------------------------------------------------------------------------------------------

    def take_reading(self, values=None):
        """Buffer a reading: the values given, or all the board's sensors read now."""
        if values is None:
            values = self.board.read(self.twin.get("period", 10), True) if self.board else {}
        if not values:
            return values
        self.seq += 1
        reading = {"boot": self.boot, "seq": self.seq, "values": values}
        self.clock.mark(reading)  # an unset clock's time is corrected when sent, once the clock is set
        self.buffer.add(self.boot, self.seq, json.dumps(reading))
        self.last_values = values
        self.new_reading.set()
        return values

    async def sample(self):
        """Read each component when it is due (its interval, else the period) and buffer what changed enough; an
        input's change is buffered at once (polled every 50 ms)."""
        board = self.board
        if board is None:
            return
        for error in board.errors:
            self.log("error", "component not started: " + error)
        while True:
            try:
                values = board.read(self.twin.get("period", 10))
                for failure in board.failed:
                    self.log("error", "sensor read failed: " + failure)
                if values and changed(self.twin.get("threshold"), self.last_values, values):
                    self.take_reading(values)
                for _ in range(20 if board.inputs else 0):
                    now = board.changes()
                    if now:
                        self.take_reading(now)
                    await asyncio.sleep(0.05)
            except Exception as e:
                self.log("error", "sensor read failed: %s" % e)
            await asyncio.sleep(board.wait(self.twin.get("period", 10)) if not board.inputs else 0)

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
                records, next_pos = buffer.read(pos, self.batch)
                if not records:
                    pos = next_pos
                    break
                batch = []  # type: list  # readings of one boot going out in one message
                sent_boot = 0
                for boot, seq, payload in records:
                    if seq <= sent.get(boot, 0) or buffer.is_acked(boot, seq):
                        continue
                    first = buffer.first(boot) if buffer.dropped else None
                    if (first and first > 1) or b'"clk"' in payload:
                        body = self.clock.stamp(json.loads(payload))
                        if first and first > 1:
                            body["first"] = first
                        payload = json.dumps(body)
                    if batch and boot != sent_boot:
                        await self.publish_readings(client, batch)
                        batch = []
                    batch.append(payload)
                    sent[boot] = seq
                    sent_boot = boot
                pos = next_pos
                if batch:
                    await self.publish_readings(client, batch)
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

    async def publish_readings(self, client, batch):
        """One reading as it is; several (catching up) as one batch message, acknowledged by the same watermark.

        A heap too fragmented for the message halves the batch, for the rest of this boot: what did not go out is
        sent in smaller ones (the gateway stores a reading it already has once, should the first one have gone)."""
        try:
            parts = [b'{"batch": [']  # type: list
            for reading in batch:
                parts.append(reading)
                parts.append(b", ")
            parts[-1] = b"]}"
            await client.publish(self.root + "telemetry", batch[0] if len(batch) == 1 else parts, qos=1)
        except MemoryError:
            if len(batch) == 1:
                raise
            parts = []
            half = len(batch) // 2
            if half < self.batch:
                self.batch = half
                print("[warning] heap too fragmented for %d readings in a message: %d from now on" % (len(batch), half))
            gc.collect()
            await self.publish_readings(client, batch[:half])
            await self.publish_readings(client, batch[half:])

    # -- the gateway ------------------------------------------------------------------------------------------------

    def log(self, level, message):
        print("[%s] %s" % (level, message))
        client = self.link.client
        if client is not None and client.connected:
            asyncio.create_task(self.link.publish("log", json.dumps({"level": level, "message": message}), qos=0))

    def meta(self):
        fw = self.firmware
        meta = {"firmware": VERSION, "bundle": (fw.get("trial_bundle" if fw.get("trial") else "bundle") or "")[:12],
                "model": self.cfg.get("model", "esp32-sensor"), "boot": self.boot,
                "resources": self.board.resources() if self.board else [], "rssi": self.link.rssi(),
                "free_heap": gc.mem_free(), "buffered": self.buffer.unacked(), "dropped": self.buffer.dropped,
                "safe_mode": self.safe_mode, "reset_cause": self.reset_cause,
                "transport": "serial" if self.link.serial else "mqtt", "controls": CONTROLS, "commands": COMMANDS}
        if fw.get("trial"):  # said only when so: meta is the largest message a board sends
            meta["trial"] = True
        if self.updating:
            meta["updating"] = True
        return meta

    async def greet(self, client, with_meta=True):
        """A new session: subscribe, say online with what this board is, and wait a little for the time."""
        root = self.root
        self.clock.known.clear()
        await client.subscribe([root + "ack", root + "twin/desired", root + "cmd", root + "time", root + "ota"])
        host = self.cfg.get("ntp_host")
        if host and not self.link.serial:
            self.clock.sync_ntp(host)
        # retained like the will, so a broker that keeps retained messages never shows a stale `offline`
        await client.publish(root + "status", "online", qos=1, retain=True)
        if with_meta:
            gc.collect()  # meta is the largest message a board sends
            await client.publish(root + "meta", json.dumps(self.meta()), qos=1)
        if with_meta:  # not at each wake of a battery board
            self.log("info", "online, boot %d after a %s reset%s" % (
                self.boot, self.reset_cause, " (safe mode)" if self.safe_mode else
                " (receiving a firmware update)" if self.updating else ""))
        failed = self.firmware.get("failed")
        if failed:  # went back to the firmware that worked: say why, at every connect until the next update
            await client.publish(root + "ota/status", json.dumps(
                {"bundle": failed.get("bundle"), "state": "rolled back", "reason": failed.get("reason")}), qos=1)
        try:  # readings taken before the clock was set go out once it is, with their true time
            await asyncio.wait_for(self.clock.known.wait(), CLOCK_WAIT_MS / 1000)
        except asyncio.TimeoutError:
            pass

    async def watchdog(self):
        timeout = self.cfg.get("watchdog_ms", 60000)
        wdt = machine.WDT(timeout=timeout)
        while True:
            wdt.feed()
            await asyncio.sleep(min(5, timeout / 4000))  # fed from the event loop: a blocked loop resets the board

    async def main(self):
        if self.cfg.get("battery") and self.board is not None and not self.firmware.get("trial"):
            from battery import wake  # deep sleep between readings; an update or a trial runs awake

            asyncio.create_task(self.watchdog())  # a hung wake must not drain the battery
            await wake(self)
            return
        tasks = [asyncio.create_task(self.link.run(self, self.buffer.flush)), asyncio.create_task(self.watchdog())]
        if self.board is not None:
            tasks.append(asyncio.create_task(self.sample()))
        if self.firmware.get("trial"):
            from trial import watch

            tasks.append(asyncio.create_task(watch(self)))
        elif self.updating:
            from ota import watch

            tasks.append(asyncio.create_task(watch(self)))
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
